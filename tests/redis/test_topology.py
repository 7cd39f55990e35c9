"""The sans-IO rules of a Redis Cluster: slots, redirects, slot maps, failovers, lost writes."""

from __future__ import annotations

import pytest

from proxy.redis.topology import (
    SLOTS,
    Redirect,
    SlotMap,
    WriteLog,
    cluster_reply,
    failed_over,
    is_cluster_refusal,
    key_slot,
    keys_of,
    parse_shards,
    parse_slots,
)


@pytest.mark.parametrize(
    ("key", "slot"),
    [  # CLUSTER KEYSLOT of redis-server 7.0
        (b"foo", 12182),
        (b"{user1000}.following", 3443),
        (b"{user1000}.followers", 3443),
        (b"foo{}{bar}", 8363),  # an empty tag: the whole key
        (b"foo{{bar}}zap", 4015),  # the tag is "{bar"
        (b"foo{bar}{zap}", 5061),  # the first tag only
        (b"a", 15495),
        (b"123456789", 12739),
    ],
)
def test_key_slot_agrees_with_redis(key: bytes, slot: int) -> None:
    assert key_slot(key) == slot


def test_cluster_replies_are_told_apart_from_ordinary_errors() -> None:
    assert cluster_reply("MOVED 3999 127.0.0.1:6381") == Redirect("moved", 3999, "127.0.0.1", 6381)
    ask = Redirect("ask", 12, "cache-1.example", 7000)
    assert cluster_reply("ASK 12 cache-1.example:7000") == ask
    assert cluster_reply("MOVED 7 [::1]:7000") == Redirect("moved", 7, "::1", 7000)
    assert cluster_reply("READONLY You can't write against a read only replica.") == "readonly"
    assert cluster_reply("LOADING Redis is loading the dataset in memory") == "loading"
    assert cluster_reply("TRYAGAIN Multiple keys request during rehashing of slot") == "tryagain"
    assert cluster_reply("CLUSTERDOWN The cluster is down") == "clusterdown"
    assert cluster_reply("MASTERDOWN Link with MASTER is down") == "masterdown"
    assert cluster_reply("ERR wrong number of arguments") is None
    assert cluster_reply("MOVED nonsense") is None
    assert is_cluster_refusal("MOVED 1 h:1") and is_cluster_refusal("READONLY x")
    assert not is_cluster_refusal("OOM command not allowed") and not is_cluster_refusal("ERR")


def _node(node_id: str, port: int, role: str, health: str = "online") -> list[object]:
    return [
        b"id", node_id.encode(), b"port", port, b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1",
        b"role", role.encode(), b"replication-offset", 0, b"health", health.encode(),
    ]  # fmt: skip


def _shards(*shards: tuple[list[int], list[list[object]]]) -> list[object]:
    return [[b"slots", slots, b"nodes", nodes] for slots, nodes in shards]


# Three shards as redis-cli --cluster create makes them, then after a failover of A to A2.
BEFORE = _shards(
    ([0, 5460], [_node("A", 7001, "master"), _node("A2", 7004, "replica")]),
    ([5461, 10922], [_node("B", 7002, "master"), _node("B2", 7005, "replica")]),
    ([10923, 16383], [_node("C", 7003, "master"), _node("C2", 7006, "replica")]),
)
AFTER_FAILOVER = _shards(
    ([0, 5460], [_node("A2", 7004, "master")]),
    ([], [_node("A", 7001, "master", "fail")]),
    ([5461, 10922], [_node("B", 7002, "master"), _node("B2", 7005, "replica")]),
    ([10923, 16383], [_node("C", 7003, "master"), _node("C2", 7006, "replica")]),
)
AFTER_MIGRATION = _shards(
    ([100, 5460], [_node("A", 7001, "master"), _node("A2", 7004, "replica")]),
    ([0, 99, 5461, 10922], [_node("B", 7002, "master"), _node("B2", 7005, "replica")]),
    ([10923, 16383], [_node("C", 7003, "master"), _node("C2", 7006, "replica")]),
)


def test_a_shards_reply_gives_each_slot_its_primary_and_each_replica_its_primary() -> None:
    slot_map = parse_shards(BEFORE)
    assert slot_map.owners[0] == slot_map.owners[5460] == "A"
    assert slot_map.owners[5461] == "B" and slot_map.owners[SLOTS - 1] == "C"
    assert slot_map.uncovered() == 0
    assert slot_map.nodes["A2"].primary == "A" and slot_map.nodes["A"].primary is None
    assert [node.port for node in slot_map.primaries()] == [7001, 7002, 7003]
    migrated = parse_shards(AFTER_MIGRATION)
    assert migrated.owners[:100] == ["B"] * 100 and migrated.owners[100] == "A"


