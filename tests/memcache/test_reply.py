"""Reading captured replies with literal bytes: every retrieval, line and meta shape.

The replies are copies of what memcached 1.6.18 sent to the requests named in the comments.
"""

from __future__ import annotations

import pytest

from proxy.memcache.reply import (
    MalformedReply,
    MetaReply,
    RetrievalItem,
    RetrievalReply,
    parse_line,
    parse_meta,
    parse_retrieval,
)

# -- retrieval --------------------------------------------------------------------------------


def test_miss_is_an_empty_list() -> None:
    assert parse_retrieval(b"END\r\n") == RetrievalReply(())


def test_single_hit() -> None:
    # get foo
    reply = parse_retrieval(b"VALUE foo 5 3\r\nbar\r\nEND\r\n")
    assert reply == RetrievalReply((RetrievalItem(b"foo", 5, b"bar", None),))
    assert reply.error is None
    key, flags, data, cas = reply.items[0]
    assert (key, flags, data, cas) == (b"foo", 5, b"bar", None)


def test_several_items_in_order_with_misses_left_out_and_duplicates_kept() -> None:
    # get k4 k4 nokey b
    reply = parse_retrieval(
        b"VALUE k4 0 2\r\nab\r\nVALUE k4 0 2\r\nab\r\nVALUE b 4294967295 0\r\n\r\nEND\r\n"
    )
    assert reply.items == (
        RetrievalItem(b"k4", 0, b"ab", None),
        RetrievalItem(b"k4", 0, b"ab", None),
        RetrievalItem(b"b", 2**32 - 1, b"", None),
    )


def test_cas_column() -> None:
    # gets k4 big
    reply = parse_retrieval(
        b"VALUE k4 0 2 34\r\nab\r\nVALUE big 1 1 18446744073709551615\r\nx\r\nEND\r\n"
    )
    assert reply.items == (
        RetrievalItem(b"k4", 0, b"ab", 34),
        RetrievalItem(b"big", 1, b"x", 2**64 - 1),
    )


def test_values_holding_protocol_bytes_are_read_by_length() -> None:
    data = b"END\r\nVALUE x 0 1\r\n\r\n"
    reply = parse_retrieval(b"VALUE k 0 %d\r\n%s\r\nEND\r\n" % (len(data), data))
    assert reply.items == (RetrievalItem(b"k", 0, data, None),)


def test_incr_padding_is_part_of_the_value() -> None:
    # set n 0 0 3 / 100, decr n 1, get n
    assert parse_retrieval(b"VALUE n 0 3\r\n99 \r\nEND\r\n").items[0].data == b"99 "


def test_keys_with_control_bytes() -> None:
    reply = parse_retrieval(b"VALUE a\tb\rc 0 1\r\nx\r\nEND\r\n")
    assert reply.items[0].key == b"a\tb\rc"


@pytest.mark.parametrize(
    "line",
    [
        b"CLIENT_ERROR bad command line format",  # a key over 250 bytes anywhere in the list
        b"ERROR",  # get with no key
        b"CLIENT_ERROR invalid exptime argument",  # gat abc k
        b"SERVER_ERROR out of memory writing get response",
    ],
)
def test_error_line_replaces_the_list(line: bytes) -> None:
    assert parse_retrieval(line + b"\r\n") == RetrievalReply((), line.decode())


