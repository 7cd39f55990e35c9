"""Request framing with literal bytes: boundaries, data blocks, sentinels and raw mode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.memcache.numbers import is_canonical_decimal, safe_strtol, safe_strtoul, safe_strtoull
from proxy.memcache.request import (
    SENTINEL,
    Expect,
    FramingLimits,
    RequestFramer,
    may_need_flush,
    parse_line,
)


def frame(data: bytes, **limits: int) -> tuple[list[tuple[bytes, str, str, bool, int]], bytes]:
    """(requests seen, bytes sent upstream) for one chunk."""
    framer = RequestFramer(FramingLimits(**limits), capture=lambda r: True)
    requests, out = framer.feed(data)
    return [(r.line, r.command, r.expect.name, r.sentinel, r.data_len) for r in requests], b"".join(
        out
    )


# -- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (b"0", 0),
        (b"42", 42),
        (b"+3", 3),
        (b"-1", -1),
        (b"\t5", 5),
        (b"5\t", 5),
        (b"4294967299", 3),  # truncated to int32, as memcached does
        (b"2147483648", -(2**31)),
        (b"99999999999999999999", None),  # ERANGE for a C long
        (b"3x", None),
        (b"", None),
        (b"-", None),
        (b"abc", None),
    ],
)
def test_safe_strtol(token: bytes, expected: int | None) -> None:
    assert safe_strtol(token) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (b"0", 0),
        (b"4294967295", 4294967295),
        (b"4294967296", 0),  # silently truncated
        (b"-0", 0),
        (b"-1", None),
        (b"-9223372036854775809", 0xFFFFFFFF),  # wraps to 2^63-1: no '-' check, then cast
        (b"18446744073709551616", None),
        (b"1.5", None),
    ],
)
def test_safe_strtoul(token: bytes, expected: int | None) -> None:
    assert safe_strtoul(token) == expected


def test_safe_strtoull_range() -> None:
    assert safe_strtoull(b"18446744073709551615") == 2**64 - 1
    assert safe_strtoull(b"18446744073709551616") is None
    assert safe_strtoull(b"-1") is None


def test_canonical_decimal() -> None:
    assert is_canonical_decimal(b"0", 10)
    assert is_canonical_decimal(b"10", 10)
    assert not is_canonical_decimal(b"11", 10)
    assert not is_canonical_decimal(b"010", 100)
    assert not is_canonical_decimal(b"+1", 100)


# -- classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command", "expect", "sentinel", "data_len"),
    [
        (b"get a b c", "get", "RETRIEVAL", False, -1),
        (b"gets a", "gets", "RETRIEVAL", False, -1),
        (b"gat 10 a", "gat", "RETRIEVAL", False, -1),
        (b"bget a", "bget", "RETRIEVAL", False, -1),
        (b"get", "get", "RETRIEVAL", False, -1),
        (b"get noreply", "get", "UNTIL_SENTINEL", True, -1),
        (b"set k 0 0 3", "set", "LINE", False, 3),
        (b"set k 0 0 3 noreply", "set", "UNTIL_SENTINEL", True, 3),
        (b"set k 0 0 3 garbage", "set", "LINE", False, 3),
        (b"set k 0 0", "set", "LINE", False, -1),  # word count: ERROR, no block
        (b"set k 0 0 3 a b", "set", "LINE", False, -1),
        (b"set k abc 0 3", "set", "LINE", False, -1),  # bad flags: block not read
        (b"set k -1 0 3", "set", "LINE", False, -1),
        (b"set k 0 0 -1", "set", "LINE", False, -1),
        (b"set k 0 0 4294967299", "set", "LINE", False, 3),
        (b"set k 0 0 2147483646", "set", "LINE", False, -1),
        (b"set k 0 0 2147483645", "set", "LINE", False, 2147483645),
        (b"set " + b"k" * 251 + b" 0 0 3", "set", "LINE", False, -1),
        (b"set " + b"k" * 250 + b" 0 0 3", "set", "LINE", False, 3),
        (b"cas k 0 0 3 77", "cas", "LINE", False, 3),
        (b"cas k 0 0 3", "cas", "LINE", False, -1),
        (b"cas k 0 0 3 -1", "cas", "LINE", False, -1),
        (b"append k 0 0 3", "append", "LINE", False, 3),
        (b"ms k 3", "ms", "META", False, 3),
        (b"ms k 3 T0 F5", "ms", "META", False, 3),
        (b"ms k 3 q", "ms", "UNTIL_SENTINEL", True, 3),
        (b"ms k 3 Zbad", "ms", "META", False, 3),  # flag errors still swallow the block
        (b"ms k", "ms", "META", False, -1),
        (b"ms k abc", "ms", "META", False, -1),
        (b"ms k 3x", "ms", "META", False, -1),
        (b"ms k +3", "ms", "META", False, 3),
        (b"ms k 3 " + b" ".join(b"O%d" % i for i in range(16)), "ms", "META", False, 3),
        (b"ms k 3 " + b" ".join(b"O%d" % i for i in range(17)), "ms", "META", False, -1),
        (b"mg k v", "mg", "META", False, -1),
        (b"mg k v q", "mg", "UNTIL_SENTINEL", True, -1),
        (b"md k q", "md", "UNTIL_SENTINEL", True, -1),
        (b"ma k", "ma", "META", False, -1),
        (b"mn", "mn", "LINE", False, -1),
        (b"mn noreply", "mn", "LINE", False, -1),
        (b"me k", "me", "META", False, -1),
        (b"delete k", "delete", "LINE", False, -1),
        (b"delete k noreply", "delete", "UNTIL_SENTINEL", True, -1),
        (b"incr k 1", "incr", "LINE", False, -1),
        (b"touch k 10 noreply", "touch", "UNTIL_SENTINEL", True, -1),
        (b"flush_all", "flush_all", "LINE", False, -1),
        (b"version foo bar", "version", "LINE", False, -1),
        (b"verbosity 1", "verbosity", "LINE", False, -1),
        (b"stats", "stats", "UNTIL_SENTINEL", True, -1),
        (b"stats items", "stats", "UNTIL_SENTINEL", True, -1),
        (b"lru_crawler metadump all", "lru_crawler", "UNTIL_SENTINEL", True, -1),
        (b"quit", "quit", "CLOSE", False, -1),
        (b"watch", "watch", "STREAM", False, -1),
        (b"GET a", "unknown", "UNTIL_SENTINEL", True, -1),
        (b"", "unknown", "UNTIL_SENTINEL", True, -1),
        (b"  get   a  ", "get", "RETRIEVAL", False, -1),
        (b"set k 0 0 3\0junk", "set", "LINE", False, 3),  # NUL ends the line (strlen)
        (b"set k\t 0 0 3", "set", "LINE", False, 3),  # a tab is part of the key
        (b"set k 0 0 3\t", "set", "LINE", False, 3),  # trailing tab accepted by strtol
    ],
)
def test_parse_line(line: bytes, command: str, expect: str, sentinel: bool, data_len: int) -> None:
    request = parse_line(line + b"\r")
    assert (request.command, request.expect.name, request.sentinel, request.data_len) == (
        command,
        expect,
        sentinel,
        data_len,
    )


def test_keys() -> None:
    assert parse_line(b"get a b a").keys == [b"a", b"b", b"a"]
    assert parse_line(b"gat 10 a b").keys == [b"a", b"b"]
    assert parse_line(b"set k 0 0 1").keys == [b"k"]
    assert parse_line(b"mg k v").keys == [b"k"]
    assert parse_line(b"version").keys == []


def test_cr_is_stripped_only_from_lines_of_two_bytes_or_more() -> None:
    assert parse_line(b"\r").words == [b"\r"]
    assert parse_line(b"mn\r").words == [b"mn"]
    assert parse_line(b"mn").words == [b"mn"]  # a bare \n ending works too


# -- streams ---------------------------------------------------------------------------------


def test_pipelined_stream_with_data_blocks_and_sentinels() -> None:
    stream = b"set a 0 0 3\r\nabc\r\nget a b\r\nset b 0 0 5 noreply\r\nhello\r\nmg a v q\r\nmn\r\n"
    requests, upstream = frame(stream)
    assert [r[1] for r in requests] == ["set", "get", "set", "mg", "mn"]
    assert upstream == (
        b"set a 0 0 3\r\nabc\r\n"
        b"get a b\r\n"
        b"set b 0 0 5 noreply\r\nhello\r\nmn\r\n"
        b"mg a v q\r\nmn\r\n"
        b"mn\r\n"
    )


def test_data_block_content_is_captured_and_checked() -> None:
    framer = RequestFramer(capture=lambda r: True)
    requests, _ = framer.feed(b"set a 0 0 3\r\nab\nc\r\nset b 0 0 3\r\nabcd\r\n")
    first = requests[0]
    # "ab\nc\r" is the 5-byte block: it must end in \r\n, so memcached says bad data chunk,
    # and then runs the lone "\n" as an empty command.
    assert first.data == b"ab\n" and first.complete and not first.data_ok
    assert [r.command for r in requests] == ["set", "unknown", "set", "unknown"]
    assert not requests[2].data_ok


def test_bad_data_chunk_leaves_the_rest_as_the_next_command() -> None:
    requests, _ = frame(b"set foo 0 0 3\r\nbarx\r\n")
    # memcached reads 'barx\r' as the block and then runs the lone '\n' as an empty command.
    assert [(r[1], r[2]) for r in requests] == [("set", "LINE"), ("unknown", "UNTIL_SENTINEL")]


def test_rejected_storage_line_does_not_swallow_its_data() -> None:
    requests, upstream = frame(b"set foo 0 0 bad\r\ndelete foo\r\n")
    assert [r[1] for r in requests] == ["set", "delete"]
    assert upstream == b"set foo 0 0 bad\r\ndelete foo\r\n"


def test_large_value_is_streamed_not_buffered() -> None:
    framer = RequestFramer(FramingLimits(max_value_bytes=10), capture=lambda r: True)
    requests, _ = framer.feed(b"set k 0 0 100\r\n" + b"x" * 50)
    assert requests[0].data is None and not requests[0].complete
    requests2, _ = framer.feed(b"x" * 50 + b"\r\nget k\r\n")
    assert requests[0].complete and requests[0].data is None
    assert [r.command for r in requests2] == ["get"]


def test_split_line_and_block_across_chunks() -> None:
    framer = RequestFramer(capture=lambda r: True)
    seen = []
    for chunk in (b"se", b"t k 0 0 3", b"\r", b"\nab", b"c\r", b"\nget k\r", b"\n"):
        requests, _ = framer.feed(chunk)
        seen.extend(requests)
    assert [r.command for r in seen] == ["set", "get"]
    assert seen[0].data == b"abc" and seen[0].data_ok


def test_binary_protocol_first_byte_turns_raw() -> None:
    framer = RequestFramer()
    requests, out = framer.feed(b"\x80\x01\x00\x03")
    assert requests == [] and out == [b"\x80\x01\x00\x03"] and framer.raw
    assert framer.raw_reason == "binary_protocol"
    assert framer.feed(b"get a\r\n") == ([], [b"get a\r\n"])


def test_quit_and_watch_end_framing() -> None:
    framer = RequestFramer()
    requests, _ = framer.feed(b"get a\r\nquit\r\nget b\r\n")
    assert [r.command for r in requests] == ["get", "quit"]
    assert framer.raw and framer.raw_reason == "quit"
    framer = RequestFramer()
    requests, _ = framer.feed(b"watch\r\nget b\r\n")
    assert [r.command for r in requests] == ["watch"] and framer.raw_reason == "watch"


def test_long_non_get_line_turns_raw_like_memcached_closing() -> None:
    framer = RequestFramer()
    assert framer.feed(b"set " + b"k" * 1000) == ([], [b"set " + b"k" * 1000])  # sent at once
    assert framer.feed(b"k" * 2000) == ([], [b"k" * 2000])
    assert framer.raw and framer.raw_reason == "line_too_long"  # memcached closes there


def test_a_partial_line_goes_upstream_at_once() -> None:
    """memcached judges a line's bytes as they come (t/issue_50.t: with -B binary it closes
    at a first text byte, newline or not): nothing waits for the end of the line."""
    framer = RequestFramer()
    requests, out = framer.feed(b"set k 0 0 1\r\nx\r\nset j 0")
    assert [r.command for r in requests] == ["set"]
    assert b"".join(out) == b"set k 0 0 1\r\nx\r\nset j 0"
    requests, out = framer.feed(b" 0 1 noreply\r\ny")
    assert [r.command for r in requests] == ["set"] and requests[0].sentinel
    assert b"".join(out) == b" 0 1 noreply\r\ny"  # its sentinel follows its block
    requests, out = framer.feed(b"\r\nver")
    assert requests == [] and b"".join(out) == b"\r\nmn\r\nver"
    assert not framer.at_boundary  # (a request is under way: drain waits for it)
    requests, out = framer.feed(b"sion\r\n")
    assert [r.command for r in requests] == ["version"] and b"".join(out) == b"sion\r\n"
    assert framer.at_boundary


def test_a_partial_line_that_may_be_a_get_gets_an_mn_first_while_replies_are_due() -> None:
    """A get of a key over 250 bytes makes memcached 1.6.18 drop the replies it has not sent
    yet; its `mn` must go before the line's first byte, before the line is known."""
    framer = RequestFramer()
    requests, out = framer.feed(b"version\r\nge")
    assert [r.command for r in requests] == ["version", "mn"] and requests[1].synthetic
    assert b"".join(out) == b"version\r\nmn\r\nge"
    requests, out = framer.feed(b"t " + b"k" * 251 + b"\r\n")
    assert [r.command for r in requests] == ["get"] and requests[0].flush_before
    assert b"".join(out) == b"t " + b"k" * 251 + b"\r\n"  # no second mn
    # Nothing due: no mn (pending is the caller's FIFO of requests awaiting replies).
    pending: list[object] = []
    framer = RequestFramer(pending=pending)
    assert framer.feed(b"get " + b"k" * 100) == ([], [b"get " + b"k" * 100])
    requests, out = framer.feed(b"k" * 200 + b"\r\n")
    assert [r.command for r in requests] == ["get"] and out == [b"k" * 200 + b"\r\n"]
    pending.append(requests[0])  # its reply has not come back yet
    requests, out = framer.feed(b"   g")
    assert [r.command for r in requests] == ["mn"] and out == [b"", b"mn\r\n", b"   g"]
    # A line whose first word is no get needs none, replies due or not.
    framer = RequestFramer(pending=pending)
    for start in (b"set k", b"delete", b"x", b"gett", b"mg k", b"get\r"):
        assert framer.feed(start)[0] == [], start
        framer.feed(b"\r\n")


