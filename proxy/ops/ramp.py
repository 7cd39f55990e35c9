"""The automatic ramp as a sans-IO policy: fed a clock value and cumulative ShadowStats
snapshots, it says when to move to the next sample rate, and why it holds when it does not.

A step is left only when the step's own comparisons put the 95% Wilson upper bound of the
mismatch ratio below the target; too few comparisons to decide always means "hold".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.config import RampConfig
from proxy.shadow.stats import StatsSnapshot
from proxy.shadow.words import Outcome

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_upper(failures: int, trials: int, z: float = Z_95) -> float:
    """Upper bound of the Wilson score interval for the ratio failures/trials (1.0 when there
    are no trials: no evidence rules nothing out)."""
    if trials <= 0:
        return 1.0
    p = failures / trials
    z2 = z * z
    centre = p + z2 / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return min(1.0, (centre + spread) / (1 + z2 / trials))


def comparisons_needed(target: float, minimum: int, z: float = Z_95) -> int:
    """Fewest comparisons that could ever promote: even with no mismatch at all, the upper
    bound z²/(n+z²) is below ``target`` only once n > z²(1-target)/target."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be between 0 and 1, got {target!r}")
    by_bound = math.floor(z * z * (1 - target) / target) + 1
    return max(minimum, by_bound)


class RampPhase(StrEnum):
    OFF = "off"  # no steps configured
    BASELINE = "baseline"  # shadow off while the latency guard measures its baseline
    RAMPING = "ramping"  # on a step, collecting evidence
    DONE = "done"  # on the last step


@dataclass(frozen=True, slots=True)
class RampMove:
    """A decision of the ramp: set the sample rate to ``rate`` because of ``reason``."""

    rate: float
    step: int  # index into the steps; -1 for the baseline phase
    reason: str


