"""Incremental request framer for the Memcached text protocol (classic and meta), sans-IO.

Fed arbitrary chunks of client bytes, it finds request boundaries exactly as memcached 1.6.18
does (line ending, tokenizer, when a data block follows and how long it is) and tells the
caller which requests have replies it cannot predict, so that an `mn` sentinel can be put
after them (REFERENCE 3). It never re-serialises and never holds bytes back: each chunk goes
on to Memcached at once, the client's own bytes with sentinels between requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from proxy.memcache.arguments import meta_key
from proxy.memcache.commands import (
    BY_WORD,
    CLOSE,
    EVERY_KEY,
    GATS,
    GETS,
    KEY_LAYOUT,
    KEY_MAX_LENGTH,
    LINE,
    META,
    META_KEY,
    META_SET,
    RETRIEVAL,
    STORAGE,
    STREAM,
    UNKNOWN,
)
from proxy.memcache.numbers import INT32_MAX, safe_strtol, safe_strtoul, safe_strtoull

# memcached's tokenizer keeps at most 23 words; ms refuses more than 19 (ntokens > 20).
MAX_WORDS = 23
META_SET_MAX_WORDS = 19
SENTINEL = b"mn\r\n"


class Expect(IntEnum):
    """The shape of the reply memcached will send for a request."""

    RETRIEVAL = 0  # VALUE ... END, or one error line
    LINE = 1  # exactly one line
    META = 2  # one line, plus a data block when it is `VA <n>`
    UNTIL_SENTINEL = 3  # unknown count: everything up to the MN of our injected `mn`
    CLOSE = 4  # no reply; memcached closes the connection (quit)
    STREAM = 5  # the connection becomes a raw stream (watch)


# The members under module names for the hot paths: `Expect.LINE` costs ~80 ns a lookup on
# Python 3.11 (EnumType attribute access), a global ~15 ns.
_RETRIEVAL = Expect.RETRIEVAL
_LINE = Expect.LINE
_META = Expect.META
_UNTIL_SENTINEL = Expect.UNTIL_SENTINEL
_CLOSE = Expect.CLOSE
_STREAM = Expect.STREAM


@dataclass(frozen=True, slots=True)
class FramingLimits:
    """Bounds on what the framer buffers; past them a connection is relayed without framing."""

    max_line_bytes: int = 2048
    max_get_line_bytes: int = 8 * 1024 * 1024
    max_value_bytes: int = 1024 * 1024 + 512


class Request:
    """One client request, registered when its command line is complete.

    `data` is filled when the data block has arrived, if it was captured; `complete` tells
    whether the whole request (line and block) has been read.
    """

    __slots__ = (
        "capture",
        "command",
        "complete",
        "data",
        "data_len",
        "data_ok",
        "expect",
        "flush_before",
        "line",
        "response",
        "sentinel",
        "started",
        "synthetic",
        "words",
    )

    def __init__(
        self,
        line: bytes,
        words: list[bytes],
        command: str,
        expect: Expect,
        sentinel: bool,
        data_len: int = -1,
    ) -> None:
        self.line = line
        self.words = words
        self.command = command
        # A request followed by a sentinel is answered by whatever comes before the MN.
        self.expect = _UNTIL_SENTINEL if sentinel else expect
        self.sentinel = sentinel
        self.data_len = data_len  # -1: no data block follows
        self.data: bytes | None = None
        self.data_ok = True  # False when the block did not end in \r\n (bad data chunk)
        self.complete = data_len < 0
        self.capture = False
        self.started = 0.0
        self.response: bytes | None = None
        self.flush_before = False  # an `mn` goes upstream first while replies are due
        self.synthetic = False  # a sentinel of the proxy's own, not a client request

    def __repr__(self) -> str:
        return f"Request({self.line[:60]!r}, expect={self.expect.name}, sentinel={self.sentinel})"

    @property
    def keys(self) -> list[bytes]:
        """Every key the request names, as memcached stores it (see request_keys)."""
        return request_keys(self.command, self.words)

    def captured(self) -> Captured:
        """What the shadow takes of this request once its reply is in."""
        return Captured(
            self.command,
            self.words,
            self.data_len,
            self.data_ok,
            self.data,
            self.response,
            self.started,
        )


class Captured(NamedTuple):
    """A request the shadow took, with its reply: what the client path hands over, the same
    inline and over the worker's wire (as a plain tuple in this order, see wire.py). Never
    changed once made."""

    command: str
    words: list[bytes]
    data_len: int  # -1: no data block
    data_ok: bool  # False when the block did not end in \r\n
    data: bytes | None  # the block, if it was buffered (within the value size limit)
    response: bytes | None  # memcached's reply, None when it was not captured
    started: float  # perf_counter time it went upstream (0.0: unknown)

    @property
    def keys(self) -> list[bytes]:
        return request_keys(self.command, self.words)


def request_keys(command: str, words: list[bytes]) -> list[bytes]:
    """Every key a request names, as memcached stores it (a meta `b` key decoded; none when
    it does not decode); commands.KEY_LAYOUT says where they are."""
    layout = KEY_LAYOUT.get(command)
    if layout is None or layout == EVERY_KEY or len(words) < 2:
        return []  # (flush_all names no key: its word is a delay)
    if layout == GETS:
        return words[1:]
    if layout == GATS:
        return words[2:]
    if layout == META_KEY:
        key = meta_key(words)
        return [key] if key else []
    return [words[1]]


def _words(line: bytes) -> list[bytes]:
    """memcached's tokenizer: split on the space character only, collapse runs."""
    words = line.split(b" ")
    if b"" in words:
        words = [w for w in words if w]
    return words


