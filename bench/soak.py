"""Soak: memshadow under mixed traffic with shadowing and periodic faults, for as long as
asked, with what an operator would watch plotted over time.

    python bench/soak.py --minutes 30            # make soak ARGS="--minutes 30"
    python bench/soak.py --minutes 5 --fault-every 30 --rate 1.0 --connections 16

Starts memcached, redis-server and a real memshadow process (`python -m proxy`, the shadow
in its worker process) on free loopback ports. Client threads run the verdict hammer's
whole command mix (keys of their own and shared hot keys, 2 s TTLs, meta and noreply
writes), reconnecting after an error. Every --fault-every seconds one fault, in turn:
Redis restarted (no persistence: it comes back empty), Memcached restarted (empty too), a
burst of --burst client connections opened at once, each asking `version`, held 2 s.

Every --interval seconds it samples the proxy and its worker from /proc (RSS, open fds,
threads), memshadow's /metrics (event loop tasks, comparisons, mismatches, drops by
reason, client connections) and the clients' own figures (operations, p99 latency,
errors). It writes, under bench/results/soak-<timestamp>/: samples.csv, summary.md (one
row per --window minutes, the fault log and the verdict lines) and soak.png (matplotlib,
when installed: `make soak` installs it).

Client errors are expected only while Memcached is down (a restart): they are counted
apart. Redis-side faults must cost clients nothing, and nothing may be a mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import random
import resource
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import (  # noqa: E402
    Processes,
    metric_total,
    scrape,
    start_memcached,
    start_memshadow,
    start_redis,
)
from pymemcache.client.base import Client  # noqa: E402

from tests.integration.hammer import full_mix  # noqa: E402  (the suite's command mix)

FAULTS = ("redis_restart", "memcached_restart", "burst")


# -- the clients ----------------------------------------------------------------------------


@dataclass
class ClientFigures:
    """What one client thread saw since the sampler last took it (swapped, not locked)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0


class Load:
    """Client threads running the hammer's mix, reconnecting after errors."""

    def __init__(self, port: int, connections: int, seed: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.figures = [ClientFigures() for _ in range(connections)]
        shared = [f"hot{i}" for i in range(6)]
        self.threads = [
            threading.Thread(
                target=self._run,
                args=(i, [f"c{i}k{j}" for j in range(20)], shared, seed + i),
                daemon=True,
            )
            for i in range(connections)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def take(self) -> tuple[list[float], int]:
        """Latencies and errors of every thread since the last take."""
        latencies: list[float] = []
        errors = 0
        for i, old in enumerate(self.figures):
            self.figures[i] = ClientFigures()
            latencies += old.latencies
            errors += old.errors
        return latencies, errors

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)

    def _run(self, index: int, own: list[str], shared: list[str], seed: int) -> None:
        rng = random.Random(seed)
        keys = own + shared
        while not self.stop.is_set():
            client = Client(
                ("127.0.0.1", self.port), default_noreply=False, timeout=5, connect_timeout=5
            )
            try:
                while not self.stop.is_set():
                    key = rng.choice(own) if rng.random() < 0.75 else rng.choice(shared)
                    started = time.perf_counter()
                    full_mix(client, rng, key, keys)
                    self.figures[index].latencies.append(time.perf_counter() - started)
            except Exception:  # (any client-visible error: counted)
                self.figures[index].errors += 1
                time.sleep(0.05)
            finally:
                client.close()


def burst(port: int, count: int, hold: float = 2.0) -> tuple[int, int]:
    """`count` connections opened at once, each asking `version`, held, then closed:
    (answered, refused or failed)."""
    socks: list[socket.socket] = []
    answered = failed = 0
    try:
        for _ in range(count):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"version\r\n")
                socks.append(sock)
            except OSError:
                failed += 1
        for sock in socks:
            try:
                if sock.recv(100).startswith(b"VERSION"):
                    answered += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
        time.sleep(hold)
    finally:
        for sock in socks:
            sock.close()
    return answered, failed


# -- what is sampled ------------------------------------------------------------------------


