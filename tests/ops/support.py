"""Helpers for the ops tests: a settable clock, and ShadowStats driven by hand the way the
dispatcher would drive it."""

from __future__ import annotations

from proxy.metrics import RequestStats
from proxy.shadow.stats import ShadowStats


class Clock:
    """A clock the test moves; starts at a fixed unix time."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def feed(
    stats: ShadowStats,
    *,
    match: int = 0,
    mismatch: int = 0,
    noise: int = 0,
    errors: int = 0,
    dropped: int = 0,
    shadowed: int | None = None,
    command: str = "get",
) -> None:
    """Count shadow outcomes. ``shadowed`` defaults to the requests compared or failed."""
    if shadowed is None:
        shadowed = match + mismatch + noise + errors
    stats.shadowed[command] += shadowed
    for _ in range(match):
        stats.count_comparison(command, "match")
    for _ in range(mismatch):
        stats.count_comparison(command, "mismatch", "value")
    for _ in range(noise):
        stats.count_comparison(command, "noise", "transient_race")
    if errors:
        stats.errors["redis_timeout"] += errors
    if dropped:
        stats.dropped["queue_full"] += dropped


def requests(stats: RequestStats, count: int, seconds: float, command: str = "get") -> None:
    """Record ``count`` client requests that each took ``seconds``."""
    for _ in range(count):
        stats.observe(command, seconds)