def test_error_after_flushed_items_keeps_them() -> None:
    reply = parse_retrieval(b"VALUE a 0 1\r\nx\r\nSERVER_ERROR out of memory\r\n")
    assert reply.items == (RetrievalItem(b"a", 0, b"x", None),)
    assert reply.error == "SERVER_ERROR out of memory"


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        b"END",  # no \r\n
        b"END\n",
        b"VALUE foo 0 3\r\nbar\r\n",  # truncated: no END
        b"VALUE foo 0 3\r\nba",  # truncated block
        b"VALUE foo 0 3\r\nbarx\r\nEND\r\n",  # block longer than announced
        b"VALUE foo 0 3\r\nba\r\nEND\r\n",  # shorter
        b"VALUE foo 0\r\n\r\nEND\r\n",
        b"VALUE foo 0 3 1 2\r\nbar\r\nEND\r\n",
        b"VALUE foo x 3\r\nbar\r\nEND\r\n",
        b"VALUE foo 4294967296 3\r\nbar\r\nEND\r\n",
        b"VALUE foo 0 -3\r\nbar\r\nEND\r\n",
        b"VALUE foo 0 3 18446744073709551616\r\nbar\r\nEND\r\n",
        b"VALUE  foo 0 3\r\nbar\r\nEND\r\n",
        b"END\r\nEND\r\n",  # two replies
        b"STORED\r\n",
        b"ERROR\r\nERROR\r\n",
        b"ERRORS\r\n",
    ],
)
def test_malformed_retrieval_replies_raise(reply: bytes) -> None:
    with pytest.raises(MalformedReply):
        parse_retrieval(reply)


# -- single lines -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (b"STORED\r\n", "STORED"),
        (b"NOT_STORED\r\n", "NOT_STORED"),
        (b"EXISTS\r\n", "EXISTS"),
        (b"NOT_FOUND\r\n", "NOT_FOUND"),
        (b"DELETED\r\n", "DELETED"),
        (b"TOUCHED\r\n", "TOUCHED"),
        (b"OK\r\n", "OK"),
        (b"99\r\n", "99"),  # decr 100 by 1: the reply line has no padding
        (b"18446744073709551615\r\n", "18446744073709551615"),
        (b"0\r\n", "0"),
        (b"ERROR\r\n", "ERROR"),
        (
            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
            "CLIENT_ERROR cannot increment or decrement non-numeric value",
        ),
        (
            b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n",
            "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]",
        ),
        (
            b"SERVER_ERROR object too large for cache\r\n",
            "SERVER_ERROR object too large for cache",
        ),
        (b"", ""),  # noreply: nothing was sent
    ],
)
def test_status_lines(reply: bytes, line: str) -> None:
    assert parse_line(reply) == line


@pytest.mark.parametrize(
    "reply",
    [b"STORED", b"STORED\n", b"STORED\r\nSTORED\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"],
)
def test_malformed_lines_raise(reply: bytes) -> None:
    with pytest.raises(MalformedReply):
        parse_line(reply)


def test_non_ascii_error_text_is_kept_byte_for_byte() -> None:
    assert parse_line(b"CLIENT_ERROR \xff\r\n").encode("latin-1") == b"CLIENT_ERROR \xff"


# -- meta -------------------------------------------------------------------------------------


def test_va_with_flags_in_reply_order() -> None:
    # set foo 5 0 3 / bar, then mg foo v f c t k s Oopaque
    reply = parse_meta(b"VA 3 f5 c13 t-1 kfoo s3 Oopaque\r\nbar\r\n")
    assert reply == MetaReply(
        "VA",
        {"f": "5", "c": "13", "t": "-1", "k": "foo", "s": "3", "O": "opaque"},
        b"bar",
        b"VA 3 f5 c13 t-1 kfoo s3 Oopaque",
    )
    assert list(reply.flags) == ["f", "c", "t", "k", "s", "O"]
    assert not reply.is_error and reply.error is None


def test_va_without_flags_and_empty_value() -> None:
    assert parse_meta(b"VA 0\r\n\r\n") == MetaReply("VA", {}, b"", b"VA 0")
    # mg stubkey N30 v (first caller wins the recache)
    assert parse_meta(b"VA 0 W\r\n\r\n").flags == {"W": ""}


def test_va_of_ma_is_the_number() -> None:
    # set n 0 0 3 / 100, decr n 1, ma n v D5 MD t c N0
    reply = parse_meta(b"VA 2 t-1 c37\r\n94\r\n")
    assert (reply.code, reply.value, reply.flags) == ("VA", b"94", {"t": "-1", "c": "37"})


