"""Memcached operations on the Redis layout: typed async calls over a RedisPool.

Writes go through the Lua functions of memcached.lua (one key each, atomic); reads use
MGET/GETEX and decode the flags|cas header here. Exptimes are converted with layout.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any, TypeAlias, TypeVar

from proxy.config import RedisURL
from proxy.redis.client import (
    FAILOVER_WINDOW,
    Arg,
    RedisConnection,
    RedisPool,
    Reply,
    ReplyCallback,
    WritesLost,
    parse_info,
)
from proxy.redis.cluster import ClusterPool, detect_cluster
from proxy.redis.errors import RedisError, RedisProtocolError, RedisUnavailable
from proxy.redis.layout import (
    DEFAULT_ITEM_SIZE_MAX,
    DEFAULT_SLAB_CHUNK_MAX,
    NO_EXPIRY,
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
from proxy.redis.topology import WriteLog

log = logging.getLogger(__name__)

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


_T = TypeVar("_T")

ExpiryArg = int | Expiry
"""A memcached exptime (converted with the store's clock) or an already converted Expiry."""

ResultCallback: TypeAlias = Callable[[_T | None, RedisError | None], None]
"""Completion of a *_callback call: exactly once, (result, None) or (None, the RedisError)."""

_NO_EXPIRY_ARGS = NO_EXPIRY.args()


# Commands and replies, sans-IO: shared by the async methods and the callback ones -------------
#
# Statuses are looked up by their reply bytes rather than through the enum's constructor and
# the str.decode() of the reply: the callback path runs once per shadowed request.


def _by_reply(enum: type[StrEnum]) -> dict[bytes, Any]:
    return {member.value.encode(): member for member in enum}


_STORE_STATUSES: dict[bytes, StoreStatus] = _by_reply(StoreStatus)
_DELTA_STATUSES: dict[bytes, DeltaStatus] = _by_reply(DeltaStatus)
_TOUCH_STATUSES: dict[bytes, TouchStatus] = _by_reply(TouchStatus)
_DELETE_STATUSES: dict[bytes, DeleteStatus] = _by_reply(DeleteStatus)
# Valid modes and ops, as plain str: StrEnum's .value is a property lookup on every call.
_STORE_MODES: dict[str, str] = {mode.value: mode.value for mode in StoreMode}
_DELTA_OPS: dict[str, str] = {op.value: op.value for op in DeltaOp}


def _status(reply: Reply, statuses: dict[bytes, _T], function: str) -> tuple[_T, list[Reply]]:
    """The status of a function's {status, ...} array reply, and the reply."""
    if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
        raise RedisProtocolError(f"{function}: unexpected reply {reply!r}")
    status = statuses.get(reply[0])
    if status is None:
        name = reply[0].decode(errors="replace")
        raise RedisProtocolError(f"{function}: unknown status {name!r}")
    return status, reply


def _int_field(reply: list[Reply], index: int, function: str) -> int:
    value = reply[index] if len(reply) > index else None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes) and value.isdigit():
        return int(value)
    raise RedisProtocolError(f"{function}: expected a number at {index} in {reply!r}")


def decode_item(raw: Reply) -> Item | None:
    """A GET/GETEX/MGET entry: the item, or None when the key is missing."""
    if raw is None:
        return None
    if not isinstance(raw, bytes):
        raise RedisProtocolError(f"expected a string value, got {raw!r}")
    return unpack_value(raw)


def store_arguments(
    mode: StoreMode | str,
    flags: int,
    expiry: tuple[bytes, bytes],
    data: bytes,
    cas: int | None,
    limit: int,
    too_large_deletes: bool | None,
) -> tuple[Arg, ...]:
    """The arguments of FCALL mc_store after the key (see RedisStore.store); ValueError when
    they are out of range."""
    checked = _STORE_MODES.get(mode)
    if checked is None:
        raise ValueError(f"{mode!r} is not a valid StoreMode")
    if not 0 <= flags <= U32_MAX:
        raise ValueError(f"flags {flags} out of uint32 range")
    if checked == "cas" and cas is None:
        raise ValueError("cas mode needs a cas value")
    if cas is not None and not 0 <= cas <= U64_MAX:
        raise ValueError(f"cas {cas} out of uint64 range")
    kind, value = expiry
    if too_large_deletes is None:
        return (checked, flags, kind, value, data, cas or 0, limit)
    deletes = b"1" if too_large_deletes else b"0"
    return (checked, flags, kind, value, data, cas or 0, limit, deletes)


