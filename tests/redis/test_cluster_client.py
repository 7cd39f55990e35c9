"""The store on a real Redis Cluster (ClusterPool): slot routing, ASK during a migration and
MOVED after it, flush and INFO over every primary, auto-detection; and one Redis behind one
endpoint answering READONLY (a demoted primary)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterator

import pytest

from proxy.memcache.words import Status
from proxy.redis.cluster import ClusterPool
from proxy.redis.connection import ConnectionOptions
from proxy.redis.errors import RedisError, RedisGaveUp
from proxy.redis.pool import RedisPool
from proxy.redis.retry import RETRY_DELAYS
from proxy.redis.store import (
    RedisStore,
)
from proxy.redis.topology import key_slot
from tests.redis.conftest import Server
from tests.support import FaultRelay, RedisCluster, ServerProcess, wait_until_async

StartRedis = Callable[..., Server]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(str(tmp_path_factory.mktemp("cluster")), replicas=0)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def _owner(cluster: RedisCluster, key: bytes) -> ServerProcess:
    slot = key_slot(key)
    for line in cluster.cli(cluster.live().port, "cluster", "nodes").splitlines():
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for part in fields[8:]:
            first, _, last = part.partition("-")
            if first.isdigit() and int(first) <= slot <= int(last or first):
                return next(s for s in cluster.servers if s.port == port)
    raise AssertionError(f"no owner of slot {slot}")


async def test_each_key_lands_on_its_slots_primary(cluster: RedisCluster) -> None:
    store = RedisStore.from_url(cluster.url(), cluster="true", size=2)
    assert await store.start() and store.is_cluster
    try:
        keys = [b"key:%d" % i for i in range(60)]
        for key in keys:
            result = await store.store("set", key, 7, 0, b"v-" + key)
            assert result.status is Status.STORED
        for key in keys:
            # the raw value sits on the owner, behind the 12-byte flags|cas header
            raw = cluster.cli(_owner(cluster, key).port, "getrange", key.decode(), "12", "-1")
            assert raw.strip() == "v-" + key.decode()
        assert len(store.pool.primaries()) == 3
        assert await store.evicted_keys() == 0
        items = await store.get_many(keys[:10])
        assert [item.data if item else None for item in items] == [b"v-" + k for k in keys[:10]]
        await store.flush()

        async def flushed() -> bool:
            return [await store.get(key) for key in keys] == [None] * len(keys)

        await wait_until_async(flushed, what="every primary flushed")
    finally:
        await store.close()


async def test_ask_during_a_migration_and_moved_after_it(cluster: RedisCluster) -> None:
    key, fresh = b"{mig}old", b"{mig}new"
    slot = key_slot(key)
    store = RedisStore.from_url(cluster.url(), cluster="true", size=2)
    assert await store.start()
    pool = store.pool
    assert isinstance(pool, ClusterPool)
    try:
        await store.store("set", key, 1, 0, b"before")
        source = _owner(cluster, key)
        target = next(p for p in cluster.primaries() if p.port != source.port)
        source_id, target_id = cluster.node_id(source), cluster.node_id(target)
        cluster.cli(target.port, "cluster", "setslot", str(slot), "importing", source_id)
        cluster.cli(source.port, "cluster", "setslot", str(slot), "migrating", target_id)
        moved = cluster.cli(
            source.port,
            "migrate",
            "127.0.0.1",
            str(target.port),
            "",
            "0",
            "5000",
            "keys",
            key.decode(),
        )
        assert moved.strip() == "OK"
        # The key has left: the source answers ASK, the store follows it (ASKING first).
        item = await store.get(key)
        assert item is not None and item.data == b"before"
        assert (await store.store("add", fresh, 2, 0, b"new")).status is Status.STORED
        assert pool.redirects["ask"] >= 2
        assert pool.map.owners[slot] == source_id  # ASK does not change the map
        for node in cluster.primaries():
            cluster.cli(node.port, "cluster", "setslot", str(slot), "node", target_id)
        # The slot has moved: MOVED, a map refresh, and the command sent to the new owner.
        item = await store.get(fresh)
        assert item is not None and item.data == b"new"
        assert pool.redirects["moved"] >= 1
        assert pool.map.owners[slot] == target_id
        assert pool.failovers == 0
    finally:
        await store.close()


async def test_auto_tells_a_cluster_from_a_single_redis(
    cluster: RedisCluster, redis_shared: Server
) -> None:
    for url, is_cluster in ((cluster.url(), True), (redis_shared.url(db=3), False)):
        store = RedisStore.from_url(url, cluster="auto")
        try:
            assert await store.start()
            assert store.is_cluster is is_cluster
            assert (await store.store("set", b"auto", 0, 0, b"x")).status is Status.STORED
        finally:
            await store.close()


async def test_a_cluster_with_a_database_in_its_url_is_refused(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match="database 0 only"):
        ClusterPool(cluster.servers[0].url(db=2))
    store = RedisStore.from_url(cluster.servers[0].url(db=2), cluster="auto")
    with caplog.at_level(logging.ERROR):
        assert not await store.start()
    await store.close()
    assert "a cluster has database 0 only" in caplog.text


# One endpoint, its primary demoted -----------------------------------------------------------


async def test_a_replica_is_not_taken_for_a_primary(redis_factory: StartRedis) -> None:
    primary = redis_factory()
    replica = redis_factory("--replicaof", "127.0.0.1", str(primary.port))
    pool = RedisPool(replica.url(), 1, ConnectionOptions(require_primary=True, connect_timeout=10))
    try:
        assert not await pool.start()
        assert "is a replica" in (pool.connections[0].last_error or "")
    finally:
        await pool.close()


async def test_readonly_is_retried_then_given_up(redis_factory: StartRedis) -> None:
    primary = redis_factory()
    replica = redis_factory("--replicaof", "127.0.0.1", str(primary.port))
    # A pool that does not check the role: as if the endpoint still led to the old primary.
    pool = RedisPool(replica.url(), 1, ConnectionOptions(backoff_max=0.1))
    store = RedisStore(pool)
    try:
        assert await store.start()
        with pytest.raises(RedisGaveUp) as refused:
            await store.delete(b"k")  # DEL: a write, refused by a replica
        assert refused.value.reason == "readonly"
        # Sent once, then again after each of the RETRY_DELAYS: the replica refused each.
        tries = len(RETRY_DELAYS) + 1
        assert f"{tries} tries" in str(refused.value)
        assert _rejected_calls(replica) == tries
    finally:
        await store.close()


def _info(server: Server, section: str = "replication") -> bytes:
    from tests.integration.test_shadow import redis_call

    reply = redis_call(server.port, "INFO", section)
    assert isinstance(reply, bytes)
    return reply


def _rejected_calls(server: Server) -> int:
    """Commands the server refused (an error before running them), every command summed."""
    return sum(int(n) for n in re.findall(rb"rejected_calls=(\d+)", _info(server, "commandstats")))


async def test_a_failover_behind_one_endpoint_reports_the_recent_writes_first(
    redis_factory: StartRedis,
) -> None:
    """The endpoint moves to the promoted replica and the old primary is demoted: the
    READONLY it answers makes the pool redial, and the new server (whose replid2 is the old
    primary's id) has the recent writes reported lost before it carries any command."""
    from tests.integration.test_shadow import redis_call

    old = redis_factory("--repl-diskless-sync-delay", "0")
    new = redis_factory("--replicaof", "127.0.0.1", str(old.port))
    await wait_until_async(lambda: b"master_link_status:up" in _info(new), what="in sync")
    endpoint = FaultRelay(old.port)
    pool = RedisPool(
        f"redis://127.0.0.1:{endpoint.port}/0", 2, ConnectionOptions(require_primary=True)
    )
    store = RedisStore(pool)
    lost: list[tuple[list[bytes] | None, str]] = []
    store.on_writes_lost = lambda keys, reason: lost.append((keys, reason))
    try:
        assert await store.start()
        await store.delete(b"before")
        redis_call(new.port, "REPLICAOF", "NO", "ONE")
        endpoint.target = new.port
        redis_call(old.port, "REPLICAOF", "127.0.0.1", str(new.port))
        assert await store.delete(b"after") is not None  # READONLY, redial, sent again
        assert lost == [([b"before", b"after"], "failover")] or lost == [
            ([b"after", b"before"], "failover")
        ]
    finally:
        await store.close()
        endpoint.close()


async def test_a_restarted_redis_has_every_key_reported(redis_factory: StartRedis) -> None:
    """Without persistence a restarted Redis is empty (new replication ids): every key."""
    server = redis_factory()
    store = RedisStore(
        RedisPool(server.url(), 2, ConnectionOptions(require_primary=True, backoff_max=0.1))
    )
    lost: list[tuple[list[bytes] | None, str]] = []
    store.on_writes_lost = lambda keys, reason: lost.append((keys, reason))
    try:
        assert await store.start()
        await store.delete(b"k")
        server.restart()

        async def reported() -> bool:
            with contextlib.suppress(RedisError):
                await store.delete(b"k")
            return bool(lost)

        await wait_until_async(reported, what="the restart reported")
        assert lost == [(None, "replaced")]
    finally:
        await store.close()


async def test_closing_while_a_moved_command_waits_completes_it_once(
    cluster: RedisCluster,
) -> None:
    """A command refused with MOVED is sent again after a map refresh; closing the pool in
    between must still complete it, exactly once (or the shadow's key chain would hang)."""
    key = b"{closing}k"
    slot = key_slot(key)
    for attempt in range(3):
        store = RedisStore.from_url(cluster.url(), cluster="true")
        assert await store.start()
        pool = store.pool
        assert isinstance(pool, ClusterPool)
        source = _owner(cluster, key)
        target = next(p for p in cluster.primaries() if p.port != source.port)
        for node in cluster.primaries():  # the slot moves; the pool's map does not know yet
            cluster.cli(node.port, "cluster", "setslot", str(slot), "node", cluster.node_id(target))
        calls: list[tuple[object, object]] = []
        store.send(
            store.get_command(key),
            lambda command, item, error, calls=calls: calls.append((item, error)),
        )
        await wait_until_async(lambda p=pool: p.redirects["moved"], what="the MOVED")
        if attempt:
            await asyncio.sleep(0.001 * attempt)  # (closing at another moment of the retry)
        await store.close()
        await wait_until_async(lambda c=calls: c, what="completed")
        await asyncio.sleep(0.05)  # (a second completion would come by now)
        assert len(calls) == 1, calls


async def test_a_primary_restarted_empty_at_its_address_has_every_key_reported(
    cluster: RedisCluster,
) -> None:
    """Without persistence a restarted cluster primary keeps its slots (nodes.conf) and
    comes back empty: nothing in the slot map changes, only its replication id."""
    store = RedisStore.from_url(cluster.url(), cluster="true", size=2)
    lost: list[tuple[list[bytes] | None, str]] = []
    store.on_writes_lost = lambda keys, reason: lost.append((keys, reason))
    try:
        assert await store.start()
        key = b"restarted:1"
        assert (await store.store("set", key, 0, 0, b"v")).status is Status.STORED
        owner = _owner(cluster, key)
        owner.restart()
        await asyncio.to_thread(cluster.wait_ok)

        async def reported() -> bool:
            with contextlib.suppress(RedisError):
                await store.get(key)
            return bool(lost)

        await wait_until_async(reported, what="the restart reported")
        assert lost == [(None, "replaced")]
        assert await store.get(key) is None  # (it did come back empty)
    finally:
        await store.close()
