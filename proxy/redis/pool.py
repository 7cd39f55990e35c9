"""A fixed set of connections to one Redis behind one endpoint, each key on the same one (so a
key's commands stay in order), and the endpoint's failover: a demoted primary redialled, the
writes a new server may lack reported."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from typing import TypeAlias

from proxy.redis.connection import DEFAULT_OPTIONS, ConnectionOptions, RedisConnection
from proxy.redis.errors import RedisReplyError, RedisUnavailable
from proxy.redis.protocol import Refusals, ReplyCallback, deliver
from proxy.redis.retry import Retries, Retry, send_later
from proxy.redis.topology import WriteLog, cluster_reply
from proxy.redis.url import RedisURL, parse_url
from proxy.shadow.words import DropReason

log = logging.getLogger(__name__)

FAILOVER_WINDOW = 10.0
"""Seconds of writes a failed-over primary may have lost (shadow.redis_failover_window): its
replication lag and, behind one endpoint, the time between the replica's promotion and the
old primary's demotion. Their keys are reported lost, and the shadow stops trusting them."""

WritesLost: TypeAlias = Callable[[list[bytes] | None, str], None]
"""Told the (Redis) keys whose recent writes a failover may have lost, or None when the log
no longer knows which (every key), and why."""


class RedisPool:
    """A fixed set of connections; each key always uses the same one (crc32 of the key).

    A primary demoted to a replica under it (a failover behind one endpoint, as ElastiCache
    does) answers writes with READONLY: the pool redials every connection (the handshake's
    role check waits for the endpoint to lead to a primary) and sends the refused command
    again, within RETRY_DELAYS. A connection that reaches another server (its replication
    id changed) reports the writes it may lack (`on_writes_lost`) before carrying any."""

    def __init__(
        self,
        url: str | RedisURL,
        size: int = 4,
        options: ConnectionOptions = DEFAULT_OPTIONS,
        *,
        refusals: Callable[[RedisConnection], Refusals] | None = None,
        failover_window: float = FAILOVER_WINDOW,
    ) -> None:
        """refusals: builds each connection's handler of a cluster's refusals (a cluster's
        node pools); by default the pool's own, for one Redis behind one endpoint."""
        if size < 1:
            raise ValueError("a Redis pool needs at least one connection")
        self.url = parse_url(url)
        self.writes = WriteLog(failover_window)
        self.on_writes_lost: WritesLost | None = None
        self.retries = Retries()
        self._demoted_on: dict[int, int] = {}  # connection -> its connects when redialled
        self._told_cluster = False
        self.connections = [
            RedisConnection(self.url, options, name=str(index)) for index in range(size)
        ]
        self._replid = ""  # the server's replication id, as the connections last saw it
        for conn in self.connections:
            conn.refusals = (refusals or self._refusals)(conn)
            conn.on_connect = self._connected

    def _refusals(self, conn: RedisConnection) -> Refusals:
        def refused(payload: bytes, error: RedisReplyError, callback: ReplyCallback) -> None:
            meaning = cluster_reply(error.message)
            if not isinstance(meaning, str):  # MOVED/ASK: this is a cluster node
                if not self._told_cluster:
                    self._told_cluster = True
                    log.error(
                        "redis %s answers %r: it is a Redis Cluster node, used as a single "
                        "Redis (shadow.redis_cluster: false?); commands of keys it does not "
                        "own fail",
                        self.url,
                        error.message,
                    )
                deliver(callback, None, error)
                return
            if meaning == "readonly":
                self._demoted(conn)
            send_later(self.retries, payload, meaning, Retry.of(callback), lambda _: conn)

        return refused

    def _demoted(self, refused_on: RedisConnection) -> None:
        """The server behind the endpoint is a replica now: the endpoint must be dialled
        again to reach the new primary (whose connect reports the writes lost: _connected).
        Once per demotion: the other refusals of connections not yet redialled are the same
        one."""
        if self._demoted_on.get(id(refused_on)) == refused_on.connects:
            return
        self._demoted_on = {id(conn): conn.connects for conn in self.connections}
        log.warning(
            "redis %s answers READONLY: its primary became a replica (a failover); "
            "reconnecting to reach the new primary",
            self.url,
        )
        for conn in self.connections:
            conn.reset(RedisUnavailable("the server became a replica; reconnecting"))

    def _connected(self, conn: RedisConnection) -> None:
        """A connection is up, nothing sent on it yet. If the endpoint now leads to another
        server (a failover, or a restart), the writes the old one took may be missing on
        this one: report them before this connection carries anything, and redial the
        connections still on the old server."""
        replid, replid2 = conn.replication
        if not replid or replid == self._replid:
            return
        previous, self._replid = self._replid, replid
        if not previous:
            return  # the first server seen
        alive = max((c.last_read for c in self.connections), default=0.0)
        if replid2 == previous:  # the old primary's replica, promoted: all but the last writes
            lost, reason = self.writes.before(alive or time.perf_counter()), DropReason.FAILOVER
            what = "a replica of the previous primary (a failover)"
        else:  # another data set altogether (a restart without persistence, a new server)
            lost, reason, what = None, DropReason.REPLACED, "another server, or the same restarted"
        log.warning("redis %s now leads to %s: recent writes may be lost", self.url, what)
        if self.on_writes_lost is not None:
            self.on_writes_lost(lost, reason)
        for other in self.connections:
            if other is not conn and other.is_connected and other.replication[0] != replid:
                other.reset(RedisUnavailable("the server behind the endpoint changed"))

    def primaries(self) -> list[RedisConnection]:
        """One connection to each primary: flush_all and INFO go to every one."""
        return self.connections[:1]

    @property
    def size(self) -> int:
        return len(self.connections)

    def index_for(self, key: bytes) -> int:
        """The key's connection; keys of one index may share a multi-key command (MGET)."""
        return zlib.crc32(key) % len(self.connections)

    def connection_for(self, key: bytes) -> RedisConnection:
        """The connection of a key; the same for the life of the pool, so per-key order holds."""
        return self.connections[zlib.crc32(key) % len(self.connections)]

    async def start(self) -> bool:
        """Start every connection; True if all of them connected on the first attempt."""
        results = await asyncio.gather(*(conn.start() for conn in self.connections))
        return all(results)

    async def wait_connected(self, timeout: float) -> bool:
        results = await asyncio.gather(*(c.wait_connected(timeout) for c in self.connections))
        return all(results)

    async def close(self) -> None:
        self.retries.close()
        await asyncio.gather(*(conn.close() for conn in self.connections))

    @property
    def is_connected(self) -> bool:
        """True when every connection is up."""
        return all(conn.is_connected for conn in self.connections)

    @property
    def connected_count(self) -> int:
        return sum(conn.is_connected for conn in self.connections)

    @property
    def reconnects(self) -> int:
        return sum(conn.reconnects for conn in self.connections)

    @property
    def timeouts(self) -> int:
        return sum(conn.timeouts for conn in self.connections)

    @property
    def connect_failures(self) -> int:
        return sum(conn.connect_failures for conn in self.connections)
