"""Re-read and repair: both stores read again for a verdict's evidence, and Redis made to hold
Memcached's item, fenced so that the operations the copy already holds are not replayed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from proxy.config import LISTENER_BITS
from proxy.redis.errors import (
    RedisBusy,
    RedisError,
    RedisGaveUp,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
)
from proxy.redis.layout import Item
from proxy.shadow.engine.evictions import EvictionWatch
from proxy.shadow.engine.keystate import CasMap, KeyState, KeyStates
from proxy.shadow.engine.mcreader import McItem, MemcachedReader, MemcachedUnavailable
from proxy.shadow.engine.scheduler import Scheduler
from proxy.shadow.engine.target import ShadowTarget
from proxy.shadow.engine.translate import McValue, ShadowOp
from proxy.shadow.stats import ShadowStats
from proxy.shadow.words import ErrorKind

LISTENER_MASK: Final = (1 << LISTENER_BITS) - 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Both stores re-read: Memcached's item read between lo and hi (perf_counter), then
    Redis's; ordered: no write of the key may lie between the judged answer and it."""

    mc: McItem | None
    redis: Item | None
    lo: float
    hi: float
    ordered: bool
    why: int = -1  # why the key stopped being in step while it was judged (-1: it did not)


class Repairer:
    """Re-reads a key in both stores and copies Memcached's item into Redis. Runs while the
    key's chain is held (the dispatcher's caller sees to it), so it is ordered with the key's
    operations."""

    def __init__(
        self,
        *,
        readers: Sequence[MemcachedReader],
        target: ShadowTarget,
        keys: KeyStates,
        casmap: CasMap,
        scheduler: Scheduler,
        evictions: EvictionWatch | None,
        stats: ShadowStats,
        reread_delay: float,
        race_window: float,
    ) -> None:
        """reread_delay, race_window: DispatcherSettings'."""
        self.readers = tuple(readers)
        self.target = target
        self.keys = keys
        self.casmap = casmap
        self.scheduler = scheduler
        self.evictions = evictions
        self.stats = stats
        self.reread_delay = reread_delay
        self.race_window = race_window

    async def reread(self, key: bytes, ordered_after: ShadowOp | None = None) -> Snapshot:
        """Read Memcached's item, then Redis's. With `ordered_after` (the operation whose
        answers differed, its chain held), also tell whether the snapshot is ordered: no
        change of the key may lie between that operation and the snapshot, neither an
        operation still on its way nor an eviction (every store's evictions before now are
        known first); when the key stopped being in step meanwhile, why."""
        await asyncio.sleep(self.reread_delay)
        lo = time.perf_counter()
        mc = await self.reader_for(key).get(key)
        hi = time.perf_counter()
        redis = await self.target.get(key)
        self.stats.redis_commands += 1
        ordered = False
        why = -1
        if ordered_after is not None:
            race_window = self.race_window
            caught_up = await self.scheduler.caught_up(hi + race_window, max(1.0, 4 * race_window))
            told = self.evictions is None or (
                await self.evictions.sync()  # (then placed in reply order, as they are due)
                and await self.scheduler.caught_up(time.perf_counter(), 1.0)
            )
            # A change of the key dropped on the way, or evicted, (known only now that
            # everything is in) leaves nothing to prove: the key is no longer in step.
            state = self.keys.peek(key)
            if state is not None and not state.warm:
                why = state.why
            ordered = (
                caught_up
                and told
                and state is not None
                and state.warm
                and not self.scheduler.pending_write(key, hi)
            )
        return Snapshot(mc, redis, lo, hi, ordered, why)

    async def settle(self, key: bytes, state: KeyState) -> None:
        """After a burst of racing writers: make Redis equal Memcached for this key."""
        touches = state.touches
        seq = state.replayed_seq
        try:
            snapshot = await self.reread(key)
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[error_kind(exc)] += 1
            state.mark_lost(seq)
            return
        await self.repair(key, state, seq, snapshot)
        if state.touches == touches:
            state.contended_until = 0.0  # nothing arrived meanwhile: done

    async def repair(self, key: bytes, state: KeyState, seq: int, snapshot: Snapshot | None) -> str:
        """Make Redis hold Memcached's item (value, flags, remaining TTL) as of `snapshot`
        (read now if None), at the chain's current place: the key's operations up to `seq`
        are replayed, and the fence keeps the later ones the copy already holds from being
        applied twice. Returns the action taken, for examples."""
        try:
            if snapshot is None:
                snapshot = await self.reread(key)
            mc = snapshot.mc
            # The remaining TTL as an absolute time, counted from the snapshot (0: none).
            exptime = 0
            if mc is not None and mc.ttl >= 0:
                wall = time.time() - (time.perf_counter() - snapshot.lo)
                exptime = int(wall) + max(mc.ttl, 1)
            # Written even when value and flags are equal already: the TTL may differ (the
            # operations the fence skips may have changed it), and so may the cas pair.
            action = "none needed"
            if mc is not None:
                stored = await self.target.store("set", key, mc.flags, exptime, mc.data)
                self.stats.redis_commands += 1
                if mc.cas and stored.cas is not None:
                    self.casmap.put(key, mc.cas, stored.cas)
                    self.stats.cas_map_entries = len(self.casmap)
                action = "copied to redis"
            elif snapshot.redis is not None:
                await self.target.delete(key)
                self.stats.redis_commands += 1
                action = "deleted in redis"
            state.note_expiry(exptime)  # 0 (absent, or no TTL): never expires
            state.fence_lo = snapshot.lo
            state.fence_hi = snapshot.hi
            state.mark_synced(seq)
            self.stats.repairs += 1
            return action
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[error_kind(exc)] += 1
            state.mark_lost(seq)
            return "repair failed"

    def reader_for(self, key: bytes) -> MemcachedReader:
        """The reader of the Memcached that holds `key`: where its last request went."""
        readers = self.readers
        if len(readers) == 1:
            return readers[0]
        state = self.keys.peek(key)
        index = state.last_session & LISTENER_MASK if state is not None else 0
        return readers[index] if index < len(readers) else readers[0]


def mc_value(item: McItem | None) -> McValue | None:
    """Memcached's re-read item as a value to compare with Redis's."""
    return None if item is None else McValue(item.flags, item.data, None)


def error_kind(exc: BaseException) -> str:
    """The error kind a failure of Redis or of the Memcached re-reader is counted as: an
    ErrorKind, or redis_<refusal> for a command Redis kept refusing."""
    if isinstance(exc, RedisReplyError):
        message = str(exc)
        if message.startswith("OOM"):
            return ErrorKind.SHADOW_OOM
        return ErrorKind.REDIS_REPLY
    if isinstance(exc, RedisGaveUp):
        return f"redis_{exc.reason}"
    if isinstance(exc, RedisTimeout):
        return ErrorKind.REDIS_TIMEOUT
    if isinstance(exc, RedisUnavailable):
        return ErrorKind.REDIS_UNAVAILABLE
    if isinstance(exc, RedisBusy):
        return ErrorKind.REDIS_BUSY
    if isinstance(exc, MemcachedUnavailable):
        return ErrorKind.MEMCACHED_READER
    return ErrorKind.REDIS_OTHER


__all__ = ["Repairer", "Snapshot", "error_kind", "mc_value"]
