"""Mismatch examples: the last few per kind, private by default, for GET /api/mismatches and logs.

Keys and values are turned into keyed hashes (HMAC-SHA256) and lengths when they are recorded,
in the proxy process (the worker sends raw keys), so no plaintext is kept in memory, served or
logged unless the operator opts in: `shadow.reveal_examples` in the config, or the runtime
switch (`set_reveal`, which the admin API allows only behind its token) for the examples
recorded from then on. The secret comes from the operator (MEMSHADOW_EXAMPLES_SECRET or
shadow.examples_secret_file), so a hash is the same across restarts and a suspect key can be
looked up (`lookup`); without one it is random per process.
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
    key_hash: str = ""  # the keyed hash, always (what a lookup matches)
    revealed: bool = False  # recorded with plaintext (key, and value texts in the dicts)

    def to_json(self, *, show_text: bool = True) -> dict[str, JSONValue]:
        """As served; ``show_text`` False shows a revealed example as a private one."""
        reveal = self.revealed and show_text
        shown: dict[str, JSONValue] = {
            "at": round(self.at, 3),
            "time": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
            "kind": self.kind,
            "command": self.command,
            "key": self.key if reveal else self.key_hash or self.key,
            "key_hash": self.key_hash or self.key,
            "memcached": self.memcached if reveal else _hide_text(self.memcached),
            "redis": self.redis if reveal else _hide_text(self.redis),
            "detail": self.detail,
        }
        if self.story is not None:
            shown["story"] = self.story if reveal else _hide_text(self.story)
        return shown


def _hide_text(value: Any) -> Any:
    """A revealed value's text taken out again (length and hash stay)."""
    if isinstance(value, dict):
        return {k: _hide_text(v) for k, v in value.items() if k not in ("text", "truncated")}
    if isinstance(value, list):
        return [_hide_text(item) for item in value]
    return value


class MismatchExamples:
    """The last `per_kind` examples of each mismatch kind, in bounded deques.

    `secret` keys the hashes; when it is None a random one is drawn for this process (hashes
    then only compare within one run). Configure one to compare hashes across instances and
    restarts. `record` takes the two sides as dicts: bytes anywhere in them (values, keys)
    are hashed; str, numbers, bools and None are kept as they are, so they must not carry
    plaintext; other objects are shown by type name only.

    `reveal` (the config's choice) records plaintext too, serves it by default and logs it;
    `set_reveal` switches it at runtime, for the examples recorded from then on, whose
    plaintext is served only to whom the caller allows (`to_json(show_text=...)`) and never
    logged.
    """

    def __init__(
        self,
        per_kind: int = 20,
        reveal: bool = False,
        secret: bytes | None = None,
        *,
        secret_source: str = "given",
        log_per_second: int = 10,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        logger: logging.Logger = log,
    ) -> None:
        if per_kind < 1:
            raise ValueError(f"per_kind must be at least 1, got {per_kind}")
        self.per_kind = per_kind
        self.reveal = reveal  # plaintext is recorded now
        self.reveal_configured = reveal  # ...and by the config: served and logged by default
        self.reveal_since: float | None = wall_clock() if reveal else None
        self._secret = secret if secret is not None else os.urandom(32)
        self.secret_source = secret_source if secret is not None else None
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
    def for_config(
        cls, config: Config, environ: Mapping[str, str] = os.environ
    ) -> MismatchExamples:
        """The examples shadow.examples_per_kind, shadow.reveal_examples and the secret
        (MEMSHADOW_EXAMPLES_SECRET, else shadow.examples_secret_file) ask for."""
        from proxy.config import examples_secret

        shadow = config.shadow
        secret = examples_secret(shadow, environ, config.source)
        return cls(
            per_kind=shadow.examples_per_kind,
            reveal=shadow.reveal_examples,
            secret=secret[0] if secret is not None else None,
            secret_source=secret[1] if secret is not None else "given",
        )

    def set_reveal(self, reveal: bool) -> bool:
        """Record plaintext from now on (or stop); False when nothing changes."""
        if reveal == self.reveal:
            return False
        self.reveal = reveal
        self.reveal_since = self._wall_clock() if reveal else None
        return True

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
        key_hash = self.hash(key)
        example = MismatchExample(
            at=self._wall_clock(),
            kind=kind,
            command=command,
            key=escape_bytes(key) if self.reveal else key_hash,
            memcached=self._private_dict(memcached),
            redis=self._private_dict(redis),
            detail=detail,
            story=None if story is None else self._private_dict(story),
            key_hash=key_hash,
            revealed=self.reveal,
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

    def to_json(
        self, kind: str | None = None, *, show_text: bool | None = None
    ) -> dict[str, JSONValue]:
        """{"reveal": bool, "kinds": {kind: [examples, newest first]}} (one kind if given).
        Plaintext recorded while revealing is shown when ``show_text`` (by default: when
        the config reveals)."""
        show = self.reveal_configured if show_text is None else show_text
        kinds = {
            name: [example.to_json(show_text=show) for example in reversed(examples)]
            for name, examples in self._kinds.items()
            if kind is None or name == kind
        }
        return {"reveal": self.reveal, "kinds": kinds}

    def describe(self) -> dict[str, JSONValue]:
        """How the examples are kept: reveal, since when, where the secret comes from."""
        return {
            "reveal": self.reveal,
            "reveal_configured": self.reveal_configured,
            "reveal_since": self.reveal_since,
            "secret": self.secret_source,  # None: random for this process
            "stable_hashes": self.secret_source is not None,
            "recorded": self.recorded,
        }

    def lookup(self, key: bytes, *, show_text: bool = False) -> dict[str, JSONValue]:
        """A suspect key's hash and the examples kept of it, newest first."""
        key_hash = self.hash(key)
        found = [
            example.to_json(show_text=show_text)
            for examples in self._kinds.values()
            for example in examples
            if example.key_hash == key_hash
        ]
        found.sort(key=lambda shown: -float(shown["at"]))
        return {
            "key_hash": key_hash,
            "stable_hashes": self.secret_source is not None,
            "examples": found,
        }

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
            # Logs carry plaintext only when the config says so, never for a runtime reveal.
            shown = example.to_json(show_text=self.reveal_configured)
            line = {"event": "mismatch", **shown}
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


def mismatches_route(
    examples: MismatchExamples, may_see_text: Callable[[Request], bool] | None = None
) -> Handler:
    """The GET /api/mismatches handler for AdminServer.add_route; `?kind=value` filters.
    ``may_see_text`` says whether a request may see plaintext (the admin token); without it,
    plaintext is shown as the config says."""

    async def handler(request: Request) -> Response:
        kinds = request.query.get("kind")
        kind = kinds[-1] if kinds and kinds[-1] else None
        if may_see_text is None:
            return Response.json(examples.to_json(kind))
        shown = examples.to_json(kind, show_text=may_see_text(request))
        shown["examples"] = examples.describe()
        return Response.json(shown)

    return handler