_STORE_RESULTS = {status: StoreResult(status) for status in StoreStatus}


def decode_store(reply: Reply) -> StoreResult:
    """mc_store's reply: {status} or {STORED, new cas}."""
    status, fields = _status(reply, _STORE_STATUSES, "mc_store")
    if status is StoreStatus.STORED:
        return StoreResult(status, _int_field(fields, 1, "mc_store"))
    return _STORE_RESULTS[status]


def delta_arguments(
    op: DeltaOp | str,
    delta: int,
    cas: int | None,
    create: tuple[bytes, bytes],
    initial: int,
    ttl: tuple[bytes, bytes],
    numeric_limit: int,
    create_ttl_wins: bool,
) -> tuple[Arg, ...]:
    """The arguments of FCALL mc_delta after the key (see RedisStore.delta); create and ttl
    are expiry argument pairs, (b"", b"") when absent."""
    checked = _DELTA_OPS.get(op)
    if checked is None:
        raise ValueError(f"{op!r} is not a valid DeltaOp")
    for name, number in (("delta", delta), ("initial", initial)):
        if not 0 <= number <= U64_MAX:
            raise ValueError(f"{name} {number} out of uint64 range")
    if cas is not None and not 0 <= cas <= U64_MAX:
        raise ValueError(f"cas {cas} out of uint64 range")
    order = b"TN" if create_ttl_wins else b"NT"
    return (checked, delta, cas or 0, *create, initial, *ttl, numeric_limit, order)


def decode_delta(reply: Reply) -> DeltaResult:
    """mc_delta's reply: {status} or {OK|CREATED, number, new cas}."""
    status, fields = _status(reply, _DELTA_STATUSES, "mc_delta")
    if status in (DeltaStatus.OK, DeltaStatus.CREATED):
        return DeltaResult(
            status, _int_field(fields, 1, "mc_delta"), _int_field(fields, 2, "mc_delta")
        )
    return DeltaResult(status)


def decode_touch(reply: Reply) -> TouchStatus:
    """mc_touch's reply: {status}."""
    return _status(reply, _TOUCH_STATUSES, "mc_touch")[0]


def decode_del(reply: Reply) -> DeleteStatus:
    """DEL's reply (the number of keys deleted) as a delete status."""
    return DeleteStatus.DELETED if reply == 1 else DeleteStatus.NOT_FOUND


def decode_cas_delete(reply: Reply) -> DeleteStatus:
    """mc_delete's reply: {status}."""
    return _status(reply, _DELETE_STATUSES, "mc_delete")[0]


def check_cas(cas: int) -> None:
    """ValueError unless cas is a uint64."""
    if not 0 <= cas <= U64_MAX:
        raise ValueError(f"cas {cas} out of uint64 range")


def getex_command(rkey: bytes, expiry: Expiry) -> tuple[Arg, ...]:
    """GETEX for gat: read the item and set its TTL the way memcached's gat does."""
    if expiry.kind is ExpiryKind.NONE:
        return (b"GETEX", rkey, b"PERSIST")
    if expiry.kind is ExpiryKind.RELATIVE:
        return (b"GETEX", rkey, b"EX", expiry.value)
    if expiry.kind is ExpiryKind.ABSOLUTE:
        return (b"GETEX", rkey, b"PXAT", expiry.value)
    # negative exptime: memcached returns the value, then the item is gone
    return (b"GETEX", rkey, b"PXAT", 1)


def _decoding(decode: Callable[[Reply], _T], done: ResultCallback[_T]) -> ReplyCallback:
    """A ReplyCallback that hands `done` the decoded reply, or the error."""

    def on_reply(reply: Reply, error: RedisError | None) -> None:
        if error is None:
            try:
                result = decode(reply)
            except RedisError as exc:
                done(None, exc)
                return
            done(result, None)
        else:
            done(None, error)

    return on_reply


class ClusterMode(StrEnum):
    """shadow.redis_cluster: whether the Redis is a Redis Cluster (auto: ask it)."""

    AUTO = "auto"
    ON = "true"
    OFF = "false"


class _Undecided:
    """The pool until `auto` has found out whether the server is a cluster: nothing can be
    sent yet (the shadow drops and counts, as when Redis is down)."""

    def __init__(self, url: RedisURL) -> None:
        self.url = url
        self.writes = WriteLog()
        self.on_writes_lost: WritesLost | None = None
        self.is_connected = False

    def connection_for(self, key: bytes) -> RedisConnection:
        raise RedisUnavailable(f"redis {self.url}: not reached yet (is it a cluster?)")

    def index_for(self, key: bytes) -> int:
        return 0

    def primaries(self) -> list[RedisConnection]:
        return []

    async def start(self) -> bool:
        return False

    async def close(self) -> None:
        return None