@dataclass(frozen=True, slots=True)
class Evidence:
    """The current step's comparisons. Noise counts neither for nor against a step."""

    compared: int  # match + mismatch
    mismatches: int
    noise: int
    upper_bound: float  # Wilson 95% upper bound of mismatches / compared
    needed: int
    shadowed: int = 0  # requests handed to the shadow during the step
    client_requests: int = 0  # every client request during the step

    @property
    def traffic_share(self) -> float | None:
        """The share of the step's client requests the shadow saw."""
        return self.shadowed / self.client_requests if self.client_requests > 0 else None

    def as_json(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "mismatches": self.mismatches,
            "noise": self.noise,
            "mismatch_upper_bound": self.upper_bound,
            "comparisons_needed": self.needed,
            "shadowed_requests": self.shadowed,
            "client_requests": self.client_requests,
            "traffic_share": self.traffic_share,
        }


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.3g}%"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class RampPolicy:
    """Which ramp step the shadow is on, and whether the evidence allows the next one.

    Pure: every method takes the time (``now``, unix seconds) and, where figures matter, a
    cumulative StatsSnapshot; the caller applies the returned RampMove to ShadowControl.
    """

    def __init__(
        self,
        config: RampConfig,
        *,
        now: float,
        snapshot: StatsSnapshot,
        start_rate: float = 0.0,
        baseline_first: bool = False,
    ) -> None:
        self.config = config
        self.steps = config.steps
        self.needed = comparisons_needed(config.mismatch_target, config.min_comparisons)
        self.paused = False
        self.pause_reason = ""
        self.halted = False
        self.step_started = now
        self._step_snapshot = snapshot
        self.evidence: Evidence | None = None
        if not self.steps:
            self.phase = RampPhase.OFF
            self.index = -1
            self.reason = "no ramp configured (shadow.ramp.steps is empty)"
            return
        self.index = self._step_at_or_below(start_rate)
        if baseline_first and self.index == 0:
            self.phase = RampPhase.BASELINE
            self.index = -1
            self.reason = "hold: measuring the shadow-off latency baseline"
        else:
            self.phase = self._phase_of(self.index)
            self.reason = self._arrived_reason()

    # --- what the caller reads ----------------------------------------------------------

    @property
    def configured(self) -> bool:
        return self.phase is not RampPhase.OFF

    @property
    def rate(self) -> float:
        """The rate this step wants (0 during the baseline phase)."""
        if self.index < 0:
            return 0.0
        return self.steps[self.index]

    def start(self) -> RampMove | None:
        """The move that puts the shadow on the starting step (None without a ramp)."""
        if not self.configured:
            return None
        return RampMove(self.rate, self.index, self.reason)

    def next_change_at(self) -> float | None:
        """Earliest time the ramp may move on its own (None when it will not: done, paused,
        halted, off, or waiting for a baseline)."""
        if self.phase is not RampPhase.RAMPING or self.paused or self.halted:
            return None
        return self.step_started + self.config.hold

    def status(self) -> dict[str, Any]:
        return {
            "configured": self.configured,
            "phase": self.phase.value,
            "step": self.index,  # 0-based; -1 before the first step
            "steps": list(self.steps),
            "hold_seconds": self.config.hold,
            "mismatch_target": self.config.mismatch_target,
            "step_started": self.step_started if self.configured else None,
            "next_change_at": self.next_change_at(),
            "paused": self.paused,
            "halted": self.halted,
            "reason": self.reason,
            "evidence": self.evidence.as_json() if self.evidence is not None else None,
        }

    # --- inputs ---------------------------------------------------------------------------

    def tick(
        self,
        now: float,
        snapshot: StatsSnapshot,
        *,
        baseline: tuple[int, int] | None = None,
        shadow_enabled: bool = True,
    ) -> RampMove | None:
        """Look at the figures; a RampMove when the next step is due. ``baseline`` is the
        latency guard's (requests measured, requests needed) while the phase is BASELINE."""
        if not self.configured or self.phase is RampPhase.DONE:
            return None
        if self.phase is RampPhase.BASELINE:
            return self._tick_baseline(now, snapshot, baseline)
        self.evidence = self._evidence(snapshot)
        if self.paused:
            self.reason = f"paused: {self.pause_reason}"
            return None
        if self.halted:
            self.reason = "halted: a guard rule stopped the ramp; clear the halt to go on"
            return None
        if not shadow_enabled:
            self.reason = "hold: shadowing is switched off (kill switch)"
            return None
        ev = self.evidence
        target = self.config.mismatch_target
        if ev.compared < ev.needed:
            self.reason = f"hold: too few comparisons ({ev.compared}/{ev.needed})"
            share = ev.traffic_share
            if share is not None and share < self.rate / 10:
                # Keys are sampled, not requests: with a skewed key mix the sampled keys can
                # carry far less than their share of the traffic.
                self.reason += (
                    f": the sampled keys ({_percent(self.rate)} of keys) carried only "
                    f"{_percent(share)} of this step's {ev.client_requests} requests"
                )
            return None
        if ev.upper_bound >= target:
            self.reason = (
                f"hold: mismatch ratio may be as high as {_percent(ev.upper_bound)} "
                f"({ev.mismatches}/{ev.compared}, 95% upper bound), target {_percent(target)}"
            )
            return None
        left = self.step_started + self.config.hold - now
        if left > 0:
            self.reason = f"hold: evidence is good; minimum hold time, {_duration(left)} left"
            return None
        held = now - self.step_started
        self._enter(self.index + 1, now, snapshot)
        reason = (
            f"promoted after {_duration(held)}: {ev.mismatches} mismatches "
            f"in {ev.compared} comparisons, upper bound {_percent(ev.upper_bound)} "
            f"< target {_percent(target)}"
        )
        self.reason = reason if self.phase is RampPhase.RAMPING else f"done: {reason}"
        return RampMove(self.rate, self.index, reason)

    def pause(self, reason: str) -> bool:
        """Stop taking steps until resume(); False when already paused or not ramping."""
        if not self.configured or self.paused:
            return False
        self.paused = True
        self.pause_reason = reason
        self.reason = f"paused: {reason}"
        return True

    def resume(self, now: float, snapshot: StatsSnapshot, current_rate: float) -> RampMove | None:
        """Go on from the highest step at or below the current rate, with a fresh hold (the
        rate may have been changed by hand meanwhile). A move when the rate must change."""
        if not self.configured or not self.paused:
            return None
        self.paused = False
        self.pause_reason = ""
        if self.phase is RampPhase.BASELINE:
            self.reason = "hold: measuring the shadow-off latency baseline"
            return None
        self._enter(self._step_at_or_below(current_rate), now, snapshot)
        self.reason = f"resumed: {self._arrived_reason()}"
        if self.rate == current_rate:
            return None
        return RampMove(self.rate, self.index, self.reason)

    def step_back(
        self, now: float, snapshot: StatsSnapshot, current_rate: float
    ) -> RampMove | None:
        """A guard's step_back: go to the highest step below the current rate, wherever that
        rate came from (the ramp, an operator, a reload); None when no step is below it."""
        if self.phase in (RampPhase.OFF, RampPhase.BASELINE):
            return None
        below = [i for i, step in enumerate(self.steps) if step < current_rate]
        if not below:
            return None
        self._enter(below[-1], now, snapshot)
        self.reason = (
            f"stepped back from {current_rate:g} to step {self.index + 1}/{len(self.steps)} "
            f"({self.rate:g}), the step below it"
        )
        return RampMove(self.rate, self.index, self.reason)

    def restart_step(self, now: float, snapshot: StatsSnapshot) -> None:
        """Start collecting the current step's evidence afresh (after a halt is cleared)."""
        self.step_started = now
        self._step_snapshot = snapshot
        self.evidence = None

    # --- internals ------------------------------------------------------------------------

    def _tick_baseline(
        self, now: float, snapshot: StatsSnapshot, baseline: tuple[int, int] | None
    ) -> RampMove | None:
        have, need = baseline if baseline is not None else (0, 0)
        if baseline is not None and have < need:
            self.reason = (
                f"hold: measuring the shadow-off latency baseline ({have}/{need} requests)"
            )
            return None
        if self.paused:
            self.reason = f"paused: {self.pause_reason}"
            return None
        self._enter(0, now, snapshot)
        self.reason = f"baseline measured ({have} requests); {self._arrived_reason()}"
        return RampMove(self.rate, self.index, self.reason)

    def _enter(self, index: int, now: float, snapshot: StatsSnapshot) -> None:
        self.index = index
        self.phase = self._phase_of(index)
        self.restart_step(now, snapshot)

    def _phase_of(self, index: int) -> RampPhase:
        return RampPhase.DONE if index == len(self.steps) - 1 else RampPhase.RAMPING

    def _arrived_reason(self) -> str:
        where = f"step {self.index + 1}/{len(self.steps)} ({self.rate:g})"
        if self.phase is RampPhase.DONE:
            return f"done: on the last step, {where}"
        return f"on {where}"

    def _step_at_or_below(self, rate: float) -> int:
        index = 0
        for i, step in enumerate(self.steps):
            if step <= rate:
                index = i
        return index

    def _evidence(self, snapshot: StatsSnapshot) -> Evidence:
        window = snapshot.minus(self._step_snapshot)
        mismatches = window.comparisons.get(Outcome.MISMATCH, 0)
        compared = window.comparisons.get(Outcome.MATCH, 0) + mismatches
        return Evidence(
            compared=compared,
            mismatches=mismatches,
            noise=window.comparisons.get(Outcome.NOISE, 0),
            upper_bound=wilson_upper(mismatches, compared),
            needed=self.needed,
            shadowed=window.shadowed,
            client_requests=window.client_requests,
        )