@pytest.mark.parametrize(
    ("start", "may"),
    [
        (b"", True),
        (b"   ", True),
        (b"g", True),
        (b"ge", True),
        (b"get", True),
        (b"gats", True),
        (b"  bge", True),
        (b"get ", True),
        (b"gat 10 k", True),
        (b"gett", False),
        (b"set", False),
        (b"get\r", False),
        (b"GET", False),
        (b"mg k", False),
        (b"gets\0 k", False),
    ],
)
def test_may_need_flush(start: bytes, may: bool) -> None:
    assert may_need_flush(start) is may


def test_get_with_too_long_key_gets_a_flushing_sentinel_first() -> None:
    long_key = b"k" * 251
    requests, upstream = frame(b"version\r\nget a " + long_key + b"\r\nget b\r\n")
    assert [r[1] for r in requests] == ["version", "mn", "get", "get"]
    assert upstream == b"version\r\nmn\r\nget a " + long_key + b"\r\nget b\r\n"


def test_long_get_line_is_buffered_up_to_its_own_limit() -> None:
    framer = RequestFramer(FramingLimits(max_get_line_bytes=100_000))
    keys = b" ".join(b"key%05d" % i for i in range(5000))
    requests, _ = framer.feed(b"get " + keys[:20_000])
    assert not framer.raw and requests == []
    requests, _ = framer.feed(keys[20_000:] + b"\r\n")
    assert len(requests) == 1 and len(requests[0].keys) == 5000
    framer.feed(b"get " + b"k" * 200_000)
    assert framer.raw and framer.raw_reason == "get_line_too_long"


