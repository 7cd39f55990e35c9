"""Memcached operations on the Redis layout: typed async calls over a RedisPool.

Writes go through the Lua functions of memcached.lua (one key each, atomic); reads use
MGET/GETEX and decode the flags|cas header here. Exptimes are converted with layout.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any, TypeVar, final

from proxy.memcache.words import DELTA_MODES, STORE_MODES, Mode, Status
from proxy.redis.cluster import ClusterPool, detect_cluster
from proxy.redis.connection import (
    DEFAULT_OPTIONS,
    ConnectionOptions,
    RedisConnection,
    missing_function,
)
from proxy.redis.errors import RedisError, RedisProtocolError, RedisReplyError, RedisUnavailable
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
from proxy.redis.pool import FAILOVER_WINDOW, RedisPool, WritesLost
from proxy.redis.resp import Arg, Reply, parse_info
from proxy.redis.topology import WriteLog
from proxy.redis.url import RedisURL, parse_url

log = logging.getLogger(__name__)

LIBRARY_RESOURCE = "memcached.lua"


def function_library() -> str:
    """Source of the `memshadow` Redis Functions library shipped with the package."""
    return resources.files("proxy.redis").joinpath(LIBRARY_RESOURCE).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class StoreResult:
    status: Status  # STORED, NOT_STORED, EXISTS, NOT_FOUND or TOO_LARGE
    cas: int | None = None
    """The new Redis cas when STORED."""


@dataclass(frozen=True, slots=True)
class DeltaResult:
    status: Status  # OK (value: the new number), CREATED (value: J), NOT_FOUND, NON_NUMERIC, EXISTS
    value: int | None = None
    """The new number (OK) or the initial value (CREATED)."""
    cas: int | None = None


_T = TypeVar("_T")

ExpiryArg = int | Expiry
"""A memcached exptime (converted with the store's clock) or an already converted Expiry."""


_NO_EXPIRY_ARGS = NO_EXPIRY.args()


# Commands and replies, sans-IO: shared by the async methods and the callback ones -------------
#
# Statuses are looked up by their reply bytes rather than through the enum's constructor and
# the str.decode() of the reply: the callback path runs once per shadowed request.


def _by_reply(*statuses: Status) -> dict[bytes, Status]:
    return {status.value.encode(): status for status in statuses}


# What each function may answer.
_STORE_STATUSES = _by_reply(
    Status.STORED, Status.NOT_STORED, Status.EXISTS, Status.NOT_FOUND, Status.TOO_LARGE
)
_DELTA_STATUSES = _by_reply(
    Status.OK, Status.CREATED, Status.NOT_FOUND, Status.NON_NUMERIC, Status.EXISTS
)
_TOUCH_STATUSES = _by_reply(Status.TOUCHED, Status.NOT_FOUND)
_DELETE_STATUSES = _by_reply(Status.DELETED, Status.NOT_FOUND, Status.EXISTS)
# Valid modes and ops, as plain str: StrEnum's .value is a property lookup on every call.
_STORE_MODES: dict[str, str] = {mode.value: mode.value for mode in STORE_MODES}
_DELTA_OPS: dict[str, str] = {op.value: op.value for op in DELTA_MODES}


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
    mode: Mode | str,
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
        raise ValueError(f"{mode!r} is not a storage mode")
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


_STORE_RESULTS = {status: StoreResult(status) for status in _STORE_STATUSES.values()}


def decode_store(reply: Reply) -> StoreResult:
    """mc_store's reply: {status} or {STORED, new cas}."""
    status, fields = _status(reply, _STORE_STATUSES, "mc_store")
    if status is Status.STORED:
        return StoreResult(status, _int_field(fields, 1, "mc_store"))
    return _STORE_RESULTS[status]


def delta_arguments(
    op: Mode | str,
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
        raise ValueError(f"{op!r} is not incr or decr")
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
    if status is Status.OK or status is Status.CREATED:
        return DeltaResult(
            status, _int_field(fields, 1, "mc_delta"), _int_field(fields, 2, "mc_delta")
        )
    return DeltaResult(status)


def decode_touch(reply: Reply) -> Status:
    """mc_touch's reply: {status}."""
    return _status(reply, _TOUCH_STATUSES, "mc_touch")[0]


def decode_del(reply: Reply) -> Status:
    """DEL's reply (the number of keys deleted) as a delete status."""
    return Status.DELETED if reply == 1 else Status.NOT_FOUND


def decode_cas_delete(reply: Reply) -> Status:
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


@final
class Command:
    """One Memcached operation on Redis, described once: the key it is routed by, its
    arguments, whether it writes, and its reply's decoder. Sent with RedisStore.send, it is
    itself the reply's callback (no closure per command): it decodes the reply, loads the
    function library again when Redis lost it (once), and calls `done`."""

    __slots__ = (
        "args",
        "conn",
        "context",
        "decode",
        "done",
        "retried",
        "rkey",
        "sent_at",
        "write",
    )

    def __init__(
        self,
        rkey: bytes,
        args: tuple[Arg, ...],
        decode: Callable[[Reply], Any],
        *,
        write: bool = False,
    ) -> None:
        self.rkey = rkey
        self.args = args
        self.decode = decode
        self.write = write
        # Set by its user and by send(): what it was sent for, whom to tell, and where.
        self.context: object = None
        self.done: Callable[[Command, Any, RedisError | None], None] | None = None
        self.conn: RedisConnection | None = None
        self.sent_at = 0.0  # perf_counter
        self.retried = False

    def __call__(self, reply: Reply, error: RedisError | None) -> None:
        done = self.done
        assert done is not None
        if error is None:
            try:
                result = self.decode(reply)
            except RedisError as exc:
                done(self, None, exc)
                return
            done(self, result, None)
            return
        conn = self.conn
        if (
            not self.retried
            and conn is not None
            and conn.library is not None
            and isinstance(error, RedisReplyError)
            and missing_function(error)
        ):
            self.retried = True  # Redis lost the library (a restart without persistence)
            conn.after_reload(self, self.args)
            return
        done(self, None, error)


class _Reads:
    """The callback of an MGET of `count` keys: the items in order, or the error."""

    __slots__ = ("context", "count", "done")

    def __init__(self, count: int, done: ReadsDone, context: object) -> None:
        self.count = count
        self.done = done
        self.context = context

    def __call__(self, reply: Reply, error: RedisError | None) -> None:
        if error is not None:
            self.done(None, error, self.context)
            return
        if not isinstance(reply, list) or len(reply) != self.count:
            error = RedisProtocolError(f"MGET: unexpected reply {reply!r}")
            self.done(None, error, self.context)
            return
        try:
            items = [decode_item(raw) for raw in reply]
        except RedisError as exc:
            self.done(None, exc, self.context)
            return
        self.done(items, None, self.context)


ReadsDone = Callable[[list[Item | None] | None, RedisError | None, object], None]
"""The completion of send_reads: (items, None, context) or (None, the error, context)."""


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
        self._options = DEFAULT_OPTIONS  # (from_url's: for the cluster detection)
        pool.on_writes_lost = self._writes_lost

    @classmethod
    def from_url(
        cls,
        url: str | RedisURL,
        options: ConnectionOptions = DEFAULT_OPTIONS,
        *,
        size: int = 4,
        item_size_max: int = DEFAULT_ITEM_SIZE_MAX,
        slab_chunk_max: int = DEFAULT_SLAB_CHUNK_MAX,
        key_prefix: bytes = b"",
        cluster: ClusterMode | str = ClusterMode.OFF,
        failover_window: float = FAILOVER_WINDOW,
    ) -> RedisStore:
        """A store over a new pool of `size` connections a primary, each with `options` and
        the function library (call start()). cluster: "true" for a Redis Cluster, "auto" to
        ask the server at start()."""
        parsed = parse_url(url)
        mode = ClusterMode(cluster)
        options = dataclasses.replace(options, library=function_library())

        def make_pool(is_cluster: bool) -> RedisPool | ClusterPool:
            if is_cluster:  # (its node pools check that they reach primaries)
                return ClusterPool(parsed, size, options, failover_window=failover_window)
            # One Redis: its connections wait while the endpoint leads to a replica.
            single = dataclasses.replace(options, require_primary=True)
            return RedisPool(parsed, size, single, failover_window=failover_window)

        first = make_pool(mode is ClusterMode.ON) if mode is not ClusterMode.AUTO else None
        store = cls(
            first if first is not None else _Undecided(parsed),
            item_size_max=item_size_max,
            slab_chunk_max=slab_chunk_max,
            key_prefix=key_prefix,
        )
        store._options = options
        if first is None:
            store._make_pool = make_pool
        return store

    async def start(self) -> bool:
        """Connect (after finding out whether the server is a cluster, when that is still to
        decide: in the background until it answers); True when connected."""
        if self._make_pool is not None and self._deciding is None:
            self._deciding = asyncio.get_running_loop().create_task(self._decide())
            with contextlib.suppress(TimeoutError):
                deciding = asyncio.shield(self._deciding)
                await asyncio.wait_for(deciding, self._options.connect_timeout + 1)
            return self.pool.is_connected
        return await self.pool.start()

    async def _decide(self) -> None:
        assert self._make_pool is not None
        url = self.pool.url
        delay = 0.1
        while True:
            try:
                is_cluster = await detect_cluster(url, self._options)
                break
            except RedisError as exc:
                if delay == 0.1:  # once: the connect failures have their own summaries
                    log.warning("redis %s: cannot tell whether it is a cluster yet: %s", url, exc)
            # (not in the except block: see RedisConnection._supervise)
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

    # -- the operations: one description each (its command and its reply's decoder) ------
    #
    # How a Command is sent is the transport's business: awaited (call), with a completion
    # (send), or many reads in one MGET (send_reads).

    def get_command(self, key: bytes) -> Command:
        """get/gets/mg of one key: the item, or None on a miss."""
        rkey = self._rkey(key)
        return Command(rkey, (b"GET", rkey), decode_item)

    def gat_command(self, exptime: ExpiryArg, key: bytes) -> Command:
        """gat/gats of one key: read and set the TTL like touch; the cas does not change."""
        rkey = self._rkey(key)
        return Command(rkey, getex_command(rkey, self.expiry(exptime)), decode_item, write=True)

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
    ) -> Command:
        """set/add/replace/append/prepend/cas: a StoreResult (ValueError when an argument is
        out of range).

        cas: required for CAS (0 never matches); for APPEND/PREPEND a non-zero cas must match
        (ms MA/MP with C). too_large_deletes: whether a value over the limit deletes the key;
        None means "only for SET" (classic commands); ms passes True for every mode.
        Append/prepend keep the item's own flags and TTL; their flags argument only counts
        for the size check, as in memcached (non-zero flags lower the limit by 4 bytes).
        """
        limit = max_value_len(item_size_max or self.item_size_max, len(key))
        expiry = self._expiry_args(exptime)
        args = store_arguments(mode, flags, expiry, data, cas, limit, too_large_deletes)
        rkey = self._rkey(key)
        return Command(rkey, (b"FCALL", b"mc_store", 1, rkey, *args), decode_store, write=True)

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
    ) -> Command:
        """incr/decr, and ma with C (cas), N (create = its TTL), J (initial), T (ttl): a
        DeltaResult.

        On autovivify both N and T set the TTL in memcached, in request order: by default T
        (given after N) wins; create_ttl_wins=True when N came after T. On an existing item
        memcached 1.6.18 applies T only when the new number is not longer than the stored
        value (in-place rewrite); the functions do the same.
        """
        absent = (b"", b"")
        args = delta_arguments(
            op,
            delta,
            cas,
            absent if create is None else self.expiry(create).args(),
            initial,
            absent if ttl is None else self.expiry(ttl).args(),
            max_numeric_len(self.slab_chunk_max, len(key)),
            create_ttl_wins,
        )
        rkey = self._rkey(key)
        return Command(rkey, (b"FCALL", b"mc_delta", 1, rkey, *args), decode_delta, write=True)

    def touch_command(self, key: bytes, exptime: ExpiryArg) -> Command:
        """A new TTL on an existing item (the cas does not change): TOUCHED or NOT_FOUND."""
        rkey = self._rkey(key)
        args = (b"FCALL", b"mc_touch", 1, rkey, *self._expiry_args(exptime))
        return Command(rkey, args, decode_touch, write=True)

    def delete_command(self, key: bytes, cas: int | None = None) -> Command:
        """delete, or md with C (cas must match exactly; 0 never matches)."""
        rkey = self._rkey(key)
        if cas is None:
            return Command(rkey, (b"DEL", rkey), decode_del, write=True)
        check_cas(cas)
        args = (b"FCALL", b"mc_delete", 1, rkey, cas)
        return Command(rkey, args, decode_cas_delete, write=True)

    # -- the transports ---------------------------------------------------------------------

    async def call(self, command: Command) -> Any:
        """Send `command` and return its decoded result (a missing function library is
        loaded again, once). Raises RedisError."""
        conn = self._route(command)
        args = command.args
        if args[0] != b"FCALL":
            return command.decode(await conn.execute(*args))
        try:
            return command.decode(await conn.execute(*args))
        except RedisReplyError as exc:
            if conn.library is None or not missing_function(exc):
                raise
        # (Awaited outside the except block: compiled, an await inside it left the handled
        # error as the context of unrelated later exceptions.)
        await conn.reload_library()
        return command.decode(await conn.execute(*args))

    def send(
        self, command: Command, done: Callable[[Command, Any, RedisError | None], None]
    ) -> None:
        """Send `command`; `done(command, result, None)` or `done(command, None, error)` is
        called once, later. Raises RedisError at once when it cannot be sent (`done` is then
        never called). The command itself is the reply's callback: no closure per call."""
        conn = self._route(command)
        command.done = done
        command.conn = conn
        command.sent_at = time.perf_counter()
        conn.send_callback(command, *command.args)

    def send_reads(self, keys: Sequence[bytes], done: ReadsDone, context: object) -> None:
        """Plain reads of several keys in one MGET, on the connection of the first (they
        must share it: see batches()); `done` is called once, later (ReadsDone). Raises
        RedisError at once when it cannot be sent."""
        rkeys = [self._rkey(key) for key in keys]
        conn = self.pool.connection_for(rkeys[0])
        conn.send_callback(_Reads(len(rkeys), done, context), b"MGET", *rkeys)

    def batches(self, keys: Sequence[bytes]) -> list[list[int]] | None:
        """Which of `keys` can go in one MGET together (positions, grouped by connection),
        or None when reads cannot be batched (a cluster: keys of different slots)."""
        if self.is_cluster:
            return None
        pool = self.pool
        prefix = self.key_prefix
        groups: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            groups.setdefault(pool.index_for(prefix + key if prefix else key), []).append(
                position
            )
        return list(groups.values())

    def _rkey(self, key: bytes) -> bytes:
        prefix = self.key_prefix
        return prefix + key if prefix else key

    def _route(self, command: Command) -> RedisConnection:
        conn = self.pool.connection_for(command.rkey)
        if command.write:  # (logged: a failover may lose it, WriteLog)
            self.pool.writes.add(time.perf_counter(), command.rkey)
        return conn

    # -- the same, awaited (tests, repairs, re-reads) -------------------------------------

    async def get(self, key: bytes) -> Item | None:
        result: Item | None = await self.call(self.get_command(key))
        return result

    async def gat(self, exptime: ExpiryArg, key: bytes) -> Item | None:
        result: Item | None = await self.call(self.gat_command(exptime, key))
        return result

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
    ) -> StoreResult:
        command = self.store_command(
            mode,
            key,
            flags,
            exptime,
            data,
            cas,
            item_size_max=item_size_max,
            too_large_deletes=too_large_deletes,
        )
        result: StoreResult = await self.call(command)
        return result

    async def delta(
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
    ) -> DeltaResult:
        command = self.delta_command(
            key,
            op,
            delta,
            cas=cas,
            create=create,
            initial=initial,
            ttl=ttl,
            create_ttl_wins=create_ttl_wins,
        )
        result: DeltaResult = await self.call(command)
        return result

    async def touch(self, key: bytes, exptime: ExpiryArg) -> Status:
        result: Status = await self.call(self.touch_command(key, exptime))
        return result

    async def delete(self, key: bytes, cas: int | None = None) -> Status:
        result: Status = await self.call(self.delete_command(key, cas))
        return result

    async def evicted_keys(self) -> int:
        """Redis's INFO stats evicted_keys, summed over the primaries."""
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
