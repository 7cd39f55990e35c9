"""An extra proxy process of `workers: N` on its own: what its control socket tells it."""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import replace
from typing import Any

import pytest

import proxy.runtime
from proxy.config import Config, RedisURL
from proxy.processes import ExtraProcess
from proxy.shadow.wire import FrameDecoder, encode


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
    start = ("start", pickle.dumps(config), 1, [], 1.0, True, [None, None], "t")
    extra.data_received(b"".join(encode(start) + encode(("rate", 0.0, False))))
    await asyncio.sleep(0.1)
    assert (extra.control.sample_rate, extra.control.enabled) == (0.0, False)
    assert ("ready",) in control.messages
    await extra._stop(0.0)
    assert extra.finished.result() == 0
    assert control.messages[-1][0] == "figures"
