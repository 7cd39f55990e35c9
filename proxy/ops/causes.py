"""Why shadow work failed or was dropped, by cause: which guard rule answers it, and the words
the console and the reports use. One table over the error kinds and drop reasons the shadow
counts (memshadow_shadow_errors_total{kind}, memshadow_shadow_dropped_total{reason}).

A guard must act on the cause, not on the count: Redis answering badly is the errors rule's
business, the shadow not keeping up at this rate is the drops rule's, and Redis being down is
no rule's (the shadow drops what it cannot send, counts it, and resumes by itself once Redis
answers, every key cold).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from proxy.shadow.words import DropReason, ErrorKind


class Cause(StrEnum):
    REDIS_FAULT = "redis_fault"  # Redis answered with an error, or too late: the errors rule
    REDIS_DOWN = "redis_down"  # Redis unreachable, loading, failing over: no rule, it resumes
    CAPACITY = "capacity"  # more work than the shadow keeps up with at this rate: drops rule
    SHADOW = "shadow"  # the shadow's own machinery (worker restart, re-reader, a bug): no rule
    MEMCACHED = "memcached"  # Memcached restarted: every key cold, no rule


@dataclass(frozen=True, slots=True)
class Reason:
    name: str  # an ErrorKind or DropReason, or a redis_<refusal> made on the fly
    cause: Cause
    words: str  # what happened, for the console and the reports


REDIS_REFUSALS: Final = frozenset(
    {"loading", "readonly", "clusterdown", "masterdown", "tryagain", "moved", "ask"}
)
"""Refusals a Redis (Cluster) gives while it starts, fails over or reshards (RedisGaveUp)."""


def _table(*reasons: Reason) -> dict[str, Reason]:
    return {reason.name: reason for reason in reasons}


ERROR_KINDS: Final = _table(
    Reason(ErrorKind.REDIS_TIMEOUT, Cause.REDIS_FAULT, "Redis did not answer in time"),
    Reason(ErrorKind.REDIS_REPLY, Cause.REDIS_FAULT, "Redis answered with an error"),
    Reason(ErrorKind.SHADOW_OOM, Cause.REDIS_FAULT, "Redis refused a write: out of memory (OOM)"),
    Reason(ErrorKind.REDIS_OTHER, Cause.REDIS_FAULT, "Redis's answer could not be used"),
    Reason(ErrorKind.REDIS_UNAVAILABLE, Cause.REDIS_DOWN, "Redis was not reachable"),
    # The connection's own bound on commands in flight: the call was never sent.
    Reason(ErrorKind.REDIS_BUSY, Cause.CAPACITY, "too many commands already in flight to Redis"),
    Reason(ErrorKind.MEMCACHED_READER, Cause.SHADOW, "the shadow's re-read of Memcached failed"),
    Reason(ErrorKind.INTERNAL, Cause.SHADOW, "a bug in the shadow (logged with its traceback)"),
    Reason(
        ErrorKind.WORKER_EXIT, Cause.SHADOW, "the shadow worker process exited and was restarted"
    ),
)
"""Every error kind the shadow counts. A kind redis_<refusal> (a command Redis kept refusing
past the retries: redis_loading, redis_readonly, redis_clusterdown...) is Redis down."""

DROP_REASONS: Final = _table(
    Reason(DropReason.QUEUE_FULL, Cause.CAPACITY, "the shadow's queue was full"),
    Reason(DropReason.SHADOW_STARVED, Cause.CAPACITY, "the shadow worker was starved of CPU"),
    Reason(DropReason.LATE_HANDOFF, Cause.CAPACITY, "handed over too late to keep the key's order"),
    Reason(DropReason.REDIS_BUSY, Cause.CAPACITY, "too many commands already in flight to Redis"),
    # Counted with its error (redis_timeout), which the errors rule judges.
    Reason(DropReason.TIMEOUT, Cause.REDIS_FAULT, "Redis did not answer in time"),
    Reason(DropReason.REDIS_DOWN, Cause.REDIS_DOWN, "Redis was not reachable"),
    Reason(DropReason.FAILOVER, Cause.REDIS_DOWN, "a Redis failover may have lost recent writes"),
    Reason(DropReason.REPLACED, Cause.REDIS_DOWN, "Redis was replaced by a server with other data"),
    Reason(DropReason.WORKER_DOWN, Cause.SHADOW, "the shadow worker process was down"),
    Reason(DropReason.MEMCACHED_RESTART, Cause.MEMCACHED, "Memcached restarted"),
)
"""Every drop reason the shadow counts; redis_<refusal> is Redis down, as for errors."""


def _refusal(name: str) -> Reason:
    refusal = name.removeprefix("redis_").upper()
    return Reason(name, Cause.REDIS_DOWN, f"Redis kept refusing ({refusal})")


def error_kind(name: str) -> Reason:
    """The cause of an error kind. An unknown kind counts as Redis's fault when it names
    Redis (a guard must not overlook a new one), else as the shadow's."""
    known = ERROR_KINDS.get(name)
    if known is not None:
        return known
    if name.startswith("redis_") and name.removeprefix("redis_") in REDIS_REFUSALS:
        return _refusal(name)
    if name.startswith("redis_"):
        return Reason(name, Cause.REDIS_FAULT, f"Redis error ({name})")
    return Reason(name, Cause.SHADOW, f"shadow error ({name})")


def drop_reason(name: str) -> Reason:
    """The cause of a drop reason. An unknown reason counts against the shadow's capacity
    (the drops rule sees it) unless it names a Redis refusal."""
    known = DROP_REASONS.get(name)
    if known is not None:
        return known
    if name.startswith("redis_") and name.removeprefix("redis_") in REDIS_REFUSALS:
        return _refusal(name)
    return Reason(name, Cause.CAPACITY, f"dropped ({name})")


def count_by_cause(counts: Mapping[str, int], *, errors: bool) -> dict[Cause, int]:
    """Sum error kinds (errors=True) or drop reasons by cause."""
    lookup = error_kind if errors else drop_reason
    totals: dict[Cause, int] = {}
    for name, count in counts.items():
        if count:
            cause = lookup(name).cause
            totals[cause] = totals.get(cause, 0) + count
    return totals


def describe(counts: Mapping[str, int], *, errors: bool) -> list[dict[str, object]]:
    """Counts by kind or reason, largest first, each with its cause and words (the console
    shows these; no raw JSON)."""
    lookup = error_kind if errors else drop_reason
    return [
        {"name": name, "count": count, "cause": lookup(name).cause.value,
         "words": lookup(name).words}
        for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        if count
    ]  # fmt: skip
