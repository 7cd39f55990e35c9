"""Mismatch examples: the last few per kind, private by default, for GET /api/mismatches and logs.

Keys and values are turned into keyed hashes (HMAC-SHA256) and lengths when they are recorded,
so no plaintext is kept in memory, served or logged unless the operator opts in (`reveal`).
Each example is also logged as one JSON line on "memshadow.mismatch", at most
`log_per_second` lines a second; the lines left out are counted and summarised.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from proxy.admin import Handler, Request, Response

if TYPE_CHECKING:
    from proxy.config import Config

log = logging.getLogger("memshadow.mismatch")

HASH_CHARS: Final = 16
"""Hex characters kept of a keyed hash (64 bits: collisions are no concern for examples)."""
MAX_KINDS: Final = 32
"""Kinds kept apart; examples of further kinds (there should be none) share OTHER_KIND."""
OTHER_KIND: Final = "other"
REVEAL_MAX_BYTES: Final = 256
"""Plaintext shown per value when revealing; the length and hash always cover all of it."""

# Bytes shown as themselves when revealed: printable ASCII except the backslash.
_ESCAPES: Final = tuple(
    chr(b) if 0x20 <= b < 0x7F and b != 0x5C else ("\\\\" if b == 0x5C else f"\\x{b:02x}")
    for b in range(256)
)

JSONValue = Any  # what json.dumps accepts; nested dicts/lists of str, int, float, bool, None


def escape_bytes(data: bytes) -> str:
    """Printable ASCII as is, a backslash doubled, every other byte as \\xNN: unambiguous,
    one line, and safe in JSON and in logs."""
    return "".join(_ESCAPES[b] for b in data)


@dataclass(frozen=True, slots=True)
class MismatchExample:
    """One recorded mismatch, already made private (or revealed) as configured."""

    at: float  # unix time
    kind: str
    command: str
    key: str  # keyed hash, or the escaped key when revealed
    memcached: dict[str, JSONValue]
    redis: dict[str, JSONValue]
    detail: str
    # How it came about: the re-read of both stores, the action taken (a repair) and the
    # key's last operations as the shadow saw them (see dispatcher._example).
    story: dict[str, JSONValue] | None = None

    def to_json(self) -> dict[str, JSONValue]:
        shown: dict[str, JSONValue] = {
            "at": round(self.at, 3),
            "time": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
            "kind": self.kind,
            "command": self.command,
            "key": self.key,
            "memcached": self.memcached,
            "redis": self.redis,
            "detail": self.detail,
        }
        if self.story is not None:
            shown["story"] = self.story
        return shown


class MismatchExamples:
    """The last `per_kind` examples of each mismatch kind, in bounded deques.

    `secret` keys the hashes; when it is None a random one is drawn for this process (hashes
    then only compare within one run). Configure one to compare hashes across instances and
    restarts. `record` takes the two sides as dicts: bytes anywhere in them (values, keys)
    are hashed; str, numbers, bools and None are kept as they are, so they must not carry
    plaintext; other objects are shown by type name only.
    """

    def __init__(
        self,
        per_kind: int = 20,
        reveal: bool = False,
        secret: bytes | None = None,
        *,
        log_per_second: int = 10,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        logger: logging.Logger = log,
    ) -> None:
        if per_kind < 1:
            raise ValueError(f"per_kind must be at least 1, got {per_kind}")
        self.per_kind = per_kind
        self.reveal = reveal
        self._secret = secret if secret is not None else os.urandom(32)
        self.log_per_second = log_per_second
        self._clock = clock
        self._wall_clock = wall_clock
        self._logger = logger
        self._kinds: dict[str, deque[MismatchExample]] = {}
        self.recorded = 0
        # Log rate limit: a window of one second from its first line.
        self._window_start: float | None = None
        self._window_lines = 0
        self._suppressed = 0  # in the current window, not yet summarised
        self.suppressed_total = 0

    @classmethod
    def for_config(cls, config: Config) -> MismatchExamples:
        """The examples shadow.examples_per_kind and shadow.reveal_examples ask for."""
        shadow = config.shadow
        return cls(per_kind=shadow.examples_per_kind, reveal=shadow.reveal_examples)

    # -- recording ---------------------------------------------------------------------------

    def record(
        self,
        kind: str,
        command: str,
        key: bytes,
        memcached: Mapping[str, Any],
        redis: Mapping[str, Any],
        detail: str,
        story: Mapping[str, Any] | None = None,
    ) -> MismatchExample:
        """Keep an example (dropping the oldest of its kind past `per_kind`) and log it."""
        example = MismatchExample(
            at=self._wall_clock(),
            kind=kind,
            command=command,
            key=escape_bytes(key) if self.reveal else self.hash(key),
            memcached=self._private_dict(memcached),
            redis=self._private_dict(redis),
            detail=detail,
            story=None if story is None else self._private_dict(story),
        )
        examples = self._kinds.get(kind)
        if examples is None:
            slot = kind if len(self._kinds) < MAX_KINDS - 1 else OTHER_KIND
            examples = self._kinds.get(slot)
            if examples is None:
                examples = self._kinds[slot] = deque(maxlen=self.per_kind)
        examples.append(example)
        self.recorded += 1
        self._log(example)
        return example

    def hash(self, data: bytes) -> str:
        """The keyed hash shown for a key or value: HMAC-SHA256, hex, HASH_CHARS long."""
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()[:HASH_CHARS]

    def _private_value(self, data: bytes) -> dict[str, JSONValue]:
        shown: dict[str, JSONValue] = {"len": len(data), "hmac": self.hash(data)}
        if self.reveal:
            shown["text"] = escape_bytes(data[:REVEAL_MAX_BYTES])
            shown["truncated"] = len(data) > REVEAL_MAX_BYTES
        return shown

    def _private(self, value: Any) -> JSONValue:
        if isinstance(value, bytes | bytearray | memoryview):
            return self._private_value(bytes(value))
        if value is None or isinstance(value, str | bool | int | float):
            return value
        if isinstance(value, Mapping):
            return self._private_dict(value)
        if isinstance(value, list | tuple | set | frozenset):
            return [self._private(item) for item in value]
        # An object might render its contents: show what it is, never what it holds.
        return repr(value) if self.reveal else f"<{type(value).__name__}>"

    def _private_dict(self, value: Mapping[str, Any]) -> dict[str, JSONValue]:
        return {str(name): self._private(item) for name, item in value.items()}

    # -- reading -----------------------------------------------------------------------------

    def to_json(self, kind: str | None = None) -> dict[str, JSONValue]:
        """{"reveal": bool, "kinds": {kind: [examples, newest first]}} (one kind if given)."""
        kinds = {
            name: [example.to_json() for example in reversed(examples)]
            for name, examples in self._kinds.items()
            if kind is None or name == kind
        }
        return {"reveal": self.reveal, "kinds": kinds}

    def examples(self, kind: str) -> list[MismatchExample]:
        """The examples kept for `kind`, newest first."""
        return list(reversed(self._kinds.get(kind, ())))

    # -- rate-limited log --------------------------------------------------------------------

    def _log(self, example: MismatchExample) -> None:
        now = self._clock()
        if self._window_start is None or now - self._window_start >= 1.0:
            self.flush_log(now)
            self._window_start = now
            self._window_lines = 0
        if self._window_lines < self.log_per_second:
            self._window_lines += 1
            line = {"event": "mismatch", **example.to_json()}
            self._logger.warning("%s", json.dumps(line, separators=(",", ":")))
        else:
            self._suppressed += 1
            self.suppressed_total += 1

    def flush_log(self, now: float | None = None) -> None:
        """Log how many example lines the limit left out, once their window is over.

        Called by record() itself; call it from a timer too if a burst may be the last.
        """
        if not self._suppressed or self._window_start is None:
            return
        now = self._clock() if now is None else now
        if now - self._window_start < 1.0:
            return
        summary = {
            "event": "mismatch_log_suppressed",
            "suppressed": self._suppressed,
            "limit_per_second": self.log_per_second,
        }
        self._logger.warning("%s", json.dumps(summary, separators=(",", ":")))
        self._suppressed = 0


def mismatches_route(examples: MismatchExamples) -> Handler:
    """The GET /api/mismatches handler for AdminServer.add_route; `?kind=value` filters."""

    async def handler(request: Request) -> Response:
        kinds = request.query.get("kind")
        return Response.json(examples.to_json(kinds[-1] if kinds else None))

    return handler
