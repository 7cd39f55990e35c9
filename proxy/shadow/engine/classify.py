"""Classification, sans-IO: what a difference between the two answers means, from evidence.

compare.py says whether Memcached's and Redis's answers differ; this module says whether that
difference proves Redis diverged (a mismatch) or is expected noise with a precise reason, and
what the shadow must do next. It is fed facts, never sockets or clocks:

1. `judge_at_once` decides from what is already known (cold key, a race between connections,
   an expiry boundary, cas and padding noise) or asks for a re-read;
2. `judge_reread` decides from a re-read of both stores, *ordered* with the key's chain: the
   re-read proves something only when no operation of the key may lie between the compared
   answer and Memcached's snapshot. Unordered evidence is "unverified" noise, never a mismatch.

`place` orders an operation against a repair's snapshot: the snapshot already holds every
operation Memcached answered before it was taken, so those must not be replayed on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.redis.layout import REALTIME_MAXDELTA
from proxy.shadow.engine import keystate
from proxy.shadow.engine.compare import (
    CAS_UNMAPPED,
    ERROR,
    MISSING_IN_REDIS,
    PADDING,
    STATUS,
    UNEXPECTED_IN_REDIS,
    Difference,
)
from proxy.shadow.engine.translate import NON_NUMERIC
from proxy.shadow.words import DiffKind, NoiseReason, Outcome, VerdictAction

# Outcomes, noise reasons and actions: the words are words.py's (REFERENCE 4.10 for the
# noise reasons); the names here are what the rules below read.
MATCH: Final = Outcome.MATCH
NOISE: Final = Outcome.NOISE
MISMATCH: Final = Outcome.MISMATCH

COLD_KEY: Final = NoiseReason.COLD_KEY
TRANSIENT_RACE: Final = NoiseReason.TRANSIENT_RACE
EXPIRY_BOUNDARY: Final = NoiseReason.EXPIRY_BOUNDARY
# The host's wall clock stepped (a VM's clock sync, an NTP step) since the key's expiry was
# set: Redis keeps expiry times on the wall clock, memcached counts a TTL on a monotonic one,
# so the stores expire such a key up to the step's size apart.
CLOCK_STEP: Final = NoiseReason.CLOCK_STEP
EVICTED: Final = NoiseReason.EVICTED  # Memcached evicted the key (its watch stream named it)
# Redis evicted the key (a keyspace notification named it): not a protocol difference but a
# capacity finding (the working set needs more than Redis's maxmemory), counted apart.
REDIS_EVICTED: Final = NoiseReason.REDIS_EVICTED
UNVERIFIED: Final = NoiseReason.UNVERIFIED
# memcached's incr/decr parses a value made only of whitespace by reading on past its end
# (strtoull skips the whitespace and the item's "\r\n"), so its answer depends on whatever
# bytes follow the item in its slab memory: seen as a number after a set of b"\x0c".
# The same parser, on a number of 2^63 or more, looks for a '-' with strchr() from the value
# to the first NUL: past the item's end too, so the bytes that follow it in memory decide
# whether the incr/decr is NON_NUMERIC (seen in the soak: 4 in 3.6M comparisons).
MEMCACHED_OVERREAD: Final = NoiseReason.MEMCACHED_OVERREAD
WHITESPACE: Final = b" \t\n\v\f\r"

# A wall clock that moved this much against the monotonic one has stepped (Linux slews
# both together: only a step moves one against the other).
STEP_SECONDS: Final = 0.25

# What the shadow does after a verdict.
KEEP: Final = VerdictAction.KEEP
REPAIR: Final = VerdictAction.REPAIR
BACKFILL: Final = VerdictAction.BACKFILL


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reason: NoiseReason | DiffKind  # noise reason, or mismatch kind
    action: VerdictAction = KEEP


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What the shadow knows of the key when a difference is judged.

    Times are unix seconds: `replied_wall` is when Memcached answered the operation,
    `judged_wall` when the difference is judged (Redis answered at or before it).
    """

    warm: bool  # Redis was known to be in step with Memcached before the operation
    raced: bool  # another connection's operation on the key overlapped it (race window)
    expires_at: float | None  # unix time Memcached expires the key (None: never)
    replied_wall: float
    judged_wall: float
    # How far the wall clock stepped since expires_at was set (seconds, + forward): Redis
    # expires the key at expires_at, memcached at expires_at + expiry_skew (both in today's
    # wall-clock seconds).
    expiry_skew: float = 0.0
    why: int = keystate.NEVER  # why the key is not warm (keystate.NEVER, EVICTED...)


