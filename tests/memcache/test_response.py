"""Response framing with literal bytes: every reply shape, sentinel removal, any chunking."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from proxy.memcache.request import Request, RequestFramer
from proxy.memcache.response import ResponseFramer


def pending_for(stream: bytes) -> deque[Request]:
    requests, _ = RequestFramer(capture=lambda r: True).feed(stream)
    return deque(requests)


def run(stream: bytes, replies: list[bytes]) -> tuple[bytes, list[tuple[str, bytes | None]], bool]:
    pending = pending_for(stream)
    framer = ResponseFramer(pending)
    out = b""
    done: list[Request] = []
    for chunk in replies:
        pieces, completed = framer.feed(chunk)
        out += b"".join(pieces)
        done.extend(completed)
    return out, [(r.command, r.response) for r in done], framer.raw


def test_single_lines_and_lists() -> None:
    out, done, raw = run(
        b"set a 0 0 1\r\nx\r\nget a b\r\ndelete zz\r\n",
        [b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\nNOT_FOUND\r\n"],
    )
    assert out == b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\nNOT_FOUND\r\n"
    assert done == [
        ("set", b"STORED\r\n"),
        ("get", b"VALUE a 0 1\r\nx\r\nEND\r\n"),
        ("delete", b"NOT_FOUND\r\n"),
    ]
    assert not raw


def test_error_line_replaces_a_value_list() -> None:
    _, done, _ = run(b"get a\r\nget b\r\n", [b"CLIENT_ERROR bad command line format\r\nEND\r\n"])
    assert done == [("get", b"CLIENT_ERROR bad command line format\r\n"), ("get", b"END\r\n")]


def test_value_containing_protocol_words_is_skipped_by_length() -> None:
    value = b"END\r\nMN\r\nVALUE x 0 1\r\n"
    reply = b"VALUE a 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
    out, done, _ = run(b"get a\r\n", [reply])
    assert out == reply and done == [("get", reply)]


def test_gets_cas_column() -> None:
    reply = b"VALUE a 5 2 12345\r\nhi\r\nEND\r\n"
    _, done, _ = run(b"gets a\r\n", [reply])
    assert done == [("gets", reply)]


def test_meta_va_block_and_single_lines() -> None:
    replies = b"VA 2 f0 kabc\r\nhi\r\nHD\r\nEN\r\nNF\r\nMN\r\n"
    out, done, _ = run(b"mg abc v f k\r\nms k 1\r\nx\r\nmg zz v\r\nmd zz\r\nmn\r\n", [replies])
    assert out == replies
    assert [d[1] for d in done] == [
        b"VA 2 f0 kabc\r\nhi\r\n",
        b"HD\r\n",
        b"EN\r\n",
        b"NF\r\n",
        b"MN\r\n",
    ]


def test_sentinel_mn_is_removed_and_groups_what_came_before() -> None:
    stream = b"set a 0 0 1 noreply\r\nx\r\nmg a v q\r\nmg miss v q\r\nmn\r\n"
    # upstream sees: set..noreply, mn, mg a q, mn, mg miss q, mn, mn(client)
    replies = b"MN\r\nVA 1\r\nx\r\nMN\r\nMN\r\nMN\r\n"
    out, done, _ = run(stream, [replies])
    assert out == b"VA 1\r\nx\r\nMN\r\n"
    assert done == [("set", b""), ("mg", b"VA 1\r\nx\r\n"), ("mg", b""), ("mn", b"MN\r\n")]


def test_noreply_error_goes_to_its_request() -> None:
    # Bad flags: CLIENT_ERROR is hidden by noreply, no block is read, "abc" runs as a command.
    stream = b"set foo abc 0 3 noreply\r\nabc\r\nget k\r\n"
    out, done, _ = run(stream, [b"MN\r\nERROR\r\nMN\r\nEND\r\n"])
    assert out == b"ERROR\r\nEND\r\n"
    assert done == [("set", b""), ("unknown", b"ERROR\r\n"), ("get", b"END\r\n")]


def test_stats_list_until_sentinel() -> None:
    reply = b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n"
    out, done, _ = run(b"stats\r\nversion\r\n", [reply + b"MN\r\nVERSION 1.6.18\r\n"])
    assert out == reply + b"VERSION 1.6.18\r\n"
    assert done == [("stats", reply), ("version", b"VERSION 1.6.18\r\n")]


def test_partial_sentinel_is_held_not_forwarded() -> None:
    pending = pending_for(b"set a 0 0 1 noreply\r\nx\r\nversion\r\n")
    framer = ResponseFramer(pending)
    pieces, done = framer.feed(b"M")
    assert b"".join(pieces) == b"" and done == []
    pieces, done = framer.feed(b"N\r\nVERS")
    assert b"".join(pieces) == b"" and [r.command for r in done] == ["set"]
    pieces, done = framer.feed(b"ION 1\r\n")
    assert b"".join(pieces) == b"VERSION 1\r\n" and [r.command for r in done] == ["version"]


def test_unsolicited_bytes_turn_raw_and_are_forwarded() -> None:
    out, done, raw = run(b"version\r\n", [b"VERSION 1\r\nSERVER_ERROR out of memory\r\n"])
    assert out == b"VERSION 1\r\nSERVER_ERROR out of memory\r\n" and raw
    assert [d[0] for d in done] == ["version"]


def test_watch_turns_the_reply_stream_raw() -> None:
    out, done, raw = run(b"watch\r\n", [b"OK\r\nts=1 gid=2 type=item_get\r\n"])
    assert out == b"OK\r\nts=1 gid=2 type=item_get\r\n" and raw
    assert [d[0] for d in done] == ["watch"]


def test_capture_only_when_asked() -> None:
    requests, _ = RequestFramer().feed(b"get a\r\n")
    framer = ResponseFramer(deque(requests))
    _, done = framer.feed(b"VALUE a 0 1\r\nx\r\nEND\r\n")
    assert done[0].response is None


STREAM = (
    b"set a 0 0 3\r\nabc\r\nget a b\r\nset b 1 0 2 noreply\r\nhi\r\nmg a v q\r\nmg b s v\r\n"
    b"stats\r\nmn\r\ndelete a\r\nversion\r\n"
)
REPLIES = (
    b"STORED\r\nVALUE a 0 3\r\nabc\r\nEND\r\nMN\r\nVA 3\r\nabc\r\nMN\r\nVA 2 s2\r\nhi\r\n"
    b"STAT pid 1\r\nEND\r\nMN\r\nMN\r\nDELETED\r\nVERSION 1.6.18\r\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(REPLIES)), max_size=25))
def test_any_chunking_of_replies_gives_the_same_result(splits: list[int]) -> None:
    points = sorted(set(splits))
    chunks = [REPLIES[a:b] for a, b in zip([0, *points], [*points, len(REPLIES)], strict=True)]
    assert run(STREAM, [c for c in chunks if c]) == run(STREAM, [REPLIES])
    out, done, raw = run(STREAM, [REPLIES])
    assert not raw and len(done) == 9
    assert out == (
        b"STORED\r\nVALUE a 0 3\r\nabc\r\nEND\r\nVA 3\r\nabc\r\nVA 2 s2\r\nhi\r\n"
        b"STAT pid 1\r\nEND\r\nMN\r\nDELETED\r\nVERSION 1.6.18\r\n"
    )
