"""The framers' one-request/one-reply-per-chunk fast paths give what the general paths give.

Each case is fed as a single chunk (the fast path's shape), then the same chunk straight to the
general path (`_frame`/`_feed`), then a byte at a time; requests, captures, forwarded bytes and
state must agree.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from proxy.memcache.request import Request, RequestFramer, _parse_line, parse_line
from proxy.memcache.response import ResponseFramer


def _request_view(r: Request) -> tuple[Any, ...]:
    return (
        r.line,
        r.words,
        r.command,
        r.expect,
        r.sentinel,
        r.data_len,
        r.data,
        r.data_ok,
        r.complete,
        r.capture,
        r.flush_before,
        r.synthetic,
    )


def _frame(
    chunks: list[bytes], capture: bool, general: bool = False
) -> tuple[list[tuple[Any, ...]], bytes, Any]:
    framer = RequestFramer(capture=(lambda r: True) if capture else None)
    requests: list[Request] = []
    upstream = b""
    for chunk in chunks:
        got, out = framer._frame(chunk, None) if general else framer.feed(chunk)
        requests.extend(got)
        upstream += b"".join(out)
    state = (framer.raw, framer.raw_reason, framer.at_boundary)
    return [_request_view(r) for r in requests], upstream, state


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize(
    "data",
    [
        b"get k\r\n",
        b"get " + b"k" * 250 + b"\r\n",
        b"get " + b"k" * 251 + b"\r\n",  # flushing sentinel first
        b"get k noreply\r\n",
        b"get noreply\r\n",
        b"get a b\r\n",
        b"get  a\r\n",
        b"get a \r\n",
        b"get a\0b\r\n",
        b"get a\rb\r\n",
        b"get a\n",
        b"get \r\n",
        b"get\r\n",
        b"gets a\r\n",
        b"set k 0 0 3\r\nabc\r\n",
        b"set k 0 0 0\r\n\r\n",
        b"set k 4294967295 0 3\r\nabc\r\n",
        b"set k 0 -1 3\r\nabc\r\n",
        b"set k 0 0 3 noreply\r\nabc\r\n",
        b"set k 0 0 3\r\nabcXY",  # bad data chunk
        b"set k 0 0 3\r\nab",  # block still to come
        b"set k 0 0 3\r\nabc\r\nget k\r\n",  # two requests
        b"set k 0  0 3\r\nabc\r\n",
        b"set k 0 0 0999999999\r\n",
        b"set  k 0 0 3\r\nabc\r\n",
        b"set k 0 0 x\r\nabc\r\n",
        b"set k\0 0 0 3\r\nabc\r\n",
        b"delete k\r\n",
        b"mg k v\r\n",
        b"mg k v q\r\n",
        b"ms k 2\r\nhi\r\n",
        b"stats\r\n",
        b"quit\r\n",
        b"watch\r\n",
        b"\r\n",
    ],
)
@pytest.mark.parametrize("capture", [False, True])
def test_request_fast_path_matches_general_path(data: bytes, capture: bool) -> None:
    fast = _frame([data], capture)
    assert fast == _frame([data], capture, general=True)
    assert fast == _frame(_bytewise(data), capture)


@pytest.mark.parametrize(
    "line",
    [
        b"get k\r",
        b"get " + b"k" * 250 + b"\r",
        b"get " + b"k" * 251 + b"\r",
        b"get noreply\r",
        b"get k noreply\r",
        b"get a b\r",
        b"get  a\r",
        b"get a \r",
        b"get a\0b\r",
        b"get a\rb\r",
        b"get a\tb\r",
        b"get a",
        b"get \r",
        b"set k 0 0 3\r",
        b"set k 1 2 100\r",
        b"set k 999999999 999999999 999999999\r",
        b"set k 4294967296 0 3\r",
        b"set k 0 0 2147483648\r",
        b"set k 0 -1 3\r",
        b"set k +0 0 3\r",
        b"set k 0 0 3 noreply\r",
        b"set k 0 0 3 \r",
        b"set k 0 0\r",
        b"set  k 0 0 3\r",
        b"set k 0 0 3\0\r",
        b"set " + b"k" * 251 + b" 0 0 3\r",
        b"set k 0 0 3",
        b"set noreply 0 0 3\r",
        b"\r",
        b"",
    ],
)
def test_canonical_lines_parse_as_the_general_rules_do(line: bytes) -> None:
    assert _request_view(parse_line(line)) == _request_view(_parse_line(line))


def _replies(
    requests: bytes, chunks: list[bytes], max_capture: int, general: bool = False
) -> tuple[Any, ...]:
    pending: deque[Request] = deque(RequestFramer(capture=lambda r: True).feed(requests)[0])
    framer = ResponseFramer(pending, max_capture=max_capture)
    out = b""
    done: list[tuple[str, bytes | None]] = []
    for chunk in chunks:
        pieces, completed = framer._feed(chunk) if general else framer.feed(chunk)
        out += b"".join(pieces)
        done += [(r.command, r.response) for r in completed]
    return out, done, framer.raw, framer.raw_reason, len(pending)


@pytest.mark.parametrize(
    ("requests", "reply"),
    [
        (b"get k\r\n", b"END\r\n"),
        (b"get k\r\n", b"VALUE k 0 3\r\nabc\r\nEND\r\n"),
        (b"gets k\r\n", b"VALUE k 0 3 99\r\nabc\r\nEND\r\n"),
        (b"get k\r\n", b"VALUE k 0 3\nabc\r\nEND\r\n"),
        (b"get k\r\n", b"VALUE k 0 5\r\nEND\r\n\r\nEND\r\n"),  # a value that looks like END
        (b"get k\r\n", b"VALUE k 0 4\r\nabc\r\nEND\r\n"),  # length does not add up
        (b"get k\r\n", b"VALUE k 0 x\r\nabc\r\nEND\r\n"),
        (b"get k\r\n", b"VALUE k 0\r\nEND\r\n"),
        (b"get a b\r\n", b"VALUE a 0 1\r\nx\r\nVALUE b 0 1\r\ny\r\nEND\r\n"),
        (b"get k\r\n", b"SERVER_ERROR out of memory\r\n"),
        (b"set k 0 0 1\r\nx\r\n", b"STORED\r\n"),
        (b"set k 0 0 1\r\nx\r\n", b"STORED\r\nEXTRA"),
        (b"set k 0 0 1\r\nx\r\nset k 0 0 1\r\nx\r\n", b"STORED\r\nSTORED\r\n"),
        (b"get a\r\nget b\r\n", b"END\r\nEND\r\n"),
        (b"get a\r\nget b\r\n", b"VALUE a 0 1\r\nx\r\nEND\r\nEND\r\n"),
        (b"get a\r\nget b\r\n", b"END\r\nVALUE b 0 1\r\nx\r\nEND\r\n"),
        (b"mg a\r\nmg b\r\n", b"HD\r\nHD\r\n"),
        (b"set k 0 0 1\r\nx\r\n", b"STORED"),
        (b"mg k v\r\n", b"EN\r\n"),
        (b"mg k v\r\n", b"VA 2\r\nhi\r\n"),
        (b"mg k v\r\n", b"VA\r\n"),
        (b"stats\r\n", b"STAT pid 1\r\nEND\r\nMN\r\n"),
    ],
)
@pytest.mark.parametrize("max_capture", [1 << 20, 8])
def test_reply_fast_path_matches_general_path(
    requests: bytes, reply: bytes, max_capture: int
) -> None:
    fast = _replies(requests, [reply], max_capture)
    assert fast == _replies(requests, [reply], max_capture, general=True)
    if max_capture > len(reply):  # a tight bound makes what is captured depend on the chunking
        assert fast == _replies(requests, _bytewise(reply), max_capture)


def test_end_chunk_after_captured_values_keeps_the_whole_capture() -> None:
    chunks = [b"VALUE a 0 1\r\nx\r\n", b"END\r\n"]
    _, done, _, _, _ = _replies(b"get a\r\n", chunks, 1 << 20)
    assert done == [("get", b"VALUE a 0 1\r\nx\r\nEND\r\n")]
