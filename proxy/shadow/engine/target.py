"""The shadow's target seam: what the engine needs of the store it replays on.

The dispatcher replays, judges and repairs through this interface only. RedisStore (one Redis,
its keys spread over a pool of connections by `pool.index_for(key)`, the key-to-node router)
implements it on one Redis, and on a Redis Cluster (a ClusterPool under the same RedisStore
routes each key to the primary that owns its slot); the verdict logic is the same for both.
Every call concerns one key, so per-key ordering is the target's to keep: one key, one
connection, in call order, a redirected call completed before the key's next one starts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from proxy.redis.client import WritesLost
from proxy.redis.layout import Item
from proxy.redis.store import (
    DeleteStatus,
    DeltaOp,
    DeltaResult,
    ExpiryArg,
    ResultCallback,
    StoreMode,
    StoreResult,
    TouchStatus,
)


@runtime_checkable
class ShadowTarget(Protocol):
    """Per-key Memcached semantics on the shadow store.

    The *_callback calls are the fast path: the command is sent at once and `done` is called
    exactly once with (result, None) or (None, error); they raise RedisError when the
    command cannot be sent. The coroutines are the slow path (repairs, re-reads, cas
    without a mapping).
    """

    item_size_max: int  # memcached's, from `stats settings`: the value size limit
    # Set by the engine: told the keys whose recent writes the target lost (a failover: the
    # old primary had not replicated them), or None for "every key".
    on_writes_lost: WritesLost | None

    def get_callback(self, done: ResultCallback[Item], key: bytes) -> None: ...

    def gat_callback(self, done: ResultCallback[Item], exptime: ExpiryArg, key: bytes) -> None: ...

    def store_callback(
        self,
        done: ResultCallback[StoreResult],
        mode: StoreMode | str,
        key: bytes,
        flags: int,
        exptime: ExpiryArg,
        data: bytes,
        cas: int | None = None,
        *,
        item_size_max: int | None = None,
        too_large_deletes: bool | None = None,
    ) -> None: ...

    def delta_callback(
        self,
        done: ResultCallback[DeltaResult],
        key: bytes,
        op: DeltaOp | str,
        delta: int,
        *,
        cas: int | None = None,
        create: ExpiryArg | None = None,
        initial: int = 0,
        ttl: ExpiryArg | None = None,
        create_ttl_wins: bool = False,
    ) -> None: ...

    def touch_callback(
        self, done: ResultCallback[TouchStatus], key: bytes, exptime: ExpiryArg
    ) -> None: ...

    def delete_callback(
        self, done: ResultCallback[DeleteStatus], key: bytes, cas: int | None = None
    ) -> None: ...

    async def get(self, key: bytes) -> Item | None: ...

    async def gat(self, exptime: ExpiryArg, key: bytes) -> Item | None: ...

    async def store(
        self,
        mode: StoreMode | str,
        key: bytes,
        flags: int,
        exptime: ExpiryArg,
        data: bytes,
        cas: int | None = None,
        *,
        item_size_max: int | None = None,
        too_large_deletes: bool | None = None,
    ) -> StoreResult: ...

    async def delta(
        self,
        key: bytes,
        op: DeltaOp | str,
        delta: int,
        *,
        cas: int | None = None,
        create: ExpiryArg | None = None,
        initial: int = 0,
        ttl: ExpiryArg | None = None,
        create_ttl_wins: bool = False,
    ) -> DeltaResult: ...

    async def touch(self, key: bytes, exptime: ExpiryArg) -> TouchStatus: ...

    async def delete(self, key: bytes, cas: int | None = None) -> DeleteStatus: ...

    async def flush(self) -> None:
        """flush_all replayed: empty the shadow's keyspace (every node)."""
        ...

    async def evicted_keys(self) -> int:
        """Keys the target evicted so far (summed over nodes): classifies `evicted`."""
        ...


__all__ = ["ShadowTarget"]
