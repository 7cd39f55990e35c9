"""CPU per request of memshadow from two source trees, measured in the same run.

Usage:
    python bench/cpu_compare.py OLD_TREE NEW_TREE [--rounds 3] [--seconds 10]
                                [--rate 1.0] [--worker process|inline]

Both trees run the same memcaslap load (90% get, 16 connections) against one memcached, in
interleaved rounds; the shadow replays on one redis-server. What is compared is the CPU time
of memshadow's own processes (the proxy and its shadow worker: utime + stime from
/proc/PID/stat over the measured interval) divided by the requests memcaslap completed, so
the load generator's and the servers' CPU on a shared 2-core machine do not blur it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    HOST,
    Processes,
    cpu_seconds,
    free_port,
    start_memcached,
    start_redis,
    wait_ready,
)
from run import memcaslap_config, parse_memcaslap


def start_memshadow(tree: Path, mc_port: int, redis_port: int, args: argparse.Namespace):
    port, admin = free_port(), free_port()
    config = Path(tempfile.mkdtemp()) / "memshadow.yaml"
    config.write_text(f"shadow:\n  worker: {args.worker}\n")
    argv = [
        sys.executable, "-m", "proxy", "--config", str(config),
        "--listen", f"{HOST}:{port}", "--memcached", f"{HOST}:{mc_port}",
        "--admin", f"{HOST}:{admin}",
        "--redis", f"redis://{HOST}:{redis_port}/0", "--sample-rate", str(args.rate),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen(
        argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    why = wait_ready(proc, port, b"version\r\n", b"VERSION ", 15.0)
    if why is not None:
        raise RuntimeError(f"{tree}: {why}")
    time.sleep(1.0)  # the worker process is up
    return proc, port


def memcaslap(port: int, seconds: int, config: Path) -> dict:
    out = subprocess.run(
        ["memcaslap", "-s", f"{HOST}:{port}", "-T", "1", "-c", "16", "-t", f"{seconds}s",
         "-F", str(config), "-S", "1s"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return parse_memcaslap(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--worker", default="process")
    args = ap.parse_args()
    servers = Processes(Path(tempfile.mkdtemp(prefix="memshadow-cpu-compare-")))
    mc_port = start_memcached(servers, threads=2).port
    redis_port = start_redis(servers).port
    conf = servers.logdir / "load.cnf"
    memcaslap_config(conf, 32, 100, 0.9)
    results: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    try:
        for round_no in range(args.rounds):
            order = [("old", args.old), ("new", args.new)]
            random.shuffle(order)
            for name, tree in order:
                proc, port = start_memshadow(tree.resolve(), mc_port, redis_port, args)
                try:
                    memcaslap(port, 2, conf)  # warm-up
                    before = sum(cpu_seconds(proc.pid))
                    run = memcaslap(port, args.seconds, conf)
                    time.sleep(1.0)  # the shadow finishes what it was handed
                    used = sum(cpu_seconds(proc.pid)) - before
                finally:
                    os.killpg(proc.pid, signal.SIGINT)
                    proc.wait(15)
                per_request = used / run["ops"] * 1e6
                results[name].append((per_request, run["tps"]))
                print(
                    f"round {round_no + 1} {name}: {per_request:.1f} us CPU/request, "
                    f"{run['tps']:.0f} req/s",
                    flush=True,
                )
    finally:
        servers.close()
    for name, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        tps = statistics.median(r[1] for r in rows)
        print(f"{name}: median {cpu:.1f} us CPU/request (proxy + worker), {tps:.0f} req/s")


if __name__ == "__main__":
    main()
