"""The console end to end in a real headless Chromium: it loads, shows the live state, and
its controls change the proxy's ShadowControl (rate, kill switch, halt) with the token."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.admin import AdminServer
from proxy.config import (
    AdminConfig,
    Config,
    GuardsConfig,
    HostPort,
    LatencyGuardConfig,
    ShadowConfig,
)
from proxy.metrics import ProxyMetrics
from proxy.ops.operations import Operations
from proxy.shadow.control import ShadowControl
from proxy.shadow.stats import ShadowStats
from tests.ops.support import Clock, feed
from tests.ops.webdriver import CHROMEDRIVER, CHROMIUM, Browser

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)

TOKEN = "console-token"


class AdminThread:
    """The admin server and the operator pieces on their own event loop thread."""

    def __init__(self) -> None:
        shadow = ShadowConfig(
            sample_rate=0.1, guards=GuardsConfig(latency=LatencyGuardConfig(enabled=False))
        )
        admin = AdminConfig(listen=HostPort("127.0.0.1", 0), token=TOKEN)
        self.config = dataclasses.replace(Config(), shadow=shadow, admin=admin)
        self.clock = Clock()
        self.control = ShadowControl(0.1)
        self.stats = ShadowStats()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))
        self.thread.start()
        assert self.ready.wait(10)

    async def main(self) -> None:
        metrics = ProxyMetrics()
        self.admin = AdminServer(self.config.admin.listen, metrics, ready=lambda: True)
        self.ops = Operations(
            self.config,
            admin=self.admin,
            control=self.control,
            stats=self.stats,
            metrics=metrics,
            environ={},
            clock=self.clock,
            handle_sighup=False,
        )
        await self.admin.start()
        self.stopping = asyncio.Event()
        self.ready.set()
        await self.stopping.wait()
        await self.admin.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin.address[1]}/"

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread (the live objects are not thread-safe)."""

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def stop(self) -> None:
        assert self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[AdminThread]:
    thread = AdminThread()
    yield thread
    thread.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_console_drives_the_shadow(server: AdminThread, browser: Browser) -> None:
    browser.open(server.url)
    browser.wait_for(lambda: browser.text("#sample-rate") == "0.1", "the live rate")
    assert browser.text("#status-pill") == "shadowing"
    assert browser.text("#halted") == "no"
    assert "no ramp configured" in browser.text("#ramp-phase")
    browser.wait_for(
        lambda: "does not serve mismatch examples" in browser.text("#mismatches"),
        "the missing examples route to be shown gracefully",
    )

    # Without the token the change is refused, and the page says why.
    browser.type("#rate-input", "0.37")
    browser.click("#set-rate")
    browser.wait_for(lambda: browser.text("#message").startswith("401"), "the refusal")
    assert "needs the admin token" in browser.text("#message")
    assert server.run(lambda: server.control.sample_rate) == 0.1

    browser.type("#token", TOKEN)
    browser.click("#set-rate")
    browser.wait_for(lambda: server.run(lambda: server.control.sample_rate) == 0.37, "new rate")
    browser.wait_for(lambda: browser.text("#sample-rate") == "0.37", "the page to follow")
    assert browser.text("#message") == "done: sample_rate 0.1 \u2192 0.37"

    # A bad value never leaves the page.
    browser.type("#rate-input", "7")
    browser.click("#set-rate")
    assert browser.text("#message") == "the sample rate must be a number from 0 to 1"

    # The token survives a reload of the page (sessionStorage), and the kill switch works.
    browser.open(server.url)
    assert browser.script("return document.getElementById('token').value") == TOKEN
    browser.click("#kill")
    browser.wait_for(lambda: not server.run(lambda: server.control.enabled), "the kill switch")
    browser.wait_for(lambda: browser.text("#status-pill") == "shadow off", "the page to follow")
    browser.click("#enable")
    browser.wait_for(lambda: server.run(lambda: server.control.enabled), "shadowing back on")


def test_console_shows_a_halt_and_clears_it(server: AdminThread, browser: Browser) -> None:
    def trip() -> None:
        server.ops.autopilot.tick()
        feed(server.stats, match=100, errors=200)
        server.clock.advance(5)
        server.ops.autopilot.tick()

    server.run(trip)
    assert server.run(lambda: server.ops.autopilot.halt) is not None
    browser.open(server.url)
    browser.wait_for(lambda: browser.text("#halted") == "YES", "the halt")
    assert browser.text("#halt-rule") == "errors"
    assert browser.text("#halt-action") == "stop"
    assert browser.text("#status-pill") == "halted"
    assert "errors" in browser.text("#audit")
    browser.type("#token", TOKEN)
    browser.click("#clear-halt")
    browser.wait_for(lambda: server.run(lambda: server.ops.autopilot.halt) is None, "clearing")
    assert server.run(lambda: server.control.enabled)
    browser.wait_for(lambda: browser.text("#halted") == "no", "the page to follow")


