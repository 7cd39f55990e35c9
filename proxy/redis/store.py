"""Memcached operations on the Redis layout: typed async calls over a RedisPool.

Writes go through the Lua functions of memcached.lua (one key each, atomic); reads use
MGET/GETEX and decode the flags|cas header here. Exptimes are converted with layout.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import TypeVar

from proxy.redis.client import Arg, RedisConnection, RedisPool, RedisURL, Reply
from proxy.redis.errors import RedisProtocolError
from proxy.redis.layout import (
    DEFAULT_ITEM_SIZE_MAX,
    DEFAULT_SLAB_CHUNK_MAX,
    U32_MAX,
    U64_MAX,
    Expiry,
    ExpiryKind,
    Item,
    expiry_from_exptime,
    max_numeric_len,
    max_value_len,
    unpack_value,
)

LIBRARY_RESOURCE = "memcached.lua"


def function_library() -> str:
    """Source of the `memshadow` Redis Functions library shipped with the package."""
    return resources.files("proxy.redis").joinpath(LIBRARY_RESOURCE).read_text(encoding="utf-8")


class StoreMode(StrEnum):
    SET = "set"
    ADD = "add"
    REPLACE = "replace"
    APPEND = "append"
    PREPEND = "prepend"
    CAS = "cas"


class StoreStatus(StrEnum):
    STORED = "STORED"
    NOT_STORED = "NOT_STORED"
    EXISTS = "EXISTS"
    NOT_FOUND = "NOT_FOUND"
    TOO_LARGE = "TOO_LARGE"  # memcached: SERVER_ERROR object too large for cache


class DeltaOp(StrEnum):
    INCR = "incr"
    DECR = "decr"


class DeltaStatus(StrEnum):
    OK = "OK"  # value is the new number
    CREATED = "CREATED"  # ma N autovivified the item; value is J
    NOT_FOUND = "NOT_FOUND"
    NON_NUMERIC = "NON_NUMERIC"
    EXISTS = "EXISTS"  # cas mismatch


class TouchStatus(StrEnum):
    TOUCHED = "TOUCHED"
    NOT_FOUND = "NOT_FOUND"


class DeleteStatus(StrEnum):
    DELETED = "DELETED"
    NOT_FOUND = "NOT_FOUND"
    EXISTS = "EXISTS"


@dataclass(frozen=True, slots=True)
class StoreResult:
    status: StoreStatus
    cas: int | None = None
    """The new Redis cas when STORED."""


@dataclass(frozen=True, slots=True)
class DeltaResult:
    status: DeltaStatus
    value: int | None = None
    """The new number (OK) or the initial value (CREATED)."""
    cas: int | None = None


_S = TypeVar("_S", bound=StrEnum)

ExpiryArg = int | Expiry
"""A memcached exptime (converted with the store's clock) or an already converted Expiry."""


def _status_reply(reply: Reply, function: str) -> tuple[str, list[Reply]]:
    """Split a function's {status, ...} array reply."""
    if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
        raise RedisProtocolError(f"{function}: unexpected reply {reply!r}")
    return reply[0].decode(), reply


def _status(enum: type[_S], name: str, function: str) -> _S:
    try:
        return enum(name)
    except ValueError:
        raise RedisProtocolError(f"{function}: unknown status {name!r}") from None


def _int_field(reply: list[Reply], index: int, function: str) -> int:
    value = reply[index] if len(reply) > index else None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes) and value.isdigit():
        return int(value)
    raise RedisProtocolError(f"{function}: expected a number at {index} in {reply!r}")


def _decode_item(raw: Reply) -> Item | None:
    if raw is None:
        return None
    if not isinstance(raw, bytes):
        raise RedisProtocolError(f"expected a string value, got {raw!r}")
    return unpack_value(raw)


