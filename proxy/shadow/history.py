"""The last few operations of recently used keys, as the shadow saw them, for mismatch examples.

Bounded twice: at most `per_key` entries for a key, at most `keys` keys (the oldest key is
forgotten first). An entry holds only protocol words and times, never a value.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Final, NamedTuple

PER_KEY: Final = 8
KEYS: Final = 4096


class Step(NamedTuple):
    """One operation of a key: its command, each store's outcome, when Memcached answered it
    (perf_counter) and the client connection that sent it."""

    command: str
    memcached: str
    redis: str
    replied_at: float
    session: int


class OpHistory:
    def __init__(self, keys: int = KEYS, per_key: int = PER_KEY) -> None:
        self.keys = keys
        self.per_key = per_key
        self._table: OrderedDict[bytes, deque[Step]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def add(self, key: bytes, step: Step) -> None:
        steps = self._table.get(key)
        if steps is None:
            steps = self._table[key] = deque(maxlen=self.per_key)
            if len(self._table) > self.keys:
                self._table.popitem(last=False)
        steps.append(step)

    def steps(self, key: bytes) -> list[Step]:
        return list(self._table.get(key, ()))

    def describe(self, key: bytes, now: float) -> list[dict[str, Any]]:
        """The key's steps, oldest first, with times in ms relative to `now` (negative:
        before it), ready for an example."""
        return [
            {
                "command": step.command,
                "memcached": step.memcached,
                "redis": step.redis,
                "ms": round((step.replied_at - now) * 1000.0, 1),
                "connection": step.session,
            }
            for step in self.steps(key)
        ]

    def clear(self) -> None:
        self._table.clear()


__all__ = ["KEYS", "PER_KEY", "OpHistory", "Step"]