def test_more_than_100_leading_spaces_is_not_a_get() -> None:
    framer = RequestFramer()
    framer.feed(b" " * 101 + b"get " + b"k" * 3000)
    assert framer.raw_reason == "line_too_long"


# -- any chunking frames identically ---------------------------------------------------------

STREAM = (
    b"set a 0 0 3\r\nabc\r\n"
    b"get a b c\r\n"
    b"set b 1 0 5 noreply\r\nhe\r\no\r\n"
    b"add c 0 0 0\r\n\r\n"
    b"cas a 0 0 2 99\r\nzz\r\n"
    b"set bad 0 0 x\r\nget a\r\n"
    b"mg a v f q\r\nms m 2 T10\r\nhi\r\nmd m q\r\nma n N0 J1\r\n"
    b"mn\r\nstats\r\nincr a 1 noreply\r\ntouch a 10\r\ndelete a\r\n"
    b"version foo bar\n"
    b"set e 0 0 3\r\nbarx\r\n"
    b"gats 100 a b\r\n"
)


def _frame_all(chunks: list[bytes]) -> tuple[list[tuple[bytes, bytes | None, bool]], bytes]:
    framer = RequestFramer(capture=lambda r: True)
    requests = []
    upstream = b""
    for chunk in chunks:
        got, out = framer.feed(chunk)
        requests.extend(r for r in got if not r.synthetic)
        upstream += b"".join(out)
    return [(r.line, r.data, r.sentinel) for r in requests], upstream