@dataclass(frozen=True, slots=True)
class Reread:
    """A re-read of both stores after the difference (Memcached first, then Redis)."""

    ordered: bool  # no operation of the key may lie between the answer and the snapshot
    memcached_present: bool
    redis_present: bool
    equal: bool  # the two items are the same (value and flags)
    raced: bool  # another connection touched the key while the evidence was gathered
    # Why the key stopped being in step while the evidence was gathered (keystate.EVICTED,
    # REDIS_EVICTED, ...; -1: it did not).
    why: int = -1
    redis_blank: bool = False  # Redis's value is not empty and holds only whitespace
    memcached_signed_overflow: bool = False  # Memcached's value is a number >= 2^63


def signed_overflow(data: bytes | None) -> bool:
    """A value memcached's number parser scans past the end of for a '-' (MEMCACHED_OVERREAD):
    a number (leading whitespace, an optional '+', any leading zeros) from 2^63 up to
    2^64 - 1."""
    if data is None:
        return False
    digits = data.lstrip(WHITESPACE).removeprefix(b"+")
    end = len(digits) - len(digits.lstrip(b"0123456789"))
    number = digits[:end].lstrip(b"0")
    return len(number) <= 20 and 1 << 63 <= int(number or b"0") < 1 << 64


def blank(data: bytes | None) -> bool:
    """A value memcached's number parser reads past the end of (see MEMCACHED_OVERREAD)."""
    return data is not None and data != b"" and not data.strip(WHITESPACE)


def near_expiry(facts: KeyFacts, tolerance: float, skew: float = 0.0) -> bool:
    """Memcached answered at replied_wall, Redis at some time up to judged_wall: an expiry
    anywhere in that span (widened by the clocks' tolerance) explains a hit against a miss.
    With `skew`, the two stores' expiries are that far apart (a wall-clock step): either one
    in the span explains it, and so does a span that lies between them."""
    expires_at = facts.expires_at
    if expires_at is None:
        return False
    first, last = sorted((expires_at, expires_at + skew))
    return facts.replied_wall - tolerance <= last and first <= facts.judged_wall + tolerance


def judge_at_once(diff: Difference, facts: KeyFacts, expiry_tolerance: float) -> Verdict | None:
    """A verdict from the facts alone, or None when a re-read must decide."""
    if diff.kind == PADDING:
        return Verdict(NOISE, PADDING)
    if diff.kind == CAS_UNMAPPED:
        return Verdict(NOISE, CAS_UNMAPPED)
    if facts.raced:
        # Memcached may have run the racing operations in another order than their replies
        # came back: the chain settles the key once the writers pause.
        return Verdict(NOISE, TRANSIENT_RACE)
    if not facts.warm:
        return _cold(facts.why)
    if near_expiry(facts, expiry_tolerance):
        # The two stores' clocks differ (memcached: whole seconds, a timer): either answer
        # may be right, and the key may now differ in any way (a touch of a key one store
        # expired): copy Memcached's state.
        return Verdict(NOISE, EXPIRY_BOUNDARY, REPAIR)
    skew = facts.expiry_skew
    if (
        abs(skew) > STEP_SECONDS
        and diff.kind in (_STEP_FORWARD if skew > 0 else _STEP_BACKWARD)
        and near_expiry(facts, expiry_tolerance, skew)
    ):
        return Verdict(NOISE, CLOCK_STEP, REPAIR)
    return None


# What a step can explain: forward, Redis expires the key early (the key missing there, an
# outcome that depends on its presence); backward, late (the key still there). Never a
# value or flags difference: a key present in both stores did not expire in either.
_STEP_FORWARD: Final = (MISSING_IN_REDIS, STATUS)
_STEP_BACKWARD: Final = (UNEXPECTED_IN_REDIS, STATUS)


