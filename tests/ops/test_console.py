"""The console end to end in a real headless Chromium: it loads, shows the live state, and
its controls change the proxy's ShadowControl (rate, kill switch, halt) with the token."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.address import HostPort
from proxy.admin import AdminServer
from proxy.config import (
    AdminConfig,
    Config,
    GuardsConfig,
    LatencyGuardConfig,
    RampConfig,
    ShadowConfig,
)
from proxy.metrics import ProxyMetrics
from proxy.ops.operations import Operations
from proxy.redis.url import RedisURL
from proxy.shadow.control import ShadowControl
from proxy.shadow.examples import MismatchExamples
from proxy.shadow.stats import ShadowStats
from tests.ops.support import Clock, feed, requests
from tests.ops.webdriver import CHROMEDRIVER, CHROMIUM, Browser
from tests.support import wait_until

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)

TOKEN = "console-token"


class AdminThread:
    """The admin server and the operator pieces on their own event loop thread."""

    def __init__(
        self, examples: MismatchExamples | None = None, shadow: ShadowConfig | None = None
    ) -> None:
        shadow = shadow or ShadowConfig(
            sample_rate=0.1, guards=GuardsConfig(latency=LatencyGuardConfig(enabled=False))
        )
        admin = AdminConfig(listen=HostPort("127.0.0.1", 0), token=TOKEN)
        self.config = dataclasses.replace(Config(), shadow=shadow, admin=admin)
        self.clock = Clock()
        self.control = ShadowControl(shadow.sample_rate)
        self.stats = ShadowStats()
        self.metrics = ProxyMetrics()
        # The client path's requests, which a test adds with serve().
        self.stats.client_requests_fn = self.metrics.requests.total
        self.examples = examples
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))
        self.thread.start()
        assert self.ready.wait(10)

    async def main(self) -> None:
        metrics = self.metrics
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
            examples=self.examples,
        )
        await self.admin.start()
        self.stopping = asyncio.Event()
        self.ready.set()
        await self.stopping.wait()
        await self.admin.stop()

    def serve(self, count: int, seconds: float = 0.0002) -> None:
        """Count client requests served (on the loop thread: call it through run)."""
        requests(self.metrics.requests_for("default"), count, seconds)

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


def contains(browser: Browser, css: str, text: str) -> Callable[[], bool]:
    return lambda: text in browser.text(css)


def test_console_drives_the_shadow(server: AdminThread, browser: Browser) -> None:
    browser.open(server.url)
    wait_until(
        lambda: browser.text("#sample-rate") == "0.1 (as configured)", what="the live rate"
    )
    assert browser.text("#status-pill") == "shadowing"
    assert browser.text("#halted") == "no"
    assert "no ramp configured" in browser.text("#ramp-phase")
    wait_until(
        lambda: "does not serve mismatch examples" in browser.text("#mismatches"),
        what="the missing examples route to be shown gracefully",
    )

    # Without the token the change is refused, and the page says why.
    browser.type("#rate-input", "0.37")
    browser.click("#set-rate")
    wait_until(lambda: browser.text("#message").startswith("401"), what="the refusal")
    assert "needs the admin token" in browser.text("#message")
    assert server.run(lambda: server.control.sample_rate) == 0.1

    browser.type("#token", TOKEN)
    browser.click("#set-rate")
    wait_until(lambda: server.run(lambda: server.control.sample_rate) == 0.37, what="new rate")
    wait_until(
        lambda: browser.text("#sample-rate").startswith("0.37 (set by an operator (API) at "),
        what="the page to follow",
    )
    assert browser.text("#message") == "done: sample_rate 0.1 \u2192 0.37"

    # A bad value never leaves the page.
    browser.type("#rate-input", "7")
    browser.click("#set-rate")
    assert browser.text("#message") == "the sample rate must be a number from 0 to 1"

    # The token survives a reload of the page (sessionStorage), and the kill switch works.
    browser.open(server.url)
    assert browser.script("return document.getElementById('token').value") == TOKEN
    browser.click("#kill")
    wait_until(lambda: not server.run(lambda: server.control.enabled), what="the kill switch")
    wait_until(lambda: browser.text("#status-pill") == "shadow off", what="the page to follow")
    browser.click("#enable")
    wait_until(lambda: server.run(lambda: server.control.enabled), what="shadowing back on")


def test_console_shows_a_halt_and_clears_it(server: AdminThread, browser: Browser) -> None:
    def trip() -> None:
        server.ops.autopilot.tick()
        feed(server.stats, match=100, errors=200)
        server.clock.advance(5)
        server.ops.autopilot.tick()

    server.run(trip)
    assert server.run(lambda: server.ops.autopilot.halt) is not None
    browser.open(server.url)
    wait_until(lambda: browser.text("#halted") == "yes", what="the halt")
    assert browser.text("#halt-rule") == "the errors guard"
    assert browser.text("#halt-action") == "stop (it switched shadowing off)"
    assert browser.text("#status-pill") == "halted"
    # Who stopped it and why, in words: not "kill switch".
    status = browser.text("#shadow-status")
    assert status.startswith("off: stopped by the errors guard at ")
    assert "because Redis errors ratio 66.67%" in status
    assert status.endswith("Clear the halt to switch it back on.")
    assert "kill switch" not in status
    assert "errors" in browser.text("#audit")
    browser.type("#token", TOKEN)
    browser.click("#clear-halt")
    wait_until(lambda: server.run(lambda: server.ops.autopilot.halt) is None, what="clearing")
    assert server.run(lambda: server.control.enabled)
    wait_until(lambda: browser.text("#halted") == "no", what="the page to follow")


def test_console_tells_a_mismatch_s_story(browser: Browser) -> None:
    examples = MismatchExamples(reveal=True)
    server = AdminThread(examples)
    try:
        _tell_a_story(server, examples, browser)
    finally:
        server.stop()


def _tell_a_story(server: AdminThread, examples: MismatchExamples, browser: Browser) -> None:
    def record() -> None:
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
    browser.type("#token", TOKEN)  # plaintext goes to token holders only
    wait_until(lambda: "key user:1" in browser.text("#mismatches"), what="the example's line")
    line = browser.text("#mismatches summary")
    assert "get" in line and "value" in line
    browser.click("#mismatches summary")
    wait_until(lambda: "Answers compared" in browser.text("#mismatches"), what="its details")
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
    wait_until(
        lambda: browser.script("return document.querySelector('#mismatches details').open") is True,
        what="still open",
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
    wait_until(
        lambda: browser.script("return document.querySelectorAll('#charts svg').length") == 4,
        what="the four charts",
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
    def served() -> None:
        feed(server.stats, match=40_000, noise=5)
        server.serve(40_005)

    server.run(served)
    browser.open(server.url)
    wait_until(
        lambda: browser.text("#readiness-verdict").startswith("Ready: 0 mismatches in 40k"),
        what="the verdict",
    )
    assert "ready" in browser.script(
        "return document.getElementById('readiness-verdict').className"
    )
    assert "get" in browser.text("#readiness-commands")
    assert browser.text("#readiness-noise") == "transient_race 5"
    server.run(lambda: feed(server.stats, mismatch=2))
    browser.open(server.url)
    wait_until(
        lambda: browser.text("#readiness-verdict").startswith("Not ready: 2 mismatches"),
        what="the verdict to turn",
    )


# --- the console says what happened, in words (issue 25) ---------------------------------------

RAMP = RampConfig(steps=(0.01, 0.05, 0.25, 1.0), hold=60.0, min_comparisons=100)


def _no_raw_json(browser: Browser) -> None:
    text = browser.text("main")
    assert '{"' not in text and "{'" not in text, text


def test_console_says_who_stopped_it_redis_down_and_the_ramp_s_real_state(
    browser: Browser,
) -> None:
    shadow = ShadowConfig(
        redis=RedisURL.parse("redis://127.0.0.1:6379/0"),
        ramp=RAMP,
        guards=GuardsConfig(latency=LatencyGuardConfig(enabled=False)),
    )
    server = AdminThread(shadow=shadow)
    try:
        # The ramp starts on 0.01; an operator sets 1.0 by hand (the ramp pauses there).
        def by_hand() -> None:
            server.control.set_rate(1.0, "api", "all keys now")
            server.ops.autopilot.tick()
            feed(server.stats, match=300)
            server.serve(2_500_000)  # the sampled keys carried 0.012% of the requests
            server.clock.advance(5)
            server.ops.autopilot.tick()

        server.run(by_hand)
        browser.open(server.url)
        wait_until(contains(browser, "#ramp-phase", "but the live rate is 1"), what="the ramp")
        phase = browser.text("#ramp-phase")
        assert phase.startswith("paused, on step 1/4 (0.01); but the live rate is 1 (step 4), ")
        assert "set by an operator (API) at " in phase and phase.endswith(
            "resume goes on from the step at or below it"
        )
        current = browser.script(
            "return [...document.querySelectorAll('#ramp-steps span.current')]"
            ".map(s => s.textContent)"
        )
        assert current == ["1"]  # the live rate's step is the one highlighted
        assert browser.text("#coverage") == (
            "100% of keys (by construction); 0.012% of the client requests in the last 5 s "
            "(300 of 2,500,000)"
        )

        # Redis goes down: no guard stops the shadow, and the page says so in words.
        def outage() -> None:
            for _ in range(3):
                server.stats.shadowed["get"] += 1000
                server.stats.errors["redis_unavailable"] += 1000
                server.stats.dropped["redis_down"] += 1000
                server.clock.advance(5)
                server.ops.autopilot.tick()

        server.run(outage)
        wait_until(lambda: browser.text("#status-pill") == "Redis down", what="Redis down")
        redis = browser.text("#redis")
        assert ": Redis is down, unreachable since " in redis
        assert "resumes by itself when Redis answers, every key cold" in redis
        assert browser.text("#halted") == "no"
        figures = browser.text("#figures-body")
        assert "Redis was not reachable (redis_down) 3,000" in figures
        assert "Redis was not reachable (redis_unavailable) 3,000" in figures
        _no_raw_json(browser)

        # The kill switch, said as such, with who and when.
        server.run(lambda: server.control.set_enabled(False, "api", "maintenance"))
        wait_until(contains(browser, "#shadow-status", "kill switch"), what="the kill switch")
        assert browser.text("#shadow-status").startswith(
            "off: kill switch, set by an operator (API) at "
        )
        assert browser.text("#shadow-status").endswith(": maintenance")
    finally:
        server.stop()


def test_console_has_one_time_format_local_with_the_zone(tmp_path: Path) -> None:
    """Every time on the page in the browser's zone (here Tokyo), as 2023-11-15 07:13:20 JST:
    the audit trail, the halt, the examples, the readiness periods; never UTC ISO strings."""
    import datetime
    import zoneinfo

    examples = MismatchExamples(secret=b"0123456789abcdef", wall_clock=lambda: 1_700_000_000.0)
    server = AdminThread(examples)
    browser = Browser(tmp_path / "profile", timezone="Asia/Tokyo")
    try:

        def story() -> None:
            server.ops.record_history()
            server.ops.autopilot.tick()
            feed(server.stats, match=100, errors=200)
            server.serve(300)
            server.clock.advance(10)
            server.ops.autopilot.tick()
            server.ops.record_history()
            examples.record("value", "get", b"k", {"value": b"a"}, {"value": b"b"}, "")

        server.run(story)
        browser.open(server.url)
        wait_until(lambda: browser.text("#halted") == "yes", what="the halt")
        wait_until(contains(browser, "#mismatches", "value"), what="the example")
        tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")
        shown = datetime.datetime.fromtimestamp(1_700_000_000, tokyo)
        assert browser.text("#mismatches summary").startswith(
            shown.strftime("%Y-%m-%d %H:%M:%S ")
        )
        halt_at = server.run(lambda: server.ops.autopilot.halt.since)  # type: ignore[union-attr]
        expected = datetime.datetime.fromtimestamp(halt_at, tokyo).strftime("%Y-%m-%d %H:%M:%S")
        assert browser.text("#halt-since").startswith(expected + " ")
        zone = browser.text("#halt-since").split(" ", 2)[2]
        assert zone in ("JST", "GMT+9"), zone
        text = browser.text("main")
        stamps = re.findall(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(?::\d\d)?\S*(?: \S+)?", text)
        assert stamps, text
        for stamp in stamps:
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (JST|GMT\+9)", stamp), stamp
        assert "UTC" not in text and "Z " not in text
        _no_raw_json(browser)
    finally:
        browser.close()
        server.stop()


def test_console_looks_a_key_up_reveals_behind_the_token_and_restarts_evidence(
    browser: Browser,
) -> None:
    examples = MismatchExamples(
        secret=b"0123456789abcdef", secret_source="MEMSHADOW_EXAMPLES_SECRET"
    )
    server = AdminThread(examples)
    try:

        def record() -> None:
            for key in (b"user:41", b"user:42"):
                examples.record(
                    "missing_in_redis", "get", key, {"present": True}, {"present": False}, ""
                )
            for _ in range(7):
                server.stats.count_comparison("get", "noise", "redis_evicted")

        server.run(record)
        # The what-if says, in a sentence, when its Redis figure is the worker's starvation.
        starved = {"seconds": 60.0, "cpu_share": 0.97, "wait_share": 0.38, "workers": 1}
        server.ops.api.worker_load = lambda: starved
        browser.open(server.url)
        wait_until(contains(browser, "#examples-privacy", "MEMSHADOW_EXAMPLES_SECRET"),
                         what="the privacy line")  # fmt: skip
        wait_until(
            lambda: browser.text("#trust").startswith(
                "Not trustworthy: the shadow worker used 97% of a core and waited for a CPU "
                "38.0% of the time over the last 60 s"
            ),
            what="the what-if's word on its Redis figure",
        )
        assert "97% of a core" in browser.text("#service")
        assert "a key hashes the same across restarts; look one up below" in browser.text(
            "#examples-privacy"
        )
        assert "user:42" not in browser.text("#mismatches")
        # Looking a key up needs the token (it confirms a guessed key).
        browser.type("#lookup-key", "user:42")
        browser.click("#lookup")
        wait_until(lambda: browser.text("#lookup-result").startswith("401"), what="refusal")
        browser.type("#token", TOKEN)
        browser.click("#lookup")
        digest = examples.hash(b"user:42")
        wait_until(
            lambda: browser.text("#lookup-result")
            == f"key hash #{digest}: 1 example(s) of this key, marked below",
            what="the lookup",
        )
        found = browser.script(
            "return [...document.querySelectorAll('#mismatches details.found')]"
            ".map(d => d.dataset.hash)"
        )
        assert found == [digest]
        # The reveal: audited, for the examples recorded from then on, token holders only.
        browser.click("#reveal-on")
        wait_until(lambda: server.run(lambda: examples.reveal), what="the reveal")
        wait_until(contains(browser, "#examples-privacy", "shown to admin token holders"),
                         what="the page to say so")  # fmt: skip
        server.run(lambda: examples.record(
            "value", "get", b"user:43", {"value": b"x"}, {"value": b"y"}, ""))  # fmt: skip
        wait_until(contains(browser, "#mismatches", "key user:43 #"), what="the revealed key")
        assert "user:42" not in browser.text("#mismatches")  # recorded before: still private
        assert "reveal_examples" in browser.text("#audit")
        # Redis's evictions are a capacity result, said as such.
        wait_until(
            contains(browser, "#readiness-capacity", "Redis evicted 7 keys Memcached still held: "
                     "this working set needs more than maxmemory"), what="the capacity finding",
        )  # fmt: skip
        # Restarting the evidence is an audited act, with its reason.
        browser.type("#evidence-reason", "maxmemory raised")
        browser.click("#restart-evidence")
        wait_until(
            contains(browser, "#readiness-since", "restarted by api: maxmemory raised"),
            what="the restart",
        )
        wait_until(lambda: browser.text("#readiness-capacity") == "", what="a fresh report")
        assert "evidence: running \u2192 restarted" in browser.text("#audit")
    finally:
        server.stop()
