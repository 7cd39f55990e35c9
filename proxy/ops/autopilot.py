"""The autopilot: a small asyncio task that feeds the ramp and guard policies the live figures
and applies what they decide to ShadowControl, keeping the halt state that only an operator
(or a config reload) lifts. tick() does one round without any I/O, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.config import ShadowConfig
from proxy.metrics import RequestFigures
from proxy.ops.audit import AuditLog
from proxy.ops.causes import Cause, count_by_cause, describe
from proxy.ops.guards import Action, Exposure, GuardPolicy, Trip, request_buckets
from proxy.ops.ramp import RampMove, RampPhase, RampPolicy
from proxy.ops.report import TrafficWindow
from proxy.shadow.control import ControlChange, ShadowControl
from proxy.shadow.stats import ShadowStats, StatsSnapshot
from proxy.shadow.words import GUARD_SEVERITY, Outcome

log = logging.getLogger("memshadow.autopilot")

HISTORY_SECONDS = 600.0  # figures kept for the console's rates and the report's window
FIGURES_WINDOW = 60.0
REPORT_WINDOW = 300.0


@dataclass(frozen=True, slots=True)
class Halt:
    rule: str
    action: Action
    reason: str
    since: float  # unix time
    stopped_shadow: bool  # the halt switched shadowing off (clearing it switches it back on)

    def as_json(self) -> dict[str, Any]:
        return {
            "halted": True,
            "rule": self.rule,
            "action": self.action.value,
            "reason": self.reason,
            "since": self.since,
        }


NO_HALT = {"halted": False, "rule": None, "action": None, "reason": None, "since": None}


@dataclass(frozen=True, slots=True)
class Setter:
    """Who last set a live setting, when and why (the console says it in words)."""

    source: str  # "api", "ramp", "halt:<rule>", "reload", "config"
    at: float  # unix time; 0 for the configuration memshadow started with
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"source": self.source, "at": self.at or None, "reason": self.reason}


STARTED = Setter("config", 0.0, "the configuration memshadow started with")


@dataclass(frozen=True, slots=True)
class _Point:
    """The figures at one tick, and what the shadow did in the interval that ended there."""

    at: float
    snapshot: StatsSnapshot
    redis_commands: int
    rate: float  # the sample rate during that interval
    clean: bool  # shadowing throughout the interval, with no change of its settings
    connect_failures: int = 0  # refused connects to Redis so far


class Autopilot:
    """Runs the ramp and the guards against one ShadowControl. Event-loop thread only."""

    def __init__(
        self,
        control: ShadowControl,
        stats: ShadowStats,
        requests: RequestFigures,
        config: ShadowConfig,
        audit: AuditLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.control = control
        self.stats = stats
        self.requests = requests
        self.audit = audit
        self.clock = clock
        self.config = config
        now = clock()
        self.guards = GuardPolicy(config.guards, now=now)
        self.ramp = self._new_ramp(config, now)
        self.halt: Halt | None = None
        self.halts_total: Counter[str] = Counter()  # by rule
        self.rate_set_by = STARTED  # who set the current sample rate
        self.enabled_set_by = STARTED  # who switched shadowing on or off last
        self._history: deque[_Point] = deque()
        self._changed = False  # the shadow's exposure changed since the last tick
        self._redis_down_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        control.add_listener(self._on_change)
        self._apply_move(self.ramp.start(), "ramp")

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self.tick()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="autopilot")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.guards.interval)
            try:
                self.tick()
            except Exception:  # a bug here must not end the task, nor the proxy
                log.exception("autopilot tick failed")

    # --- one round ------------------------------------------------------------------------

    def tick(self) -> None:
        """Evaluate the guards, then the ramp, and apply their decisions."""
        now = self.clock()
        snapshot = self.stats.snapshot()
        rate = self.control.sample_rate
        active = self.control.active
        exposure = Exposure.MIXED if self._changed else Exposure.ON if active else Exposure.OFF
        self._changed = False  # the listener sets it again if anything changes from here
        self._history.append(
            _Point(
                now,
                snapshot,
                self.stats.redis_commands,
                rate,
                exposure is Exposure.ON,
                sum(self.stats.connect_failures.values()),
            )
        )
        while len(self._history) > 2 and self._history[1].at <= now - HISTORY_SECONDS:
            self._history.popleft()
        self._follow_redis(now)
        buckets = request_buckets(self.requests.snapshot())
        for trip in self.guards.observe(now, snapshot, buckets, exposure):
            self._trip(trip, now, snapshot)
        baseline = self.guards.baseline_progress()
        move = self.ramp.tick(now, snapshot, baseline=baseline, shadow_enabled=self.control.enabled)
        self._apply_move(move, "ramp")

    def _apply_move(self, move: RampMove | None, source: str) -> None:
        if move is not None:
            self.control.set_rate(move.rate, source, move.reason)

    def _trip(self, trip: Trip, now: float, snapshot: StatsSnapshot) -> None:
        current = self.halt
        if current is not None and GUARD_SEVERITY[trip.action] <= GUARD_SEVERITY[current.action]:
            return  # already halted at least this hard
        self.halts_total[trip.rule] += 1
        source = f"halt:{trip.rule}"
        reason = trip.reason
        stopped = current.stopped_shadow if current is not None else False
        if trip.action is Action.STOP:
            stopped = self.control.set_enabled(False, source, reason) is not None or stopped
        elif trip.action is Action.STEP_BACK:
            rate = self.control.sample_rate
            setter = self.rate_set_by
            move = self.ramp.step_back(now, snapshot, rate)
            if move is None:
                reason += f"; no ramp step below the current rate {rate:g}, so holding"
            else:
                came = f"set by {setter.source}" if setter.source != "config" else "configured"
                self.control.set_rate(
                    move.rate, source, f"{reason}; {move.reason} (the rate {rate:g} was {came})"
                )
        self.ramp.halted = True
        self.halt = Halt(trip.rule, trip.action, reason, now, stopped)
        self.audit.record(source, "halt", current is not None, True, f"{trip.action}: {reason}")

    def _on_change(self, change: ControlChange) -> None:
        self._changed = True
        setter = Setter(change.source, change.at, change.reason)
        if change.field == "sample_rate":
            self.rate_set_by = setter
        elif change.field == "enabled":
            self.enabled_set_by = setter
        by_policy = change.source == "ramp" or change.source.startswith("halt:")
        if change.field == "sample_rate" and not by_policy and self.ramp.phase in (
            RampPhase.RAMPING,
            RampPhase.BASELINE,
        ):
            self.pause_ramp(
                change.source, f"sample_rate set to {change.new:g} by {change.source}"
            )

    # --- operator actions -----------------------------------------------------------------

    def pause_ramp(self, source: str, reason: str = "paused by an operator") -> bool:
        if not self.ramp.pause(reason):
            return False
        self.audit.record(source, "ramp", "running", "paused", reason)
        return True

    def resume_ramp(self, source: str) -> bool:
        if not self.ramp.paused:
            return False
        now = self.clock()
        move = self.ramp.resume(now, self.stats.snapshot(), self.control.sample_rate)
        self.audit.record(source, "ramp", "paused", "running", self.ramp.reason)
        self._apply_move(move, "ramp")
        return True

    def clear_halt(self, source: str, reason: str = "cleared by an operator") -> bool:
        """Lift the halt: switch shadowing back on if the halt switched it off, and start
        every window afresh so the old figures cannot trip a rule again at once."""
        halt = self.halt
        if halt is None:
            return False
        self.halt = None
        now = self.clock()
        self.audit.record(source, "halt", True, False, f"{reason} (was {halt.rule}: {halt.reason})")
        if halt.stopped_shadow and not self.control.enabled:
            self.control.set_enabled(True, source, "halt cleared")
        self.ramp.halted = False
        self.ramp.restart_step(now, self.stats.snapshot())
        self.guards.reset(now)
        return True

    def restart_evidence(self) -> None:
        """Start the ramp step's evidence and the guards' windows afresh (an operator
        restarted the readiness evidence, say after fixing Redis's configuration)."""
        now = self.clock()
        self.ramp.restart_step(now, self.stats.snapshot())
        self.guards.reset(now)

    def reconfigure(self, config: ShadowConfig) -> None:
        """Take new ramp and guard settings (a reload). The latency baseline survives; a
        changed ramp starts again from the step at or below the current rate."""
        old, self.config = self.config, config
        if config.guards != old.guards:
            self.guards.reconfigure(config.guards)
        if config.ramp != old.ramp:
            self.ramp = self._new_ramp(config, self.clock())
            self._apply_move(self.ramp.start(), "ramp")

    def _new_ramp(self, config: ShadowConfig, now: float) -> RampPolicy:
        progress = self.guards.baseline_progress()
        return RampPolicy(
            config.ramp,
            now=now,
            snapshot=self.stats.snapshot(),
            start_rate=self.control.sample_rate,
            baseline_first=progress is not None and progress[0] < progress[1],
        )

    # --- what the API shows ---------------------------------------------------------------

    @property
    def ramp_step(self) -> int:
        """1-based step number for the metric; 0 without a ramp or before the first step."""
        return self.ramp.index + 1 if self.ramp.configured else 0

    def status(self) -> dict[str, Any]:
        halt = self.halt.as_json() if self.halt is not None else dict(NO_HALT)
        halt["stopped_shadow"] = self.halt.stopped_shadow if self.halt is not None else False
        return {
            "ramp": self._ramp_status(),
            "halt": halt,
            "guards": [rule.as_json() for rule in self.guards.status()],
            "halts_total": dict(self.halts_total),
            "interval_seconds": self.config.guards.interval,
            "rate_set_by": self.rate_set_by.as_json(),
            "enabled_set_by": self.enabled_set_by.as_json(),
            "redis": self.redis_state(),
        }

    def _ramp_status(self) -> dict[str, Any]:
        """The ramp's own status, and how it stands against the live rate: the rate may be
        off the ramp's steps (set by hand) or away from its step (paused, halted)."""
        status = self.ramp.status()
        rate = self.control.sample_rate
        steps = self.ramp.steps
        status["rate"] = rate
        status["rate_step"] = steps.index(rate) if rate in steps else None
        status["on_its_step"] = self.ramp.configured and self.ramp.rate == rate
        return status

    def _follow_redis(self, now: float) -> None:
        """Is Redis reachable? Judged on the interval since the last tick: work lost because
        Redis was down (or a refused connect) and no comparison made means it is not."""
        if len(self._history) < 2:
            return
        last, before = self._history[-1], self._history[-2]
        window = last.snapshot.minus(before.snapshot)
        down = count_by_cause(window.errors, errors=True).get(Cause.REDIS_DOWN, 0)
        down += count_by_cause(window.dropped, errors=False).get(Cause.REDIS_DOWN, 0)
        refused = last.connect_failures - before.connect_failures
        if window.compared > 0:
            self._redis_down_since = None
        elif (down or refused) and self._redis_down_since is None:
            self._redis_down_since = before.at

    def redis_state(self) -> dict[str, Any]:
        """Redis reachable or not, from the latest interval's figures (no probe of its own)."""
        if self._redis_down_since is not None:
            return {"state": "unreachable", "since": self._redis_down_since}
        if len(self._history) < 2:
            return {"state": "unknown", "since": None}
        last, before = self._history[-1], self._history[-2]
        if last.snapshot.minus(before.snapshot).compared > 0:
            return {"state": "reachable", "since": None}
        return {"state": "unknown", "since": None}  # nothing went to Redis lately

    def figures(self) -> dict[str, Any]:
        """The latest window (up to FIGURES_WINDOW seconds) and the totals since start, kept
        apart: counts by kind and reason, each readable, never mixed across the two."""
        latest = self.stats.snapshot()
        lag = self.stats.lag
        result: dict[str, Any] = {
            "totals": _counts(latest, self.control.sample_rate),
            "skipped": _named(dict(self.stats.skipped)),
            "lag_seconds": {"p50": lag.quantile(0.5), "p99": lag.quantile(0.99)},
            "queue_depth": self.stats.queue_depth,
            "window_seconds": None,
            "window": None,
        }
        if len(self._history) < 2:
            return result
        newest = self._history[-1]
        base = self._history[0]
        for point in self._history:
            if point.at > newest.at - FIGURES_WINDOW:
                break
            base = point
        seconds = newest.at - base.at
        if seconds <= 0:
            return result
        window = newest.snapshot.minus(base.snapshot)
        counts = _counts(window, self.control.sample_rate)
        counts.update(
            shadowed_per_second=window.shadowed / seconds,
            compared_per_second=window.compared / seconds,
            dropped_per_second=window.drop_count / seconds,
        )
        result.update(window_seconds=seconds, window=counts)
        return result

    def traffic_window(self) -> TrafficWindow | None:
        """Up to REPORT_WINDOW seconds of history at the current sample rate, shadow on."""
        points = list(self._history)
        if len(points) < 2:
            return None
        newest = points[-1]
        base = newest
        for earlier, later in zip(reversed(points[:-1]), reversed(points[1:]), strict=True):
            if not later.clean or later.rate != newest.rate:
                break
            if earlier.at < newest.at - REPORT_WINDOW:
                break
            base = earlier
        if base is newest:
            return None
        window = newest.snapshot.minus(base.snapshot)
        return TrafficWindow(
            seconds=newest.at - base.at,
            shadowed=window.shadowed,
            redis_commands=newest.redis_commands - base.redis_commands,
            client_requests=window.client_requests,
        )


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None


def _named(counts: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"name": name, "count": count}
        for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        if count
    ]