def test_a_failed_primary_keeps_its_slots_until_its_replica_takes_them() -> None:
    failing = _shards(
        ([0, 5460], [_node("A", 7001, "master", "fail"), _node("A2", 7004, "replica")]),
        ([5461, 16383], [_node("B", 7002, "master")]),
    )
    assert parse_shards(failing).owners[0] == "A"
    slot_map = parse_shards(AFTER_FAILOVER)
    assert slot_map.owners[0] == "A2"
    assert "A" not in {node.id for node in slot_map.primaries()}


def test_a_slots_reply_is_read_as_well() -> None:
    reply = [
        [0, 8191, [b"127.0.0.1", 7001, b"A"], [b"127.0.0.1", 7004, b"A2"]],
        [8192, 16383, [b"127.0.0.1", 7002, b"B"]],
    ]
    slot_map = parse_slots(reply)
    assert slot_map.owners[8191] == "A" and slot_map.owners[8192] == "B"
    assert slot_map.nodes["A2"].primary == "A"


def test_a_failover_is_told_apart_from_a_migration() -> None:
    before = parse_shards(BEFORE)
    assert failed_over(before, parse_shards(AFTER_FAILOVER)) == {"A"}
    assert failed_over(before, parse_shards(AFTER_MIGRATION)) == set()
    assert failed_over(before, parse_shards(BEFORE)) == set()
    assert failed_over(SlotMap(), before) == set()  # the first map


def test_malformed_replies_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_shards(b"nope")
    with pytest.raises(ValueError):
        parse_shards([[b"slots", [0, 20000], b"nodes", [_node("A", 1, "master")]]])


def test_the_write_log_answers_since_when_and_knows_when_it_forgot() -> None:
    log = WriteLog(capacity=4)
    for when, key in ((1.0, b"a"), (2.0, b"b"), (3.0, b"a"), (4.0, b"c")):
        log.add(when, key)
    assert sorted(log.since(2.0) or []) == [b"a", b"b", b"c"]
    assert log.since(3.5) == [b"c"]
    log.add(5.0, b"d")  # forgets (1.0, a)
    assert log.since(1.0) is None  # it may have forgotten some of that period
    assert sorted(log.since(1.5) or []) == [b"a", b"b", b"c", b"d"]


def test_the_write_log_forgets_writes_older_than_twice_its_window() -> None:
    log = WriteLog(window=10.0)
    for when in range(100):
        log.add(float(when), b"k%d" % when)
    assert len(log) == 21  # 79..99: nothing older than 20 s before the newest
    assert log.before(95.0) == [b"k%d" % w for w in range(99, 84, -1)]
    assert log.before(85.0) is None  # from 75: some of that period is forgotten


def test_keys_of_a_primary_are_those_of_its_slots() -> None:
    slot_map = parse_shards(BEFORE)
    keys = [b"foo", b"a", b"{user1000}.x"]  # slots 12182 (C), 15495 (C), 3443 (A)
    assert keys_of(keys, slot_map, "C") == [b"foo", b"a"]
    assert keys_of(keys, slot_map, "A") == [b"{user1000}.x"]


def test_replies_of_the_wrong_shape_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_shards([[b"slots", [0, 1], b"nodes", [[b"role", b"master"]]]])  # no id
    with pytest.raises(ValueError):
        parse_slots([[0, 1, [b"127.0.0.1"]]])  # no port


def test_the_healthy_master_of_a_shard_is_its_primary_whatever_the_order() -> None:
    # Redis 7.2 lists the failed old primary in its successor's shard.
    for nodes in (
        [_node("A2", 7004, "master"), _node("A", 7001, "master", "fail")],
        [_node("A", 7001, "master", "fail"), _node("A2", 7004, "master")],
    ):
        slot_map = parse_shards(_shards(([0, 16383], nodes)))
        assert slot_map.owners[0] == "A2"
        assert slot_map.nodes["A2"].primary is None


def test_a_failover_through_a_gap_without_owner_is_still_one() -> None:
    before = parse_shards(BEFORE)
    gap = SlotMap([None] * 5461 + before.owners[5461:], dict(before.nodes))
    known = before.merged(gap)  # what the pool remembers: A kept its slots
    assert known.owners[0] == "A"
    assert failed_over(known, parse_shards(AFTER_FAILOVER)) == {"A"}
    assert failed_over(gap, parse_shards(AFTER_FAILOVER)) == set()  # without memory: missed


def test_a_tls_cluster_uses_the_tls_port_and_falls_back_to_the_port() -> None:
    node = [b"id", b"A", b"port", 0, b"tls-port", 7443, b"ip", b"10.0.0.1", b"role", b"master"]
    plain = [b"id", b"B", b"port", 7002, b"ip", b"10.0.0.2", b"role", b"master"]
    slot_map = parse_shards(_shards(([0, 8191], [node]), ([8192, 16383], [plain])), tls=True)
    assert slot_map.nodes["A"].port == 7443 and slot_map.nodes["B"].port == 7002
