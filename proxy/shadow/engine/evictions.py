"""Eviction evidence, key by key: which keys Memcached and Redis evicted, and when that is known.

A key a store evicted behind the shadow's back is a change the shadow did not replay: it turns
cold at once (Memcached's: noise `evicted`; Redis's: its own finding, `redis_evicted`, a
capacity result). The names come from each store:

- Memcached: `watch evictions` on a connection of the shadow's own streams a line per evicted
  item. Its logger thread may lag, so `sync()` waits until the lines received account for
  `stats` evictions read after the fact; items the slab mover drops unnamed
  (slab_reassign_evictions_nomem) and lines memcached skips make every key cold.
- Redis: keyspace notifications of `evicted` events (notify-keyspace-events E and e), on a
  subscribed connection per primary. `sync()` is a PING on it: Redis queues a notification
  when it evicts, so the PING's answer comes after every one sent before it.

Without the per-key stream (a memcached without `watch`; a Redis where CONFIG is refused and
notifications are off, as on ElastiCache until its parameter group sets
notify-keyspace-events to "Ee"), the eviction counters stand in: any growth makes every key
cold (no false mismatch, less coverage), and the log says how to turn the stream on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from proxy.redis.connection import ConnectionOptions, RedisConnection
from proxy.redis.errors import RedisError, RedisReplyError
from proxy.redis.url import RedisURL
from proxy.shadow.engine.mcreader import MemcachedReader, MemcachedUnavailable
from proxy.shadow.words import Store

log = logging.getLogger("memshadow.shadow")

SYNC_TIMEOUT: Final = 2.0
"""How long sync() waits for a store's eviction stream to catch up with its counter."""
RECONNECT_DELAY: Final = 1.0
RECONCILE_INTERVAL: Final = 5.0
"""How often the Redis primaries watched are matched with the ones the store knows."""

Evicted = Callable[[list[bytes]], None]
"""Told the keys a store evicted (already without the shadow's key prefix)."""
Unknown = Callable[[str], None]
"""Told that the store dropped keys it did not name (why, in words): every key turns cold."""


class _LineReader(asyncio.Protocol):
    def __init__(self, owner: MemcachedEvictions) -> None:
        self.owner = owner
        self.buffer = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.rfind(b"\n")
        if end < 0:
            return
        lines = bytes(self.buffer[:end]).split(b"\n")
        del self.buffer[: end + 1]
        self.owner._lines(lines)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class MemcachedEvictions:
    """One Memcached's `watch evictions` stream, with its counter to sync against."""

    def __init__(
        self,
        reader: MemcachedReader,
        evicted: Evicted,
        unknown: Unknown,
        *,
        sync_timeout: float = SYNC_TIMEOUT,
    ) -> None:
        self.reader = reader
        self.evicted = evicted
        self.unknown = unknown
        self.sync_timeout = sync_timeout
        self.streaming = False  # the watch is up and its baseline known
        self.supported = True  # False: this memcached refused `watch` (counters stand in)
        self.received = 0  # evictions named since the baseline
        self.base = 0  # `stats` evictions when the watch began
        self._nomem = -1  # slab_reassign_evictions_nomem last seen (-1: not yet)
        self._counted = -1  # fallback: evictions last seen
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._answered: asyncio.Future[bytes] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="shadow-memcached-evictions"
            )

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if self._transport is not None:
            self._transport.abort()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._watch()
            except (OSError, TimeoutError, MemcachedUnavailable, ValueError) as exc:
                log.debug("shadow: memcached eviction watch: %s", exc)
            self.streaming = False
            if not self.supported:
                return  # counters stand in (sync)
            await asyncio.sleep(RECONNECT_DELAY)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        before = await self.reader.stats()  # (first: evictions after it are all streamed)
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: _LineReader(self), self.reader.host, self.reader.port
            ),
            self.reader.timeout,
        )
        self._transport = transport
        try:
            self._answered = loop.create_future()
            transport.write(b"watch evictions\r\n")
            answer = await asyncio.wait_for(self._answered, self.reader.timeout)
            if answer != b"OK":
                self.supported = False
                log.warning(
                    "shadow: memcached %s:%s refused `watch evictions` (%r): its evictions "
                    "are known from its counters only, and each makes every key cold",
                    self.reader.host,
                    self.reader.port,
                    answer[:60],
                )
                return
            evictions = int(before.get("evictions", "0"))
            if self._counted >= 0 and evictions > self.base + self.received:
                self.unknown("memcached evicted items while its eviction watch was down")
            self.base = evictions
            self.received = 0
            self._nomem = int(before.get("slab_reassign_evictions_nomem", "0"))
            self._counted = evictions
            self.streaming = True
            await protocol.closed
        finally:
            self.streaming = False
            transport.abort()

    def _lines(self, lines: list[bytes]) -> None:
        keys: list[bytes] = []
        for line in lines:
            line = line.rstrip(b"\r")
            if self._answered is not None and not self._answered.done():
                self._answered.set_result(line)
                continue
            if b" type=eviction " in line:
                start = line.find(b" key=")
                if start < 0:
                    continue
                end = line.find(b" ", start + 5)
                keys.append(unquote_to_bytes(line[start + 5 : end if end > 0 else None]))
            elif b"skipped" in line:
                self.unknown("memcached's eviction watch skipped lines")
        if keys:
            self.received += len(keys)
            self.evicted(keys)

    async def sync(self) -> bool:
        """Every eviction Memcached made before now has been told (or, without the stream,
        the counters have been looked at). False when that cannot be known in time."""
        try:
            stats = await self.reader.stats()
        except MemcachedUnavailable:
            return False
        evictions = int(stats.get("evictions", "0"))
        nomem = int(stats.get("slab_reassign_evictions_nomem", "0"))
        if self._nomem >= 0 and nomem > self._nomem:
            self.unknown("memcached's slab mover dropped items without naming them")
        self._nomem = nomem
        if not self.supported:
            if self._counted >= 0 and evictions > self._counted:
                self.unknown("memcached evicted items (no per-key stream: watch refused)")
            self._counted = evictions
            return True
        deadline = time.monotonic() + self.sync_timeout
        while self.base + self.received < evictions:
            if not self.streaming:
                return False  # (reconnecting: what it missed is told when it is back)
            if time.monotonic() > deadline:
                # Behind for too long (or evictions fell between its baseline and its
                # start): every key turns cold, and it counts from here.
                self.unknown("memcached's eviction watch fell behind its counter")
                self.base = evictions - self.received
                return False
            await asyncio.sleep(0.005)
        return True