def _storage_data_len(words: list[bytes], is_cas: bool) -> int:
    """Data block length for a classic storage line, or -1 when memcached reads no block."""
    if len(words) not in ((6, 7) if is_cas else (5, 6)):
        return -1
    if len(words[1]) > KEY_MAX_LENGTH:
        return -1
    if safe_strtoul(words[2]) is None or safe_strtol(words[3]) is None:
        return -1
    vlen = safe_strtol(words[4])
    if vlen is None or (is_cas and safe_strtoull(words[5]) is None):
        return -1
    if vlen < 0 or vlen > INT32_MAX - 2:
        return -1
    return vlen


def _meta_set_data_len(words: list[bytes]) -> int:
    """Data block length for `ms`, or -1 when memcached reads no block (REFERENCE 2.2)."""
    if len(words) < 3 or len(words[1]) > KEY_MAX_LENGTH or len(words) > META_SET_MAX_WORDS:
        return -1
    vlen = safe_strtol(words[2])
    if vlen is None or vlen < 0 or vlen > INT32_MAX - 2:
        return -1
    return vlen


def flush_sentinel() -> Request:
    """The pending entry for an `mn` the proxy sends before a request (see flush_before)."""
    request = Request(b"mn", [b"mn"], "mn", _UNTIL_SENTINEL, True)
    request.synthetic = True
    return request


# The command words of the get family (commands.RETRIEVAL): the only lines that may need an
# `mn` in front of them (Request.flush_before).
_RETRIEVAL_WORDS = tuple(word for word, command in BY_WORD.items() if command.framing == RETRIEVAL)


def may_need_flush(start: bytes) -> bool:
    """Could a line that begins with `start` (no newline yet) be a get of an over-long key,
    which needs an `mn` before it (Request.flush_before)? True unless its first word rules
    out the get family: the words memcached's tokenizer would see (spaces skipped)."""
    word, space, _ = start.lstrip(b" ").partition(b" ")
    if space:
        return word in _RETRIEVAL_WORDS
    return any(name.startswith(word) for name in _RETRIEVAL_WORDS)


def _quiet(flags: list[bytes]) -> bool:
    return any(flag[0] == 113 for flag in flags)  # 'q'


