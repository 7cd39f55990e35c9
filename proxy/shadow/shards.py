"""Which shadow worker judges a key (workers: N): every key belongs to one, so its operations
are judged by one engine in one order, whichever proxy process served them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final
from zlib import crc32

SHARD_SEED: Final = 0x73686172
"""Initial CRC value of the shard hash ("shar"), unlike the sampler's: sampled keys are the
ones with small sampler hashes, and they must still spread evenly over the shards."""


def shard_of(key: bytes, shards: int) -> int:
    """The shadow worker (0 .. shards-1) that judges `key`."""
    return crc32(key, SHARD_SEED) % shards


def shards_for(keys: Iterable[bytes], shards: int, sampled: Callable[[bytes], bool]) -> set[int]:
    """The workers a captured request goes to: the shards of its sampled keys (each judges
    only its own keys of a multi-key get), or all of them for a keyless one (flush_all)."""
    targets = {shard_of(key, shards) for key in keys if sampled(key)}
    return targets or set(range(shards))


__all__ = ["SHARD_SEED", "shard_of", "shards_for"]
