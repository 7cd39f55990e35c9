"""Open-loop Memcached load at a fixed request rate (memcaslap's --tps does not throttle).

Requests are due at fixed times, t0 + i / rate, request i going to connection i mod N, and are
sent when due whether or not the answers to earlier ones have come back (a connection whose
target is slow pipelines them): the offered load does not bend to the target, so every target
is measured doing the same work. The mix is memcaslap's in bench/run.py: --get-ratio gets,
the rest sets, keys of --key-size bytes drawn uniformly from --keys keys, values of
--value-size bytes. Latency is counted from the time a request was due (not when it was
written), so a target that falls behind shows it in full; on a busy machine that includes
the load generator's own late wake-ups, so the time from the write to the answer is given
too ("service_*"), and how late the writes were ("send_lag_*"). Prints one JSON object:

    {"offered_rate", "achieved_rate", "sent", "completed", "errors", "unanswered",
     "p50", "p90", "p99", "p999", "max", "mean", "service_p50", "service_p99",
     "send_lag_p50", "send_lag_p99" (microseconds), ...}

    python bench/loadgen.py --target 127.0.0.1:11211 --rate 5000 --seconds 10 [--prefill]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from collections import deque
from typing import Any

import uvloop

GET, SET = 0, 1


def percentile(sorted_values: list[int], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a sorted list, or None when empty."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return float(sorted_values[int(rank) - 1])


class Connection(asyncio.Protocol):
    """One client connection: writes requests, pairs answers with them in order and records
    each one's latency (from its due time) in nanoseconds."""

    def __init__(self, latencies: list[tuple[int, int]], errors: dict[str, int]) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.pending: deque[tuple[int, int, int]] = deque()  # (kind, due, written), ns
        self.buffer = bytearray()
        self.latencies = latencies  # (due -> answer, written -> answer), ns
        self.errors = errors
        self.closed = asyncio.get_running_loop().create_future()
        self.value_left = 0  # bytes of a VALUE block still to skip (data + \r\n)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending:
            self.errors["connection_lost"] = self.errors.get("connection_lost", 0) + 1
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, kind: int, due: int, written: int, payload: bytes) -> None:
        assert self.transport is not None
        self.pending.append((kind, due, written))
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buf = self.buffer
        buf += data
        pos = 0
        while True:
            if self.value_left:
                take = min(self.value_left, len(buf) - pos)
                pos += take
                self.value_left -= take
                if self.value_left:
                    break
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = bytes(buf[pos:end])
            pos = end + 2
            if line.startswith(b"VALUE "):
                self.value_left = int(line.rsplit(b" ", 1)[1]) + 2
                continue
            if not self.pending:
                self.errors["unexpected"] = self.errors.get("unexpected", 0) + 1
                continue
            kind, due, written = self.pending.popleft()
            if (kind == GET and line != b"END") or (kind == SET and line != b"STORED"):
                word = line.split(b" ", 1)[0].decode(errors="replace")[:20] or "empty"
                self.errors[word] = self.errors.get(word, 0) + 1
            else:
                self.latencies.append((now - due, now - written))
        del buf[:pos]


async def connect(
    host: str, port: int, latencies: list[tuple[int, int]], errors: dict[str, int]
) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(latencies, errors), host, port)
    return conn


def requests(args: argparse.Namespace, rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    """(get payloads, set payloads), one of each per key."""
    value = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(args.value_size))
    keys = [(b"%0*d" % (args.key_size, i))[-args.key_size :] for i in range(args.keys)]
    gets = [b"get %s\r\n" % key for key in keys]
    sets = [b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value) for key in keys]
    return gets, sets


async def prefill(host: str, port: int, sets: list[bytes]) -> None:
    """Every key stored once, so that gets find values (as memcaslap's do)."""
    reader, writer = await asyncio.open_connection(host, port)
    for start in range(0, len(sets), 100):
        chunk = sets[start : start + 100]
        writer.write(b"".join(chunk))
        for _ in chunk:
            line = await reader.readline()
            if line != b"STORED\r\n":
                raise RuntimeError(f"prefill: unexpected answer {line!r}")
    writer.close()
    await writer.wait_closed()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port_text = args.target.rpartition(":")
    port = int(port_text)
    rng = random.Random(args.seed)
    gets, sets = requests(args, rng)
    if args.prefill:
        await prefill(host, port, sets)
    latencies: list[tuple[int, int]] = []
    errors: dict[str, int] = {}
    conns = [await connect(host, port, latencies, errors) for _ in range(args.connections)]
    # The whole schedule is drawn before the clock starts: no choice on the hot loop.
    total = int(args.rate * args.seconds)
    plan = [
        (GET, rng.randrange(args.keys)) if rng.random() < args.get_ratio
        else (SET, rng.randrange(args.keys))
        for _ in range(total)
    ]  # fmt: skip
    interval = 1e9 / args.rate
    gc.disable()  # the loadgen's own pauses would read as the target's latency
    loop = asyncio.get_running_loop()
    start = time.perf_counter_ns()
    sent = 0
    while sent < total:
        now = time.perf_counter_ns()
        due_count = min(total, int((now - start) / interval) + 1)
        while sent < due_count:
            kind, key = plan[sent]
            conns[sent % len(conns)].send(
                kind, start + int(sent * interval), now, gets[key] if kind == GET else sets[key]
            )
            sent += 1
        next_due = start + sent * interval
        delay = (next_due - time.perf_counter_ns()) / 1e9
        # uvloop's timers have a millisecond's resolution: requests due within it go together
        # (on different connections), the next ones wait for the following tick.
        await asyncio.sleep(max(0.0, delay))
    send_end = time.perf_counter_ns()
    # The answers still on their way: at most --drain seconds.
    deadline = loop.time() + args.drain
    while any(c.pending for c in conns) and loop.time() < deadline:
        await asyncio.sleep(0.005)
    end = time.perf_counter_ns()
    gc.enable()
    unanswered = sum(len(c.pending) for c in conns)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.gather(*(c.closed for c in conns))
    lat = sorted(due for due, _ in latencies)
    service = sorted(written for _, written in latencies)
    lag = sorted(due - written for due, written in latencies)
    completed = len(lat)
    elapsed = (send_end - start) / 1e9
    result: dict[str, Any] = {
        "target": args.target,
        "connections": args.connections,
        "offered_rate": args.rate,
        "seconds": args.seconds,
        "sent": sent,
        "completed": completed,
        "answered": sent - unanswered,  # errors included: the target's work
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "unanswered": unanswered,
        "achieved_rate": (sent - unanswered) / elapsed if elapsed > 0 else None,
        "send_seconds": elapsed,
        "drain_seconds": (end - send_end) / 1e9,
        "mean": sum(lat) / completed / 1000 if completed else None,
    }
    for prefix, values in (("", lat), ("service_", service), ("send_lag_", lag)):
        for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100)):
            value = percentile(values, q)
            result[prefix + name] = None if value is None else value / 1000
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("--rate", type=float, default=5000.0, help="requests/s, all connections")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--keys", type=int, default=10000, help="key space (default 10000)")
    ap.add_argument("--key-size", type=int, default=32)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--get-ratio", type=float, default=0.9)
    ap.add_argument("--prefill", action="store_true", help="set every key first")
    ap.add_argument("--drain", type=float, default=5.0, help="seconds to wait for answers")
    ap.add_argument("--seed", type=int, default=1)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.connections <= 0 or args.keys <= 0:
        raise SystemExit("--rate, --connections and --keys must be positive")
    result = uvloop.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if not result["errors"] and not result["unanswered"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
