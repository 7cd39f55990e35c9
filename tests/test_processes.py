"""An extra proxy process of `workers: N` on its own: what its control socket tells it."""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import replace
from typing import Any

import pytest

import proxy.runtime
from proxy.config import Config
from proxy.processes import ExtraProcess
from proxy.redis.url import RedisURL
from proxy.shadow.wire import FrameDecoder, encode
from tests.support import wait_until_async


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = FrameDecoder()
        self.messages: list[tuple[Any, ...]] = []

    def writelines(self, data: Any) -> None:
        self.messages += self.decoder.feed(b"".join(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def test_a_rate_change_right_behind_start_is_not_overwritten_by_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both in one read while the process boots: a halt sent then must hold."""
    monkeypatch.setattr(proxy.runtime, "configure_logging", lambda config: None)
    base = Config()
    config = replace(
        base,
        workers=2,
        shadow=replace(base.shadow, redis=RedisURL.parse("redis://127.0.0.1:1/0")),
    )
    extra = ExtraProcess()
    control = Recorder()
    extra.connection_made(control)
    start = ("start", pickle.dumps(config), 1, [], 1.0, True, [None, None], "t", [True])
    extra.data_received(b"".join(encode(start) + encode(("rate", 0.0, False))))
    await wait_until_async(lambda: ("ready",) in control.messages, what="booted")
    assert (extra.control.sample_rate, extra.control.enabled) == (0.0, False)
    await extra._stop(0.0)
    assert extra.finished.result() == 0
    assert control.messages[-1][0] == "figures"


async def test_a_listener_follows_the_first_process_and_closes_at_its_own_failure() -> None:
    """An extra process's view of a Memcached: what the first process says, except that a
    client's failed connect closes the listener at once and is reported; the first
    process's word from before that report cannot open it again."""
    from proxy.processes import _FirstsWord

    extra = ExtraProcess()
    control = Recorder()
    extra.connection_made(control)
    word = _FirstsWord(extra, 0, ready=False)
    changes: list[bool] = []
    word.add_listener(changes.append)
    word.told(True, 0)
    assert word.ready and changes == [True]
    word.note_failure("refused")
    word.note_failure("refused again")  # (clients accepted before it closed)
    assert not word.ready and changes == [True, False]
    assert control.messages == [("memcached_failed", 0, 1, "refused")]
    word.told(True, 0)  # sent before the first process had read the report
    assert not word.ready
    word.told(False, 1)
    word.told(True, 1)  # Memcached answers the first process again
    assert word.ready and changes == [True, False, True]
    word.note_success()  # (a success tells nothing the first process does not know)
    assert changes == [True, False, True]


async def test_the_first_process_acknowledges_each_report_of_a_failed_connect() -> None:
    """Its answer carries the report's number, so the extra process knows it is not stale:
    down when its Memcached is (a change told to every process, or the state told to it
    alone), open at once when no Memcached is watched at all."""
    from proxy.address import HostPort
    from proxy.health import UpstreamHealth
    from proxy.metrics import ProxyMetrics
    from proxy.processes import ProxyProcesses

    config = replace(Config(), workers=3)
    metrics = ProxyMetrics(listeners=[b.label for b in config.backends], processes=3)
    unwatched = ProxyProcesses(config, metrics, None, None)
    one, other = unwatched._extras
    one.transport = Recorder()
    one.dispatch(("memcached_failed", 0, 1, "refused"))
    assert one.transport.messages == [("accept", 0, True, 1)]

    health = UpstreamHealth(HostPort("127.0.0.1", 1))  # (never started: nothing is dialled)
    health.note_success()
    watched = ProxyProcesses(config, metrics, None, None, healths=[health])
    one, other = watched._extras
    one.transport, other.transport = Recorder(), Recorder()
    one.dispatch(("memcached_failed", 0, 1, "refused"))
    assert not health.ready and "refused (proxy process 1)" in health.reason
    assert one.transport.messages == [("accept", 0, False, 1)]
    assert other.transport.messages == [("accept", 0, False, 0)]
    one.dispatch(("memcached_failed", 0, 2, "refused again"))  # still down
    assert one.transport.messages[-1] == ("accept", 0, False, 2)
    assert len(other.transport.messages) == 1
    health.note_success()  # Memcached answers again: everyone opens, the report acknowledged
    assert one.transport.messages[-1] == ("accept", 0, True, 2)
    assert other.transport.messages[-1] == ("accept", 0, True, 0)
