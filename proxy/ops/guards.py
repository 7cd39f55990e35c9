"""Halt rules as a sans-IO policy: fed a clock value, cumulative ShadowStats snapshots and the
proxy's own request-latency histogram, it says which rule trips and why.

Each rule is a small object over a window (the figures now minus the figures ``window``
seconds ago) that decides only once its denominator reaches ``min_count``, and acts on one
cause (causes.py): the errors rule on Redis's own faults, the drops rule on the shadow not
keeping up; Redis being down is no rule's business (the shadow resumes by itself).

The latency rule compares the client p99 while shadowing with a baseline measured in
comparable conditions: shadow-off time no older than ``baseline_max_age``, at a request rate
within ``load_tolerance`` of the current one. It trips only on a breach that lasts
``sustain`` seconds, and never while nothing was shadowed in its window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.config import GuardRuleConfig, GuardsConfig, LatencyGuardConfig
from proxy.metrics import DURATION_BUCKETS, LatencyHistogram, bucket_quantile
from proxy.ops.causes import Cause, count_by_cause
from proxy.shadow.stats import StatsSnapshot
from proxy.shadow.words import GUARD_SEVERITY, GuardAction, Outcome

# What a rule does when it trips: hold, step_back or stop (words.py; config.py checks the
# YAML against the same words).
Action = GuardAction


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

EMPTY: Buckets = (0,) * (len(DURATION_BUCKETS) + 1)


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


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def _rate(requests: float, seconds: float) -> str:
    return f"{requests / seconds:.3g} requests/s" if seconds > 0 else "? requests/s"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


# --- the ratio rules ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counted:
    """What a ratio rule counted in its window: ``bad`` of ``count``, and what it left out
    on purpose (said in its detail)."""

    bad: int
    count: int
    left_out: str = ""


class RatioRule:
    """A rule on bad / total over a window; the subclasses say what they count."""

    name = ""
    numerator = ""
    denominator = ""

    def settings(self, config: GuardsConfig) -> GuardRuleConfig:
        raise NotImplementedError

    def count(self, window: StatsSnapshot) -> Counted:
        raise NotImplementedError


class MismatchRule(RatioRule):
    name, numerator, denominator = "mismatch", "mismatches", "comparisons"

    def settings(self, config: GuardsConfig) -> GuardRuleConfig:
        return config.mismatch

    def count(self, window: StatsSnapshot) -> Counted:
        bad = window.comparisons.get(Outcome.MISMATCH, 0)
        return Counted(bad, window.comparisons.get(Outcome.MATCH, 0) + bad)


class RedisErrorRule(RatioRule):
    """Redis's own faults (an error answer, no answer in time) per shadowed request. Not the
    shadow's own lag (a starved worker's lost replies are drops, the drops rule's), not its
    bugs, and not Redis being down: the shadow then drops what it cannot send and resumes by
    itself once Redis answers, so stopping it would only keep it stopped."""

    name, numerator, denominator = "errors", "Redis errors", "shadowed requests"

    def settings(self, config: GuardsConfig) -> GuardRuleConfig:
        return config.errors

    def count(self, window: StatsSnapshot) -> Counted:
        causes = count_by_cause(window.errors, errors=True)
        down = causes.get(Cause.REDIS_DOWN, 0)
        other = sum(n for cause, n in causes.items() if cause is not Cause.REDIS_FAULT) - down
        left_out = []
        if down:
            left_out.append(f"{down} while Redis was unreachable (the shadow resumes by itself)")
        if other:
            left_out.append(f"{other} of the shadow's own")
        return Counted(causes.get(Cause.REDIS_FAULT, 0), window.shadowed, "; ".join(left_out))


class DropRule(RatioRule):
    """Work the shadow could not keep up with at this rate (its queue full, its worker starved
    of CPU, too much in flight) per shadowed request: one ramp step down usually fits."""

    name, numerator, denominator = "drops", "drops", "shadowed requests"

    def settings(self, config: GuardsConfig) -> GuardRuleConfig:
        return config.drops

    def count(self, window: StatsSnapshot) -> Counted:
        causes = count_by_cause(window.dropped, errors=False)
        other = sum(n for cause, n in causes.items() if cause is not Cause.CAPACITY)
        left_out = f"{other} for other causes (Redis down or failing, restarts)" if other else ""
        return Counted(causes.get(Cause.CAPACITY, 0), window.shadowed, left_out)


RATIO_RULES: tuple[RatioRule, ...] = (MismatchRule(), RedisErrorRule(), DropRule())


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
    requests: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _longest_window(config: GuardsConfig) -> float:
    return max(
        config.mismatch.window, config.errors.window, config.drops.window, config.latency.window
    )


def _sum(intervals: Iterable[_Interval]) -> tuple[Buckets, float]:
    buckets, seconds = EMPTY, 0.0
    for interval in intervals:
        buckets = _plus(buckets, interval.buckets)
        seconds += interval.seconds
    return buckets, seconds


class GuardPolicy:
    """The halt rules over sliding windows. Pure: observe() is given the time."""

    RULES = ("mismatch", "errors", "drops", "latency")

    def __init__(self, config: GuardsConfig, *, now: float) -> None:
        self.config = config
        self._samples: deque[_Sample] = deque()
        self._last_buckets: Buckets | None = None
        self._last_at = now
        self._on: deque[_Interval] = deque()  # request latency while shadowing
        self._off: deque[_Interval] = deque()  # and while not: the baseline's candidates
        self._breach_since: float | None = None
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
        self._breach_since = None
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
        for rule in RATIO_RULES:
            trip = self._ratio_rule(rule, now)
            if trip is not None:
                trips.append(trip)
        trip = self._latency_rule(now)
        if trip is not None:
            trips.append(trip)
        trips.sort(key=lambda t: -GUARD_SEVERITY[t.action])
        return trips

    def status(self) -> list[RuleStatus]:
        return [self._status[rule] for rule in self.RULES if rule in self._status]

    def baseline_progress(self) -> tuple[int, int] | None:
        """(requests in the shadow-off baseline, requests needed); None when the latency
        rule is off."""
        if not self.config.latency.enabled:
            return None
        return sum(i.requests for i in self._off), self.config.latency.min_count

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

    def _ratio_rule(self, rule: RatioRule, now: float) -> Trip | None:
        config = rule.settings(self.config)
        counted = rule.count(self._window(now, config.window))
        bad, count = counted.bad, counted.count
        value = bad / count if count >= config.min_count and count > 0 else None
        if not config.enabled:
            detail = "rule disabled"
        elif value is None:
            detail = f"waiting for {config.min_count} {rule.denominator} ({count} so far)"
        else:
            detail = (
                f"{rule.numerator} ratio {value:.2%} over the last {config.window:g}s "
                f"({bad} of {count} {rule.denominator})"
            )
        if counted.left_out and config.enabled:
            detail += f"; not counted: {counted.left_out}"
        self._set_status(rule.name, config, count, value, detail)
        if config.enabled and value is not None and value >= config.threshold:
            return Trip(rule.name, Action(config.action), f"{detail} >= {config.threshold:.2%}")
        return None

    def _track_latency(self, now: float, requests: Buckets, exposure: Exposure) -> None:
        previous, self._last_buckets = self._last_buckets, requests
        start, self._last_at = self._last_at, now
        if previous is None or exposure is Exposure.MIXED or now <= start:
            return
        delta = _minus(requests, previous)
        interval = _Interval(start, now, delta, sum(delta))
        (self._on if exposure is Exposure.ON else self._off).append(interval)
        latency = self.config.latency
        while self._on and self._on[0].end <= now - latency.window:
            self._on.popleft()
        while self._off and self._off[0].end <= now - latency.baseline_max_age:
            self._off.popleft()

    def _baseline(self, now: float, rate: float) -> tuple[Buckets, str] | str:
        """The comparable shadow-off figures: the most recent intervals of no older than
        baseline_max_age at a request rate within load_tolerance of ``rate``, until they hold
        min_count requests and cover a window. Else why there are none, in words."""
        config = self.config.latency
        if not self._off:
            return "none measured with the shadow off yet"
        low, high = rate / config.load_tolerance, rate * config.load_tolerance
        chosen: list[_Interval] = []
        requests, seconds = 0, 0.0
        for interval in reversed(self._off):
            if interval.seconds > 0 and low <= interval.requests / interval.seconds <= high:
                chosen.append(interval)
                requests += interval.requests
                seconds += interval.seconds
                if requests >= config.min_count and seconds >= config.window:
                    break
        if requests >= config.min_count:
            buckets, seconds = _sum(chosen)
            newest = chosen[0].end
            return buckets, (
                f"with the shadow off ({requests} requests at {_rate(requests, seconds)}, "
                f"the newest {_ago(now - newest)})"
            )
        off_requests = sum(i.requests for i in self._off)
        _, off_seconds = _sum(self._off)
        return (
            f"none comparable: {off_requests} requests measured with the shadow off at "
            f"{_rate(off_requests, off_seconds)} in the last {config.baseline_max_age / 3600:g} h,"
            f" {requests} of them within {config.load_tolerance:g}x of today's load; "
            f"{config.min_count} are needed"
        )

    def _latency_rule(self, now: float) -> Trip | None:
        config: LatencyGuardConfig = self.config.latency
        current, on_seconds = _sum(self._on)
        count = sum(current)
        value: float | None = None
        trip: Trip | None = None
        breach = False
        shadowed = self._window(now, config.window).shadowed
        if not config.enabled:
            detail = "rule disabled"
        elif count < config.min_count:
            progress = self.baseline_progress() or (0, config.min_count)
            detail = f"waiting for {config.min_count} requests while shadowing ({count} so far)"
            if not self._on:
                detail = (
                    f"the shadow is off: measuring the baseline ({progress[0]} requests with "
                    "the shadow off so far)"
                )
        elif shadowed <= 0:
            detail = (
                f"nothing shadowed in the last {config.window:g}s (the sampled keys got no "
                "requests): client latency cannot be the shadow's doing"
            )
        else:
            rate = count / on_seconds if on_seconds > 0 else 0.0
            found = self._baseline(now, rate)
            against: str
            if isinstance(found, tuple):
                baseline, how = found
                base_p99 = bucket_quantile(baseline, 0.99)
                assert base_p99 is not None
                against = f"{_ms(base_p99)} {how}"
            elif config.baseline_p99 is not None:
                base_p99 = _as_measured(config.baseline_p99)
                against = (
                    f"{_ms(base_p99)} configured (shadow.guards.latency.baseline_p99: "
                    f"{_ms(config.baseline_p99)}; measured: {found})"
                )
            else:
                base_p99 = None
                against = found
            if base_p99 is None:
                detail = (
                    f"no comparable baseline ({against}); the rule waits: it grows only "
                    "while the shadow is off (rate 0 or disabled), or set "
                    "shadow.guards.latency.baseline_p99"
                )
            else:
                p99 = bucket_quantile(current, 0.99)
                assert p99 is not None
                value = p99 / base_p99 if base_p99 > 0 else float("inf")
                detail = (
                    f"client p99 {_ms(p99)} while shadowing ({count} requests at "
                    f"{_rate(count, on_seconds)}, {shadowed} shadowed) vs {against}: "
                    f"{value:.2f}x"
                )
                breach = value >= config.threshold and p99 - base_p99 >= config.min_increase
                if breach:
                    since = self._breach_since if self._breach_since is not None else now
                    self._breach_since = since
                    held = now - since
                    condition = (
                        f">= {config.threshold:g}x and at least {_ms(config.min_increase)} "
                        f"slower for {held:.0f}s"
                    )
                    if held >= config.sustain:
                        trip = Trip("latency", Action(config.action), f"{detail}, {condition}")
                    else:
                        detail += f"; {condition} of the {config.sustain:g}s it must last"
        if not breach:
            self._breach_since = None
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
