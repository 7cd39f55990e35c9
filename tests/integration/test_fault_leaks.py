"""Faults on both sides, again and again, under load: nothing may leak in the memshadow
process (file descriptors, threads, memory) and the shadow's worker process stays one, with
no zombie left behind (hardening: faults). Memcached restarted, Redis restarted, Redis
paused: each round must leave the proxy as it found it, and serving."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError

from proxy.shadow.handoff import PIPE_BUFFER_LIMIT
from tests.integration.test_connections_held import _rss_kb
from tests.support import ServerProcess, memcached_argv, redis_argv, start_memshadow, wait_until

ROUNDS = 5
WARM_UP = 2
"""Rounds before the figures a leak is judged against: the worker's queue and its Redis
commands in flight reach their bounds (queue_size, max_inflight) in the first Redis pauses, and
the allocator keeps that high-water mark. Measured with tracemalloc in the worker: its Python
objects stay at 5.3-6.2 MB from the second round to the seventh, while its RSS climbs for the
first three to four (by 13 MB with the default queue of 10,000 requests, 6 MB with 1,000) and
then stays."""
FD_SLACK = 6  # connections being redialled at the moment of a count
RSS_SLACK_MB = 12
# A Redis restart or pause no longer stops the shadow (no guard answers Redis being down: it
# resumes by itself), so the shadow runs through every round, and the proxy may hold what a
# stalled worker has not taken yet: up to PIPE_BUFFER_LIMIT, as request tuples and then as
# their encoded frame at once. Bounded by design; the allocator keeps the high-water mark.
PROXY_RSS_SLACK_MB = RSS_SLACK_MB + 2 * PIPE_BUFFER_LIMIT / (1 << 20)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the process's children."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        for child in text:
            with contextlib.suppress(FileNotFoundError):
                status = Path(f"/proc/{child}/status").read_text()
                state = next(
                    line.split()[1] for line in status.splitlines() if line.startswith("State:")
                )
                found.append((int(child), state))
    return found


Figures = tuple[int, int, int, list[tuple[int, str, int, int]]]
"""The proxy's fds, threads and RSS KB, and its children's (pid, state, fds, RSS KB)."""


def _figures(pid: int) -> Figures:
    worker = [(child, state, _fds(child), _rss_kb(child)) for child, state in _children(pid)]
    return _fds(pid), _threads(pid), _rss_kb(pid), worker


def _as_found(base: Figures, now: Figures) -> bool:
    base_fds, base_threads, base_rss, base_worker = base
    fds, threads, rss, worker = now
    return (
        fds <= base_fds + FD_SLACK
        and threads <= base_threads
        and (rss - base_rss) / 1024 < PROXY_RSS_SLACK_MB
        and len(worker) == 1  # the shadow's worker, no other
        and worker[0][1] != "Z"
        and worker[0][2] <= base_worker[0][2] + FD_SLACK
        and (worker[0][3] - base_worker[0][3]) / 1024 < RSS_SLACK_MB
    )


def _left_as_found(pid: int, base: Figures) -> None:
    """What a round leaves behind for good, not what it is still closing: a leak never goes
    back within the bounds."""
    last: list[Figures] = []

    def as_found() -> bool:
        last[:] = [_figures(pid)]
        return _as_found(base, last[0])

    try:
        wait_until(as_found, what="the round leaving the proxy as it found it")
    finally:
        print(last[0])


def _load(port: int, stop: threading.Event) -> None:
    """A client that keeps writing and reading; errors while Memcached restarts are normal."""
    while not stop.is_set():
        client = Client(("127.0.0.1", port), timeout=2, connect_timeout=2, default_noreply=False)
        try:
            for i in range(100_000):
                if stop.is_set():
                    break
                key = f"leak{i % 50}"
                client.set(key, b"v%d" % i, expire=60)
                client.get(key)
        except (MemcacheError, OSError):
            time.sleep(0.05)
        finally:
            client.close()


def test_repeated_faults_leak_nothing(tmp_path: Path) -> None:
    memcached = ServerProcess(memcached_argv()).start()
    redis = ServerProcess(redis_argv()).start()
    config = tmp_path / "memshadow.yaml"
    config.write_text(
        f"shadow:\n  redis: redis://127.0.0.1:{redis.port}/0\n  sample_rate: 1.0\n"
        "  worker: process\n  queue_size: 1000\n",  # a small bound: a leak stands out of it
        encoding="utf-8",
    )
    proc, port = start_memshadow(
        "--config", str(config), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--memcached", str(memcached.address),
    )  # fmt: skip
    stop = threading.Event()
    loaders: list[threading.Thread] = []
    try:
        assert proc.stderr is not None
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # the pipe never fills
        loaders = [threading.Thread(target=_load, args=(port, stop)) for _ in range(4)]
        for loader in loaders:
            loader.start()
        print("\nafter each round (fds, threads, RSS KB, worker: pid, state, fds, RSS KB):")
        base: Figures | None = None
        for round_ in range(1, ROUNDS + 1):
            memcached.restart()
            time.sleep(1.0)
            redis.restart()
            time.sleep(1.0)
            redis.pause()
            time.sleep(1.0)
            redis.resume()
            time.sleep(2.0)  # reconnected, caught up
            if round_ < WARM_UP:
                print(_figures(proc.pid))
                continue
            if base is None:
                base = _figures(proc.pid)
                print(base)
                continue
            _left_as_found(proc.pid, base)
        # Still serving, and still shadowing.
        client = Client(("127.0.0.1", port), timeout=5, default_noreply=False)
        assert client.set("after", b"ok") and client.get("after") == b"ok"
        client.close()
    finally:
        stop.set()
        for loader in loaders:
            loader.join(10)
        proc.terminate()
        proc.wait(30)
        memcached.stop()
        redis.stop()
