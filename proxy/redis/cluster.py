"""A Redis Cluster as the shadow's store: keys routed to the primary that owns their slot.

ClusterPool offers what RedisPool offers the store (`connection_for`, `index_for`,
`primaries`, `writes`...), so RedisStore runs unchanged on one Redis or on a cluster. Each
primary gets a RedisPool of its own (the function library is loaded on each connection, so
on every primary, and again on a node that appears or is promoted). The slot map is learned
with CLUSTER SHARDS (CLUSTER SLOTS before Redis 7) and refreshed every `refresh_interval`,
at once when a node is unreachable or a slot has no owner, and before a MOVED command is
sent again. Refusals are handled the way production clients handle them:

- MOVED: refresh the map, then send the command to the slot's owner;
- ASK: send ASKING and the command to the node named, this once;
- TRYAGAIN, LOADING, CLUSTERDOWN, MASTERDOWN, READONLY: send it again after RETRY_DELAYS;

and past the bound the command fails with RedisGaveUp(reason), which the shadow counts as a
drop, never as a mismatch. The shadow runs one operation of a key at a time, so a redirected
command keeps its key's order. A primary replaced by its replica (failover) may have lost
the writes it had not replicated: their keys are reported through `on_writes_lost`, before
the map that routes them to the new primary is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import hiredis

from proxy.redis.connection import DEFAULT_OPTIONS, ConnectionOptions, RedisConnection
from proxy.redis.errors import RedisError, RedisReplyError, RedisUnavailable
from proxy.redis.pool import FAILOVER_WINDOW, RedisPool, WritesLost
from proxy.redis.protocol import Refusals, ReplyCallback, deliver
from proxy.redis.resp import parse_info
from proxy.redis.retry import RETRY_DELAYS, Retries, Retry, give_up, send_later
from proxy.redis.topology import (
    SLOTS,
    Redirect,
    SlotMap,
    WriteLog,
    cluster_reply,
    failed_over,
    key_slot,
    keys_of,
    parse_shards,
    parse_slots,
)
from proxy.redis.url import RedisURL, parse_url
from proxy.shadow.words import DropReason

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 5.0
"""Seconds between two slot map refreshes while all is well (new nodes, moved slots)."""
UNHEALTHY_REFRESH = 0.25
"""Seconds between refreshes while a primary is unreachable or a slot has no owner."""


def _cancelled(task: asyncio.Task[Any], retry: Retry) -> None:
    """A redirect's task cancelled before it sent the command (the pool closed): fail it."""
    if task.cancelled():
        deliver(retry.done, None, RedisUnavailable("the Redis client is closing"))


def command_key(payload: bytes) -> bytes | None:
    """The key of an encoded single-key command (FCALL f 1 key..., or CMD key...)."""
    reader = hiredis.Reader()
    reader.feed(payload)
    args = reader.gets()
    if not isinstance(args, list) or len(args) < 2:
        return None
    if args[0].upper() == b"FCALL":
        return args[3] if len(args) > 3 else None
    key = args[1]
    return key if isinstance(key, bytes) else None


async def detect_cluster(url: RedisURL, options: ConnectionOptions) -> bool:
    """Whether the server at `url` runs in cluster mode (INFO cluster: cluster_enabled:1),
    asked on a connection of options.probe(). Raises RedisError when it cannot be asked."""
    conn = RedisConnection(dataclasses.replace(url, db=0), options.probe())
    try:
        if not await conn.start():
            raise RedisUnavailable(f"redis {url}: {conn.last_error or 'unreachable'}")
        reply = await conn.execute(b"INFO", b"cluster")
    finally:
        await conn.close()
    return parse_info(reply).get("cluster_enabled") == "1"


