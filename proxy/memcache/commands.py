"""memcached's text commands, in one table: how each is framed, where its keys are, and how
the shadow replays it. The framer, Request.keys, the sampler and the translation all read it:
a command is described here once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KEY_MAX_LENGTH: Final = 250

# How the framer finds the end of a request and of its reply (request.py).
RETRIEVAL: Final = "retrieval"  # get/gat family: VALUE blocks, then END
STORAGE: Final = "storage"  # a classic line with a data block: one reply line
META_SET: Final = "meta_set"  # ms: a data block, a meta reply (none when quiet)
META: Final = "meta"  # mg/md/ma/me: a meta reply (none when quiet)
LINE: Final = "line"  # one reply line unless noreply
CLOSE: Final = "close"  # quit: memcached closes the connection
STREAM: Final = "stream"  # watch: a stream with no end
VARIED: Final = "varied"  # stats, slabs, unknown...: replies of varied shape and count

# Where a command's keys are (Request.keys, the sampler).
NO_KEY: Final = 0
FIRST: Final = 1  # words[1]
GETS: Final = 2  # words[1:]
GATS: Final = 3  # words[2:] (words[1] is the exptime)
META_KEY: Final = 4  # words[1], base64-decoded when a flag token starts with b
EVERY_KEY: Final = 5  # no key of its own, but changes every key (flush_all)


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # also its label in metrics
    framing: str
    keys: int = NO_KEY
    # How the shadow replays it (the translation's family of handlers); "" = never shadowed.
    shadow: str = ""


_TABLE: Final = (
    *(Command(name, RETRIEVAL, GETS, "retrieval") for name in ("get", "gets", "bget")),
    *(Command(name, RETRIEVAL, GATS, "retrieval") for name in ("gat", "gats")),
    *(
        Command(name, STORAGE, FIRST, "storage")
        for name in ("set", "add", "replace", "append", "prepend", "cas")
    ),
    Command("delete", LINE, FIRST, "delete"),
    Command("incr", LINE, FIRST, "arith"),
    Command("decr", LINE, FIRST, "arith"),
    Command("touch", LINE, FIRST, "touch"),
    Command("flush_all", LINE, EVERY_KEY, "flush"),
    Command("verbosity", LINE),
    Command("version", LINE),
    Command("mn", LINE),
    Command("mg", META, META_KEY, "mg"),
    Command("ms", META_SET, META_KEY, "ms"),
    Command("md", META, META_KEY, "md"),
    Command("ma", META, META_KEY, "ma"),
    Command("me", META, FIRST),
    Command("quit", CLOSE),
    Command("watch", STREAM),
    *(
        Command(name, VARIED)
        for name in (
            "stats",
            "shutdown",
            "cache_memlimit",
            "slabs",
            "lru",
            "lru_crawler",
            "misbehave",
            "debugtime",
        )
    ),
)

COMMANDS: Final[dict[str, Command]] = {command.name: command for command in _TABLE}
"""By name. A name not here is the command "unknown" (UNKNOWN)."""

UNKNOWN: Final = Command("unknown", VARIED)

BY_WORD: Final[dict[bytes, Command]] = {command.name.encode(): command for command in _TABLE}
"""By the first word of a command line, as the framer reads it."""

KEY_LAYOUT: Final[dict[str, int]] = {
    command.name: command.keys for command in _TABLE if command.keys != NO_KEY
}
META_COMMANDS: Final = frozenset(c.name for c in _TABLE if c.keys == META_KEY)
SHADOWED: Final = frozenset(c.name for c in _TABLE if c.shadow)

__all__ = [
    "BY_WORD",
    "CLOSE",
    "COMMANDS",
    "EVERY_KEY",
    "FIRST",
    "GATS",
    "GETS",
    "KEY_LAYOUT",
    "KEY_MAX_LENGTH",
    "LINE",
    "META",
    "META_COMMANDS",
    "META_KEY",
    "META_SET",
    "NO_KEY",
    "RETRIEVAL",
    "SHADOWED",
    "STORAGE",
    "STREAM",
    "UNKNOWN",
    "VARIED",
    "Command",
]
