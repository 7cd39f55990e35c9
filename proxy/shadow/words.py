"""The shadow's vocabulary, defined once: verdict outcomes, difference kinds, noise reasons,
drop reasons, error kinds, skip reasons, connect failures and guard actions. Producers count
these members, the metrics pre-create label sets from them, ops/causes.py keys on them.

Members are str (StrEnum): they hash and compare equal to their words, so a counter keyed by
them renders the same label text. Standard library only: the client path, the Redis layer,
the worker and the config all import it. marshal refuses str subclasses: what crosses the
worker's pipe is passed through str() first (wire.stats_state, worker examples).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Outcome(StrEnum):
    """A comparison's verdict (memshadow_shadow_comparisons_total{outcome})."""

    MATCH = "match"
    MISMATCH = "mismatch"
    NOISE = "noise"


class DiffKind(StrEnum):
    """How two answers differ (compare.py): a mismatch's kind
    (memshadow_shadow_mismatches_total{kind}); INCR_PADDING and CAS_UNMAPPED are noise by
    kind, and counted as noise reasons under the same words."""

    VALUE = "value"
    FLAGS = "flags"
    MISSING_IN_REDIS = "missing_in_redis"
    UNEXPECTED_IN_REDIS = "unexpected_in_redis"
    STATUS = "status"
    ERROR = "error"
    INCR_PADDING = "incr_padding"  # only trailing spaces differ on a number
    # Not compared at all: a cas token whose gets was not shadowed, so Memcached's outcome
    # was followed.
    CAS_UNMAPPED = "cas_unmapped"


class NoiseReason(StrEnum):
    """Why a difference is expected noise (memshadow_shadow_noise_total{reason}, with
    DiffKind.INCR_PADDING and DiffKind.CAS_UNMAPPED); classify.py says when each applies."""

    COLD_KEY = "cold_key"
    TRANSIENT_RACE = "transient_race"
    EXPIRY_BOUNDARY = "expiry_boundary"
    CLOCK_STEP = "clock_step"  # the wall clock stepped since the key's expiry was set
    EVICTED = "evicted"  # Memcached evicted the key (its watch stream named it)
    REDIS_EVICTED = "redis_evicted"  # Redis evicted it: a capacity finding, counted apart
    UNVERIFIED = "unverified"  # the re-read could not be ordered with the key's operations
    MEMCACHED_OVERREAD = "memcached_overread"  # memcached's number parser read past the item


class VerdictAction(StrEnum):
    """What the shadow does after a verdict (classify.Verdict.action)."""

    KEEP = "keep"  # nothing: Redis is as much in step as it was
    REPAIR = "repair"  # copy Memcached's snapshot into Redis, fenced against the chain
    BACKFILL = "backfill"  # a cold key: repair only when shadow.backfill is on


class DropReason(StrEnum):
    """Why shadow work was dropped (memshadow_shadow_dropped_total{reason}); a reason
    redis_<refusal> (a command Redis kept refusing: redis_loading...) is made on the fly."""

    QUEUE_FULL = "queue_full"
    SHADOW_STARVED = "shadow_starved"  # the worker's own CPU starvation
    LATE_HANDOFF = "late_handoff"
    REDIS_BUSY = "redis_busy"
    TIMEOUT = "timeout"
    REDIS_DOWN = "redis_down"
    FAILOVER = "failover"  # a Redis failover may have lost recent writes
    REPLACED = "replaced"  # Redis was replaced by a server with other data
    WORKER_DOWN = "worker_down"
    MEMCACHED_RESTART = "memcached_restart"


class ErrorKind(StrEnum):
    """Failures of the shadow path (memshadow_shadow_errors_total{kind}); a kind
    redis_<refusal> is made on the fly, as for DropReason."""

    REDIS_TIMEOUT = "redis_timeout"
    REDIS_UNAVAILABLE = "redis_unavailable"
    REDIS_BUSY = "redis_busy"
    REDIS_REPLY = "redis_reply"
    SHADOW_OOM = "shadow_oom"
    REDIS_OTHER = "redis_other"
    MEMCACHED_READER = "memcached_reader"
    INTERNAL = "internal"
    WORKER_EXIT = "worker_exit"


class SkipReason(StrEnum):
    """Why a sampled request was not replayed (memshadow_shadow_skipped_total{reason})."""

    REPLY_NOT_CAPTURED = "reply_not_captured"
    NOT_SHADOWED = "not_shadowed"
    # Of the request's arguments, most serious first (memcache/arguments.py keeps the worst).
    UNSHADOWABLE_INPUT = "unshadowable_input"  # memcached 1.6.18 rejects the request
    META_UNEMULATED = "meta_unemulated"  # a meta flag whose effect the shadow cannot copy
    NON_CANONICAL = "non_canonical"  # accepted, but not spelled as a plain decimal etc.
    MEMCACHED_ERROR = "memcached_error"
    BAD_DATA_CHUNK = "bad_data_chunk"  # memcached stored nothing
    FLUSH_ALL_NOT_REPLAYED = "flush_all_not_replayed"
    IN_REPAIR_COPY = "in_repair_copy"  # the repair's copy already holds its effect
    REPAIR_OVERLAP = "repair_overlap"  # it may or may not be in the repair's copy


class ConnectFailure(StrEnum):
    """Why a connection to Redis failed (memshadow_shadow_redis_connect_failures_total)."""

    TLS = "tls"
    AUTH = "auth"
    PERMISSION = "permission"
    DNS = "dns"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    REPLICA = "replica"
    OTHER = "other"


class Store(StrEnum):
    """A store whose evictions are counted (memshadow_shadow_evictions_total{store})."""

    MEMCACHED = "memcached"
    REDIS = "redis"


class GuardAction(StrEnum):
    """What a guard rule does when it trips (guards.*.action in the YAML)."""

    HOLD = "hold"  # freeze the ramp where it is
    STEP_BACK = "step_back"  # go to the ramp step below the current rate (hold when none)
    STOP = "stop"  # switch shadowing off (the kill switch)


GUARD_SEVERITY: Final[dict[GuardAction, int]] = {
    GuardAction.HOLD: 1,
    GuardAction.STEP_BACK: 2,
    GuardAction.STOP: 3,
}
"""The stronger action wins when several rules trip."""


__all__ = [
    "GUARD_SEVERITY",
    "ConnectFailure",
    "DiffKind",
    "DropReason",
    "ErrorKind",
    "GuardAction",
    "NoiseReason",
    "Outcome",
    "SkipReason",
    "Store",
    "VerdictAction",
]
