"""Comparison, sans-IO: Memcached's answer against Redis's for one key, as a Difference or None.

What a difference *means* (a real mismatch or expected noise such as a race, an eviction or a
cold key) needs more evidence than the two answers, so the dispatcher classifies it; this
module only says whether and how the answers differ. Cas numbers are never compared, only
their presence (REFERENCE 4.6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from proxy.redis.layout import Item
from proxy.shadow.translate import (
    CREATED,
    HIT,
    MISS,
    NON_NUMERIC,
    STORED,
    McValue,
    ShadowOp,
)

# Mismatch kinds (memshadow_shadow_mismatches_total{kind}).
VALUE = "value"
FLAGS = "flags"
MISSING_IN_REDIS = "missing_in_redis"
UNEXPECTED_IN_REDIS = "unexpected_in_redis"
STATUS = "status"
ERROR = "error"
PADDING = "incr_padding"  # only trailing spaces differ on a number: noise, not a mismatch
# Not compared at all: a cas token whose gets was not shadowed, so Memcached's outcome was
# followed (noise, never a mismatch).
CAS_UNMAPPED = "cas_unmapped"


@dataclass(frozen=True, slots=True)
class Difference:
    kind: str
    memcached: str
    redis: str


def _show(data: bytes | None) -> str:
    if data is None:
        return "-"
    return f"{len(data)} bytes"


_PADDED: Final = re.compile(rb"\A([0-9]+) +")


def _same_number(a: bytes, b: bytes) -> bool:
    """Values that differ only by memcached's incr padding (REFERENCE 1.7): spaces after the
    number an incr or decr left, which memcached writes or not depending on whether a reader
    held the item at that moment; an append after it keeps them inside the value (seen in
    the soak: "0x" against "0" + 17 spaces + "x")."""
    return a != b and _PADDED.sub(rb"\1", a) == _PADDED.sub(rb"\1", b)


def compare_values(mc: McValue | None, redis: Item | None) -> Difference | None:
    """Two views of one item (None: absent). Only what Memcached returned is compared."""
    if mc is None and redis is None:
        return None
    if mc is None:
        assert redis is not None
        return Difference(UNEXPECTED_IN_REDIS, "miss", f"hit ({_show(redis.data)})")
    if redis is None:
        return Difference(MISSING_IN_REDIS, f"hit ({_show(mc.data)})", "miss")
    if mc.data is not None and mc.data != redis.data:
        if _same_number(mc.data, redis.data):
            return Difference(PADDING, repr(mc.data[:40]), repr(redis.data[:40]))
        return Difference(VALUE, _show(mc.data), _show(redis.data))
    if mc.flags is not None and mc.flags != redis.flags:
        return Difference(FLAGS, str(mc.flags), str(redis.flags))
    return None


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