class RedisEvictions:
    """Keyspace notifications of Redis's `evicted` events on one primary."""

    def __init__(
        self,
        url: RedisURL,
        evicted: Evicted,
        unknown: Unknown,
        counter: Callable[[], Awaitable[int]],
        *,
        key_prefix: bytes = b"",
        connect_timeout: float = 2.0,
        sync_timeout: float = SYNC_TIMEOUT,
    ) -> None:
        self.url = url
        self.evicted = evicted
        self.unknown = unknown
        self.counter = counter  # INFO stats evicted_keys of this primary
        self.key_prefix = key_prefix
        self.channel = b"__keyevent@%d__:evicted" % url.db
        self.streaming = False  # subscribed
        # Notifications of evictions are known to be on (we turned them on, or they were).
        # Otherwise the counter tells whether each eviction was notified.
        self.notified = False
        self.received = 0  # notifications since the counter was last read
        self._counted = -1
        self._conn = RedisConnection(
            url,
            ConnectionOptions(timeout=sync_timeout, connect_timeout=connect_timeout),
            name="evictions",
            on_push=self._pushed,
        )
        self._conn.on_connect = self._connected
        self._subscribing: asyncio.Task[None] | None = None
        self._warned = False

    async def start(self) -> None:
        await self._conn.start()

    async def stop(self) -> None:
        if self._subscribing is not None:
            self._subscribing.cancel()
        await self._conn.close()

    def _connected(self, conn: RedisConnection) -> None:
        self.streaming = False
        self._subscribing = asyncio.get_running_loop().create_task(self._subscribe())

    async def _subscribe(self) -> None:
        conn = self._conn
        try:
            await conn.wait_connected(5.0)
            self.notified = await self._turn_on()
            self._counted = -1 if self.notified else await self.counter()
            await conn.execute(b"SUBSCRIBE", self.channel)
            self.received = 0
            self.streaming = True
        except (RedisError, OSError, ValueError) as exc:
            log.debug("shadow: Redis eviction notifications: %s", exc)

    async def _turn_on(self) -> bool:
        """Make Redis notify evicted keys (E: key events, e: evictions); True if it does."""
        conn = self._conn
        try:
            reply = await conn.execute(b"CONFIG", b"GET", b"notify-keyspace-events")
            value = reply[1] if isinstance(reply, list) and len(reply) > 1 else b""
            flags = value.decode() if isinstance(value, bytes) else ""
            wanted = flags + ("" if "E" in flags else "E")
            wanted += "" if "e" in flags or "A" in flags else "e"
            if wanted != flags:
                await conn.execute(b"CONFIG", b"SET", b"notify-keyspace-events", wanted)
            return True
        except RedisReplyError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "shadow: Redis %s refuses CONFIG (%s). Turn its evicted-key notifications "
                    'on yourself: notify-keyspace-events "Ee" (on ElastiCache, in the '
                    "cluster's parameter group). Until then, an eviction Redis did not "
                    "notify makes every key cold.",
                    self.url,
                    exc,
                )
            return False

    def _pushed(self, message: list[Any]) -> None:
        if len(message) == 3 and message[1] == self.channel and isinstance(message[2], bytes):
            key = message[2]
            self.received += 1
            if key.startswith(self.key_prefix):
                self.evicted([key[len(self.key_prefix) :]])

    async def sync(self) -> bool:
        """Every eviction Redis made before now has been told. A PING on the subscribed
        connection is answered after every notification Redis queued before it. Where
        notifications may be off, the counter (read first) must not have grown by more
        than what was notified, or every key turns cold."""
        if not self.streaming:
            return False
        try:
            evicted = -1 if self.notified else await self.counter()
            await self._conn.execute(b"PING")
        except (RedisError, OSError, ValueError):
            return False
        if evicted >= 0:
            if self._counted >= 0 and evicted - self._counted > self.received:
                self.unknown("Redis evicted keys it did not notify")
            self._counted = evicted
            self.received = 0
        return True


