"""The last few operations of recently used keys, as the shadow saw them, for mismatch examples.

Bounded by memory, not by a count of keys: at most `steps` operations in all (about 120 bytes
each), and at most `per_key` of them shown for a key. An entry holds only protocol words and
times, never a value. The dispatcher takes a key's steps when it sees a difference (snapshot),
so the story of an example is the one that stood then, whatever the traffic did since.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

PER_KEY: Final = 8
HISTORY_STEPS: Final = 65_536
"""Operations remembered in all by default (about 8 MB): at 100,000 distinct keys a second,
the last half second or more of every key; on hot keys, much longer."""


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
    once; when the current one holds steps/2 operations it becomes the old one and the
    previous old one is dropped, so at most `steps` operations are remembered, at O(1) each.

    Measured (100,000 distinct keys, each operation on a new key, as memcaslap does): 0.6 us
    an add, against 4.1 us for an OrderedDict of deque(maxlen=8) (a deque allocates a block
    of 64 slots); on hot keys 0.34 us against 1.35 us (timeit, harness overhead included).
    """

    def __init__(self, steps: int = HISTORY_STEPS, per_key: int = PER_KEY) -> None:
        self.steps_max = max(steps, 2 * per_key)
        self.per_key = per_key
        self._young: dict[bytes, list[StepTuple]] = {}
        self._old: dict[bytes, list[StepTuple]] = {}
        self._young_steps = 0  # operations held by the young generation

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def add(self, key: bytes, step: StepTuple) -> None:
        steps = self._young.get(key)
        if steps is None:
            steps = self._old.pop(key, None)
            if steps is None:
                steps = []
            else:
                self._young_steps += len(steps)
            self._young[key] = steps
        steps.append(step)
        self._young_steps += 1
        if len(steps) > 2 * self.per_key:  # trimmed now and then, not on every add
            del steps[: -self.per_key]
            self._young_steps -= self.per_key + 1
        if self._young_steps >= self.steps_max // 2:
            self._old = self._young
            self._young = {}
            self._young_steps = 0

    def snapshot(self, key: bytes) -> list[StepTuple]:
        """The key's last steps, oldest first (a copy: later operations do not change it)."""
        found = self._young.get(key)
        if found is None:
            found = self._old.get(key, [])
        return found[-self.per_key :]

    def steps(self, key: bytes) -> list[Step]:
        return [Step(*step) for step in self.snapshot(key)]

    def describe(self, key: bytes, now: float) -> list[dict[str, Any]]:
        """The key's steps, ready for an example (see describe_steps)."""
        return describe_steps(self.snapshot(key), now)

    def clear(self) -> None:
        self._young.clear()
        self._old.clear()
        self._young_steps = 0


def describe_steps(steps: list[StepTuple], now: float) -> list[dict[str, Any]]:
    """Steps oldest first, with times in ms relative to `now` (negative: before it)."""
    return [
        {
            "command": step[0],
            "memcached": str(step[1]),  # (plain text: an enum member does not marshal)
            "redis": str(step[2]),
            "ms": round((step[3] - now) * 1000.0, 1),
            "connection": step[4],
        }
        for step in steps
    ]


__all__ = ["HISTORY_STEPS", "PER_KEY", "OpHistory", "Step", "StepTuple", "describe_steps"]
