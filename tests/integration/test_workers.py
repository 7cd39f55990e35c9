"""`workers: 2`: two proxy processes on one listen address, two shadow workers.

Client connections land on both processes (SO_REUSEPORT); a hot key's operations arrive
through both and are judged by the one worker that owns the key, in reply order: the whole
command mix with keys shared by every connection gives no false mismatch. /metrics shows
the sum of both processes, a rate change reaches both at once, and an extra process that
dies is started again without counters going back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from tests.integration.hammer import Hammer, assert_drops_accounted, figures
from tests.support import ProxyThread, ServerProcess, proxy_config, start_memshadow, wait_until


@pytest.fixture
def two(memcached: ServerProcess, redis_server: ServerProcess) -> Iterator[ProxyThread]:
    proxy = ProxyThread(replace(proxy_config(memcached, redis_server, 1.0), workers=2))
    proxy.start()
    yield proxy
    proxy.stop()


def _label(proxy: ProxyThread) -> str:
    return proxy.config.backends[0].label


def _local_and_remote(proxy: ProxyThread) -> tuple[int, int]:
    """Requests served by the first process, and by the extra one (its last report)."""
    label = _label(proxy)
    return proxy.metrics.requests_for(label).total(), proxy.metrics.remote[0][label].total()


def _sets(port: int, connections: int, per_connection: int, prefix: str) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        client = Client(("127.0.0.1", port), default_noreply=False, timeout=10)
        try:
            for i in range(per_connection):
                assert client.set(f"{prefix}:{n}:{i}", b"v" * (i % 50))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]


def test_hot_keys_through_two_processes_give_no_false_mismatch(two: ProxyThread) -> None:
    hammer = Hammer(two.port, 24, 6.0, shared=[f"hot{i}" for i in range(6)])
    hammer.join()
    two.settle(120)
    out = figures(two)
    assert hammer.result.errors == []
    assert out["mismatches"] == {}, out
    assert out["comparisons"] > 1000, out
    local, remote = _local_and_remote(two)
    assert local > 0 and remote > 0, "both processes serve clients"
    assert two.metrics.requests.total() == local + remote


def test_shadow_workers_killed_under_load_give_no_false_mismatch(two: ProxyThread) -> None:
    """A restarted worker hears the first process at once and the other one only once it
    has reconnected: what that one dropped meanwhile must make its keys cold."""
    hammer = Hammer(two.port, 16, 8.0, shared=[f"hot{i}" for i in range(4)])
    time.sleep(2.5)
    first = list(two.shadow.worker_pids)
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: all(p not in (None, *first) for p in two.shadow.worker_pids))
    hammer.join()
    two.settle(120)
    out = figures(two)
    assert hammer.result.errors == []
    assert out["mismatches"] == {}, out
    assert out["comparisons"] > 500, out


def test_metrics_add_up_and_a_rate_change_reaches_both_processes(two: ProxyThread) -> None:
    _sets(two.port, 16, 50, "on")
    two.settle()
    local, remote = _local_and_remote(two)
    assert local > 0 and remote > 0
    assert local + remote == 16 * 50
    stats = two.shadow.stats
    # At rate 1 every set of both processes was handed to the shadow, and judged (or, on a
    # loaded host, dropped: counted, for a reason the load explains).
    assert stats.shadowed["set"] == 800
    compared = sum(n for (cmd, _), n in stats.comparisons.items() if cmd == "set")
    assert compared + sum(stats.dropped.values()) == 800, (compared, stats.dropped)
    assert_drops_accounted(two, figures(two))
    text = two.metrics.render().decode()
    assert f'memshadow_requests_total{{command="set",listener="{_label(two)}"}} 800.0' in text

    two.call(lambda: two.shadow.control.set_rate(0.0, "test"))

    def heard() -> bool:  # the extra process hears it over its control socket
        before = stats.shadowed["set"]
        _sets(two.port, 8, 5, "probe")
        two.settle()
        return bool(stats.shadowed["set"] == before)

    wait_until(heard, what="no set shadowed by either process")
    shadowed = stats.shadowed["set"]
    _sets(two.port, 16, 50, "off")
    two.settle()
    local_after, remote_after = _local_and_remote(two)
    assert local_after > local and remote_after > remote
    assert stats.shadowed["set"] == shadowed  # neither process sampled anything at rate 0


def test_a_killed_extra_process_is_restarted_and_counters_never_go_back(two: ProxyThread) -> None:
    _sets(two.port, 16, 20, "before")
    two.settle()
    total = two.metrics.requests.total()
    assert total == 320
    (pid,) = two.processes.pids
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: two.processes.pids[0] not in (None, pid) and two.processes.describe()[0]["serving"]
    )
    assert two.metrics.requests.total() >= total
    _sets(two.port, 16, 20, "after")  # every new connection is served, by either process
    two.settle()
    assert two.metrics.requests.total() == 640
    assert two.processes.describe()[0]["restarts"] == 1


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def test_the_command_line_runs_two_processes_and_stops_them_all(
    tmp_path: Path, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    config = tmp_path / "memshadow.yaml"
    config.write_text(
        f"listen: 127.0.0.1:0\nmemcached: {memcached.address}\nadmin: 127.0.0.1:0\n"
        f"workers: 2\nshadow:\n  redis: redis://127.0.0.1:{redis_server.port}/0\n"
        "  sample_rate: 1\n"
    )
    proc, port = start_memshadow("--config", str(config))
    try:
        assert proc.stderr is not None
        drain = threading.Thread(target=proc.stderr.read, daemon=True)
        drain.start()
        # Two shadow workers and one extra proxy process.
        wait_until(lambda: len(_children(proc.pid)) == 3)
        _sets(port, 8, 10, "cli")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_until(lambda: not _children(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_no_process_is_left_when_the_first_one_is_killed(
    tmp_path: Path, memcached: ServerProcess
) -> None:
    config = tmp_path / "memshadow.yaml"
    config.write_text(
        f"listen: 127.0.0.1:0\nmemcached: {memcached.address}\nadmin: 127.0.0.1:0\nworkers: 2\n"
    )
    proc, port = start_memshadow("--config", str(config))
    try:
        wait_until(lambda: len(_children(proc.pid)) == 1)
        (extra,) = _children(proc.pid)
        proc.kill()
        proc.wait(10)
        # It loses its control socket, drains its (no) clients and exits by itself.
        wait_until(lambda: not Path(f"/proc/{extra}").exists() or _zombie(extra))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    del port


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
