"""Latency prober: sequential `get` on one blocking TCP connection, paced.

Runs alongside the memcaslap load and times every request with
time.perf_counter_ns() from just before sendall() to the end of `END\\r\\n`.
It stops on SIGTERM/SIGINT (or after --max-seconds) and prints one JSON object
with percentiles in microseconds.

Blocking sockets (not asyncio) keep the prober's own overhead and jitter as
small as Python allows; pacing (--rate) keeps its extra load negligible.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

KEY = b"memshadow:bench:probe:key:000001"  # 32 bytes, like the memcaslap keys


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    rank = max(1, -(-len(sorted_vals) * q // 100))  # ceil(n*q/100), at least 1
    return sorted_vals[int(rank) - 1]


def summarize(lat_us: list[float]) -> dict[str, Any]:
    s = sorted(lat_us)
    out: dict[str, Any] = {"n": len(s)}
    if s:
        out.update(
            mean=sum(s) / len(s),
            min=s[0],
            p50=percentile(s, 50),
            p90=percentile(s, 90),
            p99=percentile(s, 99),
            p999=percentile(s, 99.9),
            max=s[-1],
        )
    return out


def recv_until(sock: socket.socket, buf: bytearray, terminator: bytes) -> None:
    while not buf.endswith(terminator):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by target")
        buf += chunk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s (pacing)")
    ap.add_argument("--delay", type=float, default=0.3, help="seconds before first request")
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument(
        "--realtime",
        type=int,
        default=0,
        metavar="PRIO",
        help="try SCHED_FIFO with this priority (0 = normal scheduling)",
    )
    a = ap.parse_args()

    sched = "normal"
    if a.realtime > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(a.realtime))
            sched = f"SCHED_FIFO:{a.realtime}"
        except (OSError, AttributeError) as exc:
            sched = f"normal (SCHED_FIFO refused: {exc})"

    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    host, _, port = a.target.rpartition(":")
    lat_us: list[float] = []
    errors: list[str] = []
    misses = 0
    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        value = b"p" * a.value_size
        buf = bytearray()
        sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (KEY, len(value), value))
        recv_until(sock, buf, b"\r\n")
        if bytes(buf) != b"STORED\r\n":
            raise RuntimeError(f"unexpected reply to set: {bytes(buf)!r}")
        request = b"get %s\r\n" % KEY
        expected_len = len(b"VALUE %s 0 %d\r\n" % (KEY, len(value))) + len(value) + 7
        interval = 1.0 / a.rate
        time.sleep(a.delay)
        gc.disable()
        clock = time.perf_counter_ns
        deadline = time.monotonic() + a.max_seconds
        next_at = time.monotonic()
        while not stop and next_at < deadline:
            buf.clear()
            t0 = clock()
            sock.sendall(request)
            recv_until(sock, buf, b"END\r\n")
            t1 = clock()
            lat_us.append((t1 - t0) / 1000.0)
            if len(buf) != expected_len:
                misses += 1
            next_at += interval
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            else:
                next_at = now  # behind schedule: do not burst to catch up
        sock.close()
    except (OSError, RuntimeError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    result = summarize(lat_us)
    result.update(misses=misses, errors=errors, rate=a.rate, sched=sched)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
