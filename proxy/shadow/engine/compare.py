"""Comparison, sans-IO: Memcached's answer against Redis's for one key, as a Difference or None.

What a difference *means* (a real mismatch or expected noise such as a race, an eviction or a
cold key) needs more evidence than the two answers, so the dispatcher classifies it; this
module only says whether and how the answers differ. Cas numbers are never compared, only
their presence (REFERENCE 4.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.redis.layout import Item
from proxy.shadow.engine.translate import (
    CREATED,
    HIT,
    MISS,
    NON_NUMERIC,
    STORED,
    McValue,
    ShadowOp,
)
from proxy.shadow.words import DiffKind

# How answers differ: mismatch kinds (memshadow_shadow_mismatches_total{kind}), words.py's.
VALUE: Final = DiffKind.VALUE
FLAGS: Final = DiffKind.FLAGS
MISSING_IN_REDIS: Final = DiffKind.MISSING_IN_REDIS
UNEXPECTED_IN_REDIS: Final = DiffKind.UNEXPECTED_IN_REDIS
STATUS: Final = DiffKind.STATUS
ERROR: Final = DiffKind.ERROR
PADDING: Final = DiffKind.INCR_PADDING  # only spaces differ on a number: noise, not a mismatch
# Not compared at all: a cas token whose gets was not shadowed, so Memcached's outcome was
# followed (noise, never a mismatch).
CAS_UNMAPPED: Final = DiffKind.CAS_UNMAPPED


@dataclass(frozen=True, slots=True)
class Difference:
    kind: DiffKind
    memcached: str
    redis: str


def _show(data: bytes | None) -> str:
    if data is None:
        return "-"
    return f"{len(data)} bytes"


_DIGITS: Final = frozenset(b"0123456789")


def _padding_only(mc: bytes, redis: bytes) -> bool:
    """Values that differ only by memcached's incr padding (REFERENCE 1.7). memcached pads a
    shorter incr or decr result with spaces up to the old length only when no other request
    holds the item at that moment (otherwise it writes a new item of the exact length); the
    Redis side always pads, so its value is the longer one, by spaces added to a run of
    spaces (perhaps empty) that follows a digit. A later append or prepend keeps them inside
    the value (seen in the soak: "0x" against "0" + 17 spaces + "x"; "x0" against "x0" + 18
    spaces; a 35-byte value ending in a number against the same with one space after it)."""
    extra = len(redis) - len(mc)
    if extra <= 0 or redis.replace(b" ", b"") != mc.replace(b" ", b""):
        return False  # (bytes other than spaces differ: a real difference, found in C)
    lo, hi = 0, len(mc)  # the common prefix, by halves (values can be a megabyte)
    view = memoryview(mc)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if redis.startswith(view[:mid]):
            lo = mid
        else:
            hi = mid - 1
    if redis[lo + extra :] != mc[lo:]:
        return False  # spaces added at more than one place
    run = len(redis[:lo].rstrip(b" "))  # the inserted spaces may join a run
    return run > 0 and redis[run - 1] in _DIGITS


def compare_values(mc: McValue | None, redis: Item | None) -> Difference | None:
    """Two views of one item (None: absent). Only what Memcached returned is compared."""
    if mc is None and redis is None:
        return None
    if mc is None:
        assert redis is not None
        return Difference(UNEXPECTED_IN_REDIS, "miss", f"hit ({_show(redis.data)})")
    if redis is None:
        return Difference(MISSING_IN_REDIS, f"hit ({_show(mc.data)})", "miss")
    padding = None
    if mc.data is not None and mc.data != redis.data:
        if not _padding_only(mc.data, redis.data):
            return Difference(VALUE, _show(mc.data), _show(redis.data))
        padding = Difference(PADDING, _show(mc.data), _show(redis.data))
    if mc.flags is not None and mc.flags != redis.flags:
        return Difference(FLAGS, str(mc.flags), str(redis.flags))  # (padding or not)
    return padding


def compare_read(op: ShadowOp, redis: Item | None) -> Difference | None:
    if op.mc_status == MISS:
        return compare_values(None, redis)
    assert op.mc_status == HIT
    return compare_values(op.mc_value or McValue(None, None, None), redis)


def compare_outcome(op: ShadowOp, redis_status: str, redis_number: int | None) -> Difference | None:
    """A write's outcome (STORED/NOT_FOUND/... and, for arithmetic, the new number)."""
    mc_status = op.mc_status
    if mc_status is None:
        return None  # noreply / quiet: nothing to compare
    if redis_status in (CREATED, "OK"):
        # incr/decr/ma success ("OK"), and ma N's autovivify: memcached answers both with
        # the number (HD/VA for ma), which translate calls STORED.
        redis_status = STORED
    if mc_status != redis_status:
        kind = ERROR if NON_NUMERIC in (mc_status, redis_status) else STATUS
        return Difference(kind, mc_status, redis_status)
    if op.mc_number is not None and redis_number is not None and op.mc_number != redis_number:
        return Difference(VALUE, str(op.mc_number), str(redis_number))
    return None


def state_equal(mc: McValue | None, redis: Item | None) -> bool:
    """Full-state comparison after a re-read (value and flags both known)."""
    diff = compare_values(mc, redis)
    return diff is None or diff.kind == PADDING
