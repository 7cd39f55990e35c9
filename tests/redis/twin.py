"""Runs each memcached operation on a real memcached and on the Redis store, and checks that
both answer the same. The memcached side is a blocking raw-socket text-protocol client."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.memcache.words import Mode, Status
from proxy.redis.connection import ConnectionOptions
from proxy.redis.errors import RedisError
from proxy.redis.layout import Item, unpack_value
from proxy.redis.pool import RedisPool
from proxy.redis.store import (
    Command,
    DeltaResult,
    RedisStore,
    StoreResult,
    function_library,
)
from proxy.shadow.engine.classify import signed_overflow
from tests.support import memcached_stats

T = TypeVar("T")

TTL_TOLERANCE_S = 2.0

PATIENCE_S = 60.0
"""How long either server may take to answer (and Redis to be reconnected) before the twin
gives up. Generous: the differential judges the answers, never their speed, and a loaded host
can stall a process for seconds; a command that timed out would also leave the next example
failing at once on a connection still being re-opened (hypothesis then reports the test as
flaky instead of the stall)."""


class MemcachedText:
    """Blocking memcached text-protocol client that returns raw reply lines and blocks."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def _send(self, line: bytes, data: bytes | None) -> None:
        payload = line + b"\r\n"
        if data is not None:
            payload += data + b"\r\n"
        self.sock.sendall(payload)

    def _line(self) -> bytes:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"memcached closed or sent a partial line: {line!r}")
        return line[:-2]

    def _block(self, size: int) -> bytes:
        block = self.file.read(size + 2)
        assert block.endswith(b"\r\n"), block[-10:]
        return block[:-2]

    def line(self, line: bytes, data: bytes | None = None) -> bytes:
        """A command with a one-line reply."""
        self._send(line, data)
        return self._line()

    def values(self, line: bytes) -> list[tuple[bytes, int, bytes, int | None]]:
        """get/gets/gat/gats: (key, flags, data, cas or None) per hit, up to END."""
        self._send(line, None)
        hits = []
        while True:
            reply = self._line()
            if reply == b"END":
                return hits
            parts = reply.split(b" ")
            assert parts[0] == b"VALUE", reply
            data = self._block(int(parts[3]))
            cas = int(parts[4]) if len(parts) > 4 else None
            hits.append((parts[1], int(parts[2]), data, cas))

    def clock_lag(self) -> float:
        """How far memcached's clock (whole seconds, ticked by a timer that a loaded host
        delays) is behind ours: its TTLs read that much longer than Redis's."""
        return max(0.0, time.time() - int(memcached_stats(self.port)["time"]))

    def meta(self, line: bytes, data: bytes | None = None) -> tuple[list[bytes], bytes | None]:
        """A meta command: the reply tokens, and the block of a VA reply."""
        self._send(line, data)
        tokens = self._line().split(b" ")
        if tokens[0] == b"VA":
            return tokens, self._block(int(tokens[1]))
        return tokens, None


def _meta_flag(tokens: list[bytes], flag: bytes) -> bytes | None:
    for token in tokens[1:]:
        if token[:1] == flag:
            return token[1:]
    return None


@dataclass(frozen=True)
class Hit:
    key: bytes
    flags: int
    data: bytes
    has_cas: bool


@dataclass(frozen=True)
class KeyState:
    """What both stores hold for a key (the TTL is compared separately, with a tolerance)."""

    present: bool
    flags: int = 0
    data: bytes = b""


class Mismatch(AssertionError):
    pass


class CallbackStore:
    """RedisStore's single-key operations sent with a completion (RedisStore.send, the
    shadow's fast path) and awaited, so the differential checks both ways of sending a
    command (each completion must come once, never from inside the send)."""

    def __init__(self, store: RedisStore) -> None:
        self.target = store

    async def _send(self, command: Command) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(sent: Command, result: object, error: RedisError | None) -> None:
            assert sent is command
            assert not future.done(), "completion called twice"
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        self.target.send(command, done)
        assert not future.done(), "completion called from inside the send"
        return await future

    async def store(self, *args: Any, **kwargs: Any) -> StoreResult:
        result: StoreResult = await self._send(self.target.store_command(*args, **kwargs))
        return result

    async def delta(self, *args: Any, **kwargs: Any) -> DeltaResult:
        result: DeltaResult = await self._send(self.target.delta_command(*args, **kwargs))
        return result

    async def touch(self, *args: Any) -> Status:
        result: Status = await self._send(self.target.touch_command(*args))
        return result

    async def delete(self, *args: Any) -> Status:
        result: Status = await self._send(self.target.delete_command(*args))
        return result

    async def get(self, key: bytes) -> Item | None:
        result: Item | None = await self._send(self.target.get_command(key))
        return result


