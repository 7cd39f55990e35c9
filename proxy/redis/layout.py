"""Sans-IO rules of the Redis layout: the flags|cas|data value, exptime conversion, size limits.

Nothing here touches a socket or a clock; "now" is always a parameter (REFERENCE.md 4.1, 4.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

from proxy.redis.errors import CorruptValue

HEADER = struct.Struct(">IQ")
"""flags (uint32 big-endian) then cas (uint64 big-endian), in front of the data."""
HEADER_LEN = HEADER.size

REALTIME_MAXDELTA = 2_592_000
"""Exptimes up to 30 days are relative seconds; larger ones are absolute unix times."""

ITEM_OVERHEAD = 48 + 8 + 1 + 2
"""Bytes memcached adds to key+data in an item: header, cas, key NUL, trailing "\\r\\n"."""
FLAGS_OVERHEAD = 4
"""Extra bytes of an item whose client flags are not 0 (memcached stores 0 flags in no space)."""

DEFAULT_ITEM_SIZE_MAX = 1_048_576
"""memcached -I default (1m)."""
DEFAULT_SLAB_CHUNK_MAX = 524_288
"""memcached -o slab_chunk_max default: larger items are chunked (and never numeric)."""

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class ExpiryKind(StrEnum):
    """How the Lua functions and the GETEX mapping read an expiry value."""

    NONE = "0"
    RELATIVE = "R"  # seconds from now, 1..2592000
    ABSOLUTE = "A"  # unix time in milliseconds
    EXPIRED = "X"  # the command takes effect, then the item is gone


@dataclass(frozen=True, slots=True)
class Expiry:
    """A memcached exptime converted for Redis."""

    kind: ExpiryKind
    value: int = 0

    def args(self) -> tuple[bytes, bytes]:
        """The (kind, value) argument pair of the Lua functions."""
        return self.kind.value.encode(), str(self.value).encode()


NO_EXPIRY = Expiry(ExpiryKind.NONE)
EXPIRED = Expiry(ExpiryKind.EXPIRED)


@dataclass(frozen=True, slots=True)
class Item:
    """A memcached item as the shadow stores it."""

    flags: int
    cas: int
    data: bytes


def truncate_int32(value: int) -> int:
    """memcached parses exptime with strtol and keeps the low 32 bits, signed."""
    return ((value + 2**31) & 0xFFFFFFFF) - 2**31


def expiry_from_exptime(exptime: int, now: float) -> Expiry:
    """Convert a memcached exptime (classic field, gat, or meta T/N token).

    ``now`` is the unix time that memcached would use. 0 never expires; 1..2592000 are
    relative seconds; larger values are absolute unix seconds, already expired when not after
    ``now``; negative values mean "expired at once". Out-of-int32 input is truncated the way
    memcached 1.6.18 does (4294967296 -> 0).
    """
    value = truncate_int32(exptime)
    if value == 0:
        return NO_EXPIRY
    if value < 0:
        return EXPIRED
    if value <= REALTIME_MAXDELTA:
        return Expiry(ExpiryKind.RELATIVE, value)
    if value <= now:
        return EXPIRED
    return Expiry(ExpiryKind.ABSOLUTE, value * 1000)


def pack_value(flags: int, cas: int, data: bytes) -> bytes:
    """The Redis string for an item (the Lua functions build the same bytes)."""
    return HEADER.pack(flags, cas) + data


def unpack_value(raw: bytes) -> Item:
    """Decode a Redis string of the layout; CorruptValue if it is shorter than the header."""
    if len(raw) < HEADER_LEN:
        raise CorruptValue(f"stored value of {len(raw)} bytes has no {HEADER_LEN}-byte header")
    flags, cas = HEADER.unpack_from(raw)
    return Item(flags, cas, raw[HEADER_LEN:])


def _overhead(keylen: int, flags: int) -> int:
    return ITEM_OVERHEAD + keylen + (FLAGS_OVERHEAD if flags else 0)


def max_value_len(item_size_max: int, keylen: int, flags: int = 0) -> int:
    """Largest data length memcached stores for a key: 1048514 for a 3-byte key at -I 1m with
    flags 0, and 4 bytes less with non-zero flags."""
    return item_size_max - _overhead(keylen, flags)


def max_numeric_len(slab_chunk_max: int, keylen: int, flags: int = 0) -> int:
    """Longest data incr/decr reads; longer items are chunked, which memcached calls non-numeric."""
    return slab_chunk_max - _overhead(keylen, flags)
