"""A Redis Cluster as the shadow target, and a failover behind one endpoint (ElastiCache).

Real processes on loopback: a 3-primary cluster with a replica each (redis-cli --cluster
create), the hammer's whole command mix through memshadow, and during the load a slot
migration (redis-cli --cluster reshard: MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE) or a
primary killed and its replica promoted. The verdict must stay clean: no client error, no
false mismatch, what could not be replayed dropped and counted by reason.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import hiredis
import pytest

from proxy.config import Config
from proxy.ops.causes import REDIS_REFUSALS
from proxy.ops.operations import redis_info_from
from proxy.ops.report import parse_keyspace
from proxy.redis.url import RedisURL
from tests.integration.hammer import LOAD_DROPS, assert_drops_accounted, figures
from tests.integration.test_shadow import redis_call
from tests.integration.test_verdicts import hammer_gives_no_false_alarm
from tests.support import (
    REDIS_CLI,
    FaultRelay,
    ProxyThread,
    RedisCluster,
    ServerProcess,
    proxy_config,
    redis_argv,
    wait_until,
)


@pytest.fixture(params=["process", "inline"])
def worker_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    nodes = RedisCluster(str(tmp_path))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


SLOTS_2000 = ("--cluster-slots", "2000", "--cluster-yes", "--cluster-pipeline", "20")


def cluster_get(cluster: RedisCluster, key: str) -> object:
    """GET on the cluster, following a MOVED (test-side direct access)."""
    reply = redis_call(cluster.live().port, "GET", key)
    if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("MOVED"):
        reply = redis_call(int(str(reply).rsplit(":", 1)[1]), "GET", key)
    return reply


def _proxy(memcached: ServerProcess, redis: ServerProcess, worker: str) -> ProxyThread:
    proxy = ProxyThread(proxy_config(memcached, redis, 1.0, worker=worker, backfill=True))
    proxy.start()
    return proxy


def _pool(proxy: ProxyThread) -> object:
    return proxy.shadow.store.pool


def test_the_hammer_on_a_cluster_gives_no_false_alarm(
    worker_mode: str, memcached: ServerProcess, cluster: RedisCluster
) -> None:
    proxy = _proxy(memcached, cluster.servers[0], worker_mode)
    epoch = cluster.epoch()
    try:
        after = hammer_gives_no_false_alarm(proxy, memcached, lambda key: cluster_get(cluster, key))
        # What was dropped, the load explains (Redis or the shadow too slow for it): never a
        # refusal given up or a write the cluster lost, unless a node did fail over (a host
        # loaded past the cluster's 1 s node timeout: its epoch says so).
        explained = LOAD_DROPS
        if cluster.epoch() != epoch:
            explained |= {"failover", *(f"redis_{refusal}" for refusal in REDIS_REFUSALS)}
        assert_drops_accounted(proxy, after, explained)
        if worker_mode == "inline":
            assert proxy.shadow.store.is_cluster

        # The operators' INFO covers every primary: the keys summed over the cluster (read
        # between two counts: keys with a 2 s TTL may expire meanwhile).
        def keys() -> int:
            return sum(int(redis_call(p.port, "DBSIZE")) for p in cluster.primaries())  # type: ignore[call-overload]

        before = keys()
        info = proxy.run(redis_info_from(proxy.shadow.redis_primaries))
        after = keys()
        assert after <= parse_keyspace(info["db0"])["keys"] <= before, (after, info, before)
    finally:
        proxy.stop()
    # The keys went to every primary: each holds some.
    sizes = [redis_call(p.port, "DBSIZE") for p in cluster.primaries()]
    assert len(sizes) == 3 and all(isinstance(n, int) and n > 0 for n in sizes), sizes


def test_a_slot_migration_under_load_keeps_the_verdict_clean(
    worker_mode: str, memcached: ServerProcess, cluster: RedisCluster
) -> None:
    source, target = cluster.primaries()[:2]

    def reshard() -> None:
        time.sleep(1.5)
        started = time.monotonic()
        ids = cluster.node_id(source), cluster.node_id(target)
        moving = ("--cluster-from", ids[0], "--cluster-to", ids[1])
        subprocess.run(
            [REDIS_CLI, "--cluster", "reshard", f"127.0.0.1:{source.port}", *moving, *SLOTS_2000],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=120,
        )
        print(f"\nresharding 2000 slots took {time.monotonic() - started:.1f} s")

    proxy = _proxy(memcached, cluster.servers[0], worker_mode)
    try:
        result = hammer_gives_no_false_alarm(
            proxy, memcached, lambda key: cluster_get(cluster, key), 10.0, reshard
        )
        # No replay given up over the migration's own refusals (MOVED, ASK, TRYAGAIN): each
        # was followed. (Replays timed out by a stalled machine are dropped as everywhere.)
        refused = {r: n for r, n in result["dropped"].items() if r.startswith("redis_")}  # type: ignore[attr-defined]
        refused.pop("redis_down", None)
        refused.pop("redis_busy", None)
        assert refused == {}, result["dropped"]
        if worker_mode == "inline":
            pool = _pool(proxy)
            print(f"redirects followed: {pool.redirects}")  # type: ignore[attr-defined]
            assert pool.redirects["moved"] > 0  # type: ignore[attr-defined]
            assert pool.failovers == 0  # type: ignore[attr-defined]
    finally:
        proxy.stop()


def test_a_primary_killed_under_load_fails_over_without_false_alarm(
    worker_mode: str, memcached: ServerProcess, cluster: RedisCluster
) -> None:
    victim = cluster.primaries()[-1]
    proxy = _proxy(memcached, cluster.servers[0], worker_mode)
    matches: list[int] = []

    def kill() -> None:
        time.sleep(2.0)
        victim.stop()
        killed = time.monotonic()
        cluster.wait_ok()  # the replica promoted
        print(f"\ncluster failed over {time.monotonic() - killed:.1f} s after the kill")
        if worker_mode == "inline":
            pool = _pool(proxy)
            wait_until(
                lambda: pool.is_connected and pool.failovers,  # type: ignore[attr-defined]
                60,
                "the shadow on the new primary",
            )
            print(f"shadow on the promoted replica {time.monotonic() - killed:.1f} s after")
        matches.append(figures(proxy)["outcomes"].get("match", 0))  # type: ignore[union-attr]
        # the hammer goes on (however long the failover took) until the shadow came back:
        # comparisons go on after the failover
        wait_until(
            lambda: figures(proxy)["outcomes"].get("match", 0) > matches[0] + 500,  # type: ignore[union-attr]
            120,
            "comparisons after the failover",
        )

    try:
        result = hammer_gives_no_false_alarm(
            proxy,
            memcached,
            lambda key: cluster_get(cluster, key),
            180.0,
            kill,
            stop_when_done=True,
        )
        assert result["outcomes"]["match"] > matches[0] + 500  # type: ignore[index]
        dropped = result["dropped"]
        assert dropped.get("redis_down", 0) > 0, dropped  # type: ignore[attr-defined]
        assert dropped.get("failover", 0) > 0, dropped  # type: ignore[attr-defined]
    finally:
        proxy.stop()


@pytest.fixture
def replica_pair() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    primary = ServerProcess(redis_argv()).start()
    replica = ServerProcess(redis_argv("--replicaof", "127.0.0.1", str(primary.port))).start()
    try:
        wait_until(
            lambda: b"master_link_status:up" in redis_call(replica.port, "INFO", "replication"),  # type: ignore[operator]
            what="the replica in sync",
        )
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_a_primary_demoted_behind_one_endpoint_like_elasticache(
    worker_mode: str,
    memcached: ServerProcess,
    replica_pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """One endpoint (a relay) leads to the primary; the failover promotes the replica, moves
    the endpoint to it and demotes the old primary, whose open connections then answer
    writes with READONLY: memshadow must reconnect and go on, without false alarm."""
    old, new = replica_pair
    endpoint = FaultRelay(old.port)

    def fail_over() -> None:
        time.sleep(2.0)
        redis_call(new.port, "REPLICAOF", "NO", "ONE")
        endpoint.target = new.port
        redis_call(old.port, "REPLICAOF", "127.0.0.1", str(new.port))

    proxy = ProxyThread(_endpoint_config(memcached, endpoint.port, worker_mode))
    proxy.start()
    try:
        result = hammer_gives_no_false_alarm(
            proxy, memcached, lambda key: redis_call(new.port, "GET", key), 10.0, fail_over
        )
        dropped = result["dropped"]
        print(f"dropped by reason: {dropped}")
        assert dropped.get("failover", 0) > 0, dropped  # type: ignore[attr-defined]
    finally:
        proxy.stop()
        endpoint.close()


def _endpoint_config(memcached: ServerProcess, port: int, worker: str) -> Config:
    config = proxy_config(memcached, None)
    url = RedisURL.parse(f"redis://127.0.0.1:{port}/0")
    return replace(
        config,
        shadow=replace(config.shadow, redis=url, sample_rate=1.0, worker=worker, backfill=True),
    )