class Twin:
    """The same operations on memcached and on RedisStore; each method returns the common
    outcome and raises Mismatch when they differ."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mc_port: int,
        redis_url: str,
        *,
        item_size_max: int,
        slab_chunk_max: int,
        pool_size: int = 2,
    ) -> None:
        self.loop = loop
        self.mc = MemcachedText(mc_port)
        self.item_size_max = item_size_max
        self.slab_chunk_max = slab_chunk_max
        pool = RedisPool(
            redis_url,
            pool_size,
            ConnectionOptions(timeout=PATIENCE_S, library=function_library()),
        )
        self.store = RedisStore(pool, item_size_max=item_size_max, slab_chunk_max=slab_chunk_max)
        assert self.loop.run_until_complete(self.store.start()), "redis did not connect"
        self.callbacks = CallbackStore(self.store)
        self._turn = 0
        self.cas_map: dict[tuple[bytes, int], int] = {}
        self.log: list[str] = []

    def single(self) -> RedisStore | CallbackStore:
        """The store's async methods and its callback ones, in turn."""
        self._turn += 1
        return self.store if self._turn % 2 else self.callbacks

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the twin's loop, once every Redis connection is up."""
        pool = self.store.pool
        if not pool.is_connected and not self.loop.run_until_complete(
            pool.wait_connected(PATIENCE_S)
        ):
            coro.close()
            raise AssertionError(f"redis not connected after {PATIENCE_S:.0f} s")
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.mc.close()
        self.loop.run_until_complete(self.store.close())

    def reset(self) -> None:
        assert self.mc.line(b"flush_all") == b"OK"
        self.run(self.store.flush())
        self.cas_map.clear()
        self.log.clear()

    def _same(self, what: str, mc: T, redis: T) -> T:
        self.log.append(f"{what} -> {mc!r}")
        if mc != redis:
            raise Mismatch(f"{what}: memcached {mc!r} != redis {redis!r}\n{self.history()}")
        return mc

    def history(self) -> str:
        """The operations since the last reset, for a failure hypothesis cannot replay (one
        that depends on time or on the servers' state, not only on the drawn steps)."""
        return "operations since the reset:\n" + "\n".join(f"  {line}" for line in self.log)

    def redis_cas(self, key: bytes, mc_cas: int) -> int:
        """The Redis cas paired with a memcached cas of the key; unknown tokens pass through
        (they match neither store: memcached's counter is small, Redis's are ~1.7e15)."""
        return self.cas_map.get((key, mc_cas), mc_cas)

    # classic commands

    def storage(
        self,
        cmd: str,
        key: bytes,
        flags: int,
        exptime: int,
        data: bytes,
        cas: int | None = None,
    ) -> str:
        line = b"%s %s %d %d %d" % (cmd.encode(), key, flags, exptime, len(data))
        if cmd == "cas":
            assert cas is not None
            line += b" %d" % cas
        reply = self.mc.line(line, data)
        mc = "TOO_LARGE" if reply == b"SERVER_ERROR object too large for cache" else reply.decode()
        result = self.run(
            self.single().store(
                Mode(cmd),
                key,
                flags,
                exptime,
                data,
                cas=None if cas is None else self.redis_cas(key, cas),
            )
        )
        return self._same(
            f"{cmd} {key!r} f={flags} e={exptime} len={len(data)}", mc, result.status.value
        )

    def delete(self, key: bytes) -> str:
        mc = self.mc.line(b"delete " + key).decode()
        return self._same(f"delete {key!r}", mc, self.run(self.single().delete(key)).value)

    def _overread_snapshot(self, key: bytes) -> tuple[bytes, int] | None:
        """Redis's raw item and PTTL, when the key holds a number of 2^63 or more."""
        conn, rkey = self.store._conn(key)
        raw = self.run(conn.execute(b"GET", rkey))
        if not isinstance(raw, bytes) or not signed_overflow(unpack_value(raw).data):
            return None
        pttl = self.run(conn.execute(b"PTTL", rkey))
        assert isinstance(pttl, int)
        return raw, pttl

    def _overread(
        self, snapshot: tuple[bytes, int] | None, key: bytes, mc: str, redis: Status
    ) -> bool:
        """memcached 1.6.18 answered an incr/decr of a number of 2^63 or more with
        NON_NUMERIC: its parser looks for a '-' from the value to the first NUL, past the
        item's end, so the bytes after the item in its slab memory decide (the shadow's
        noise reason memcached_overread). Redis, which did the arithmetic, is put back."""
        if snapshot is None or mc != "NON_NUMERIC" or redis not in (Status.OK, Status.CREATED):
            return False
        raw, pttl = snapshot
        conn, rkey = self.store._conn(key)
        expiry = (b"PX", b"%d" % pttl) if pttl > 0 else ()
        assert self.run(conn.execute(b"SET", rkey, raw, *expiry)) == b"OK"
        self.log.append(f"memcached overread {key!r}: NON_NUMERIC, Redis put back")
        return True

    def delta(self, op: str, key: bytes, delta: int) -> str:
        snapshot = self._overread_snapshot(key)
        reply = self.mc.line(b"%s %s %d" % (op.encode(), key, delta))
        mc = {
            b"NOT_FOUND": "NOT_FOUND",
            b"CLIENT_ERROR cannot increment or decrement non-numeric value": "NON_NUMERIC",
        }.get(reply, reply.decode())
        result = self.run(self.single().delta(key, Mode(op), delta))
        redis = str(result.value) if result.status is Status.OK else result.status.value
        if self._overread(snapshot, key, mc, result.status):
            redis = mc
        return self._same(f"{op} {key!r} {delta}", mc, redis)

    def touch(self, key: bytes, exptime: int) -> str:
        mc = self.mc.line(b"touch %s %d" % (key, exptime)).decode()
        redis = self.run(self.single().touch(key, exptime)).value
        return self._same(f"touch {key!r} {exptime}", mc, redis)

    def retrieve(
        self, keys: list[bytes], *, cas: bool = False, exptime: int | None = None
    ) -> list[Hit]:
        """get/gets, or gat/gats when exptime is given."""
        if exptime is None:
            cmd = b"gets" if cas else b"get"
            mc_hits = self.mc.values(cmd + b" " + b" ".join(keys))
            items = self.run(self.store.get_many(keys))
        else:
            cmd = b"gats" if cas else b"gat"
            mc_hits = self.mc.values(b"%s %d %s" % (cmd, exptime, b" ".join(keys)))
            items = self.run(self.store.gat_many(exptime, keys))
        mc = [Hit(k, f, d, c is not None) for k, f, d, c in mc_hits]
        redis = [
            Hit(key, item.flags, item.data, cas)
            for key, item in zip(keys, items, strict=True)
            if item is not None
        ]
        if cas and len(mc_hits) == len(redis):
            hit_items = [item for item in items if item is not None]
            for (key, _, _, mc_cas), item in zip(mc_hits, hit_items, strict=True):
                assert mc_cas is not None
                self.cas_map[(key, mc_cas)] = item.cas
        what = f"{cmd.decode()}{'' if exptime is None else f' {exptime}'} {keys!r}"
        return self._same(what, mc, redis)

    def flush(self) -> str:
        reply = self.mc.line(b"flush_all").decode()
        self.run(self.store.flush())
        return self._same("flush_all", reply, "OK")

    # meta commands

    def ms(
        self,
        key: bytes,
        mode: str,
        flags: int,
        exptime: int,
        data: bytes,
        cas: int | None = None,
    ) -> str:
        """ms with M<mode> F T [C] c; too-large deletes in every mode."""
        line = b"ms %s %d F%d T%d M%s c" % (key, len(data), flags, exptime, mode.encode())
        if cas is not None:
            line += b" C%d" % cas
        tokens, _ = self.mc.meta(line, data)
        codes = {b"HD": "STORED", b"NS": "NOT_STORED", b"EX": "EXISTS", b"NF": "NOT_FOUND"}
        if tokens[0] in codes:
            mc = codes[tokens[0]]
        elif b" ".join(tokens) == b"SERVER_ERROR object too large for cache":
            mc = "TOO_LARGE"
        else:
            mc = b" ".join(tokens).decode()
        store_mode = {
            "S": Mode.SET,
            "E": Mode.ADD,
            "A": Mode.APPEND,
            "P": Mode.PREPEND,
            "R": Mode.REPLACE,
        }[mode]
        redis_cas: int | None = None
        if cas is not None and store_mode is not Mode.ADD:
            redis_cas = self.redis_cas(key, cas)
            if store_mode in (Mode.SET, Mode.REPLACE):
                store_mode = Mode.CAS
        result = self.run(
            self.single().store(
                store_mode, key, flags, exptime, data, cas=redis_cas, too_large_deletes=True
            )
        )
        if mc == "STORED" and result.status is Status.STORED:
            mc_cas = _meta_flag(tokens, b"c")
            assert mc_cas is not None and result.cas is not None
            self.cas_map[(key, int(mc_cas))] = result.cas
        what = f"ms {key!r} M{mode} F{flags} T{exptime} C{cas} len={len(data)}"
        return self._same(what, mc, result.status.value)

    def ma(
        self,
        key: bytes,
        op: str,
        delta: int,
        *,
        create: int | None = None,
        initial: int | None = None,
        ttl: int | None = None,
        ttl_first: bool = False,
        cas: int | None = None,
    ) -> str:
        """ma with D M [N J T C] v c: the number, or NOT_FOUND/NOT_STORED/EXISTS/NON_NUMERIC."""
        flags = [b"D%d" % delta, b"M" + (b"I" if op == "incr" else b"D")]
        n_t: list[bytes] = []
        if create is not None:
            n_t.append(b"N%d" % create)
        if ttl is not None:
            n_t.append(b"T%d" % ttl)
        if ttl_first:
            n_t.reverse()
        flags += n_t
        if initial is not None:
            flags.append(b"J%d" % initial)
        if cas is not None:
            flags.append(b"C%d" % cas)
        line = b"ma %s %s v c" % (key, b" ".join(flags))
        snapshot = self._overread_snapshot(key)
        tokens, block = self.mc.meta(line)
        codes = {b"NF": "NOT_FOUND", b"NS": "NOT_STORED", b"EX": "EXISTS"}
        if block is not None:
            mc = block.decode()
        elif tokens[0] in codes:
            mc = codes[tokens[0]]
        elif b" ".join(tokens) == b"CLIENT_ERROR cannot increment or decrement non-numeric value":
            mc = "NON_NUMERIC"
        else:
            mc = b" ".join(tokens).decode()
        result = self.run(
            self.single().delta(
                key,
                Mode(op),
                delta,
                cas=None if cas is None else self.redis_cas(key, cas),
                create=create,
                initial=initial or 0,
                ttl=ttl,
                create_ttl_wins=ttl_first,
            )
        )
        if result.status in (Status.OK, Status.CREATED):
            redis = str(result.value)
            mc_cas = _meta_flag(tokens, b"c")
            if block is not None and mc_cas is not None and result.cas is not None:
                self.cas_map[(key, int(mc_cas))] = result.cas
        else:
            redis = result.status.value
        if self._overread(snapshot, key, mc, result.status):
            redis = mc
        return self._same(f"{line.decode(errors='replace')}", mc, redis)

    def md(self, key: bytes, cas: int | None = None) -> str:
        line = b"md " + key + (b"" if cas is None else b" C%d" % cas)
        tokens, _ = self.mc.meta(line)
        mc = {b"HD": "DELETED", b"NF": "NOT_FOUND", b"EX": "EXISTS"}.get(
            tokens[0], b" ".join(tokens).decode()
        )
        status: Status = self.run(
            self.single().delete(key, None if cas is None else self.redis_cas(key, cas))
        )
        return self._same(line.decode(errors="replace"), mc, status.value)

    # state

    def _close_ttls(self, mc_ttl: int, redis_ttl: float) -> bool:
        """Within TTL_TOLERANCE_S, plus the lag of memcached's clock on memcached's side."""
        if abs(mc_ttl - redis_ttl) <= TTL_TOLERANCE_S:
            return True
        lag = self.mc.clock_lag()
        return -TTL_TOLERANCE_S <= mc_ttl - redis_ttl <= TTL_TOLERANCE_S + lag

    def state(self, key: bytes) -> KeyState:
        """Compare presence, flags, exact data and TTL (within TTL_TOLERANCE_S) of one key."""
        tokens, block = self.mc.meta(b"mg %s v f t" % key)
        item = self.run(self.single().get(key))
        pttl = self.run(self.store.pttl(key))
        if block is None:
            assert tokens == [b"EN"], tokens
            mc = KeyState(False)
        else:
            mc = KeyState(True, int(_meta_flag(tokens, b"f") or b"0"), block)
        redis = KeyState(False) if item is None else KeyState(True, item.flags, item.data)
        self._same(f"state {key!r}", mc, redis)
        if mc.present:
            mc_ttl = int(_meta_flag(tokens, b"t") or b"0")
            if (mc_ttl == -1) != (pttl == -1):
                raise Mismatch(
                    f"ttl {key!r}: memcached {mc_ttl}s, redis {pttl}ms (-1 = none)\n"
                    + self.history()
                )
            if mc_ttl != -1 and not self._close_ttls(mc_ttl, pttl / 1000):
                raise Mismatch(
                    f"ttl {key!r}: memcached {mc_ttl}s, redis {pttl}ms\n" + self.history()
                )
        return mc
