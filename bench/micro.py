"""Micro-benchmarks of two calls every request makes: timeit, best of N rounds of 1M calls.
The figures quoted in proxy/shadow/sampler.py's and proxy/metrics.py's docstrings.

    python bench/micro.py sampler   KeySampler.decide per request kind, at rate 0 and 0.01
    python bench/micro.py metrics   RequestStats.observe next to prometheus_client's Histogram

Printed, never judged: a figure of the machine it ran on, not something that passes or fails.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Histogram

from proxy.memcache.request import parse_line
from proxy.metrics import DURATION_BUCKETS, RequestStats
from proxy.shadow.control import ShadowControl
from proxy.shadow.sampler import KeySampler

NUMBER = 1_000_000


def best_us(statement: str, env: dict[str, object], repeat: int) -> float:
    """Microseconds per call, the best of `repeat` rounds of NUMBER calls."""
    return min(timeit.repeat(statement, globals=env, number=NUMBER, repeat=repeat)) / NUMBER * 1e6


def sampler() -> None:
    requests = {
        "set": parse_line(b"set user:12345 0 0 10"),
        "get 1 key": parse_line(b"get user:12345"),
        "get 10 keys": parse_line(b"get " + b" ".join(b"user:%d" % i for i in range(10))),
        "mg": parse_line(b"mg user:12345 v f t"),
        "mg base64": parse_line(b"mg dXNlcjoxMjM0NQ== b v f t"),
        "version": parse_line(b"version"),
    }
    for rate in (0.0, 0.01):
        decide = KeySampler(ShadowControl(sample_rate=rate)).decide
        for name, request in requests.items():
            us = best_us("decide(request)", {"decide": decide, "request": request}, repeat=7)
            print(f"rate {rate:<5} {name:12s} {us:.3f} us/call")


def metrics() -> None:
    stats = RequestStats()
    histogram = Histogram(
        "h", "h", ["command"], buckets=DURATION_BUCKETS, registry=CollectorRegistry()
    )
    env = {"stats": stats, "child": histogram.labels("get"), "histogram": histogram}
    for name, statement in {
        "RequestStats.observe": "stats.observe('get', 0.0003)",
        "Histogram child.observe": "child.observe(0.0003)",
        "Histogram.labels(cmd).observe": "histogram.labels('get').observe(0.0003)",
    }.items():
        print(f"{name:32s} {best_us(statement, env, repeat=5):.3f} us/call")


def main() -> None:
    benches = {"sampler": sampler, "metrics": metrics}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=sorted(benches), nargs="*", help="all when none given")
    for name in parser.parse_args().bench or sorted(benches):
        print(f"-- {name}")
        benches[name]()


if __name__ == "__main__":
    main()
