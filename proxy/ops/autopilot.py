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
from proxy.ops.guards import Action, Exposure, GuardPolicy, Trip, request_buckets
from proxy.ops.ramp import RampMove, RampPhase, RampPolicy
from proxy.ops.report import TrafficWindow
from proxy.shadow.control import ControlChange, ShadowControl
from proxy.shadow.stats import ShadowStats, StatsSnapshot

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
class _Point:
    """The figures at one tick, and what the shadow did in the interval that ended there."""

    at: float
    snapshot: StatsSnapshot
    redis_commands: int
    rate: float  # the sample rate during that interval
    clean: bool  # shadowing throughout the interval, with no change of its settings


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
        self._history: deque[_Point] = deque()
        self._changed = False  # the shadow's exposure changed since the last tick
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
            _Point(now, snapshot, self.stats.redis_commands, rate, exposure is Exposure.ON)
        )
        while len(self._history) > 2 and self._history[1].at <= now - HISTORY_SECONDS:
            self._history.popleft()
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
        if current is not None and trip.action.severity <= current.action.severity:
            return  # already halted at least this hard
        self.halts_total[trip.rule] += 1
        source = f"halt:{trip.rule}"
        reason = trip.reason
        stopped = current.stopped_shadow if current is not None else False
        if trip.action is Action.STOP:
            stopped = self.control.set_enabled(False, source, reason) is not None or stopped
        elif trip.action is Action.STEP_BACK:
            move = self.ramp.step_back(now, snapshot)
            if move is None:
                reason += "; no lower ramp step, so holding"
            else:
                self.control.set_rate(move.rate, source, f"{reason}; {move.reason}")
        self.ramp.halted = True
        self.halt = Halt(trip.rule, trip.action, reason, now, stopped)
        self.audit.record(source, "halt", current is not None, True, f"{trip.action}: {reason}")

    def _on_change(self, change: ControlChange) -> None:
        self._changed = True
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
        return {
            "ramp": self.ramp.status(),
            "halt": self.halt.as_json() if self.halt is not None else dict(NO_HALT),
            "guards": [rule.as_json() for rule in self.guards.status()],
            "halts_total": dict(self.halts_total),
            "interval_seconds": self.config.guards.interval,
        }

    def figures(self) -> dict[str, Any]:
        """Recent rates (over up to FIGURES_WINDOW seconds) and totals since start."""
        latest = self.stats.snapshot()
        lag = self.stats.lag
        result: dict[str, Any] = {
            "totals": {
                "shadowed": latest.shadowed,
                "comparisons": latest.comparisons,
                "mismatches": latest.mismatches,
                "noise": latest.noise,
                "dropped": latest.dropped,
                "errors": latest.errors,
                "skipped": dict(self.stats.skipped),
            },
            "lag_seconds": {"p50": lag.quantile(0.5), "p99": lag.quantile(0.99)},
            "queue_depth": self.stats.queue_depth,
            "window_seconds": None,
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
        compared = window.compared
        result.update(
            window_seconds=seconds,
            shadowed_per_second=window.shadowed / seconds,
            compared_per_second=compared / seconds,
            match_ratio=_ratio(window.comparisons.get("match", 0), compared),
            mismatch_ratio=_ratio(window.mismatch_count, compared),
            noise_ratio=_ratio(window.comparisons.get("noise", 0), compared),
            dropped_per_second=window.drop_count / seconds,
            drop_ratio=_ratio(window.drop_count, window.shadowed),
            error_ratio=_ratio(window.error_count, window.shadowed),
        )
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