def parse_line(raw: bytes) -> Request:
    """Classify one command line (without its \\n) the way memcached would dispatch it."""
    # Fast path for the commonest lines, spelled canonically: `get <key>\r` and
    # `set <key> <flags> <exptime> <bytes>\r` with single spaces and short plain decimals. They
    # give the same Request as the general path below, which tokenizes and checks every rule.
    # timeit on the 2-core dev VM: get 0.85 -> 0.50 us a line, set 1.47 -> 0.81 us.
    # (`0 in raw` is a memchr; `b"\0" in raw` takes ~8x as long, through the buffer protocol.)
    if raw and raw[-1] == 13 and 0 not in raw:
        head = raw[:4]
        if head == b"get ":
            key = raw[4:-1]
            if key and len(key) <= KEY_MAX_LENGTH and 32 not in key and key != b"noreply":
                return Request(raw, [b"get", key], "get", _RETRIEVAL, False)
        elif head == b"set ":
            words = raw[:-1].split(b" ")
            if len(words) == 5:
                key, flags, exptime, size = words[1], words[2], words[3], words[4]
                if (
                    key
                    and len(key) <= KEY_MAX_LENGTH
                    and flags.isdigit()
                    and len(flags) < 10
                    and exptime.isdigit()
                    and len(exptime) < 10
                    and size.isdigit()
                    and len(size) < 10
                ):
                    return Request(raw, words, "set", _LINE, False, int(size))
    return _parse_line(raw)


def _parse_line(raw: bytes) -> Request:
    """parse_line for any line: memcached's tokenizer and dispatch rules, one by one."""
    line = raw
    if len(line) > 1 and line[-1] == 13:  # memcached strips \r only from lines of 2+ bytes
        line = line[:-1]
    nul = line.find(b"\0")
    if nul >= 0:  # memcached uses strlen(): a NUL ends the line
        line = line[:nul]
    words = _words(line)
    if not words:
        return Request(raw, words, "unknown", _UNTIL_SENTINEL, True)
    name = words[0]
    command = BY_WORD.get(name, UNKNOWN)
    label = command.name
    framing = command.framing
    last_is_noreply = words[-1] == b"noreply"

    if framing == RETRIEVAL:
        request = Request(raw, words, label, _RETRIEVAL, last_is_noreply)
        # memcached 1.6.18 answers a get with a key over 250 bytes by discarding every reply
        # it has not flushed yet on the connection (conn_release_items). An `mn` first flushes
        # them (when any are due), so each request keeps exactly its own reply.
        if len(line) > KEY_MAX_LENGTH + 4 and any(len(w) > KEY_MAX_LENGTH for w in words):
            request.flush_before = True
        return request
    if framing == STORAGE:
        data_len = _storage_data_len(words, name == b"cas")
        return Request(raw, words, label, _LINE, last_is_noreply, data_len)
    if framing == META_SET:
        data_len = _meta_set_data_len(words)
        quiet = len(words) > MAX_WORDS or _quiet(words[3:])
        return Request(raw, words, label, _META, quiet, data_len)
    if framing == META:
        if name == b"me":  # memcached reads no flags of me
            return Request(raw, words, label, _META, len(words) > MAX_WORDS)
        quiet = len(words) > MAX_WORDS or _quiet(words[2:])
        return Request(raw, words, label, _META, quiet)
    if framing == LINE:
        if name == b"mn":  # never quiet: its MN is how a client ends a pipeline
            return Request(raw, words, label, _LINE, False)
        if name == b"version":  # memcached counts no words for version
            return Request(raw, words, label, _LINE, last_is_noreply)
        return Request(raw, words, label, _LINE, last_is_noreply or len(words) > MAX_WORDS)
    if framing == CLOSE:
        return Request(raw, words, label, _CLOSE, False)
    if framing == STREAM:
        return Request(raw, words, label, _STREAM, False)
    # stats, lru_crawler, slabs, unknown commands...: replies of varied shape and count.
    return Request(raw, words, label, _UNTIL_SENTINEL, True)


