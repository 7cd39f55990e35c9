"""The console's history: the key series of a dark launch, one point every `resolution`
seconds for `span` seconds (24 h at 10 s: 8,640 points, about 2 MB at most), and the events
that explain them (ramp steps, halts, reloads, rate changes, from the audit trail).

Sans-IO: `sample(now, reading)` is fed cumulative figures (a Reading) and keeps what changed
since the last sample; the operations wiring reads the live objects and calls it on a timer.
`GET /api/history` serves `to_json()`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.metrics import DURATION_BUCKETS, bucket_quantile
from proxy.ops.audit import AuditEntry

RESOLUTION = 10.0
SPAN = 24 * 3600.0
MAX_EVENTS = 2_000
# Periods of one sample rate and ramp step, kept whole for as long as memshadow runs (the
# readiness report's per-step figures), not only for the span: at most this many.
MAX_STEPS = 1_000

FIELDS = (
    "t",  # unix time of the sample (the end of its interval)
    "sample_rate",  # the rate at the sample (0 while the shadow is off or halted)
    "ramp_step",  # 1-based, 0 without a ramp
    "match",  # verdicts in the interval, by outcome
    "mismatch",
    "noise",
    "dropped",  # shadow work dropped in the interval (every reason)
    "errors",  # shadow errors in the interval
    "lag_p99",  # seconds from Memcached's reply to the verdict, p99 of the interval
    "client_p99",  # client requests' p99 in the interval (seconds), whatever the rate
    "requests",  # client requests in the interval
    "shadowed",  # of them, handed to the shadow
)

STEP_FIELDS = (
    "sample_rate",
    "ramp_step",
    "from",  # unix time of the period's first point
    "until",  # ...and of its last
    "match",  # verdicts in the period, by outcome
    "mismatch",
    "noise",
    "requests",  # client requests in the period
    "shadowed",  # of them, handed to the shadow
)


@dataclass(frozen=True, slots=True)
class Reading:
    """Cumulative figures at one moment (counts since start; histograms as non-cumulative
    bucket counts over DURATION_BUCKETS and +Inf)."""

    sample_rate: float
    ramp_step: int
    match: int
    mismatch: int
    noise: int
    dropped: int
    errors: int
    lag_buckets: Sequence[int]
    client_buckets: Sequence[int]
    shadowed: int = 0  # requests handed to the shadow


EMPTY_BUCKETS = (0,) * (len(DURATION_BUCKETS) + 1)


def _delta(now: Sequence[int], before: Sequence[int]) -> list[int]:
    return [max(0, a - b) for a, b in zip(now, before, strict=True)]


class Timeline:
    """A bounded history of points (tuples in FIELDS order) and events."""

    def __init__(self, resolution: float = RESOLUTION, span: float = SPAN) -> None:
        self.resolution = resolution
        self.points: deque[tuple[float | int | None, ...]] = deque(
            maxlen=max(1, int(span / resolution))
        )
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.steps: deque[list[float]] = deque(maxlen=MAX_STEPS)  # rows in STEP_FIELDS order
        self.steps_dropped = 0  # the oldest periods, past MAX_STEPS
        self._last: Reading | None = None
        self._audit_seq = 0
        self._cut = False  # the next sample starts a new period (evidence restarted)

    def cut(self) -> None:
        """Start a new period at the next sample, whatever the rate (the readiness evidence
        was restarted: its periods must not mix figures from before)."""
        self._cut = True

    def sample(self, now: float, reading: Reading) -> None:
        """Add the point for the interval that ends at `now` (the first reading only sets
        the base: there is no interval before it)."""
        last, self._last = self._last, reading
        if last is None:
            return
        lag = _delta(reading.lag_buckets, last.lag_buckets)
        client = _delta(reading.client_buckets, last.client_buckets)
        t = round(now, 3)
        match = max(0, reading.match - last.match)
        mismatch = max(0, reading.mismatch - last.mismatch)
        noise = max(0, reading.noise - last.noise)
        shadowed = max(0, reading.shadowed - last.shadowed)
        requests = sum(client)
        steps = self.steps
        current = (reading.sample_rate, reading.ramp_step)
        if not steps or self._cut or (steps[-1][0], steps[-1][1]) != current:
            if len(steps) == steps.maxlen:
                self.steps_dropped += 1
            steps.append([reading.sample_rate, reading.ramp_step, t, t, 0, 0, 0, 0, 0])
            self._cut = False
        period = steps[-1]
        period[3] = t
        period[4] += match
        period[5] += mismatch
        period[6] += noise
        period[7] += requests
        period[8] += shadowed
        self.points.append(
            (
                t,
                reading.sample_rate,
                reading.ramp_step,
                match,
                mismatch,
                noise,
                max(0, reading.dropped - last.dropped),
                max(0, reading.errors - last.errors),
                _rounded(bucket_quantile(lag, 0.99)),
                _rounded(bucket_quantile(client, 0.99)),
                requests,
                shadowed,
            )
        )

    def note(self, entries: Iterable[AuditEntry]) -> None:
        """Keep the audit entries not seen yet as events (ramp, halt, reload, rate...)."""
        for entry in entries:
            if entry.seq <= self._audit_seq:
                continue
            self._audit_seq = entry.seq
            self.events.append(
                {
                    "t": entry.at,
                    "source": entry.source,
                    "field": entry.field,
                    "what": entry.describe(),
                }
            )

    @property
    def audit_seq(self) -> int:
        """The last audit entry noted: ask the audit log for what comes after."""
        return self._audit_seq

    def to_json(self, since: float = 0.0) -> dict[str, Any]:
        """The points and events after `since` (unix time), as GET /api/history serves
        them: columns named once, each point a row. A whole read (no `since`) also has every
        period of one rate and ramp step since the start (the readiness report's)."""
        history: dict[str, Any] = {
            "resolution": self.resolution,
            "fields": list(FIELDS),
            "points": [list(point) for point in self.points if (point[0] or 0) > since],
            "events": [event for event in self.events if event["t"] > since],
        }
        if since <= 0:
            history["step_fields"] = list(STEP_FIELDS)
            history["steps"] = [list(period) for period in self.steps]
            history["steps_dropped"] = self.steps_dropped
        return history


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def cumulative_to_buckets(cumulative: Sequence[int]) -> list[int]:
    """Prometheus-style cumulative counts back to per-bucket counts."""
    out: list[int] = []
    previous = 0
    for count in cumulative:
        out.append(count - previous)
        previous = count
    return out
