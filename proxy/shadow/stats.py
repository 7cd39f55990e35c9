"""Cumulative figures of the shadow path, kept as plain numbers on the event loop.

The Prometheus collector, the ramp/halt rules and the what-if report all read these. Rules
work on windows by diffing two snapshots (`ShadowStats.snapshot()`), so nothing here needs a
clock-driven reset.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.metrics import LatencyHistogram
from proxy.shadow.words import Outcome

if TYPE_CHECKING:
    from proxy.metrics import ProxyMetrics


class CommandFigures:
    """One command's histograms and comparison counter key, looked up once: the dispatcher
    records them for every shadowed operation. A histogram joins its table when it is first
    used, so a command never observed exports no empty series."""

    __slots__ = ("_duration", "_memcached", "_redis", "_stats", "command", "match")

    def __init__(self, stats: ShadowStats, command: str) -> None:
        self._stats = stats
        self.command = command
        self.match = (command, Outcome.MATCH)  # the `comparisons` key of a match
        self._memcached: LatencyHistogram | None = None
        self._redis: LatencyHistogram | None = None
        self._duration: LatencyHistogram | None = None

    @property
    def memcached_latency(self) -> LatencyHistogram:
        hist = self._memcached
        if hist is None:
            hist = self._memcached = self._stats.histogram(
                self._stats.memcached_latency, self.command
            )
        return hist

    @property
    def redis_latency(self) -> LatencyHistogram:
        hist = self._redis
        if hist is None:
            hist = self._redis = self._stats.histogram(self._stats.redis_latency, self.command)
        return hist

    @property
    def duration(self) -> LatencyHistogram:
        hist = self._duration
        if hist is None:
            hist = self._duration = self._stats.histogram(self._stats.shadow_duration, self.command)
        return hist


@dataclass
class StatsSnapshot:
    """A frozen copy of ShadowStats at one moment; subtract two for a window."""

    at: float
    shadowed: int  # requests handed to the shadow (sampled and submitted)
    comparisons: dict[str, int]  # outcome ("match", "mismatch", "noise") -> count
    mismatches: dict[str, int]  # kind -> count
    noise: dict[str, int]  # reason -> count
    errors: dict[str, int]  # kind -> count
    dropped: dict[str, int]  # reason -> count
    client_requests: int  # every client request (shadowed or not)

    def minus(self, earlier: StatsSnapshot) -> StatsSnapshot:
        return StatsSnapshot(
            at=self.at,
            shadowed=self.shadowed - earlier.shadowed,
            comparisons=_sub(self.comparisons, earlier.comparisons),
            mismatches=_sub(self.mismatches, earlier.mismatches),
            noise=_sub(self.noise, earlier.noise),
            errors=_sub(self.errors, earlier.errors),
            dropped=_sub(self.dropped, earlier.dropped),
            client_requests=self.client_requests - earlier.client_requests,
        )

    @property
    def compared(self) -> int:
        return sum(self.comparisons.values())

    @property
    def mismatch_count(self) -> int:
        return self.comparisons.get(Outcome.MISMATCH, 0)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def drop_count(self) -> int:
        return sum(self.dropped.values())


def _sub(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}


@dataclass
class ShadowStats:
    """Everything the shadow counts. Updated only from the event loop."""

    shadowed: Counter[str] = field(default_factory=Counter)  # command -> requests
    comparisons: Counter[tuple[str, str]] = field(default_factory=Counter)  # (command, outcome)
    mismatches: Counter[tuple[str, str]] = field(default_factory=Counter)  # (command, kind)
    noise: Counter[tuple[str, str]] = field(default_factory=Counter)  # (command, reason)
    skipped: Counter[str] = field(default_factory=Counter)  # reason
    dropped: Counter[str] = field(default_factory=Counter)  # reason
    errors: Counter[str] = field(default_factory=Counter)  # kind
    connect_failures: Counter[str] = field(default_factory=Counter)  # Redis connects: reason
    # Sampled keys a store evicted ("memcached", "redis"), and times a store dropped keys
    # without naming them ("memcached_unnamed", "redis_unnamed": every key turned cold).
    evictions: Counter[str] = field(default_factory=Counter)
    redis_commands: int = 0  # Redis commands sent for shadowed requests
    repairs: int = 0  # keys copied from Memcached into Redis after a difference
    # Per command: Memcached's latency (client request -> reply) and Redis's (op sent ->
    # reply) on the same shadowed requests, for the what-if report.
    memcached_latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    redis_latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    shadow_duration: dict[str, LatencyHistogram] = field(default_factory=dict)
    lag: LatencyHistogram = field(default_factory=LatencyHistogram)  # reply -> verdict
    # Redis's own service time, every shadow command: the write that carried it to the read
    # that brought its reply (no batching window, no queue, no verdict work).
    redis_service: LatencyHistogram = field(default_factory=LatencyHistogram)
    # The shadow's own delay before Redis: from Memcached's reply to the replay's start (the
    # hand-off, the batching window, the queue, the key's earlier operations).
    queueing: LatencyHistogram = field(default_factory=LatencyHistogram)
    queue_depth: int = 0
    cas_map_entries: int = 0  # Memcached -> Redis cas pairs remembered (a gauge)
    # Set by the wiring: () -> int, every client request served so far.
    client_requests_fn: Callable[[], int] | None = None
    _figures: dict[str, CommandFigures] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def for_command(self, command: str) -> CommandFigures:
        """The command's histograms (created when first needed) and counter key."""
        figures = self._figures.get(command)
        if figures is None:
            figures = self._figures[command] = CommandFigures(self, command)
        return figures

    def count_comparison(self, command: str, outcome: str, detail: str = "") -> None:
        """outcome: match | mismatch (detail = kind) | noise (detail = reason)."""
        self.comparisons[(command, outcome)] += 1
        if outcome == Outcome.MISMATCH:
            self.mismatches[(command, detail)] += 1
        elif outcome == Outcome.NOISE:
            self.noise[(command, detail)] += 1

    def snapshot(self) -> StatsSnapshot:
        outcomes: Counter[str] = Counter()
        for (_, outcome), n in self.comparisons.items():
            outcomes[outcome] += n
        kinds: Counter[str] = Counter()
        for (_, kind), n in self.mismatches.items():
            kinds[kind] += n
        reasons: Counter[str] = Counter()
        for (_, reason), n in self.noise.items():
            reasons[reason] += n
        fn = self.client_requests_fn
        return StatsSnapshot(
            at=time.time(),
            shadowed=sum(self.shadowed.values()),
            comparisons=dict(outcomes),
            mismatches=dict(kinds),
            noise=dict(reasons),
            errors=dict(self.errors),
            dropped=dict(self.dropped),
            client_requests=int(fn()) if callable(fn) else 0,
        )

    def histogram(self, table: dict[str, LatencyHistogram], command: str) -> LatencyHistogram:
        hist = table.get(command)
        if hist is None:
            hist = table[command] = LatencyHistogram()
        return hist


def client_requests(metrics: ProxyMetrics) -> Callable[[], int]:
    """Client requests the proxy has served so far (ShadowStats.client_requests_fn)."""
    requests = metrics.requests
    return lambda: sum(requests.count(command) for command, _, _ in requests.snapshot())
