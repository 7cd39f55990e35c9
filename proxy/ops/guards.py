"""Halt rules as a sans-IO policy: fed a clock value, cumulative ShadowStats snapshots and the
proxy's own request-latency histogram, it says which rule trips and why.

Each rule looks at a window (the figures now minus the figures ``window`` seconds ago) and
decides only once its denominator reaches ``min_count``. The latency rule compares the
client p99 while shadowing with the p99 measured while the shadow was off.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.config import GuardRuleConfig, GuardsConfig, LatencyGuardConfig
from proxy.metrics import DURATION_BUCKETS, LatencyHistogram, bucket_quantile
from proxy.shadow.stats import StatsSnapshot


class Action(StrEnum):
    HOLD = "hold"  # freeze the ramp where it is
    STEP_BACK = "step_back"  # go down one ramp step (hold when there is none)
    STOP = "stop"  # switch shadowing off (the kill switch)

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Action.HOLD: 1, Action.STEP_BACK: 2, Action.STOP: 3}


class Exposure(StrEnum):
    """Was the shadow sampling keys during the interval since the previous observation?"""

    ON = "on"
    OFF = "off"
    MIXED = "mixed"  # it changed during the interval: counts for neither side


@dataclass(frozen=True, slots=True)
class Trip:
    """A rule fired."""

    rule: str  # "mismatch", "errors", "drops" or "latency"
    action: Action
    reason: str


@dataclass(frozen=True, slots=True)
class RuleStatus:
    """Where one rule stands, for the API and the console."""

    rule: str
    enabled: bool
    action: str
    threshold: float
    window: float
    count: int  # the denominator seen in the window
    needed: int  # min_count
    value: float | None  # the ratio (or latency ratio) when count >= needed
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "enabled": self.enabled,
            "action": self.action,
            "threshold": self.threshold,
            "window_seconds": self.window,
            "count": self.count,
            "min_count": self.needed,
            "value": self.value,
            "detail": self.detail,
        }


# --- latency histograms -----------------------------------------------------------------------

Buckets = tuple[int, ...]
"""Non-cumulative counts per bucket of DURATION_BUCKETS, the last slot for +Inf."""


def request_buckets(snapshot: Iterable[tuple[str, list[int], float]]) -> Buckets:
    """Sum RequestStats.snapshot() (cumulative per command) into one non-cumulative histogram
    of every client request."""
    total = [0] * (len(DURATION_BUCKETS) + 1)
    for _command, cumulative, _seconds in snapshot:
        previous = 0
        for index, running in enumerate(cumulative):
            total[index] += running - previous
            previous = running
    return tuple(total)


def _minus(a: Buckets, b: Buckets) -> Buckets:
    return tuple(x - y for x, y in zip(a, b, strict=True))


def _plus(a: Buckets, b: Buckets) -> Buckets:
    return tuple(x + y for x, y in zip(a, b, strict=True))


# --- the policy -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    snapshot: StatsSnapshot


@dataclass(frozen=True, slots=True)
class _Interval:
    start: float
    end: float
    buckets: Buckets


def _longest_window(config: GuardsConfig) -> float:
    return max(
        config.mismatch.window, config.errors.window, config.drops.window, config.latency.window
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


class GuardPolicy:
    """The four halt rules over sliding windows. Pure: observe() is given the time."""

    RULES = ("mismatch", "errors", "drops", "latency")

    def __init__(self, config: GuardsConfig, *, now: float) -> None:
        self.config = config
        self._samples: deque[_Sample] = deque()
        self._last_buckets: Buckets | None = None
        self._last_at = now
        self._on: deque[_Interval] = deque()  # request latency while shadowing
        self._off: deque[_Interval] = deque()  # and while not: the baseline
        self._status: dict[str, RuleStatus] = {}
        self._keep = _longest_window(config)

    def reconfigure(self, config: GuardsConfig) -> None:
        """New rules; the windows are cut from the same history, so nothing is lost."""
        self.config = config
        self._keep = _longest_window(config)

    def reset(self, now: float) -> None:
        """Forget the windows (after a halt is cleared, the old figures must not trip a rule
        again). The latency baseline is kept: it describes the shadow being off."""
        self._samples.clear()
        self._on.clear()
        self._last_at = now

    def observe(
        self, now: float, snapshot: StatsSnapshot, requests: Buckets, exposure: Exposure
    ) -> list[Trip]:
        """Take the figures at ``now``; return the rules that trip, most severe first.
        ``exposure`` says whether the shadow was on for the whole interval since the last
        call."""
        self._samples.append(_Sample(now, snapshot))
        while len(self._samples) > 2 and self._samples[1].at <= now - self._keep:
            self._samples.popleft()
        self._track_latency(now, requests, exposure)
        trips: list[Trip] = []
        for rule, config, numerator, denominator in (
            ("mismatch", self.config.mismatch, "mismatches", "comparisons"),
            ("errors", self.config.errors, "shadow errors", "shadowed requests"),
            ("drops", self.config.drops, "drops", "shadowed requests"),
        ):
            trip = self._ratio_rule(rule, config, now, numerator, denominator)
            if trip is not None:
                trips.append(trip)
        trip = self._latency_rule(now)
        if trip is not None:
            trips.append(trip)
        trips.sort(key=lambda t: -t.action.severity)
        return trips

    def status(self) -> list[RuleStatus]:
        return [self._status[rule] for rule in self.RULES if rule in self._status]

    def baseline_progress(self) -> tuple[int, int] | None:
        """(requests in the shadow-off baseline, requests needed); None when the latency
        rule is off."""
        if not self.config.latency.enabled:
            return None
        return sum(sum(i.buckets) for i in self._off), self.config.latency.min_count

    # --- rules ----------------------------------------------------------------------------

    def _window(self, now: float, seconds: float) -> StatsSnapshot:
        """The figures of the last ``seconds`` (or of all there is, when less)."""
        latest = self._samples[-1].snapshot
        base = self._samples[0]
        for sample in self._samples:
            if sample.at > now - seconds:
                break
            base = sample
        return latest.minus(base.snapshot)

    def _ratio_rule(
        self, rule: str, config: GuardRuleConfig, now: float, numerator: str, denominator: str
    ) -> Trip | None:
        window = self._window(now, config.window)
        if rule == "mismatch":
            bad = window.comparisons.get("mismatch", 0)
            count = window.comparisons.get("match", 0) + bad
        elif rule == "errors":
            bad, count = window.error_count, window.shadowed
        else:
            bad, count = window.drop_count, window.shadowed
        value = bad / count if count >= config.min_count and count > 0 else None
        if not config.enabled:
            detail = "rule disabled"
        elif value is None:
            detail = f"waiting for {config.min_count} {denominator} ({count} so far)"
        else:
            detail = (
                f"{numerator} ratio {value:.2%} over the last {config.window:g}s "
                f"({bad} of {count} {denominator})"
            )
        self._set_status(rule, config, count, value, detail)
        if config.enabled and value is not None and value >= config.threshold:
            return Trip(rule, Action(config.action), f"{detail} >= {config.threshold:.2%}")
        return None

    def _track_latency(self, now: float, requests: Buckets, exposure: Exposure) -> None:
        previous, self._last_buckets = self._last_buckets, requests
        start, self._last_at = self._last_at, now
        if previous is None or exposure is Exposure.MIXED:
            return
        delta = _minus(requests, previous)
        if exposure is Exposure.ON:
            self._on.append(_Interval(start, now, delta))
        else:
            self._off.append(_Interval(start, now, delta))
        window = self.config.latency.window
        while self._on and self._on[0].end <= now - window:
            self._on.popleft()
        # The baseline keeps the most recent `window` seconds of shadow-off time, however
        # long ago that was.
        while self._off and self._off[-1].end - self._off[0].end >= window:
            self._off.popleft()

    def _latency_rule(self, now: float) -> Trip | None:
        config: LatencyGuardConfig = self.config.latency
        empty: Buckets = tuple([0] * (len(DURATION_BUCKETS) + 1))
        current, baseline = empty, empty
        for interval in self._on:
            current = _plus(current, interval.buckets)
        for interval in self._off:
            baseline = _plus(baseline, interval.buckets)
        count, base_count = sum(current), sum(baseline)
        measured = base_count >= config.min_count
        value: float | None = None
        trip: Trip | None = None
        if not config.enabled:
            detail = "rule disabled"
        elif not measured and config.baseline_p99 is None:
            detail = (
                f"no baseline yet: {base_count}/{config.min_count} requests measured with the "
                "shadow off"
            )
            if count:  # shadowing now: the baseline cannot grow until the shadow is off
                detail += (
                    "; it grows only while the shadow is off (rate 0 or disabled): turn it "
                    "off until enough requests are measured to arm this rule, or set "
                    "shadow.guards.latency.baseline_p99"
                )
        elif count < config.min_count:
            detail = f"waiting for {config.min_count} requests while shadowing ({count} so far)"
        else:
            p99 = bucket_quantile(current, 0.99)
            assert p99 is not None
            if measured:
                base_p99 = bucket_quantile(baseline, 0.99)
                assert base_p99 is not None
                against = f"{_ms(base_p99)} with the shadow off"
                counts = f"{count} and {base_count} requests"
            else:
                assert config.baseline_p99 is not None
                base_p99 = _as_measured(config.baseline_p99)
                against = (
                    f"{_ms(base_p99)} configured (shadow.guards.latency.baseline_p99: "
                    f"{_ms(config.baseline_p99)})"
                )
                counts = f"{count} requests"
            value = p99 / base_p99 if base_p99 > 0 else float("inf")
            detail = f"client p99 {_ms(p99)} while shadowing vs {against} ({value:.2f}x, {counts})"
            if value >= config.threshold and p99 - base_p99 >= config.min_increase:
                trip = Trip(
                    "latency",
                    Action(config.action),
                    f"{detail} >= {config.threshold:g}x and at least "
                    f"{_ms(config.min_increase)} slower",
                )
        self._set_status("latency", config, count, value, detail)
        return trip

    def _set_status(
        self,
        rule: str,
        config: GuardRuleConfig | LatencyGuardConfig,
        count: int,
        value: float | None,
        detail: str,
    ) -> None:
        self._status[rule] = RuleStatus(
            rule,
            config.enabled,
            config.action,
            config.threshold,
            config.window,
            count,
            config.min_count,
            value,
            detail,
        )


def _as_measured(p99: float) -> float:
    """A configured p99 as the rule reads a measured one: from the histogram's buckets
    (interpolated within its bucket, which sits 2-2.5x above the one below), so the two
    sides compare alike: an exact 2.4 ms beside a measured 2.6 ms read as 4.98 ms would be
    a false 2x."""
    histogram = LatencyHistogram()
    histogram.observe(p99)
    measured = histogram.quantile(0.99)
    assert measured is not None
    return measured
