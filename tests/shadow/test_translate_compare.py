"""Translation and comparison, sans-IO: literal requests and replies in, typed ops and
differences out."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.memcache.request import RequestFramer
from proxy.redis.layout import DEFAULT_ITEM_SIZE_MAX, Item
from proxy.shadow.engine.compare import (
    FLAGS,
    MISSING_IN_REDIS,
    PADDING,
    STATUS,
    UNEXPECTED_IN_REDIS,
    VALUE,
    compare_outcome,
    compare_read,
    compare_values,
    state_equal,
)
from proxy.shadow.engine.translate import (
    DELTA,
    HIT,
    MISS,
    NON_NUMERIC,
    NOT_SEEN,
    NOT_STORED,
    READ,
    STORE,
    STORED,
    TOO_LARGE,
    McValue,
    ShadowOp,
    Skip,
    _Context,
    _retrieval,
    translate,
)
from proxy.shadow.words import SkipReason


def op_for(stream: bytes, reply: bytes, sampled: object = None) -> list[ShadowOp] | Skip:
    requests, _ = RequestFramer(capture=lambda r: True).feed(stream)
    assert len(requests) == 1
    request = requests[0]
    request.response = reply
    predicate = sampled if callable(sampled) else (lambda key: True)
    return translate(request.captured(), predicate)


def one(stream: bytes, reply: bytes) -> ShadowOp:
    ops = op_for(stream, reply)
    assert isinstance(ops, list) and len(ops) == 1, ops
    return ops[0]


def test_get_splits_into_sampled_keys() -> None:
    reply = b"VALUE a 5 2\r\nhi\r\nVALUE a 5 2\r\nhi\r\nEND\r\n"
    ops = op_for(b"get a b a c\r\n", reply, lambda key: key != b"c")
    assert isinstance(ops, list)
    assert [(o.key, o.mc_status) for o in ops] == [(b"a", HIT), (b"b", MISS)]
    assert ops[0].mc_value == McValue(5, b"hi", None)


def test_gets_records_cas_and_gat_exptime() -> None:
    op = one(b"gats 100 k\r\n", b"VALUE k 0 1 42\r\nx\r\nEND\r\n")
    assert op.want_cas and op.exptime == 100 and op.mc_value == McValue(0, b"x", 42)


def _both(stream: bytes, reply: bytes, sampled: Callable[[bytes], bool]) -> tuple[object, object]:
    """What translate makes of a request, and what _retrieval (the general path, without the
    plain-get shortcut) makes of it."""
    requests, _ = RequestFramer(capture=lambda r: True).feed(stream)
    request = requests[-1]  # after the `mn` of an over-long key
    request.response = reply
    captured = request.captured()
    general = _retrieval(_Context(captured, reply, sampled, NOT_SEEN, DEFAULT_ITEM_SIZE_MAX))
    return translate(captured, sampled), general


KEY = b"k" * 32
PLAIN_GET_REPLIES = [
    b"END\r\n",
    b"VALUE " + KEY + b" 3 5\r\nhello\r\nEND\r\n",
    b"VALUE " + KEY + b" 0 0\r\n\r\nEND\r\n",
    b"VALUE " + KEY + b" 4294967295 4\r\n\r\nEN\r\nEND\r\n",  # data that looks like lines
    b"VALUE " + KEY + b" 4294967296 1\r\nx\r\nEND\r\n",  # flags out of range
    b"VALUE " + KEY + b" 0 1 77\r\nx\r\nEND\r\n",  # a cas it was not asked for
    b"VALUE other 0 1\r\nx\r\nEND\r\n",
    b"VALUE " + KEY + b" 0 2\r\nx\r\nEND\r\n",  # shorter than announced
    b"VALUE " + KEY + b" 0 1\r\nx\r\nEND\r\nEND\r\n",
    b"VALUE " + KEY + b" 0 1\r\nx\r\n",
    b"VALUE " + KEY + b" 0  1\r\nx\r\nEND\r\n",
    b"VALUE " + KEY + b" +0 1\r\nx\r\nEND\r\n",
    b"VALUE " + KEY + b" 0 1",
    b"VALUE ",
    b"SERVER_ERROR out of memory\r\n",
    b"END\r\nEND\r\n",
    b"",
]


@pytest.mark.parametrize("reply", PLAIN_GET_REPLIES)
@pytest.mark.parametrize("is_sampled", [True, False])
def test_plain_get_shortcut_gives_what_the_general_path_gives(
    reply: bytes, is_sampled: bool
) -> None:
    def sampled(key: bytes) -> bool:
        return is_sampled

    for stream in (b"get " + KEY + b"\r\n", b"get noreply\r\n", b"get " + b"x" * 251 + b"\r\n"):
        shortcut, general = _both(stream, reply, sampled)
        assert shortcut == general


@given(st.lists(st.sampled_from([b"VALUE ", KEY, b" ", b"0", b"12", b"\r\n", b"END", b"x"])))
def test_plain_get_shortcut_agrees_on_any_reply(parts: list[bytes]) -> None:
    shortcut, general = _both(b"get " + KEY + b"\r\n", b"".join(parts), lambda key: True)
    assert shortcut == general


def test_get_error_reply_is_skipped() -> None:
    assert op_for(b"get a\r\n", b"SERVER_ERROR out of memory\r\n") == Skip(
        SkipReason.MEMCACHED_ERROR
    )


@pytest.mark.parametrize(
    ("line", "reply", "status", "inferred"),
    [
        (b"set k 1 0 2\r\nhi\r\n", b"STORED\r\n", STORED, False),
        (b"add k 1 0 2\r\nhi\r\n", b"NOT_STORED\r\n", NOT_STORED, False),
        # A classic set with noreply whose value fits an item: memcached stored it (the
        # outcome is inferred when it is observed, never written into the record later).
        (b"set k 1 0 2 noreply\r\nhi\r\n", b"", STORED, True),
        (b"add k 1 0 2 noreply\r\nhi\r\n", b"", None, False),
        (b"set k 0 -1 2\r\nhi\r\n", b"STORED\r\n", STORED, False),
    ],
)
def test_storage(line: bytes, reply: bytes, status: str | None, inferred: bool) -> None:
    op = one(line, reply)
    assert (op.action, op.key, op.mc_status, op.data) == (STORE, b"k", status, b"hi")
    assert op.inferred is inferred


def test_storage_non_canonical_numbers_are_skipped_and_key_turns_cold() -> None:
    for line in (b"set k 010 0 1\r\nx\r\n", b"set k +1 0 1\r\nx\r\n", b"set k 0 +5 1\r\nx\r\n"):
        result = op_for(line, b"STORED\r\n")
        assert isinstance(result, Skip) and result.reason == "non_canonical" and result.keys


def test_cas_and_too_large() -> None:
    op = one(b"cas k 0 0 1 77\r\nx\r\n", b"EXISTS\r\n")
    assert (op.mode, op.cas, op.mc_status) == ("cas", 77, "EXISTS")
    op = one(b"set k 0 0 1\r\nx\r\n", b"SERVER_ERROR object too large for cache\r\n")
    assert op.mc_status == TOO_LARGE


def test_incr_outcomes() -> None:
    assert one(b"incr n 5\r\n", b"15\r\n").mc_number == 15
    assert one(b"decr n 5\r\n", b"NOT_FOUND\r\n").mc_status == "NOT_FOUND"
    op = one(b"incr n 1\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n")
    assert op.mc_status == NON_NUMERIC
    assert isinstance(op_for(b"incr n -1\r\n", b"CLIENT_ERROR invalid numeric delta\r\n"), Skip)


def test_meta_get_set_delete_arith() -> None:
    op = one(b"mg k v f c\r\n", b"VA 2 f3 c9\r\nhi\r\n")
    assert op.mc_value == McValue(3, b"hi", 9) and op.want_cas
    assert one(b"mg k v q\r\n", b"").mc_status == MISS
    assert one(b"mg k s\r\n", b"HD s2\r\n").mc_value == McValue(None, None, None)
    op = one(b"ms k 2 F7 T100 MA\r\nhi\r\n", b"NS\r\n")
    assert (op.mode, op.flags, op.exptime, op.mc_status) == ("append", 7, 100, NOT_STORED)
    assert one(b"ms k 2 q\r\nhi\r\n", b"").mc_status == STORED
    assert one(b"ms k 2 C5\r\nhi\r\n", b"EX\r\n").mode == "cas"
    assert one(b"md k q\r\n", b"").mc_status == "DELETED"
    op = one(b"ma k N0 J13 v\r\n", b"VA 2\r\n13\r\n")
    assert (op.create, op.initial, op.mc_number) == (0, 13, 13)
    key = base64.b64encode(b"bin key")
    assert one(b"mg " + key + b" b v\r\n", b"EN\r\n").key == b"bin key"


@pytest.mark.parametrize(
    "line",
    [b"mg k v N30\r\n", b"mg k T30 v\r\n", b"md k I\r\n", b"ms k 1 I\r\nx\r\n", b"mg k v R30\r\n"],
)
def test_unemulated_meta_flags_are_skipped(line: bytes) -> None:
    result = op_for(line, b"HD\r\n")
    assert isinstance(result, Skip) and result.reason == "meta_unemulated"


def test_compare_read() -> None:
    hit = ShadowOp("get", READ, b"k", HIT, mc_value=McValue(1, b"v", None))
    miss = ShadowOp("get", READ, b"k", MISS)
    assert compare_read(hit, Item(1, 5, b"v")) is None
    diff = compare_read(hit, Item(2, 5, b"v"))
    assert diff is not None and diff.kind == "flags"
    diff = compare_read(hit, Item(1, 5, b"w"))
    assert diff is not None and diff.kind == VALUE
    diff = compare_read(hit, None)
    assert diff is not None and diff.kind == MISSING_IN_REDIS
    diff = compare_read(miss, Item(1, 5, b"v"))
    assert diff is not None and diff.kind == UNEXPECTED_IN_REDIS
    assert compare_read(miss, None) is None
    padded = ShadowOp("get", READ, b"k", HIT, mc_value=McValue(0, b"99", None))
    diff = compare_read(padded, Item(0, 1, b"99 "))
    assert diff is not None and diff.kind == PADDING


def test_incr_padding_is_noise_wherever_an_append_or_prepend_left_it() -> None:
    """memcached pads a shorter incr/decr result only when no reader holds the item; the
    Redis side always does, so Redis may hold more spaces after a number, never fewer."""
    assert state_equal(McValue(0, b"99", None), Item(0, 1, b"99 "))
    # An append after it: the spaces inside the value.
    assert state_equal(McValue(0, b"0x", None), Item(0, 1, b"0" + b" " * 17 + b"x"))
    # A prepend after it: the spaces end the value, after other bytes (the soak's mismatches).
    assert state_equal(McValue(0, b"x0", None), Item(0, 1, b"x0" + b" " * 18))
    assert state_equal(
        McValue(0, b"ab 8704560008494919533", None), Item(0, 1, b"ab 8704560008494919533 ")
    )
    # Both padded, Redis more: spaces added to a run already there.
    assert state_equal(McValue(0, b"p12 s", None), Item(0, 1, b"p12 " + b" " * 5 + b"s"))
    assert state_equal(McValue(0, b"x7 ", None), Item(0, 1, b"x7   "))
    # A megabyte value is judged quickly (the common prefix is found by halves, in C).
    big = b"v" * 1_000_000 + b"42"
    assert state_equal(McValue(0, big, None), Item(0, 1, big + b"  "))
    assert not state_equal(McValue(0, big, None), Item(0, 1, b"w" + big[1:] + b"  "))


@pytest.mark.parametrize(
    ("mc", "redis"),
    [
        (b"99 ", b"99"),  # memcached never holds more padding than Redis
        (b"ax", b"a x"),  # no digit before the spaces
        (b"x", b"x  "),
        (b"5", b" 5"),  # spaces before, not after, the number
        (b"", b"  "),
        (b"0y", b"0 x"),  # other bytes differ too
        (b"1 2", b"12  "),  # a space moved, not only added
        (b"1 2 3", b"1  2  3"),  # spaces added at two places
        (b"12", b"1 "),  # a digit lost
    ],
)
def test_a_difference_that_is_not_only_padding_is_a_mismatch(mc: bytes, redis: bytes) -> None:
    assert not state_equal(McValue(0, mc, None), Item(0, 1, redis))
    diff = compare_values(McValue(0, mc, None), Item(0, 1, redis))
    assert diff is not None and diff.kind == VALUE


def test_flags_that_differ_are_a_mismatch_even_when_the_value_is_only_padded() -> None:
    diff = compare_values(McValue(5, b"1", None), Item(7, 1, b"1 "))
    assert diff is not None and diff.kind == FLAGS
    assert not state_equal(McValue(5, b"1", None), Item(7, 1, b"1 "))


def test_compare_outcome() -> None:
    op = ShadowOp("add", STORE, b"k", STORED)
    assert compare_outcome(op, STORED, None) is None
    diff = compare_outcome(op, NOT_STORED, None)
    assert diff is not None and diff.kind == STATUS
    incr = ShadowOp("incr", DELTA, b"k", STORED, mc_number=10)
    assert compare_outcome(incr, "OK", 10) is None  # the store's Status.OK
    diff = compare_outcome(incr, "OK", 11)
    assert diff is not None and diff.kind == VALUE
    diff = compare_outcome(incr, NON_NUMERIC, None)
    assert diff is not None and diff.kind == "error"
    autoviv = ShadowOp("ma", DELTA, b"k", STORED, mc_number=13)
    assert compare_outcome(autoviv, "CREATED", 13) is None
    assert compare_outcome(ShadowOp("set", STORE, b"k", None), NOT_STORED, None) is None


def test_dropped_requests_are_filed_under_decoded_meta_keys() -> None:
    requests, _ = RequestFramer().feed(
        b"mg " + base64.b64encode(b"bin key") + b" b v\r\nget a b\r\nms k 1\r\nx\r\n"
    )
    assert [r.keys for r in requests] == [[b"bin key"], [b"a", b"b"], [b"k"]]
