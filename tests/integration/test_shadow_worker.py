"""The shadow's worker process (shadow.worker: process): isolation, restart, hand-off limits.

The verdicts themselves are covered for both worker modes by test_shadow.py; these tests are
about the process boundary: what happens to clients and to the figures when the worker is
killed, stalled or told a new rate, and that it never outlives the proxy.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator

import pytest
from pymemcache.client.base import Client

import proxy.children
import proxy.shadow.handoff
import proxy.shadow.process
from proxy.shadow.sampler import KeySampler
from tests.integration.test_shadow import Hammers, assert_stores_equal
from tests.support import ProxyThread, ServerProcess, proxy_config, totals, wait_until


@pytest.fixture
def worker_proxy(memcached: ServerProcess, redis_server: ServerProcess) -> Iterator[ProxyThread]:
    # (a patient Redis timeout: these tests count every outcome, a stall must not drop one)
    proxy = ProxyThread(
        proxy_config(memcached, redis_server, 1.0, worker="process", redis_timeout=30.0)
    )
    proxy.start()
    yield proxy
    proxy.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); its /proc status says so
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_the_worker_runs_apart_niced_and_ends_with_the_proxy(
    memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    proxy = ProxyThread(proxy_config(memcached, redis_server, 1.0, worker="process"))
    proxy.start()
    pid = proxy.shadow.worker_pid
    assert pid is not None and pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) - os.getpriority(os.PRIO_PROCESS, 0) == 10
    client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=30)
    client.set("k", b"v")
    assert client.get("k") == b"v"
    proxy.settle()
    assert totals(proxy) == {"match": 2}
    client.close()
    proxy.stop()
    wait_until(lambda: not _pid_alive(pid), what=f"worker {pid} gone")


def test_a_killed_worker_is_restarted_and_clients_never_notice(
    worker_proxy: ProxyThread, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    keys = [f"w{i}" for i in range(40)]
    hammers = Hammers(worker_proxy.port, keys, 4.0, 8)
    errors = hammers.errors
    time.sleep(1.0)
    first = worker_proxy.shadow.worker_pid
    before = sum(worker_proxy.shadow.stats.comparisons.values())
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: worker_proxy.shadow.worker_pid not in (None, first), what="restarted")
    hammers.join(30)
    assert errors == []
    assert hammers.result.operations > 0
    worker_proxy.settle()
    stats = worker_proxy.shadow.stats
    assert stats.errors["worker_exit"] == 1
    assert stats.dropped["worker_down"] > 0  # handed over while no worker ran: counted
    # The dead worker's figures are kept and the new one adds to them.
    assert sum(stats.comparisons.values()) > before
    assert totals(worker_proxy).get("mismatch", 0) == 0
    # The new worker is in step again: quiet keys read back equal in both stores.
    client = Client(("127.0.0.1", worker_proxy.port), default_noreply=False, timeout=30)
    for key in keys:
        client.set(key, b"after")
    worker_proxy.settle()
    assert_stores_equal(memcached, redis_server, keys)
    client.close()


def test_a_stalled_worker_costs_drops_not_latency_or_memory(
    worker_proxy: ProxyThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_proxy.call(lambda: setattr(worker_proxy.shadow.handoff, "budget", 64 * 1024))
    pid = worker_proxy.shadow.worker_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        client = Client(("127.0.0.1", worker_proxy.port), default_noreply=False, timeout=30)
        value = b"x" * 1000
        for i in range(3000):  # ~3 MB of sets: more than the socket and the limit hold
            assert client.set(f"s{i % 50}", value)
        dropped = worker_proxy.call(lambda: worker_proxy.shadow.stats.dropped["queue_full"])
        assert dropped > 0
    finally:
        os.kill(pid, signal.SIGCONT)
    worker_proxy.settle()
    stats = worker_proxy.shadow.stats
    assert stats.errors["worker_exit"] == 0
    assert totals(worker_proxy).get("mismatch", 0) == 0
    # Keys whose changes were dropped are cold: the worker was told, nothing is guessed.
    for i in range(50):
        assert client.get(f"s{i}") == value
    worker_proxy.settle()
    assert totals(worker_proxy).get("mismatch", 0) == 0
    client.close()


def test_a_rate_change_reaches_the_worker(worker_proxy: ProxyThread) -> None:
    # A multi-key get is captured when any key is sampled; the worker compares only the
    # sampled ones, so it must know the new rate.
    worker_proxy.call(lambda: worker_proxy.shadow.control.set_rate(0.5, "test"))
    worker_proxy.settle()
    sampler = KeySampler(worker_proxy.shadow.control)
    keys = [f"m{i}" for i in range(40)]
    sampled = [k for k in keys if sampler.sampled(k.encode())]
    assert 0 < len(sampled) < len(keys)
    client = Client(("127.0.0.1", worker_proxy.port), default_noreply=False, timeout=30)
    for key in keys:
        client.set(key, b"v")
    worker_proxy.settle()
    before = worker_proxy.shadow.stats.comparisons[("get", "match")]
    assert client.get_many(keys) == dict.fromkeys(keys, b"v")
    worker_proxy.settle()
    assert worker_proxy.shadow.stats.comparisons[("get", "match")] - before == len(sampled)
    client.close()


def test_work_a_dead_worker_took_with_it_is_counted_as_dropped(
    worker_proxy: ProxyThread,
) -> None:
    pid = worker_proxy.shadow.worker_pid
    worker_proxy.settle()
    os.kill(pid, signal.SIGSTOP)
    client = Client(("127.0.0.1", worker_proxy.port), default_noreply=False, timeout=30)
    for i in range(500):
        assert client.set(f"d{i}", b"v")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: worker_proxy.shadow.worker_pid not in (None, pid), what="restarted")
    worker_proxy.settle()
    stats = worker_proxy.shadow.stats
    assert stats.shadowed["set"] == 500
    # None of the 500 was judged; all of them show up as dropped, none vanish.
    assert stats.dropped["worker_down"] >= 500
    client.close()


def test_counters_never_go_back_across_a_restart(worker_proxy: ProxyThread) -> None:
    client = Client(("127.0.0.1", worker_proxy.port), default_noreply=False, timeout=30)
    seen: list[tuple[int, int, int]] = []

    def sample() -> None:
        stats = worker_proxy.shadow.stats
        seen.append(
            worker_proxy.call(
                lambda: (
                    sum(stats.comparisons.values()),
                    sum(stats.dropped.values()),
                    stats.redis_commands,
                )
            )
        )

    for i in range(100):
        client.set(f"c{i}", b"v")
    worker_proxy.settle()
    sample()
    first = worker_proxy.shadow.worker_pid
    os.kill(first, signal.SIGKILL)

    def restarted() -> bool:  # (sampled all along)
        client.get("c1")
        sample()
        return worker_proxy.shadow.worker_pid not in (None, first)

    wait_until(restarted, what="the worker restarted")
    for i in range(100):
        client.get(f"c{i}")
    worker_proxy.settle()
    sample()
    for earlier, later in itertools.pairwise(seen):
        assert all(b >= a for a, b in zip(earlier, later, strict=True)), (earlier, later)
    assert seen[-1][0] > seen[0][0]
    client.close()


def test_a_request_too_big_for_the_hand_off_is_dropped_and_its_key_made_cold(
    worker_proxy: ProxyThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_proxy.call(lambda: setattr(worker_proxy.shadow.handoff, "budget", 64 * 1024))
    client = Client(("127.0.0.1", worker_proxy.port), default_noreply=False, timeout=30)
    assert client.set("big", b"a")
    assert client.get("big") == b"a"
    worker_proxy.settle()
    assert client.set("big", b"b" * 100_000)  # over the limit on its own: never handed over
    assert client.get("big") == b"b" * 100_000
    worker_proxy.settle()
    stats = worker_proxy.shadow.stats
    assert stats.dropped["queue_full"] == 2  # the set, and the get whose reply holds the value
    # Redis still has "a", Memcached the big value: the worker was told the key's change
    # was lost, so a touch that succeeds on both proves nothing and nothing is reported.
    assert client.touch("big", 100)
    worker_proxy.settle()
    assert client.set("big", b"c")
    assert client.get("big") == b"c"
    worker_proxy.settle()
    assert totals(worker_proxy) == {"match": 5}  # set, get, touch, set, get
    client.close()


def test_a_worker_that_cannot_start_does_not_hold_up_clients(
    memcached: ServerProcess, redis_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy.children.sys, "executable", "/bin/false")
    # Were start() to wait for readiness, this would hold it far past ProxyThread's own
    # start-up wait: starting at all shows the first exit ended the wait.
    monkeypatch.setattr(proxy.shadow.process, "READY_TIMEOUT", 3600.0)
    proxy_thread = ProxyThread(
        proxy_config(memcached, redis_server, 1.0, worker="process"), workers_ready=False
    )
    proxy_thread.start()
    try:
        assert proxy_thread.shadow.stats.errors["worker_exit"] >= 1
        client = Client(("127.0.0.1", proxy_thread.port), default_noreply=False, timeout=30)
        for i in range(50):
            assert client.set(f"f{i}", b"v")
            assert client.get(f"f{i}") == b"v"
        assert proxy_thread.shadow.stats.dropped["worker_down"] == 100
        client.close()
    finally:
        proxy_thread.stop()