def test_console_tells_a_mismatch_s_story(server: AdminThread, browser: Browser) -> None:
    from proxy.shadow.examples import MismatchExamples, mismatches_route

    examples = MismatchExamples(reveal=True)

    def record() -> None:
        server.admin.add_route("GET", "/api/mismatches", mismatches_route(examples))
        examples.record(
            "value",
            "get",
            b"user:1",
            {"present": True, "flags": 1, "value": b"profile"},
            {"present": True, "flags": 1, "value": b"tampered"},
            "",
            {
                "connection": 7,
                "lag_ms": 1050.0,
                "action": "copied to redis",
                "history": [
                    {
                        "command": "set",
                        "memcached": "STORED",
                        "redis": "STORED",
                        "ms": -812.5,
                        "connection": 7,
                    },
                    {
                        "command": "get",
                        "memcached": "HIT",
                        "redis": "HIT",
                        "ms": 0.0,
                        "connection": 7,
                    },
                ],
                "reread": {
                    "memcached": {"present": True, "flags": 1, "value": b"profile"},
                    "redis": {"present": True, "flags": 1, "value": b"tampered"},
                    "ordered": True,
                },
            },
        )

    server.run(record)
    browser.open(server.url)
    browser.wait_for(lambda: "key user:1" in browser.text("#mismatches"), "the example's line")
    line = browser.text("#mismatches summary")
    assert "get" in line and "value" in line
    browser.click("#mismatches summary")
    browser.wait_for(lambda: "Answers compared" in browser.text("#mismatches"), "its details")
    text = browser.text("#mismatches")
    assert '"profile" 7 bytes' in text and '"tampered" 8 bytes' in text  # side by side
    assert "Re-read (ordered)" in text
    assert "action: copied to redis" in text
    assert "-0.813 s" in text and "the mismatch" in text and "#7" in text  # the history
    # Only the differing row is marked.
    marked = browser.script(
        "return [...document.querySelectorAll('#mismatches tr.differs td:first-child')]"
        ".map(td => td.textContent)"
    )
    assert marked == ["value", "value"]  # in the answers and in the re-read
    # The next poll keeps it open.
    browser.wait_for(
        lambda: browser.script("return document.querySelector('#mismatches details').open") is True,
        "still open",
    )


def test_console_charts_the_history_with_its_events(server: AdminThread, browser: Browser) -> None:
    def history() -> None:
        ops = server.ops
        # The audit trail stamps changes with the real time: the history's clock runs
        # around it, so the rate change below falls inside the charted period.
        server.clock.now = time.time() - 150
        ops.record_history()
        for minute in range(30):
            feed(server.stats, match=100 + minute, noise=3, mismatch=1 if minute == 20 else 0)
            if minute == 10:
                server.control.set_rate(0.5, "api", "wider")
            server.clock.advance(10)
            ops.record_history()

    server.run(history)
    browser.open(server.url)
    browser.wait_for(
        lambda: browser.script("return document.querySelectorAll('#charts svg').length") == 4,
        "the four charts",
    )
    drawn = browser.script(
        "return [...document.querySelectorAll('#charts polyline')]"
        ".map(p => [p.dataset.field, p.getAttribute('points').split(' ').length])"
    )
    assert dict(drawn)["match"] == 30 and dict(drawn)["sample_rate"] == 30
    # the rate change is marked on the time axis, with what it was
    marks = browser.script(
        "return [...document.querySelectorAll('#charts svg title')].map(t => t.textContent)"
    )
    assert any("sample_rate" in m and "0.5" in m for m in marks), marks
    # hovering a chart reads out the point under the pointer
    browser.script(
        "const s = document.querySelector('#charts svg'); const r = s.getBoundingClientRect();"
        "s.dispatchEvent(new MouseEvent('mousemove', {clientX: r.right - 1, clientY: r.top + 5}));"
    )
    readout = browser.text("#history-readout")
    assert "match 129" in readout and "rate 50.0%" in readout, readout


def test_console_shows_the_readiness_verdict(server: AdminThread, browser: Browser) -> None:
    server.run(lambda: feed(server.stats, match=40_000, noise=5))
    browser.open(server.url)
    browser.wait_for(
        lambda: browser.text("#readiness-verdict").startswith("Ready: 0 mismatches in 40k"),
        "the verdict",
    )
    assert "ready" in browser.script(
        "return document.getElementById('readiness-verdict').className"
    )
    assert "get" in browser.text("#readiness-commands")
    assert browser.text("#readiness-noise") == "transient_race 5"
    server.run(lambda: feed(server.stats, mismatch=2))
    browser.open(server.url)
    browser.wait_for(
        lambda: browser.text("#readiness-verdict").startswith("Not ready: 2 mismatches"),
        "the verdict to turn",
    )