class RedisStore:
    """Memcached semantics on Redis. Every method raises RedisError subclasses on failure."""

    def __init__(
        self,
        pool: RedisPool,
        *,
        item_size_max: int = DEFAULT_ITEM_SIZE_MAX,
        slab_chunk_max: int = DEFAULT_SLAB_CHUNK_MAX,
        key_prefix: bytes = b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """item_size_max and slab_chunk_max are memcached's (`stats settings`); clock gives
        the unix time used to convert absolute exptimes."""
        self.pool = pool
        self.item_size_max = item_size_max
        self.slab_chunk_max = slab_chunk_max
        self.key_prefix = key_prefix
        self.clock = clock

    @classmethod
    def from_url(
        cls,
        url: str | RedisURL,
        *,
        size: int = 4,
        timeout: float = 1.0,
        max_inflight: int = 1024,
        item_size_max: int = DEFAULT_ITEM_SIZE_MAX,
        slab_chunk_max: int = DEFAULT_SLAB_CHUNK_MAX,
        key_prefix: bytes = b"",
    ) -> RedisStore:
        """A store over a new pool that loads the function library (call start())."""
        pool = RedisPool(
            url, size, timeout=timeout, max_inflight=max_inflight, library=function_library()
        )
        return cls(
            pool, item_size_max=item_size_max, slab_chunk_max=slab_chunk_max, key_prefix=key_prefix
        )

    async def start(self) -> bool:
        return await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    def expiry(self, exptime: ExpiryArg) -> Expiry:
        if isinstance(exptime, Expiry):
            return exptime
        return expiry_from_exptime(exptime, self.clock())

    def _conn(self, key: bytes) -> tuple[RedisConnection, bytes]:
        return self.pool.connection_for(key), self.key_prefix + key

    # writes

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
    ) -> StoreResult:
        """set/add/replace/append/prepend/cas.

        cas: required for CAS (0 never matches); for APPEND/PREPEND a non-zero cas must match
        (ms MA/MP with C). too_large_deletes: whether a value over the limit deletes the key;
        None means "only for SET" (classic commands); ms passes True for every mode.
        Append/prepend keep the item's own flags and TTL; their flags argument only counts
        for the size check, as in memcached (non-zero flags lower the limit by 4 bytes).
        """
        mode = StoreMode(mode)
        if not 0 <= flags <= U32_MAX:
            raise ValueError(f"flags {flags} out of uint32 range")
        if mode is StoreMode.CAS and cas is None:
            raise ValueError("cas mode needs a cas value")
        if cas is not None and not 0 <= cas <= U64_MAX:
            raise ValueError(f"cas {cas} out of uint64 range")
        limit = max_value_len(item_size_max or self.item_size_max, len(key))
        kind, value = self.expiry(exptime).args()
        conn, rkey = self._conn(key)
        args: list[Arg] = [mode.value, flags, kind, value, data, cas or 0, limit]
        if too_large_deletes is not None:
            args.append(b"1" if too_large_deletes else b"0")
        name, reply = _status_reply(await conn.fcall("mc_store", rkey, *args), "mc_store")
        status = _status(StoreStatus, name, "mc_store")
        if status is StoreStatus.STORED:
            return StoreResult(status, _int_field(reply, 1, "mc_store"))
        return StoreResult(status)

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
    ) -> DeltaResult:
        """incr/decr, and ma with C (cas), N (create = its TTL), J (initial), T (ttl).

        On autovivify both N and T set the TTL in memcached, in request order: by default T
        (given after N) wins; create_ttl_wins=True when N came after T. On an existing item
        memcached 1.6.18 applies T only when the new number is not longer than the stored
        value (in-place rewrite); the functions do the same.
        """
        op = DeltaOp(op)
        for name, number in (("delta", delta), ("initial", initial)):
            if not 0 <= number <= U64_MAX:
                raise ValueError(f"{name} {number} out of uint64 range")
        if cas is not None and not 0 <= cas <= U64_MAX:
            raise ValueError(f"cas {cas} out of uint64 range")
        create_args: tuple[bytes, bytes] = (b"", b"")
        if create is not None:
            create_args = self.expiry(create).args()
        ttl_args: tuple[bytes, bytes] = (b"", b"")
        if ttl is not None:
            ttl_args = self.expiry(ttl).args()
        conn, rkey = self._conn(key)
        name, reply = _status_reply(
            await conn.fcall(
                "mc_delta",
                rkey,
                op.value,
                delta,
                cas or 0,
                *create_args,
                initial,
                *ttl_args,
                max_numeric_len(self.slab_chunk_max, len(key)),
                b"TN" if create_ttl_wins else b"NT",
            ),
            "mc_delta",
        )
        status = _status(DeltaStatus, name, "mc_delta")
        if status in (DeltaStatus.OK, DeltaStatus.CREATED):
            return DeltaResult(
                status, _int_field(reply, 1, "mc_delta"), _int_field(reply, 2, "mc_delta")
            )
        return DeltaResult(status)

    async def touch(self, key: bytes, exptime: ExpiryArg) -> TouchStatus:
        """Set a new TTL on an existing item; the cas does not change."""
        conn, rkey = self._conn(key)
        name, _ = _status_reply(
            await conn.fcall("mc_touch", rkey, *self.expiry(exptime).args()), "mc_touch"
        )
        return _status(TouchStatus, name, "mc_touch")

    async def delete(self, key: bytes, cas: int | None = None) -> DeleteStatus:
        """delete, or md with C (cas must match exactly; 0 never matches)."""
        conn, rkey = self._conn(key)
        if cas is None:
            deleted = await conn.execute(b"DEL", rkey)
            return DeleteStatus.DELETED if deleted == 1 else DeleteStatus.NOT_FOUND
        if not 0 <= cas <= U64_MAX:
            raise ValueError(f"cas {cas} out of uint64 range")
        name, _ = _status_reply(await conn.fcall("mc_delete", rkey, cas), "mc_delete")
        return _status(DeleteStatus, name, "mc_delete")

    async def evicted_keys(self) -> int:
        """Redis's INFO stats evicted_keys (tells its evictions apart from real differences)."""
        reply = await self.pool.connections[0].execute(b"INFO", b"stats")
        if isinstance(reply, bytes):
            for line in reply.split(b"\r\n"):
                if line.startswith(b"evicted_keys:"):
                    return int(line.split(b":", 1)[1])
        return 0

    async def flush(self) -> None:
        """flush_all without delay: FLUSHDB ASYNC, so the Redis DB must be dedicated.

        It goes over the first connection only; writes in flight on other connections are not
        ordered against it (as with two memcached clients racing a flush_all).
        """
        await self.pool.connections[0].execute(b"FLUSHDB", b"ASYNC")

    # reads

    async def get(self, key: bytes) -> Item | None:
        conn, rkey = self._conn(key)
        return _decode_item(await conn.execute(b"GET", rkey))

    async def get_many(self, keys: Sequence[bytes]) -> list[Item | None]:
        """get/gets: one MGET per connection, so each key stays ordered after its writes."""
        if not keys:
            return []
        groups: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            groups.setdefault(self.pool.index_for(key), []).append(position)
        futures: list[asyncio.Future[Reply]] = []
        try:
            for index, positions in groups.items():
                conn = self.pool.connections[index]
                rkeys = [self.key_prefix + keys[p] for p in positions]
                futures.append(conn.send(b"MGET", *rkeys))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        replies = await asyncio.gather(*futures)
        items: list[Item | None] = [None] * len(keys)
        for positions, reply in zip(groups.values(), replies, strict=True):
            if not isinstance(reply, list) or len(reply) != len(positions):
                raise RedisProtocolError(f"MGET: unexpected reply {reply!r}")
            for position, raw in zip(positions, reply, strict=True):
                items[position] = _decode_item(raw)
        return items

    def _getex_args(self, rkey: bytes, exptime: ExpiryArg) -> tuple[Arg, ...]:
        expiry = self.expiry(exptime)
        if expiry.kind is ExpiryKind.NONE:
            return (b"GETEX", rkey, b"PERSIST")
        if expiry.kind is ExpiryKind.RELATIVE:
            return (b"GETEX", rkey, b"EX", expiry.value)
        if expiry.kind is ExpiryKind.ABSOLUTE:
            return (b"GETEX", rkey, b"PXAT", expiry.value)
        # negative exptime: memcached returns the value, then the item is gone
        return (b"GETEX", rkey, b"PXAT", 1)

    async def gat(self, exptime: ExpiryArg, key: bytes) -> Item | None:
        """gat/gats of one key: read and set the TTL like touch; the cas does not change."""
        conn, rkey = self._conn(key)
        return _decode_item(await conn.execute(*self._getex_args(rkey, exptime)))

    async def gat_many(self, exptime: ExpiryArg, keys: Sequence[bytes]) -> list[Item | None]:
        """gat/gats of several keys: one pipelined GETEX per key."""
        expiry = self.expiry(exptime)
        futures: list[asyncio.Future[Reply]] = []
        try:
            for key in keys:
                conn, rkey = self._conn(key)
                futures.append(conn.send(*self._getex_args(rkey, expiry)))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [_decode_item(raw) for raw in await asyncio.gather(*futures)]

    async def pttl(self, key: bytes) -> int:
        """Redis PTTL of the key: milliseconds left, -1 without expiry, -2 when missing."""
        conn, rkey = self._conn(key)
        reply = await conn.execute(b"PTTL", rkey)
        if not isinstance(reply, int):
            raise RedisProtocolError(f"PTTL: unexpected reply {reply!r}")
        return reply
