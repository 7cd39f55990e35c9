"""The last few operations of recently used keys, as the shadow saw them, for mismatch examples.

Bounded twice: at most `per_key` entries for a key, at most `keys` keys (the oldest key is
forgotten first). An entry holds only protocol words and times, never a value.
"""

from __future__ import annotations

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


# What add() takes: a Step's fields as a plain tuple (built for every replayed operation: a
# tuple literal costs a tenth of a NamedTuple's constructor).
StepTuple = tuple[str, str, str, float, int]


class OpHistory:
    """Two generations of dicts of lists: a key seen in the current generation is found at
    once; when the current one holds keys/2 keys it becomes the old one and the previous old
    one is dropped, so at most `keys` keys are remembered, at O(1) per operation.

    Measured (100,000 distinct keys, each operation on a new key, as memcaslap does): 0.6 us
    an add, against 4.1 us for an OrderedDict of deque(maxlen=8) (a deque allocates a block
    of 64 slots); on hot keys 0.34 us against 1.35 us (timeit, harness overhead included).
    """

    def __init__(self, keys: int = KEYS, per_key: int = PER_KEY) -> None:
        self.keys = keys
        self.per_key = per_key
        self._young: dict[bytes, list[StepTuple]] = {}
        self._old: dict[bytes, list[StepTuple]] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def add(self, key: bytes, step: StepTuple) -> None:
        steps = self._young.get(key)
        if steps is None:
            steps = self._old.pop(key, None)
            if steps is None:
                steps = []
            young = self._young
            young[key] = steps
            if len(young) >= self.keys // 2:
                self._old = young
                self._young = {}
        steps.append(step)
        if len(steps) > 2 * self.per_key:  # trimmed now and then, not on every add
            del steps[: -self.per_key]

    def steps(self, key: bytes) -> list[Step]:
        found = self._young.get(key)
        if found is None:
            found = self._old.get(key, [])
        return [Step(*step) for step in found[-self.per_key :]]

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
        self._young.clear()
        self._old.clear()


__all__ = ["KEYS", "PER_KEY", "OpHistory", "Step", "StepTuple"]