def test_va_value_holding_crlf_is_read_by_length() -> None:
    assert parse_meta(b"VA 4\r\n\r\n\r\n\r\n").value == b"\r\n\r\n"


def test_miss_echoes_key_opaque_and_base64_flag() -> None:
    # mg missingkey k O123 v
    assert parse_meta(b"EN kmissingkey O123\r\n") == MetaReply(
        "EN", {"k": "missingkey", "O": "123"}, None, b"EN kmissingkey O123"
    )
    # mg a2V5NA== b v k
    assert parse_meta(b"EN ka2V5NA== b\r\n").flags == {"k": "a2V5NA==", "b": ""}
    assert parse_meta(b"EN\r\n") == MetaReply("EN", {}, None, b"EN")


@pytest.mark.parametrize(
    ("raw", "code", "flags"),
    [
        (b"HD\r\n", "HD", {}),
        (b"HD c23 kk1\r\n", "HD", {"c": "23", "k": "k1"}),  # ms k1 1 F+1 c k
        (b"HD c24 t-1\r\n", "HD", {"c": "24", "t": "-1"}),
        (
            b"HD s2 f0 t-1 c34 h1 l3\r\n",
            "HD",
            {"s": "2", "f": "0", "t": "-1", "c": "34", "h": "1", "l": "3"},
        ),
        (b"NS c0\r\n", "NS", {"c": "0"}),  # ms k5 2 c MA on a missing key
        (b"EX c0 kk4 O\r\n", "EX", {"c": "0", "k": "k4", "O": ""}),  # cas mismatch
        (b"NF c0\r\n", "NF", {"c": "0"}),  # ms C0 c on a missing key
        (b"NF kk1 O9\r\n", "NF", {"k": "k1", "O": "9"}),
        (b"MN\r\n", "MN", {}),
        (b"HD W X Z\r\n", "HD", {"W": "", "X": "", "Z": ""}),
    ],
)
def test_status_codes_with_flags(raw: bytes, code: str, flags: dict[str, str]) -> None:
    reply = parse_meta(raw)
    assert (reply.code, reply.flags, reply.value, reply.line) == (code, flags, None, raw[:-2])


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"CLIENT_ERROR bad command line format\r\n", "CLIENT_ERROR"),
        (b"CLIENT_ERROR invalid flag\r\n", "CLIENT_ERROR"),
        (b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n", "CLIENT_ERROR"),
        (b"SERVER_ERROR object too large for cache\r\n", "SERVER_ERROR"),
        (b"ERROR\r\n", "ERROR"),
    ],
)
def test_error_lines(raw: bytes, code: str) -> None:
    reply = parse_meta(raw)
    assert reply.code == code and reply.is_error
    assert reply.error == raw[:-2].decode()
    assert reply.flags == {} and reply.value is None


def test_empty_capture_is_a_hidden_quiet_reply() -> None:
    reply = parse_meta(b"")
    assert reply == MetaReply("")
    assert not reply.is_error


@pytest.mark.parametrize(
    "raw",
    [
        b"HD",
        b"HD\n",
        b"VA 3\r\nba",  # truncated
        b"VA 3\r\nbar",
        b"VA 3\r\nbarx\r\n",
        b"VA\r\n\r\n",
        b"VA x\r\nbar\r\n",
        b"VA -1\r\n\r\n",
        b"HD  c1\r\n",  # empty flag
        b"HD\r\nHD\r\n",
        b"CLIENT_ERROR bad data chunk\r\nERROR\r\n",
        b"STORED\r\n",
        b"ME foo exp=-1 la=1 cas=2 fetch=no cls=1 size=63\r\n",
        b"VALUE foo 0 1\r\nx\r\nEND\r\n",
    ],
)
def test_malformed_meta_replies_raise(raw: bytes) -> None:
    with pytest.raises(MalformedReply) as info:
        parse_meta(raw)
    assert info.value.reply == raw