def judge_reread(diff: Difference, reread: Reread) -> Verdict:
    """The verdict once both stores were re-read."""
    if reread.raced:
        return Verdict(NOISE, TRANSIENT_RACE, REPAIR)
    if not reread.ordered:
        if reread.why in (keystate.EVICTED, keystate.REDIS_EVICTED):
            return _cold(reread.why)  # a store evicted the key meanwhile
        # Memcached's snapshot may hold operations Redis has not replayed yet (or miss one
        # it has): it proves nothing either way.
        return Verdict(NOISE, UNVERIFIED, REPAIR)
    if diff.kind == ERROR and diff.redis == NON_NUMERIC and reread.redis_blank:
        return Verdict(NOISE, MEMCACHED_OVERREAD, REPAIR)
    if diff.kind == ERROR and diff.memcached == NON_NUMERIC and reread.memcached_signed_overflow:
        return Verdict(NOISE, MEMCACHED_OVERREAD, REPAIR)
    if reread.equal:
        # Both stores agree again and nothing of the key came between: something outside
        # this proxy (another instance, a direct client) wrote the key meanwhile.
        return Verdict(NOISE, TRANSIENT_RACE, REPAIR)
    return Verdict(MISMATCH, diff.kind, REPAIR)


def _cold(why: int) -> Verdict:
    """A difference on a key not in step, by why it is not: evicted by a store (repaired:
    the eviction is the whole story), or never established since the shadow lost track of
    it (backfilled only when shadow.backfill asks for it)."""
    if why == keystate.EVICTED:
        return Verdict(NOISE, EVICTED, REPAIR)
    if why == keystate.REDIS_EVICTED:
        return Verdict(NOISE, REDIS_EVICTED, REPAIR)
    return Verdict(NOISE, COLD_KEY, BACKFILL)


# Where an operation stands against a repair's snapshot (taken between fence_lo and fence_hi).
AFTER: Final = 0  # Memcached ran it after the snapshot: replay it
SUBSUMED: Final = 1  # Memcached ran it before the snapshot: the copy holds its effect
OVERLAPS: Final = 2  # it may have run on either side: its effect in Redis is unknown


FLUSH_CLOCK_SLACK: Final = 1.0
"""Seconds either side of where memcached's one-second clock may apply a delayed flush_all:
its tick lags when its timer runs late."""


def flush_window(
    delay: int, sent: float, replied: float, wall_offset: float
) -> tuple[float, float, float]:
    """When memcached may apply `flush_all <delay>` sent at `sent` and answered at `replied`
    (perf_counter times; wall_offset: unix time minus perf_counter): (lo, hi, at). Operations
    that meet [lo, hi] may or may not see it; every key turns cold at `at`, in reply order.

    Checked on 1.6.18: 0 (or negative) applies while the request runs. N seconds applies at
    the tick N-1 seconds on of memcached's one-second clock, N-2 to N-1 s after the command,
    and flushes too what is written up to the next tick (N-1 to N s after it): those writes
    are lost. A delay over 30 days is a unix time (it applies about then)."""
    if delay <= 0:
        return sent, replied, replied
    if delay > REALTIME_MAXDELTA:
        at = delay - wall_offset
        return sent, max(replied, at) + 1.0 + FLUSH_CLOCK_SLACK, sent
    lo = max(sent, sent + delay - 2 - FLUSH_CLOCK_SLACK)
    return lo, replied + delay + FLUSH_CLOCK_SLACK, lo


def place(sent_at: float, replied_at: float, fence_lo: float, fence_hi: float) -> int:
    """Order an operation ([sent_at, replied_at]: when the proxy sent it and got its reply)
    against a snapshot read between fence_lo and fence_hi (same monotonic clock)."""
    if sent_at > fence_hi:
        return AFTER
    if replied_at < fence_lo:
        return SUBSUMED
    return OVERLAPS


__all__ = [
    "AFTER",
    "BACKFILL",
    "CLOCK_STEP",
    "COLD_KEY",
    "EVICTED",
    "EXPIRY_BOUNDARY",
    "KEEP",
    "MATCH",
    "MEMCACHED_OVERREAD",
    "MISMATCH",
    "NOISE",
    "OVERLAPS",
    "REDIS_EVICTED",
    "REPAIR",
    "STEP_SECONDS",
    "SUBSUMED",
    "TRANSIENT_RACE",
    "UNVERIFIED",
    "KeyFacts",
    "Reread",
    "Verdict",
    "blank",
    "flush_window",
    "judge_at_once",
    "judge_reread",
    "near_expiry",
    "place",
]