def _counts(figures: StatsSnapshot, key_share: float) -> dict[str, Any]:
    """One period's figures as the API shows them: coverage (keys by construction, requests
    as counted), verdicts, and drops and errors by reason with their cause and words."""
    compared = figures.compared
    return {
        "shadowed": figures.shadowed,
        "client_requests": figures.client_requests,
        "traffic_share": _ratio(figures.shadowed, figures.client_requests),
        "key_share": key_share,
        "compared": compared,
        "match": figures.comparisons.get(Outcome.MATCH, 0),
        "mismatch": figures.mismatch_count,
        "noise": figures.comparisons.get(Outcome.NOISE, 0),
        "match_ratio": _ratio(figures.comparisons.get(Outcome.MATCH, 0), compared),
        "mismatch_ratio": _ratio(figures.mismatch_count, compared),
        "noise_ratio": _ratio(figures.comparisons.get(Outcome.NOISE, 0), compared),
        "drop_ratio": _ratio(figures.drop_count, figures.shadowed),
        "error_ratio": _ratio(figures.error_count, figures.shadowed),
        "mismatch_kinds": _named(figures.mismatches),
        "noise_reasons": _named(figures.noise),
        "dropped": describe(figures.dropped, errors=False),
        "errors": describe(figures.errors, errors=True),
        "dropped_total": figures.drop_count,
        "errors_total": figures.error_count,
    }
