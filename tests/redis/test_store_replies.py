"""The store's commands and reply decoders, sans-IO: literal arguments and replies."""

from __future__ import annotations

import pytest

from proxy.memcache.words import Mode, Status
from proxy.redis.errors import CorruptValue, RedisProtocolError
from proxy.redis.layout import Expiry, ExpiryKind, Item, pack_value
from proxy.redis.store import (
    DeltaResult,
    StoreResult,
    decode_cas_delete,
    decode_del,
    decode_delta,
    decode_item,
    decode_store,
    decode_touch,
    delta_arguments,
    getex_command,
    store_arguments,
)


def test_store_arguments() -> None:
    assert store_arguments("set", 3, (b"0", b"0"), b"data", None, 1000, None) == (
        "set", 3, b"0", b"0", b"data", 0, 1000,
    )  # fmt: skip
    assert store_arguments(Mode.CAS, 0, (b"R", b"10"), b"d", 7, 5, True) == (
        "cas", 0, b"R", b"10", b"d", 7, 5, b"1",
    )  # fmt: skip
    args = store_arguments(Mode.APPEND, 0, (b"0", b"0"), b"d", None, 5, False)
    assert args[0] == "append" and type(args[0]) is str and args[-1] == b"0"


@pytest.mark.parametrize(
    ("mode", "flags", "cas", "problem"),
    [
        ("frobnicate", 0, None, "not a storage mode"),
        ("set", 2**32, None, "flags"),
        ("set", -1, None, "flags"),
        ("cas", 0, None, "cas mode needs"),
        ("cas", 0, 2**64, "cas"),
    ],
)
def test_store_arguments_out_of_range(mode: str, flags: int, cas: int | None, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        store_arguments(mode, flags, (b"0", b"0"), b"", cas, 10, None)


def test_delta_arguments() -> None:
    absent = (b"", b"")
    assert delta_arguments("incr", 5, None, absent, 0, absent, 100, False) == (
        "incr", 5, 0, b"", b"", 0, b"", b"", 100, b"NT",
    )  # fmt: skip
    assert delta_arguments("decr", 1, 9, (b"R", b"60"), 4, (b"A", b"7000"), 50, True) == (
        "decr", 1, 9, b"R", b"60", 4, b"A", b"7000", 50, b"TN",
    )  # fmt: skip
    with pytest.raises(ValueError, match="incr or decr"):
        delta_arguments("mul", 1, None, absent, 0, absent, 1, False)
    with pytest.raises(ValueError, match="delta"):
        delta_arguments("incr", 2**64, None, absent, 0, absent, 1, False)


def test_getex_command_follows_the_expiry_kind() -> None:
    assert getex_command(b"k", Expiry(ExpiryKind.NONE)) == (b"GETEX", b"k", b"PERSIST")
    assert getex_command(b"k", Expiry(ExpiryKind.RELATIVE, 5)) == (b"GETEX", b"k", b"EX", 5)
    assert getex_command(b"k", Expiry(ExpiryKind.ABSOLUTE, 9000)) == (
        b"GETEX", b"k", b"PXAT", 9000,
    )  # fmt: skip
    assert getex_command(b"k", Expiry(ExpiryKind.EXPIRED)) == (b"GETEX", b"k", b"PXAT", 1)


def test_decode_store() -> None:
    assert decode_store([b"STORED", 1234]) == StoreResult(Status.STORED, 1234)
    assert decode_store([b"STORED", b"99"]) == StoreResult(Status.STORED, 99)
    for status in ("NOT_STORED", "EXISTS", "NOT_FOUND", "TOO_LARGE"):
        result = decode_store([status.encode()])
        assert result == StoreResult(Status(status)) and result.status is Status(status)


@pytest.mark.parametrize(
    "reply", [None, b"STORED", [], [1], [b"STOR"], [b"STORED"], [b"STORED", b"x"], [b"\xff"]]
)
def test_decode_store_refuses_other_replies(reply: object) -> None:
    with pytest.raises(RedisProtocolError, match="mc_store"):
        decode_store(reply)  # type: ignore[arg-type]


def test_decode_delta() -> None:
    assert decode_delta([b"OK", 11, 5]) == DeltaResult(Status.OK, 11, 5)
    assert decode_delta([b"CREATED", 0, 6]) == DeltaResult(Status.CREATED, 0, 6)
    assert decode_delta([b"NON_NUMERIC"]) == DeltaResult(Status.NON_NUMERIC)
    with pytest.raises(RedisProtocolError, match="mc_delta"):
        decode_delta([b"OK"])
    with pytest.raises(RedisProtocolError, match="unknown status 'NOPE'"):
        decode_delta([b"NOPE"])


def test_decode_touch_and_deletes() -> None:
    assert decode_touch([b"TOUCHED"]) is Status.TOUCHED
    assert decode_touch([b"NOT_FOUND"]) is Status.NOT_FOUND
    with pytest.raises(RedisProtocolError, match="mc_touch"):
        decode_touch([b"DELETED"])
    assert decode_del(1) is Status.DELETED
    assert decode_del(0) is Status.NOT_FOUND
    assert decode_cas_delete([b"EXISTS"]) is Status.EXISTS
    with pytest.raises(RedisProtocolError, match="mc_delete"):
        decode_cas_delete(b"DELETED")


def test_decode_item() -> None:
    assert decode_item(None) is None
    assert decode_item(pack_value(7, 42, b"data")) == Item(7, 42, b"data")
    with pytest.raises(CorruptValue):
        decode_item(b"short")
    with pytest.raises(RedisProtocolError, match="expected a string"):
        decode_item(5)
