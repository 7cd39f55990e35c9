"""Micro benchmark of the client path's own Python cost, with no sockets and no event loop.

Replays memcaslap-shaped traffic (32-byte keys, 100-byte values, one request per chunk, 90/10
get/set) through parse_line, RequestFramer.feed, ResponseFramer.feed and a whole ClientSession
(data_received + upstream_data on fake transports), and prints ns per request (best of N).
Usage: python bench/framing.py [--repeat 7] [--n 200000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config import Config
from proxy.memcache.request import Request, RequestFramer, parse_line
from proxy.memcache.response import ResponseFramer
from proxy.metrics import ProxyMetrics
from proxy.server import ClientSession, ProxyServer, _Upstream

KEY = b"k" * 32
VALUE = b"v" * 100
GET = b"get " + KEY + b"\r\n"
SET = b"set " + KEY + b" 0 0 100\r\n" + VALUE + b"\r\n"
HIT = b"VALUE " + KEY + b" 0 100\r\n" + VALUE + b"\r\nEND\r\n"
MISS = b"END\r\n"
STORED = b"STORED\r\n"


def workload(n: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """(request chunk, reply chunk) pairs: 90% get (90% hits), 10% set."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.9:
            out.append((GET, HIT if rng.random() < 0.9 else MISS))
        else:
            out.append((SET, STORED))
    return out


def best(fn: Callable[[], None], n: int, repeat: int) -> float:
    """ns per item, best of `repeat` runs of `fn` (which handles n items)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return min(times) / n


class _Transport:
    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name: str) -> Any:
        return None

    def write(self, data: Any) -> None:
        self.written += 1

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    n, repeat = args.n, args.repeat
    traffic = workload(n)
    lines = [req[: req.index(b"\n")] for req, _ in traffic]

    def parse_lines() -> None:
        for line in lines:
            parse_line(line)

    def request_framer() -> None:
        framer = RequestFramer()
        feed = framer.feed
        for req, _ in traffic:
            feed(req)

    requests: list[Request] = []
    framer = RequestFramer()
    for req, _ in traffic:
        requests.extend(framer.feed(req)[0])

    def response_framer() -> None:
        pending: deque[Request] = deque()
        rf = ResponseFramer(pending)
        feed = rf.feed
        append = pending.append
        for request, (_, reply) in zip(requests, traffic, strict=True):
            append(request)
            feed(reply)

    def rate0_observer(done: list[Request], session: int) -> None:
        # What the shadow dispatcher does at sample rate 0: look at each request, skip it.
        for request in done:
            if not request.capture:
                continue

    def session(
        capture: Callable[[Request], bool] | None,
        observer: Callable[[list[Request], int], None] | None = None,
    ) -> Callable[[], None]:
        def run() -> None:
            proxy = ProxyServer(Config(), ProxyMetrics(), capture=capture, observer=observer)
            s = ClientSession(proxy)
            s.transport = _Transport()  # type: ignore[assignment]
            upstream = _Upstream(s)
            upstream.connection_made(_Transport())  # type: ignore[arg-type]
            s.upstream = upstream  # as ClientSession._connect does once connected
            down, up = s.data_received, upstream.data_received
            for req, reply in traffic:
                down(req)
                up(reply)

        return run

    results = {
        "parse_line (get/set command lines)": best(parse_lines, n, repeat),
        "RequestFramer.feed (one request per chunk)": best(request_framer, n, repeat),
        "ResponseFramer.feed (one reply per chunk)": best(response_framer, n, repeat),
        "ClientSession data_received+upstream_data": best(session(None), n, repeat),
        "  same, with a capture hook returning False": best(session(lambda r: False), n, repeat),
        "  same, plus a rate-0 observer": best(session(lambda r: False, rate0_observer), n, repeat),
    }
    print(f"python {sys.version.split()[0]}, {n:,} requests (90/10 get/set), best of {repeat}")
    for name, ns in results.items():
        print(f"{name:<46} {ns:8.0f} ns/req  {1e9 / ns / 1e3:8.0f} k req/s")


if __name__ == "__main__":
    main()
