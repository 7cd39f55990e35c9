"""RESP2 on the wire, sans-IO: commands encoded as arrays of bulk strings (hiredis.pack_command
where it has one), the types of arguments and replies, and the INFO reply's text decoded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

import hiredis

Reply: TypeAlias = bytes | int | float | list["Reply"] | None
"""A decoded RESP2 reply (error replies are raised as RedisReplyError instead)."""

Arg: TypeAlias = bytes | str | int | float
"""One command argument; str is UTF-8 encoded, numbers are sent in decimal."""


ASKING = b"*1\r\n$6\r\nASKING\r\n"
"""ASKING, encoded: sent before a command redirected by an ASK refusal."""


def arg_bytes(arg: Arg) -> bytes:
    """One argument as it is sent: str UTF-8 encoded, numbers in decimal."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    return repr(arg).encode() if isinstance(arg, float) else str(arg).encode()


def resp_encode(args: Sequence[Arg]) -> bytes:
    """Encode a command as a RESP array of bulk strings (fallback for hiredis.pack_command)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg_bytes(arg)
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


def _pack_command(args: Sequence[Arg]) -> bytes:
    # cast: hiredis's stub types the argument as a 1-tuple
    return bytes(hiredis.pack_command(cast(Any, tuple(args))))


encode_command: Callable[[Sequence[Arg]], bytes] = (
    _pack_command if hasattr(hiredis, "pack_command") else resp_encode
)


def parse_info(reply: Reply | str) -> dict[str, str]:
    """Redis INFO text (``field:value`` lines, ``# Section`` headers) as a dict; {} for a
    reply that is not text."""
    if isinstance(reply, bytes):
        text = reply.decode("utf-8", "replace")
    elif isinstance(reply, str):
        text = reply
    else:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields
