"""Memcached 1.6.18's number parsers (safe_strtol/strtoul/strtoull), reproduced exactly.

The proxy must decide, byte for byte like memcached, whether a storage line is followed by a
data block; that depends on whether its numbers parse, so these mirror C's strtol family plus
memcached's acceptance rules (REFERENCE 1.2), including silent truncation to 32 bits.
"""

from __future__ import annotations

# isspace() in the C locale.
_C_SPACE = frozenset(b" \t\n\v\f\r")
_LONG_MIN = -(2**63)
_LONG_MAX = 2**63 - 1
_ULONG_MAX = 2**64 - 1

INT32_MAX = 2**31 - 1


def _scan(token: bytes) -> tuple[bool, int, int] | None:
    """Scan like strtol: (negative, magnitude, end index), or None when no digits or junk follows.

    memcached accepts a number only when the character after the digits is whitespace or the
    end of the token.
    """
    n = len(token)
    i = 0
    while i < n and token[i] in _C_SPACE:
        i += 1
    negative = False
    if i < n and token[i] in (43, 45):  # '+', '-'
        negative = token[i] == 45
        i += 1
    j = i
    while j < n and 48 <= token[j] <= 57:
        j += 1
    if j == i:
        return None
    if j < n and token[j] not in _C_SPACE:
        return None
    return negative, int(token[i:j]), j


def _wrap(value: int, bits: int, signed: bool) -> int:
    value &= (1 << bits) - 1
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def safe_strtol(token: bytes) -> int | None:
    """memcached's safe_strtol: a C long, then cast to int32 (so out-of-range values wrap)."""
    if token.isdigit() and len(token) < 10:
        return int(token)
    scanned = _scan(token)
    if scanned is None:
        return None
    negative, magnitude, _ = scanned
    value = -magnitude if negative else magnitude
    if value < _LONG_MIN or value > _LONG_MAX:
        return None  # ERANGE
    return _wrap(value, 32, signed=True)


def _strtoul(token: bytes) -> int | None:
    scanned = _scan(token)
    if scanned is None:
        return None
    negative, magnitude, end = scanned
    if magnitude > _ULONG_MAX:
        return None  # ERANGE
    value = (-magnitude) & _ULONG_MAX if negative else magnitude
    # memcached rejects a '-' only when the wrapped value would be negative as a signed long.
    if value > _LONG_MAX and 45 in token[:end]:
        return None
    return value


def safe_strtoul(token: bytes) -> int | None:
    """memcached's safe_strtoul for 32-bit fields (client flags): values >= 2^32 are truncated."""
    if token.isdigit() and len(token) < 10:
        return int(token)
    value = _strtoul(token)
    return None if value is None else value & 0xFFFFFFFF


def safe_strtoull(token: bytes) -> int | None:
    """memcached's safe_strtoull: an unsigned 64-bit number (cas unique, incr/decr delta)."""
    if token.isdigit() and len(token) < 19:
        return int(token)
    return _strtoul(token)


def is_canonical_decimal(token: bytes, maximum: int) -> bool:
    """True for a plain decimal in [0, maximum] without sign, spaces or leading zeros.

    The shadow replays only canonical requests: anything else is parsed by memcached in ways
    that newer versions changed (REFERENCE 1.2), so it is counted rather than guessed.
    """
    if not token.isdigit() or (len(token) > 1 and token[0] == 48):
        return False
    return int(token) <= maximum


INT32_MIN = -(2**31)


def canonical_int32(token: bytes) -> int | None:
    """The value of a plain decimal int32 (exptime, ttl), or None when it is spelled any other
    way. A negative number is '-' then a canonical non-zero number ('-0' is not canonical)."""
    if token[:1] == b"-":
        if token == b"-0" or not is_canonical_decimal(token[1:], -INT32_MIN):
            return None
        return -int(token[1:])
    return int(token) if is_canonical_decimal(token, INT32_MAX) else None
