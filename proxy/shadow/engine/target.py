"""The shadow's target seam: what the engine needs of the store it replays on.

The engine replays, judges and repairs through this interface only. RedisStore (one Redis,
its keys spread over a pool of connections by `pool.index_for(key)`, the key-to-node router)
implements it on one Redis, and on a Redis Cluster (a ClusterPool under the same RedisStore
routes each key to the primary that owns its slot); the verdict logic is the same for both.
Each operation is described once (a Command: its arguments and its reply's decoder); how it
is sent (awaited, with a completion, or reads batched in one MGET) is the target's business.
Every command concerns one key, so per-key ordering is the target's to keep: one key, one
connection, in send order, a redirected command completed before the key's next one starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from proxy.memcache.words import Mode
from proxy.redis.errors import RedisError
from proxy.redis.layout import Item
from proxy.redis.pool import WritesLost
from proxy.redis.store import Command, ExpiryArg, ReadsDone


@runtime_checkable
class ShadowTarget(Protocol):
    """Per-key Memcached semantics on the shadow store."""

    item_size_max: int  # memcached's, from `stats settings`: the value size limit
    # Set by the engine: told the keys whose recent writes the target lost (a failover: the
    # old primary had not replicated them), or None for "every key".
    on_writes_lost: WritesLost | None

    # -- the operations ------------------------------------------------------------------

    def get_command(self, key: bytes) -> Command: ...

    def gat_command(self, exptime: ExpiryArg, key: bytes) -> Command: ...

    def store_command(
        self,
        mode: Mode | str,
        key: bytes,
        flags: int,
        exptime: ExpiryArg,
        data: bytes,
        cas: int | None = None,
        *,
        item_size_max: int | None = None,
        too_large_deletes: bool | None = None,
    ) -> Command: ...

    def delta_command(
        self,
        key: bytes,
        op: Mode | str,
        delta: int,
        *,
        cas: int | None = None,
        create: ExpiryArg | None = None,
        initial: int = 0,
        ttl: ExpiryArg | None = None,
        create_ttl_wins: bool = False,
    ) -> Command: ...

    def touch_command(self, key: bytes, exptime: ExpiryArg) -> Command: ...

    def delete_command(self, key: bytes, cas: int | None = None) -> Command: ...

    # -- the transports ----------------------------------------------------------------------

    async def call(self, command: Command) -> Any:
        """The decoded result. Raises RedisError."""
        ...

    def send(
        self, command: Command, done: Callable[[Command, Any, RedisError | None], None]
    ) -> None:
        """`done` once, later; RedisError at once when it cannot be sent (Redis down, busy)."""
        ...

    def batches(self, keys: Sequence[bytes]) -> list[list[int]] | None:
        """The positions of `keys` that may share one MGET, or None: never batch."""
        ...

    def send_reads(self, keys: Sequence[bytes], done: ReadsDone, context: object) -> None:
        """Reads of keys of one batch (batches()) in one MGET; `done` once, later."""
        ...

    # -- the rest --------------------------------------------------------------------------

    async def get(self, key: bytes) -> Item | None: ...

    async def store(
        self,
        mode: Mode | str,
        key: bytes,
        flags: int,
        exptime: ExpiryArg,
        data: bytes,
        cas: int | None = None,
        *,
        item_size_max: int | None = None,
        too_large_deletes: bool | None = None,
    ) -> Any: ...

    async def delete(self, key: bytes, cas: int | None = None) -> Any: ...

    async def flush(self) -> None:
        """flush_all replayed: empty the shadow's keyspace (every node)."""
        ...


__all__ = ["ShadowTarget"]