class ClusterPool:
    """Connections to every primary of a Redis Cluster, found from any one node (`url`)."""

    def __init__(
        self,
        url: str | RedisURL,
        size: int = 2,
        options: ConnectionOptions = DEFAULT_OPTIONS,
        *,
        refresh_interval: float = REFRESH_INTERVAL,
        failover_window: float = FAILOVER_WINDOW,
    ) -> None:
        """options: those of every connection to a node (each node's pool checks that it
        reaches a primary, whatever options.require_primary says)."""
        self.url = parse_url(url)
        if self.url.db:
            raise ValueError(
                f"redis {self.url}: a Redis Cluster has database 0 only; the URL asks for "
                f"{self.url.db}"
            )
        self.size = size
        self.options = options
        self._node_options = dataclasses.replace(options, require_primary=True)
        self.refresh_interval = refresh_interval
        self.map = SlotMap()
        self._known = SlotMap()  # each slot's last known owner, for telling failovers
        self._leaving: list[RedisPool] = []  # pools of nodes that left the map, closing
        self._owners: list[RedisPool | None] = [None] * SLOTS
        self._nodes: dict[tuple[str, int], RedisPool] = {}
        self.writes = WriteLog(failover_window)
        self.on_writes_lost: WritesLost | None = None
        self.retries = Retries()
        self._refresh_lock = asyncio.Lock()
        self._refreshed = 0  # refreshes done: a waiter that sees it move needs none of its own
        self._wanted = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintainer: asyncio.Task[None] | None = None
        self._closing = False
        self._refresh_failing = False
        self.failovers = 0
        """Primaries seen replaced by one of their replicas."""
        self.redirects: dict[str, int] = {"moved": 0, "ask": 0}

    # -- what the store uses -------------------------------------------------------------

    def connection_for(self, key: bytes) -> RedisConnection:
        """The connection of a key: the owner of its slot, one of its connections by slot."""
        slot = key_slot(key)
        node = self._owners[slot]
        if node is None:
            raise RedisUnavailable(f"redis cluster {self.url}: slot {slot} has no known owner")
        return node.connections[slot % node.size]

    def index_for(self, key: bytes) -> int:
        """Keys of one index (slot) may share a multi-key command (MGET)."""
        return key_slot(key)

    def primaries(self) -> list[RedisConnection]:
        """One connection to each primary that owns slots (the pools of `_nodes`: _install
        keeps there exactly the primaries of the map)."""
        return [pool.connections[0] for pool in self._nodes.values()]

    @property
    def is_connected(self) -> bool:
        pools = self._nodes.values()
        return bool(pools) and self.map.uncovered() == 0 and all(p.is_connected for p in pools)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> bool:
        """Learn the slot map and connect to every primary; keep refreshing in the background.
        True when every slot has a connected owner."""
        with contextlib.suppress(RedisError):
            await self.refresh()
        await asyncio.gather(
            *(pool.wait_connected(self.options.connect_timeout) for pool in self._nodes.values())
        )
        if self._maintainer is None:
            self._maintainer = asyncio.get_running_loop().create_task(
                self._maintain(), name="redis-cluster-map"
            )
        return self.is_connected

    async def close(self) -> None:
        """Stop: refused commands waiting to be sent again fail (RedisUnavailable), nothing
        new starts, every node pool is closed (those leaving the map included)."""
        self._closing = True
        self.retries.close()
        task, self._maintainer = self._maintainer, None
        tasks = [*self._tasks, *([task] if task is not None else [])]
        for pending in tasks:
            pending.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        pools, self._nodes = [*self._nodes.values(), *self._leaving], {}
        self._leaving = []
        self._owners = [None] * SLOTS
        await asyncio.gather(*(pool.close() for pool in pools))

    async def _maintain(self) -> None:
        last = time.monotonic()
        while not self._closing:
            await asyncio.sleep(UNHEALTHY_REFRESH)
            now = time.monotonic()
            due = now - last >= self.refresh_interval
            if not (due or self._wanted or not self.is_connected):
                continue
            last = now
            try:
                await self.refresh()
            except RedisError as exc:
                if not self._refresh_failing:
                    log.warning("redis cluster %s: cannot read the slot map: %s", self.url, exc)
                self._refresh_failing = True
            except Exception:
                log.exception("redis cluster %s: slot map refresh failed", self.url)

    # -- the slot map --------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the slot map again and install it; concurrent callers share one read."""
        seen = self._refreshed
        async with self._refresh_lock:
            if self._refreshed != seen:
                return  # someone read it while this caller waited
            self._wanted = False
            slot_map = await self._read_map()
            self._install(slot_map)
            self._refreshed += 1
            if self._refresh_failing:
                self._refresh_failing = False
                log.info("redis cluster %s: slot map read again", self.url)

    async def _read_map(self) -> SlotMap:
        errors: list[str] = []
        for pool in list(self._nodes.values()):  # connected primaries first: the likeliest fresh
            if pool.connections[0].is_connected:
                try:
                    return await self._ask_map(pool.connections[0])
                except RedisError as exc:
                    errors.append(f"{pool.url.host}:{pool.url.port}: {exc}")
        addresses = [(self.url.host, self.url.port)]
        addresses += [node.address for node in self.map.nodes.values()]
        for host, port in dict.fromkeys(addresses):
            conn = RedisConnection(
                dataclasses.replace(self.url, host=host, port=port),
                self.options.probe(),
                name="map",
            )
            try:
                if await conn.start():
                    return await self._ask_map(conn)
                errors.append(f"{host}:{port}: {conn.last_error}")
            except RedisError as exc:
                errors.append(f"{host}:{port}: {exc}")
            finally:
                await conn.close()
        raise RedisUnavailable("no node answered: " + "; ".join(errors[-3:]))

    async def _ask_map(self, conn: RedisConnection) -> SlotMap:
        try:
            reply = await conn.execute(b"CLUSTER", b"SHARDS")
            shards = parse_shards(reply, tls=self.url.tls)
            if not shards.uncovered():
                return shards
            # Redis 7.2 before 7.2.6 could list a new primary's shard without its slots
            # (redis/redis#13414): CLUSTER SLOTS tells, where it covers more.
            with contextlib.suppress(RedisReplyError, ValueError):
                slots = parse_slots(await conn.execute(b"CLUSTER", b"SLOTS"))
                if slots.uncovered() < shards.uncovered():
                    return slots
            return shards
        except RedisReplyError as exc:
            if "unknown" not in exc.message.lower():
                raise
        except ValueError as exc:
            raise RedisUnavailable(f"unreadable CLUSTER SHARDS reply: {exc}") from None
        try:  # before Redis 7
            return parse_slots(await conn.execute(b"CLUSTER", b"SLOTS"))
        except ValueError as exc:
            raise RedisUnavailable(f"unreadable CLUSTER SLOTS reply: {exc}") from None

    def _install(self, new: SlotMap) -> None:
        """Use `new` from now on. The writes a failover lost are reported first, while no
        command of their keys can have reached the new primary yet. A failover is judged
        against each slot's last known owner: a slot may have had none in between (its
        primary failed, the replica not promoted yet)."""
        if self._closing:
            return
        old = self._known
        for owner in failed_over(old, new):
            self.failovers += 1
            node = old.nodes[owner]
            pool = self._nodes.get(node.address)
            alive = max((c.last_read for c in pool.connections), default=0.0) if pool else 0.0
            log.warning(
                "redis cluster %s: primary %s:%d failed over to a replica; writes it had "
                "not replicated are lost, their keys are no longer trusted",
                self.url,
                node.host,
                node.port,
            )
            if self.on_writes_lost is not None:
                keys = self.writes.before(alive or time.perf_counter())
                if keys is not None:
                    keys = keys_of(keys, old, owner)
                self.on_writes_lost(keys, DropReason.FAILOVER)
        if new.uncovered() and not old.uncovered():
            log.warning("redis cluster %s: %d slots have no primary", self.url, new.uncovered())
        pools: dict[str, RedisPool] = {}
        for node in new.primaries():
            pool = self._nodes.get(node.address)
            if pool is None:
                pool = self._nodes[node.address] = self._node_pool(node.host, node.port)
            pools[node.id] = pool
        self._owners = [None if owner is None else pools[owner] for owner in new.owners]
        self.map = new
        self._known = self._known.merged(new)
        owning = {id(pool) for pool in pools.values()}
        for address, pool in list(self._nodes.items()):
            if id(pool) not in owning:  # no longer a primary with slots
                del self._nodes[address]
                self._leaving.append(pool)
                self._spawn(self._retire(pool))

    async def _retire(self, pool: RedisPool) -> None:
        await pool.close()
        with contextlib.suppress(ValueError):
            self._leaving.remove(pool)

    def _node_pool(self, host: str, port: int) -> RedisPool:
        pool = RedisPool(
            dataclasses.replace(self.url, host=host, port=port),
            self.size,
            self._node_options,
            refusals=self._refusals,
        )
        pool.on_writes_lost = self._node_replaced
        self._spawn(pool.start())
        return pool

    def _node_replaced(self, keys: list[bytes] | None, reason: str) -> None:
        """A node's own address now leads to another data set (a primary restarted without
        persistence keeps its slots and comes back empty): its pool saw the replication id
        change. The cluster's write log cannot say which of its keys that node held: every
        key turns cold."""
        log.warning(
            "redis cluster %s: a primary came back with another data set (%s); every key "
            "is cold again",
            self.url,
            reason,
        )
        if self.on_writes_lost is not None:
            self.on_writes_lost(None, reason)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("redis cluster %s: %s", self.url, task.exception())

    # -- refusals ------------------------------------------------------------------------

    def _refusals(self, conn: RedisConnection) -> Refusals:
        def refused(payload: bytes, error: RedisReplyError, callback: ReplyCallback) -> None:
            retry = Retry.of(callback)
            if self._closing:
                deliver(callback, None, RedisUnavailable("the Redis client is closing"))
                return
            meaning = cluster_reply(error.message)
            if retry.attempts > len(RETRY_DELAYS) or meaning is None:
                reason = meaning.kind if isinstance(meaning, Redirect) else meaning or "refused"
                give_up(retry, reason, f"redis cluster {self.url}: {error.message}")
                return
            if isinstance(meaning, Redirect):
                self.redirects[meaning.kind] += 1
                if meaning.kind == "ask":
                    self._ask(meaning, payload, retry)
                else:  # the map is stale: read it, then follow it
                    self._wanted = True
                    moving = self._spawn(self._moved(meaning, payload, retry))
                    moving.add_done_callback(lambda task: _cancelled(task, retry))
                return
            if meaning in ("clusterdown", "masterdown", "readonly"):
                self._wanted = True
            self._later(payload, meaning, retry)

        return refused

    async def _moved(self, redirect: Redirect, payload: bytes, retry: Retry) -> None:
        """Read the map (a failover is reported before anything reaches a new primary),
        then send the command to the node the redirect names, or else to the slot's owner
        in the map; when neither can take it, again after a delay. Cancelled (closing)
        before it sends, `_cancelled` fails the command."""
        with contextlib.suppress(RedisError, TimeoutError):
            async with asyncio.timeout(self.options.connect_timeout):
                await self.refresh()
        node = self._nodes.get((redirect.host, redirect.port)) or self._owners[redirect.slot]
        try:
            if node is None:
                raise RedisUnavailable(f"slot {redirect.slot} has no known owner")
            node.connections[redirect.slot % node.size].send_payload(payload, retry)
        except RedisError:
            self._later(payload, "moved", retry)

    def _ask(self, redirect: Redirect, payload: bytes, retry: Retry) -> None:
        """ASK: this command, once, on the node importing the slot (after ASKING)."""
        pool = self._nodes.get((redirect.host, redirect.port))
        if pool is None:  # a node this client does not know yet: the map will tell
            self._wanted = True
            self._later(payload, "ask", retry)
            return
        try:
            pool.connections[redirect.slot % pool.size].send_payload(payload, retry, asking=True)
        except RedisError:
            self._later(payload, "ask", retry)

    def _later(self, payload: bytes, reason: str, retry: Retry) -> None:
        """Send the command again after a while, to whichever node owns its key's slot."""
        send_later(self.retries, payload, reason, retry, self._route)

    def _route(self, payload: bytes) -> RedisConnection:
        key = command_key(payload)
        if key is None:
            raise RedisUnavailable("cannot tell the key of a refused command")
        return self.connection_for(key)