def _boundaries(stream: bytes) -> set[int]:
    """Where the requests of `stream` begin and end (it must not turn the framer raw)."""
    requests, _ = RequestFramer().feed(stream)
    points, pos = {0}, 0
    for request in requests:
        if not request.synthetic:
            pos += len(request.line) + 1 + (request.data_len + 2 if request.data_len >= 0 else 0)
            points.add(pos)
    return points


def _unsentinel(upstream: bytes, sent: bytes, boundaries: set[int]) -> tuple[bytes, int]:
    """`upstream` without the `mn\\r\\n`s the framer put in, checking each is at a request
    boundary of the client's bytes `sent`: (the client's bytes found, sentinels put in)."""
    i = j = added = 0
    while j < len(upstream):
        if upstream[j : j + 4] == SENTINEL and sent[i : i + 4] != SENTINEL:
            assert i in boundaries, (i, upstream[max(0, j - 20) : j + 20])
            added += 1
            j += 4
            continue
        assert upstream[j] == sent[i], (i, j)
        i, j = i + 1, j + 1
    return sent[:i], added


@settings(deadline=None)  # (a busy CI machine: the work is small, its time is not the test)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_any_chunking_frames_identically_and_holds_nothing_back(splits: list[int]) -> None:
    """Whatever the chunks: the same requests; after every chunk, all the client's bytes so
    far have gone upstream; sentinels only at request boundaries, one for each request that
    needs one (and for each `mn` put before a line that may be a get of a long key)."""
    points = sorted(set(splits))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    chunks = [c for c in chunks if c]
    assert _frame_all(chunks)[0] == _frame_all([STREAM])[0]
    boundaries = _boundaries(STREAM)
    framer = RequestFramer(capture=lambda r: True)
    sent = upstream = b""
    requests = []
    for chunk in chunks:
        got, out = framer.feed(chunk)
        requests.extend(got)
        sent += chunk
        upstream += b"".join(out)
        client_bytes, added = _unsentinel(upstream, sent, boundaries)
        assert client_bytes == sent  # nothing held back
        needed = [r for r in requests if r.synthetic or (r.sentinel and r.complete)]
        assert added == len(needed)


def test_reference_stream_shape() -> None:
    requests, upstream = _frame_all([STREAM])
    assert len(requests) == 20  # the lone \n after the bad "set e" block is a command too
    assert upstream.count(b"mn\r\n") - STREAM.count(b"mn\r\n") == sum(1 for r in requests if r[2])
    assert requests[5] == (b"set bad 0 0 x\r", None, False)
    assert requests[6][0] == b"get a\r"


def test_expect_enum_values_are_stable() -> None:
    assert Expect.UNTIL_SENTINEL.name == "UNTIL_SENTINEL"


def test_canonical_int32() -> None:
    from proxy.memcache.numbers import canonical_int32

    assert canonical_int32(b"0") == 0
    assert canonical_int32(b"100") == 100
    assert canonical_int32(b"-1") == -1
    assert canonical_int32(b"-2147483648") == -(2**31)
    assert canonical_int32(b"2147483647") == 2**31 - 1
    for token in (b"-0", b"+1", b"010", b"2147483648", b"-2147483649", b"1x", b""):
        assert canonical_int32(token) is None, token