class RequestFramer:
    """Turns a stream of client bytes into Requests, with the places to put sentinels.

    `feed(chunk)` returns the requests whose command line completed in this chunk (in order)
    and the bytes to send upstream: the whole chunk, with `mn\\r\\n` inserted where needed.
    After a `watch`, `quit`, a binary-protocol first byte or an over-long line, the framer
    turns `raw`: later bytes are forwarded with no framing (`raw_reason` says why).

    `pending`: the caller's requests still awaiting their reply (the session's FIFO). A line
    that starts in one chunk and ends in a later one goes upstream as it arrives; if it may
    turn out to be a get of an over-long key (flush_before) while replies are due, an `mn`
    goes before its first byte, since none can be put there later. Without `pending`, only
    the requests earlier in the same chunk count as due.
    """

    def __init__(
        self,
        limits: FramingLimits | None = None,
        capture: Callable[[Request], bool] | None = None,
        pending: Sized | None = None,
    ) -> None:
        self.limits = limits or FramingLimits()
        self._capture = capture
        self._pending = pending
        self.raw = False
        self.raw_reason = ""
        self._started = False
        # The start of a line whose end has not arrived: already sent upstream, kept only to
        # parse the line once it is complete (bounded by _check_partial).
        self._partial = bytearray()
        self._block_left = 0  # bytes of the current data block (with \r\n) still to come
        self._block_req: Request | None = None
        self._block_buf: bytearray | None = None

    def _go_raw(self, reason: str) -> None:
        self.raw = True
        self.raw_reason = reason
        self._partial = bytearray()

    @property
    def at_boundary(self) -> bool:
        """True between requests: no line begun, no data block under way."""
        return not self._partial and not self._block_left

    @property
    def in_block(self) -> bool:
        """True while a request's data block is under way (its line is complete)."""
        return self._block_left > 0

    def feed(self, data: bytes) -> tuple[list[Request], list[bytes]]:
        """Frame a chunk: (requests whose line completed, in order; bytes to send upstream).

        The bytes to send are the whole chunk, the client's own, with `mn\\r\\n` inserted at
        request boundaries where needed: nothing is held back waiting for the end of a line or
        of a data block, so Memcached judges every byte when it would directly.
        """
        if self.raw:
            return [], [data]
        if not data:
            return [], []
        if not self._started:
            self._started = True
            if data[0] == 0x80:
                self._go_raw("binary_protocol")
                return [], [data]
        if not self._partial and not self._block_left:
            nl = data.find(b"\n")
            if nl >= 0:
                request = parse_line(data[:nl])
                # Fast path: the chunk is exactly this one request (line and whole block) and
                # it needs no `mn`, as with any client that has one request in flight. Register
                # it as _frame would, without the general loop (inline: a call costs ~50 ns).
                # bench/framing.py, 90/10 get/set one a chunk: 1.7-2.0 -> 0.95 us a request.
                if not request.sentinel and not request.flush_before:
                    size = request.data_len
                    if size < 0:
                        expect = request.expect
                        if nl == len(data) - 1 and expect != _CLOSE and expect != _STREAM:
                            if self._capture is not None:
                                request.capture = self._capture(request)
                            return [request], [data]
                    elif len(data) == nl + size + 3:  # \n, block, \r\n
                        capture = self._capture is not None and self._capture(request)
                        request.capture = capture
                        if capture and size <= self.limits.max_value_bytes:
                            request.data_ok = data[-2:] == b"\r\n"
                            request.data = data[nl + 1 : -2]
                        request.complete = True
                        return [request], [data]
                return self._frame(data, request)
        return self._frame(data, None)

    def _frame(self, data: bytes, first: Request | None) -> tuple[list[Request], list[bytes]]:
        """The general case of feed(). `first`: the request of the chunk's first line, when
        feed() has parsed it already (the chunk then starts at a request boundary)."""
        requests: list[Request] = []
        out: list[bytes] = []
        pos = 0
        emit_from = 0
        continued = False  # the first line began in an earlier chunk (already sent)
        if self._partial:
            if data.find(b"\n") < 0:
                self._partial += data
                self._check_partial()
                return requests, [data]
            emit_from = len(self._partial)
            data = bytes(self._partial) + data
            self._partial = bytearray()
            continued = True
        elif self._block_left:
            pos = self._take_block(data, 0)
            if self._block_left:
                return requests, [data]
            if self._block_req is not None and self._block_req.sentinel:
                out.append(data[:pos])
                emit_from = pos
            self._finish_block(out, data, pos)
        n = len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                start = data[pos:]
                if self._replies_due(requests) and may_need_flush(start):
                    out.append(data[emit_from:pos])
                    out.append(SENTINEL)
                    emit_from = pos
                    requests.append(flush_sentinel())
                out.append(data[emit_from:])
                self._partial += start
                self._check_partial()
                return requests, out
            line_start = pos
            pos = nl + 1
            if first is not None:
                request, first = first, None
            else:
                request = parse_line(data[line_start:nl])
            if continued:
                # Its first bytes went upstream already, after an `mn` if it needed one.
                continued = False
            elif request.flush_before and self._replies_due(requests):
                out.append(data[emit_from:line_start])
                out.append(SENTINEL)
                emit_from = line_start
                requests.append(flush_sentinel())
            requests.append(request)
            if request.data_len >= 0:
                self._block_req = request
                self._block_left = request.data_len + 2
                capture = self._capture is not None and self._capture(request)
                request.capture = capture
                if capture and request.data_len <= self.limits.max_value_bytes:
                    self._block_buf = bytearray()
                pos = self._take_block(data, pos)
                if self._block_left:
                    break
                if request.sentinel:
                    out.append(data[emit_from:pos])
                    emit_from = pos
                self._finish_block(out, data, pos)
                continue
            if self._capture is not None:
                request.capture = self._capture(request)
            if request.sentinel:
                out.append(data[emit_from:pos])
                out.append(SENTINEL)
                emit_from = pos
            elif request.expect == _CLOSE or request.expect == _STREAM:
                self._go_raw(request.command)
                break
        out.append(data[emit_from:])
        return requests, out

    def _take_block(self, data: bytes, pos: int) -> int:
        take = min(self._block_left, len(data) - pos)
        if self._block_buf is not None:
            self._block_buf += data[pos : pos + take]
        self._block_left -= take
        return pos + take

    def _finish_block(self, out: list[bytes], data: bytes, pos: int) -> None:
        """The data block ended at `pos`: fill in the request, add its sentinel if any.

        The caller has already emitted the bytes up to `pos` when the request needs one.
        """
        request = self._block_req
        assert request is not None
        buf = self._block_buf
        if buf is not None:
            request.data_ok = buf[-2:] == b"\r\n"
            request.data = bytes(buf[:-2])
        request.complete = True
        self._block_req = None
        self._block_buf = None
        if request.sentinel:
            out.append(SENTINEL)

    def _replies_due(self, requests: list[Request]) -> bool:
        """May Memcached still hold unsent replies? (requests earlier in this chunk, or
        earlier ones the caller has not seen answered)"""
        return bool(requests) or (self._pending is not None and len(self._pending) > 0)

    def _check_partial(self) -> None:
        """Bound the kept start of a line as memcached does: only get/gets lines may grow
        past 2 KiB (memcached closes the connection at any other; the framer stops framing,
        the bytes went upstream already)."""
        size = len(self._partial)
        if size <= self.limits.max_line_bytes:
            return
        stripped = self._partial.lstrip(b" ")
        if size - len(stripped) > 100 or not (
            stripped.startswith(b"get ") or stripped.startswith(b"gets ")
        ):
            self._go_raw("line_too_long")
        elif size > self.limits.max_get_line_bytes:
            self._go_raw("get_line_too_long")
