"""Shadow figures under the benchmark's load: verdict counts, shadow lag p50/p99 and Redis
commands per Memcached request, read from memshadow's own /metrics after a memcaslap run.

    python bench/shadow_figures.py --rate 1.0 --seconds 8

Starts memcached, redis-server and memshadow on free loopback ports, runs memcaslap
(16 connections, 90/10 get/set, as bench/run.py does), then scrapes the admin port.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    HOST,
    Processes,
    Samples,
    bucket_quantile,
    histogram_buckets,
    scrape,
    start_memcached,
    start_memshadow,
    start_redis,
)
from harness import metric_total as total
from run import LoadSpec, memcaslap_config, parse_memcaslap, run_memcaslap


def histogram_quantile(samples: Samples, name: str, q: float) -> float:
    bound = bucket_quantile(histogram_buckets(samples, name), q)
    return float("nan") if bound is None else bound


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--config", help="memshadow YAML config (e.g. shadow.worker: inline)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="memshadow-shadowfig-"))
    procs = Processes(workdir)
    try:
        mc_port, redis_port = start_memcached(procs).port, start_redis(procs).port
        proxy, port, admin = start_memshadow(
            procs,
            "--listen", f"{HOST}:0", "--memcached", f"{HOST}:{mc_port}", "--admin", f"{HOST}:0",
            "--redis", f"redis://{HOST}:{redis_port}/0", "--sample-rate", str(args.rate),
            *(["--config", args.config] if args.config else []),
        )  # fmt: skip
        cfg = workdir / "memcaslap.cnf"
        memcaslap_config(cfg, 32, 100, 0.9)
        spec = LoadSpec(
            memcaslap=shutil.which("memcaslap") or "/usr/bin/memcaslap",
            cfg=cfg, concurrency=16, threads=1, tps=0, probe_rate=0, probe_cpus=None,
            probe_rt=0, value_size=100,
        )  # fmt: skip
        rc, out = run_memcaslap(spec, port, args.seconds)
        if rc != 0:
            print(out[-500:], file=sys.stderr)
            return 1
        time.sleep(2)  # let the shadow finish what it was handed
        s = scrape(admin)
        requests = total(s, "memshadow_requests_total")
        shadowed = total(s, "memshadow_shadow_requests_total")
        workers = _children(proxy.pid)
        tps = parse_memcaslap(out)["tps"]
        print(
            f"rate {args.rate}: {tps:,.0f} ops/s, {requests:,.0f} client "
            f"requests, {shadowed:,.0f} shadowed; RSS memshadow {_rss_mib(proxy.pid):.1f} MiB"
            + "".join(f", worker {_rss_mib(pid):.1f} MiB" for pid in workers)
        )
        for outcome in ("match", "mismatch", "noise"):
            n = total(s, "memshadow_shadow_comparisons_total", f'outcome="{outcome}"')
            print(f"  {outcome:9s} {n:,.0f}")
        for name in ("memshadow_shadow_dropped_total", "memshadow_shadow_skipped_total",
                     "memshadow_shadow_errors_total"):  # fmt: skip
            print(f"  {name.split('_shadow_')[1]:9s} {total(s, name):,.0f}")
        redis = total(s, "memshadow_shadow_redis_commands_total")
        print(f"  redis commands per shadowed request: {redis / max(shadowed, 1):.2f}")
        for q in (0.5, 0.99):
            lag = histogram_quantile(s, "memshadow_shadow_lag_seconds", q)
            print(f"  shadow lag p{int(q * 100)}: <= {lag * 1000:.2f} ms (bucket bound)")
        return 0
    finally:
        procs.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _children(pid: int) -> list[int]:
    """Child processes of pid (the shadow worker, in shadow.worker: process mode)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.extend(int(c) for c in (task / "children").read_text().split())
    return children


if __name__ == "__main__":
    raise SystemExit(main())
