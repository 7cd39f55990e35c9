"""Unit tests of the sans-IO layout helpers: header, exptime conversion, size limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.redis.errors import CorruptValue
from proxy.redis.layout import (
    EXPIRED,
    NO_EXPIRY,
    Expiry,
    ExpiryKind,
    Item,
    expiry_from_exptime,
    max_numeric_len,
    max_value_len,
    pack_value,
    truncate_int32,
    unpack_value,
)

NOW = 1_700_000_000.25


def test_header_is_flags_then_cas_big_endian() -> None:
    raw = pack_value(0x01020304, 0x0A0B0C0D0E0F1011, b"data")
    assert raw == b"\x01\x02\x03\x04\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11data"
    assert unpack_value(raw) == Item(0x01020304, 0x0A0B0C0D0E0F1011, b"data")


def test_empty_data_round_trips() -> None:
    assert unpack_value(pack_value(0, 1, b"")) == Item(0, 1, b"")


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_pack_unpack_round_trip(flags: int, cas: int, data: bytes) -> None:
    assert unpack_value(pack_value(flags, cas, data)) == Item(flags, cas, data)


def test_short_value_is_corrupt() -> None:
    with pytest.raises(CorruptValue):
        unpack_value(b"plain value")


@pytest.mark.parametrize(
    ("exptime", "expected"),
    [
        (0, NO_EXPIRY),
        (1, Expiry(ExpiryKind.RELATIVE, 1)),
        (100, Expiry(ExpiryKind.RELATIVE, 100)),
        (2_592_000, Expiry(ExpiryKind.RELATIVE, 2_592_000)),
        (2_592_001, EXPIRED),  # absolute, in 1970
        (1_699_999_999, EXPIRED),  # absolute, in the past
        (1_700_000_000, EXPIRED),  # absolute, not after now
        (1_700_000_001, Expiry(ExpiryKind.ABSOLUTE, 1_700_000_001_000)),
        (2**31 - 1, Expiry(ExpiryKind.ABSOLUTE, (2**31 - 1) * 1000)),
        (-1, EXPIRED),
        (-(2**31), EXPIRED),
        (2**32, NO_EXPIRY),  # memcached truncates to int32: 0, never expires
        (2**32 + 100, Expiry(ExpiryKind.RELATIVE, 100)),
        (2**31, EXPIRED),  # wraps to -2^31
        (99_999_999_999, EXPIRED),  # truncates to a past unix time
    ],
)
def test_expiry_from_exptime(exptime: int, expected: Expiry) -> None:
    assert expiry_from_exptime(exptime, NOW) == expected


def test_expiry_args_are_the_lua_pair() -> None:
    assert Expiry(ExpiryKind.RELATIVE, 30).args() == (b"R", b"30")
    assert NO_EXPIRY.args() == (b"0", b"0")
    assert EXPIRED.args() == (b"X", b"0")


def test_truncate_int32() -> None:
    assert truncate_int32(2**31 - 1) == 2**31 - 1
    assert truncate_int32(2**31) == -(2**31)
    assert truncate_int32(-1) == -1
    assert truncate_int32(4294967299) == 3


def test_max_value_len_matches_observed_memcached_limits() -> None:
    # REFERENCE 1.4: bisected on memcached 1.6.18 -I 1m
    assert max_value_len(1_048_576, 3) == 1_048_514
    assert max_value_len(1_048_576, 250) == 1_048_267
    # non-zero flags take 4 bytes in the item (bisected on 1.6.18 too)
    assert max_value_len(1_048_576, 3, flags=1) == 1_048_510
    assert max_value_len(4096, 250, flags=2**32 - 1) == 3783


def test_max_numeric_len_is_the_chunked_item_boundary() -> None:
    # bisected: "1" + spaces stays numeric up to these lengths (slab_chunk_max 512 KiB)
    assert max_numeric_len(524_288, 1) == 524_228
    assert max_numeric_len(524_288, 100) == 524_129
    assert max_numeric_len(524_288, 1, flags=7) == 524_224
