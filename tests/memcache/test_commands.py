"""The command table: every reader agrees with it (the framer, Request.keys, the sampler and
the translation), so a command is described once."""

from __future__ import annotations

import pytest

from proxy.memcache.commands import COMMANDS, EVERY_KEY, NO_KEY, SHADOWED, UNKNOWN
from proxy.memcache.request import Expect, RequestFramer
from proxy.shadow import sampler
from proxy.shadow.control import ShadowControl
from proxy.shadow.engine import translate


def frame(stream: bytes) -> list:  # type: ignore[type-arg]
    requests, _ = RequestFramer().feed(stream)
    return requests


def test_every_command_is_labelled_by_its_name_and_the_rest_is_unknown() -> None:
    for name in COMMANDS:
        (request,) = frame(name.encode() + b" k\r\n")[:1]
        assert request.command == name
    assert frame(b"frobnicate k\r\n")[0].command == UNKNOWN.name == "unknown"


@pytest.mark.parametrize(
    ("line", "keys"),
    [
        (b"get a b c", [b"a", b"b", b"c"]),
        (b"gats 60 a b", [b"a", b"b"]),
        (b"delete a", [b"a"]),
        (b"incr a 1", [b"a"]),
        (b"md Zm9v b", [b"foo"]),  # a meta b key, decoded
        (b"mg !!!! b", []),  # one that does not decode
        (b"mg a v", [b"a"]),
        (b"flush_all", []),
        (b"stats items", []),
        (b"get", []),
    ],
)
def test_request_keys_follow_the_table(line: bytes, keys: list[bytes]) -> None:
    assert frame(line + b"\r\n")[0].keys == keys


def test_the_shadow_translates_and_samples_exactly_the_shadowed_commands() -> None:
    assert set(translate._HANDLERS) == SHADOWED
    assert set(sampler._KIND) == SHADOWED
    assert {
        *("get", "gets", "bget", "gat", "gats"),
        *("set", "add", "replace", "append", "prepend", "cas"),
        *("delete", "incr", "decr", "touch", "flush_all", "mg", "ms", "md", "ma"),
    } == SHADOWED
    decide = sampler.KeySampler(ShadowControl(1.0)).decide
    for name, command in COMMANDS.items():
        (request,) = frame(name.encode() + b" k 0 0 1\r\n")[:1]
        assert decide(request) == bool(command.shadow), name
        if command.shadow and command.keys != EVERY_KEY:
            assert command.keys != NO_KEY, name


def test_framing_follows_the_table() -> None:
    assert frame(b"set k 0 0 1\r\nx\r\n")[0].data_len == 1
    assert frame(b"ms k 2 q\r\nxy\r\n")[0].sentinel  # quiet
    assert frame(b"version\r\n")[0].expect == Expect.LINE
    assert frame(b"quit\r\n")[0].expect == Expect.CLOSE
    assert frame(b"watch\r\n")[0].expect == Expect.STREAM
    assert frame(b"slabs reassign 1 2\r\n")[0].expect == Expect.UNTIL_SENTINEL