Pool = RedisPool | ClusterPool | _Undecided


class RedisStore:
    """Memcached semantics on Redis. Every method raises RedisError subclasses on failure."""

    def __init__(
        self,
        pool: Pool,
        *,
        item_size_max: int = DEFAULT_ITEM_SIZE_MAX,
        slab_chunk_max: int = DEFAULT_SLAB_CHUNK_MAX,
        key_prefix: bytes = b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """item_size_max and slab_chunk_max are memcached's (`stats settings`); clock gives
        the unix time used to convert absolute exptimes."""
        self.pool: Pool = pool
        self.item_size_max = item_size_max
        self.slab_chunk_max = slab_chunk_max
        self.key_prefix = key_prefix
        self.clock = clock
        self.on_writes_lost: WritesLost | None = None
        """Told the keys (without the prefix) whose writes a failover of Redis lost."""
        self._make_pool: Callable[[bool], RedisPool | ClusterPool] | None = None
        self._deciding: asyncio.Task[None] | None = None
        self._connect_timeout = 2.0
        self._failures: Counter[str] | None = None  # (for the cluster detection's attempts)
        pool.on_writes_lost = self._writes_lost

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
        service_time: Callable[[float], None] | None = None,
        cluster: ClusterMode | str = ClusterMode.OFF,
        connect_timeout: float = 2.0,
        failover_window: float = FAILOVER_WINDOW,
        failures: Counter[str] | None = None,
    ) -> RedisStore:
        """A store over a new pool that loads the function library (call start());
        `service_time` observes each reply's service time (write to read, seconds).
        cluster: "true" for a Redis Cluster, "auto" to ask the server at start().
        failures: counts failed connection attempts by reason (client.failure_reason)."""
        parsed = RedisURL.parse(url, options=True) if isinstance(url, str) else url
        mode = ClusterMode(cluster)

        def make_pool(is_cluster: bool) -> RedisPool | ClusterPool:
            # One Redis: its connections wait while the endpoint leads to a replica. A
            # cluster's node pools check that themselves.
            kind: Callable[..., RedisPool | ClusterPool] = (
                ClusterPool if is_cluster else functools.partial(RedisPool, require_primary=True)
            )
            return kind(
                parsed,
                size,
                timeout=timeout,
                connect_timeout=connect_timeout,
                max_inflight=max_inflight,
                library=function_library(),
                service_time=service_time,
                failover_window=failover_window,
                failures=failures,
            )

        first = make_pool(mode is ClusterMode.ON) if mode is not ClusterMode.AUTO else None
        store = cls(
            first if first is not None else _Undecided(parsed),
            item_size_max=item_size_max,
            slab_chunk_max=slab_chunk_max,
            key_prefix=key_prefix,
        )
        store._connect_timeout = connect_timeout
        if first is None:
            store._make_pool = make_pool
            store._failures = failures
        return store

    async def start(self) -> bool:
        """Connect (after finding out whether the server is a cluster, when that is still to
        decide: in the background until it answers); True when connected."""
        if self._make_pool is not None and self._deciding is None:
            self._deciding = asyncio.get_running_loop().create_task(self._decide())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._deciding), self._connect_timeout + 1)
            return self.pool.is_connected
        return await self.pool.start()

    async def _decide(self) -> None:
        assert self._make_pool is not None
        url = self.pool.url
        delay = 0.1
        while True:
            try:
                is_cluster = await detect_cluster(
                    url, self._connect_timeout, failures=self._failures
                )
                break
            except RedisError as exc:
                if delay == 0.1:  # once: the connect failures have their own summaries
                    log.warning("redis %s: cannot tell whether it is a cluster yet: %s", url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if is_cluster and url.db:
            log.error(
                "redis %s is a Redis Cluster node, and a cluster has database 0 only: set "
                "shadow.redis to .../0; the shadow stays off",
                url,
            )
            return
        pool = self._make_pool(is_cluster)
        pool.on_writes_lost = self._writes_lost
        if is_cluster:
            log.info("redis %s is a Redis Cluster node: keys go to their slots' primaries", url)
        self.pool = pool
        await pool.start()

    async def close(self) -> None:
        if self._deciding is not None and not self._deciding.done():
            self._deciding.cancel()
            await asyncio.wait((self._deciding,), timeout=1.0)
        await self.pool.close()

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.pool, ClusterPool)

    def _writes_lost(self, rkeys: list[bytes] | None, reason: str) -> None:
        if self.on_writes_lost is None:
            return
        prefix = len(self.key_prefix)
        keys = None if rkeys is None else [rkey[prefix:] for rkey in rkeys]
        self.on_writes_lost(keys, reason)

    def expiry(self, exptime: ExpiryArg) -> Expiry:
        if isinstance(exptime, Expiry):
            return exptime
        return expiry_from_exptime(exptime, self.clock())

    def _expiry_args(self, exptime: ExpiryArg) -> tuple[bytes, bytes]:
        if exptime == 0:  # the common case, without the clock (0 never expires)
            return _NO_EXPIRY_ARGS
        return self.expiry(exptime).args()

    def _conn(self, key: bytes) -> tuple[RedisConnection, bytes]:
        prefix = self.key_prefix
        rkey = prefix + key if prefix else key
        return self.pool.connection_for(rkey), rkey

    def _write(self, key: bytes) -> tuple[RedisConnection, bytes]:
        """_conn() of a write, logged: a failover may lose it (WriteLog)."""
        prefix = self.key_prefix
        rkey = prefix + key if prefix else key
        conn = self.pool.connection_for(rkey)
        self.pool.writes.add(time.perf_counter(), rkey)
        return conn, rkey

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
        args = self._store_arguments(
            mode, key, flags, exptime, data, cas, item_size_max, too_large_deletes
        )
        conn, rkey = self._write(key)
        return decode_store(await conn.fcall("mc_store", rkey, *args))

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
    ) -> None:
        """store() with a callback (see ResultCallback; RedisError or ValueError at once when
        the command cannot be sent)."""
        args = self._store_arguments(
            mode, key, flags, exptime, data, cas, item_size_max, too_large_deletes
        )
        conn, rkey = self._write(key)
        conn.fcall_callback(_decoding(decode_store, done), "mc_store", rkey, *args)

    def _store_arguments(
        self,
        mode: StoreMode | str,
        key: bytes,
        flags: int,
        exptime: ExpiryArg,
        data: bytes,
        cas: int | None,
        item_size_max: int | None,
        too_large_deletes: bool | None,
    ) -> tuple[Arg, ...]:
        limit = max_value_len(item_size_max or self.item_size_max, len(key))
        expiry = self._expiry_args(exptime)
        return store_arguments(mode, flags, expiry, data, cas, limit, too_large_deletes)

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
        args = self._delta_arguments(key, op, delta, cas, create, initial, ttl, create_ttl_wins)
        conn, rkey = self._write(key)
        return decode_delta(await conn.fcall("mc_delta", rkey, *args))

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
    ) -> None:
        """delta() with a callback (see store_callback)."""
        args = self._delta_arguments(key, op, delta, cas, create, initial, ttl, create_ttl_wins)
        conn, rkey = self._write(key)
        conn.fcall_callback(_decoding(decode_delta, done), "mc_delta", rkey, *args)

    def _delta_arguments(
        self,
        key: bytes,
        op: DeltaOp | str,
        delta: int,
        cas: int | None,
        create: ExpiryArg | None,
        initial: int,
        ttl: ExpiryArg | None,
        create_ttl_wins: bool,
    ) -> tuple[Arg, ...]:
        absent = (b"", b"")
        return delta_arguments(
            op,
            delta,
            cas,
            absent if create is None else self.expiry(create).args(),
            initial,
            absent if ttl is None else self.expiry(ttl).args(),
            max_numeric_len(self.slab_chunk_max, len(key)),
            create_ttl_wins,
        )

    async def touch(self, key: bytes, exptime: ExpiryArg) -> TouchStatus:
        """Set a new TTL on an existing item; the cas does not change."""
        conn, rkey = self._write(key)
        return decode_touch(await conn.fcall("mc_touch", rkey, *self._expiry_args(exptime)))

    def touch_callback(
        self, done: ResultCallback[TouchStatus], key: bytes, exptime: ExpiryArg
    ) -> None:
        """touch() with a callback (see store_callback)."""
        conn, rkey = self._write(key)
        args = self._expiry_args(exptime)
        conn.fcall_callback(_decoding(decode_touch, done), "mc_touch", rkey, *args)

    async def delete(self, key: bytes, cas: int | None = None) -> DeleteStatus:
        """delete, or md with C (cas must match exactly; 0 never matches)."""
        conn, rkey = self._write(key)
        if cas is None:
            return decode_del(await conn.execute(b"DEL", rkey))
        check_cas(cas)
        return decode_cas_delete(await conn.fcall("mc_delete", rkey, cas))

    def delete_callback(
        self, done: ResultCallback[DeleteStatus], key: bytes, cas: int | None = None
    ) -> None:
        """delete() with a callback (see store_callback)."""
        conn, rkey = self._write(key)
        if cas is None:
            conn.send_callback(_decoding(decode_del, done), b"DEL", rkey)
            return
        check_cas(cas)
        conn.fcall_callback(_decoding(decode_cas_delete, done), "mc_delete", rkey, cas)

    async def evicted_keys(self) -> int:
        """Redis's INFO stats evicted_keys, summed over the primaries (tells its evictions
        apart from real differences)."""
        primaries = self._primaries()
        replies = await asyncio.gather(*(conn.execute(b"INFO", b"stats") for conn in primaries))
        return sum(int(parse_info(reply).get("evicted_keys", "0")) for reply in replies)

    async def flush(self) -> None:
        """flush_all without delay: FLUSHDB ASYNC on every primary, so the Redis DB (or the
        whole cluster) must be dedicated.

        It goes over one connection of each; writes in flight on other connections are not
        ordered against it (as with two memcached clients racing a flush_all).
        """
        await asyncio.gather(*(conn.execute(b"FLUSHDB", b"ASYNC") for conn in self._primaries()))

    def _primaries(self) -> list[RedisConnection]:
        primaries = self.pool.primaries()
        if not primaries:
            raise RedisUnavailable(f"redis {self.pool.url}: no primary reached yet")
        return primaries

    # reads

    async def get(self, key: bytes) -> Item | None:
        conn, rkey = self._conn(key)
        return decode_item(await conn.execute(b"GET", rkey))

    def get_callback(self, done: ResultCallback[Item], key: bytes) -> None:
        """get() with a callback (see store_callback); a miss is (None, None)."""
        conn, rkey = self._conn(key)
        conn.send_callback(_decoding(decode_item, done), b"GET", rkey)

    async def get_many(self, keys: Sequence[bytes]) -> list[Item | None]:
        """get/gets: one MGET per connection (per slot on a cluster), so each key stays
        ordered after its writes."""
        if not keys:
            return []
        rkeys = [self.key_prefix + key for key in keys]
        groups: dict[int, list[int]] = {}
        for position, rkey in enumerate(rkeys):
            groups.setdefault(self.pool.index_for(rkey), []).append(position)
        futures: list[asyncio.Future[Reply]] = []
        try:
            for positions in groups.values():
                conn = self.pool.connection_for(rkeys[positions[0]])
                futures.append(conn.send(b"MGET", *(rkeys[p] for p in positions)))
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
                items[position] = decode_item(raw)
        return items

    async def gat(self, exptime: ExpiryArg, key: bytes) -> Item | None:
        """gat/gats of one key: read and set the TTL like touch; the cas does not change."""
        conn, rkey = self._write(key)
        return decode_item(await conn.execute(*getex_command(rkey, self.expiry(exptime))))

    def gat_callback(self, done: ResultCallback[Item], exptime: ExpiryArg, key: bytes) -> None:
        """gat() with a callback (see store_callback)."""
        conn, rkey = self._write(key)
        command = getex_command(rkey, self.expiry(exptime))
        conn.send_callback(_decoding(decode_item, done), *command)

    async def gat_many(self, exptime: ExpiryArg, keys: Sequence[bytes]) -> list[Item | None]:
        """gat/gats of several keys: one pipelined GETEX per key."""
        expiry = self.expiry(exptime)
        futures: list[asyncio.Future[Reply]] = []
        try:
            for key in keys:
                conn, rkey = self._write(key)
                futures.append(conn.send(*getex_command(rkey, expiry)))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [decode_item(raw) for raw in await asyncio.gather(*futures)]

    async def pttl(self, key: bytes) -> int:
        """Redis PTTL of the key: milliseconds left, -1 without expiry, -2 when missing."""
        conn, rkey = self._conn(key)
        reply = await conn.execute(b"PTTL", rkey)
        if not isinstance(reply, int):
            raise RedisProtocolError(f"PTTL: unexpected reply {reply!r}")
        return reply