MEMCACHED: Final = Store.MEMCACHED
REDIS: Final = Store.REDIS

RedisSource = tuple[RedisURL, Callable[[], Awaitable[int]]]
"""A Redis primary to watch: its URL, and its INFO stats evicted_keys."""


class EvictionWatch:
    """Every store's eviction evidence for one shadow engine. `on_evicted(store, keys)` and
    `on_unknown(store, why)` are set by its user (store: MEMCACHED or REDIS)."""

    def __init__(
        self,
        readers: Sequence[MemcachedReader],
        redis_sources: Callable[[], list[RedisSource]],
        *,
        key_prefix: bytes = b"",
        connect_timeout: float = 2.0,
    ) -> None:
        self.on_evicted: Callable[[str, list[bytes]], None] = lambda store, keys: None
        self.on_unknown: Callable[[str, str], None] = lambda store, why: None
        self.memcached = [
            MemcachedEvictions(
                reader,
                lambda keys: self.on_evicted(MEMCACHED, keys),
                lambda why: self.on_unknown(MEMCACHED, why),
            )
            for reader in readers
        ]
        self._redis: dict[str, RedisEvictions] = {}  # by primary
        self._task: asyncio.Task[None] | None = None
        self._redis_sources = redis_sources
        self._key_prefix = key_prefix
        self._connect_timeout = connect_timeout
        self.started = False

    async def start(self) -> None:
        """Watch every store: each Memcached now, Redis's primaries as they are known (a
        cluster's change: looked at every RECONCILE_INTERVAL)."""
        if self.started:
            return
        self.started = True
        for one in self.memcached:
            one.start()
        await self._reconcile()
        self._task = asyncio.get_running_loop().create_task(
            self._keep_up(), name="shadow-redis-evictions"
        )

    async def _keep_up(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                await self._reconcile()
            except Exception:  # (never fatal: the next round tries again)
                log.exception("shadow: cannot follow Redis's primaries for evictions")

    async def _reconcile(self) -> None:
        """One watch per Redis primary now known; those of former primaries stop."""
        sources = {str(url): (url, counter) for url, counter in self._redis_sources()}
        for name in [name for name in self._redis if name not in sources]:
            await self._redis.pop(name).stop()
        for name, (url, counter) in sources.items():
            if name in self._redis:
                continue
            watch = RedisEvictions(
                url,
                lambda keys: self.on_evicted(REDIS, keys),
                lambda why: self.on_unknown(REDIS, why),
                counter,
                key_prefix=self._key_prefix,
                connect_timeout=self._connect_timeout,
            )
            self._redis[name] = watch
            await watch.start()

    @property
    def redis(self) -> list[RedisEvictions]:
        return list(self._redis.values())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for one in self.memcached:
            await one.stop()
        for other in self.redis:
            await other.stop()

    async def sync(self) -> bool:
        """Every eviction of every store before now has been told."""
        if not self.started:
            return True
        if not self._redis and self._redis_sources():
            return False  # (primaries known, not watched yet: the next round will)
        results = await asyncio.gather(
            *(one.sync() for one in self.memcached), *(other.sync() for other in self.redis)
        )
        return all(results)