def _status(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def process_figures(pid: int) -> dict[str, float]:
    """RSS (MB), fds and threads of the proxy and of its children (the shadow worker)."""
    out = {
        "proxy_rss_mb": _status(pid, "VmRSS") / 1024,
        "proxy_fds": len(os.listdir(f"/proc/{pid}/fd")),
        "proxy_threads": _status(pid, "Threads"),
        "worker_rss_mb": 0.0,
        "worker_fds": 0,
        "children": 0,
    }
    for child in _children(pid):
        with contextlib.suppress(OSError):
            out["worker_rss_mb"] += _status(child, "VmRSS") / 1024
            out["worker_fds"] += len(os.listdir(f"/proc/{child}/fd"))
            out["children"] += 1
    return out


def metric_figures(admin: int) -> dict[str, float]:
    samples = scrape(admin)
    total = metric_total
    out = {
        "tasks": total(samples, "memshadow_event_loop_tasks"),
        "client_connections": total(samples, "memshadow_client_connections"),
        "comparisons": total(samples, "memshadow_shadow_comparisons_total"),
        "mismatches": total(samples, "memshadow_shadow_mismatches_total"),
        "dropped": total(samples, "memshadow_shadow_dropped_total"),
        "shadow_errors": total(samples, "memshadow_shadow_errors_total"),
        "cas_map": total(samples, "memshadow_shadow_cas_map_entries"),
    }
    for name, labels, value in samples:
        if name == "memshadow_shadow_dropped_total" and value:
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[f"dropped:{reason}"] = value
    return out


def p99(latencies: list[float]) -> float:
    if not latencies:
        return float("nan")
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# -- the run --------------------------------------------------------------------------------


@dataclass
class Fault:
    at: float  # seconds since the start
    kind: str
    detail: str


def soak(args: argparse.Namespace, out: Path) -> tuple[list[dict[str, Any]], list[Fault], int]:
    """Run; (samples, faults, proxy log lines that are errors)."""
    procs = Processes(out)  # (their logs: out/memshadow.log, out/memcached.log...)
    memcached = start_memcached(procs, "-c", str(args.burst + 2048), threads=2)
    redis = start_redis(procs)
    config = out / "memshadow.yaml"
    config.write_text(
        f"listen: 127.0.0.1:0\nmemcached: 127.0.0.1:{memcached.port}\n"
        f"admin: 127.0.0.1:0\n"
        f"shadow:\n  redis: redis://127.0.0.1:{redis.port}/0\n  sample_rate: {args.rate}\n"
    )
    proc, port, admin = start_memshadow(procs, "--config", str(config))
    load = Load(port, args.connections, args.seed)
    samples: list[dict[str, Any]] = []
    faults: list[Fault] = []
    started = time.monotonic()
    until = started + args.minutes * 60
    next_sample = started + args.interval
    next_fault = started + args.fault_every
    memcached_down: list[tuple[float, float]] = []  # (from, to), seconds since the start
    turn = 0
    try:
        load.start()
        load.take()
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= next_fault:
                kind = FAULTS[turn % len(FAULTS)]
                turn += 1
                at = now - started
                if kind == "redis_restart":
                    redis.restart()
                    detail = "redis-server killed and started again, empty"
                elif kind == "memcached_restart":
                    memcached.restart()
                    memcached_down.append((at, time.monotonic() - started + 1.0))
                    detail = "memcached killed and started again, empty"
                else:
                    answered, failed = burst(port, args.burst)
                    detail = f"{args.burst} connections: {answered} answered, {failed} failed"
                faults.append(Fault(at, kind, detail))
                print(f"{at:7.0f} s  {kind}: {detail}", flush=True)
                next_fault += args.fault_every
            if now >= next_sample:
                latencies, errors = load.take()
                elapsed = now - started
                in_fault = any(a - args.interval <= elapsed <= b + 1 for a, b in memcached_down)
                row: dict[str, Any] = {
                    "t": round(elapsed, 1),
                    "ops_per_s": len(latencies) / args.interval,
                    "client_p99_ms": p99(latencies) * 1000,
                    "client_errors": errors,
                    "errors_outside_memcached_faults": 0 if in_fault else errors,
                }
                with contextlib.suppress(OSError):
                    row.update(process_figures(proc.pid))
                with contextlib.suppress(OSError):
                    row.update(metric_figures(admin))
                samples.append(row)
                next_sample += args.interval
            time.sleep(0.05)
    finally:
        load.join()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            proc.wait(30)
        procs.close()
    log_lines = (out / "memshadow.log").read_text(errors="replace").splitlines()
    bad = [line for line in log_lines if "Traceback" in line or " ERROR " in line]
    return samples, faults, len(bad)


# -- the report -----------------------------------------------------------------------------


def _median(rows: list[dict[str, Any]], name: str) -> float:
    values = [r[name] for r in rows if isinstance(r.get(name), int | float)]
    return statistics.median(values) if values else float("nan")


def report(
    args: argparse.Namespace,
    out: Path,
    samples: list[dict[str, Any]],
    faults: list[Fault],
    bad_log_lines: int,
) -> str:
    names = sorted({k for row in samples for k in row}, key=lambda k: (k != "t", k))
    with (out / "samples.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(samples)
    (out / "faults.json").write_text(json.dumps([f.__dict__ for f in faults], indent=1))
    window = args.window * 60
    lines = [
        f"# memshadow soak, {args.minutes:g} min, rate {args.rate:g}, "
        f"{args.connections} connections, a fault every {args.fault_every:g} s",
        "",
        "| minutes | ops/s | client p99 ms | client errors (outside Memcached restarts) | "
        "proxy RSS MB | worker RSS MB | cas map pairs | proxy fds | tasks | comparisons | "
        "mismatches | dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    start = 0.0
    last = samples[-1]["t"] if samples else 0.0
    while start < last:
        rows = [r for r in samples if start < r["t"] <= start + window]
        if rows:
            end = rows[-1]
            errors = sum(r["client_errors"] for r in rows)
            outside = sum(r["errors_outside_memcached_faults"] for r in rows)
            lines.append(
                f"| {start / 60:.0f}-{(start + window) / 60:.0f} "
                f"| {_median(rows, 'ops_per_s'):,.0f} | {_median(rows, 'client_p99_ms'):.2f} "
                f"| {errors} ({outside}) | {_median(rows, 'proxy_rss_mb'):.1f} "
                f"| {_median(rows, 'worker_rss_mb'):.1f} | {_median(rows, 'cas_map'):,.0f} "
                f"| {_median(rows, 'proxy_fds'):.0f} "
                f"| {_median(rows, 'tasks'):.0f} | {end.get('comparisons', 0):,.0f} "
                f"| {end.get('mismatches', 0):,.0f} | {end.get('dropped', 0):,.0f} |"
            )
        start += window
    lines += ["", "Faults:", ""]
    lines += [f"- {f.at / 60:5.1f} min: {f.kind}: {f.detail}" for f in faults]
    if samples:
        quarter = max(1, len(samples) // 4)
        head, tail = samples[:quarter], samples[-quarter:]
        drops = {k.split(":", 1)[1]: v for k, v in samples[-1].items() if k.startswith("dropped:")}
        lines += [
            "",
            "Verdict:",
            "",
            "- proxy RSS, median of the first and last quarter: "
            f"{_median(head, 'proxy_rss_mb'):.1f} -> {_median(tail, 'proxy_rss_mb'):.1f} MB; "
            f"worker {_median(head, 'worker_rss_mb'):.1f} -> "
            f"{_median(tail, 'worker_rss_mb'):.1f} MB",
            f"- proxy fds {_median(head, 'proxy_fds'):.0f} -> {_median(tail, 'proxy_fds'):.0f}; "
            f"event loop tasks {_median(head, 'tasks'):.0f} -> {_median(tail, 'tasks'):.0f}; "
            f"shadow worker processes at the end: {samples[-1].get('children', 0)}",
            f"- comparisons {samples[-1].get('comparisons', 0):,.0f}, "
            f"**mismatches {samples[-1].get('mismatches', 0):,.0f}**, dropped by reason {drops}",
            f"- client errors {sum(r['client_errors'] for r in samples)}, of which outside "
            f"Memcached restarts **{sum(r['errors_outside_memcached_faults'] for r in samples)}**",
            f"- error lines in memshadow's log: {bad_log_lines}",
        ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def plot(out: Path, samples: list[dict[str, Any]], faults: list[Fault]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (make soak installs it)")
        return False
    minutes = [r["t"] / 60 for r in samples]
    panels = [
        ("RSS (MB)", [("proxy_rss_mb", "proxy"), ("worker_rss_mb", "shadow worker")]),
        ("shadow cas map (pairs)", [("cas_map", "cas map")]),
        ("open fds", [("proxy_fds", "proxy"), ("worker_fds", "shadow worker")]),
        ("event loop tasks", [("tasks", "proxy")]),
        ("shadow drops (cumulative)", [("dropped", "dropped")]),
        ("mismatches (cumulative)", [("mismatches", "mismatches")]),
        ("client p99 (ms)", [("client_p99_ms", "p99")]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.2 * len(panels)), sharex=True)
    colors = {"redis_restart": "tab:red", "memcached_restart": "tab:purple", "burst": "tab:olive"}
    for ax, (title, series) in zip(axes, panels, strict=True):
        for name, label in series:
            ax.plot(minutes, [r.get(name, float("nan")) for r in samples], label=label)
        for fault in faults:
            ax.axvline(fault.at / 60, color=colors[fault.kind], alpha=0.35, linewidth=1)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("minutes (vertical lines: red Redis restart, purple Memcached "
                        "restart, olive connection burst)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=1.0, help="shadow sample rate")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    ap.add_argument("--burst", type=int, default=5000, help="connections in a burst")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--window", type=float, default=5.0, help="minutes per summary row")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the burst, and memshadow's
    needed = 2 * args.burst + 1000
    if hard < needed:
        print(f"the fd limit {hard} is under {needed}: the burst will see refusals")
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    out = args.out or ROOT / "bench" / "results" / f"soak-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    samples, faults, bad = soak(args, out)
    print(report(args, out, samples, faults, bad))
    if plot(out, samples, faults):
        print(f"plot: {out / 'soak.png'}")
    print(f"written to {out}")
    mismatches = samples[-1].get("mismatches", 0) if samples else 0
    return 1 if mismatches or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
