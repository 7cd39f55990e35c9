"""Captured Memcached replies (Request.response) read into typed outcomes for the comparator.

Sans-IO and strict: the framer has already cut exactly one reply per request, so anything that
is not one well-formed reply (a truncated capture, two replies, an unknown line) raises
MalformedReply rather than being guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NamedTuple

from proxy.errors import MemshadowError

ERROR_CODES: Final = frozenset(("ERROR", "CLIENT_ERROR", "SERVER_ERROR"))
# Meta return codes whose words after the code are flags (VA has its length first).
_META_FLAG_CODES: Final = frozenset(("HD", "VA", "EN", "NF", "NS", "EX", "MN"))


class MalformedReply(MemshadowError, ValueError):
    """A captured reply is not one complete reply of the expected shape."""

    def __init__(self, problem: str, reply: bytes) -> None:
        self.problem = problem
        self.reply = reply
        super().__init__(f"{problem}: {reply[:80]!r}")


class RetrievalItem(NamedTuple):
    """One VALUE entry of a get/gets/gat/gats reply."""

    key: bytes
    flags: int
    data: bytes
    cas: int | None  # present on gets/gats only


@dataclass(frozen=True, slots=True)
class RetrievalReply:
    """A VALUE...END list, or the single error line memcached sent instead of it."""

    items: tuple[RetrievalItem, ...]  # in reply order; a key asked twice appears twice
    # The error line that ended the reply ("CLIENT_ERROR bad command line format"). memcached
    # drops the hits it has not sent yet, so items is empty unless some had been flushed.
    error: str | None = None


@dataclass(frozen=True, slots=True)
class MetaReply:
    """One mg/ms/md/ma reply.

    `code` is the return code (HD VA EN NF NS EX MN), the first word of an error line
    (ERROR, CLIENT_ERROR, SERVER_ERROR), or "" when the capture is empty (a quiet request
    whose nominal reply memcached hid).
    """

    code: str
    flags: dict[str, str] = field(default_factory=dict)  # flag char -> value, reply order
    value: bytes | None = None  # VA only
    line: bytes = b""  # the status line as sent, without \r\n

    @property
    def is_error(self) -> bool:
        return self.code in ERROR_CODES

    @property
    def error(self) -> str | None:
        """The whole error line ("CLIENT_ERROR bad data chunk"), or None."""
        return self.line.decode("latin-1") if self.code in ERROR_CODES else None


def _next_line(reply: bytes, pos: int) -> tuple[bytes, int]:
    """The line starting at `pos` (without \\r\\n) and where the next one starts."""
    end = reply.find(b"\r\n", pos)
    if end < 0:
        raise MalformedReply("line without \\r\\n", reply)
    return reply[pos:end], end + 2


def _decimal(token: bytes, maximum: int, what: str, reply: bytes) -> int:
    if not token.isdigit():
        raise MalformedReply(f"bad {what} {token!r}", reply)
    value = int(token)
    if value > maximum:
        raise MalformedReply(f"{what} out of range {token!r}", reply)
    return value


def _is_error(line: bytes) -> bool:
    return line == b"ERROR" or line.startswith((b"ERROR ", b"CLIENT_ERROR", b"SERVER_ERROR"))


def parse_retrieval(reply: bytes) -> RetrievalReply:
    """Read a get/gets/gat/gats reply: `VALUE <key> <flags> <bytes>[ <cas>]` blocks then END,
    or one error line in place of the whole list."""
    items: list[RetrievalItem] = []
    pos = 0
    n = len(reply)
    while True:
        if pos >= n:
            raise MalformedReply("retrieval reply without END", reply)
        line, pos = _next_line(reply, pos)
        if line == b"END":
            break
        if not line.startswith(b"VALUE "):
            if not _is_error(line):
                raise MalformedReply(f"unexpected line {line[:40]!r}", reply)
            if pos != n:
                raise MalformedReply("bytes after the error line", reply)
            return RetrievalReply(tuple(items), line.decode("latin-1"))
        words = line.split(b" ")
        if len(words) not in (4, 5) or not words[1]:
            raise MalformedReply(f"bad VALUE line {line[:80]!r}", reply)
        flags = _decimal(words[2], 2**32 - 1, "flags", reply)
        size = _decimal(words[3], 2**31, "length", reply)
        cas = _decimal(words[4], 2**64 - 1, "cas", reply) if len(words) == 5 else None
        end = pos + size
        if reply[end : end + 2] != b"\r\n":
            raise MalformedReply("value block shorter than announced", reply)
        items.append(RetrievalItem(words[1], flags, reply[pos:end], cas))
        pos = end + 2
    if pos != n:
        raise MalformedReply("bytes after END", reply)
    return RetrievalReply(tuple(items))


def parse_line(reply: bytes) -> str:
    """The single status line of a classic reply ("STORED", "NOT_FOUND", "42" for incr,
    "CLIENT_ERROR ..." verbatim), or "" for an empty capture (noreply)."""
    if not reply:
        return ""
    line, pos = _next_line(reply, 0)
    if pos != len(reply):
        raise MalformedReply("more than one line", reply)
    return line.decode("latin-1")


def parse_meta(reply: bytes) -> MetaReply:
    """Read one meta reply: `<code> <flags>*`, `VA <len> <flags>*` plus its value, an error
    line, or nothing (quiet mode)."""
    if not reply:
        return MetaReply("")
    line, pos = _next_line(reply, 0)
    if _is_error(line):
        if pos != len(reply):
            raise MalformedReply("bytes after the error line", reply)
        return MetaReply(line.split(b" ", 1)[0].decode("latin-1"), line=line)
    words = line.split(b" ")
    code = words[0].decode("latin-1")
    if code not in _META_FLAG_CODES:
        raise MalformedReply(f"unknown meta return code {words[0][:20]!r}", reply)
    value: bytes | None = None
    flag_words = words[1:]
    if code == "VA":
        if not flag_words:
            raise MalformedReply("VA without a length", reply)
        size = _decimal(flag_words[0], 2**31, "length", reply)
        flag_words = flag_words[1:]
        end = pos + size
        if reply[end : end + 2] != b"\r\n":
            raise MalformedReply("value block shorter than announced", reply)
        value = reply[pos:end]
        pos = end + 2
    if pos != len(reply):
        raise MalformedReply("bytes after the reply", reply)
    flags: dict[str, str] = {}
    for word in flag_words:
        if not word:
            raise MalformedReply("empty flag", reply)
        flags[chr(word[0])] = word[1:].decode("latin-1")
    return MetaReply(code, flags, value, line)
