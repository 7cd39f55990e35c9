"""The messages between memshadow's processes: each side's handler table holds exactly the
kinds its peer sends, and the constructors build the plain tuples that go on the wire."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from proxy import messages
from proxy.children import deliver
from proxy.processes import ExtraProcess, ProxyProcesses, _Extra
from proxy.shadow.engine.worker import WorkerSession
from proxy.shadow.process import _Worker
from proxy.shadow.wire import FrameDecoder, encode


async def test_every_side_handles_exactly_what_its_peer_sends() -> None:
    owner: Any = SimpleNamespace(
        stopping=lambda: False,
        examples=SimpleNamespace(record=lambda *fields: None),
        _idle_answered=lambda shard, token: None,
        _merge=lambda extra, figures: None,
        _memcached_failed=lambda extra, listener, report, reason: None,
    )
    assert set(ExtraProcess().handlers) == messages.TO_EXTRA
    assert set(_Extra(owner, 1).handlers) == messages.FROM_EXTRA
    session = WorkerSession()
    assert set(session.handlers) == messages.TO_WORKER
    assert set(session._feed_handlers) == messages.ON_FEED
    assert set(_Worker(owner, 0).handlers) == messages.FROM_WORKER
    assert ProxyProcesses  # (the owner _Extra reports to)


def test_constructors_build_the_plain_tuples_on_the_wire() -> None:
    built = [
        messages.start_extra(b"c", 1, [5], 0.5, True, [None], "t", [True]),
        messages.rate(0.5, False),
        messages.accept(0, True, 2),
        messages.feeds(["a", None]),
        messages.stop(1.5),
        messages.extra_ready(),
        messages.figures({"connections": 1}),
        messages.memcached_failed(0, 1, "refused"),
        messages.start_worker(b"c", 7, 10, 0, 2, "t", 1.0),
        messages.idle(3),
        messages.epoch(2.0),
        messages.hello("t", 1.0, 7),
        messages.stats({"queue_depth": 0}, 4),
        messages.example("k", "get", b"key", {}, {}, "d", {}),
        messages.worker_ready(None),
    ]
    assert built[0] == ("start", b"c", 1, [5], 0.5, True, [None], "t", [True])
    assert built[8] == ("start", b"c", 7, 10, 0, 2, "t", 1.0)
    assert built[13] == ("example", "k", "get", b"key", {}, {}, "d", {})
    for message in built:
        assert type(message) is tuple and type(message[0]) is str
        assert FrameDecoder().feed(b"".join(encode(message))) == [message]


def test_an_unknown_kind_is_logged_and_skipped(caplog: Any) -> None:
    seen: list[tuple[Any, ...]] = []
    handlers = {"rate": lambda *fields: seen.append(fields)}
    log = logging.getLogger("memshadow.test")
    deliver(handlers, ("rate", 0.5, True), log, "proxy process 1")
    deliver(handlers, ("nope", 1), log, "proxy process 1")
    assert seen == [(0.5, True)]
    assert "proxy process 1: unknown message 'nope'" in caplog.text
