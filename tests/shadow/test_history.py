"""OpHistory: the last operations of recently used keys, bounded per key and in keys."""

from __future__ import annotations

from proxy.shadow.history import OpHistory, Step


def test_a_key_keeps_its_last_operations_in_order() -> None:
    history = OpHistory(keys=100, per_key=3)
    for i in range(40):
        history.add(b"k", ("set", "STORED", "STORED", float(i), 7))
    assert history.steps(b"k") == [
        Step("set", "STORED", "STORED", float(i), 7) for i in (37, 38, 39)
    ]
    assert history.describe(b"k", 39.0)[-1] == {
        "command": "set",
        "memcached": "STORED",
        "redis": "STORED",
        "ms": 0.0,
        "connection": 7,
    }
    assert history.describe(b"k", 39.0)[0]["ms"] == -2000.0
    assert history.steps(b"unknown") == []


def test_the_table_is_bounded_and_keeps_keys_in_use() -> None:
    history = OpHistory(keys=10, per_key=2)
    history.add(b"hot", ("get", "HIT", "HIT", 0.0, 1))
    for i in range(1000):
        history.add(b"k%d" % i, ("get", "MISS", "MISS", 0.0, 1))
        if i % 3 == 0:
            history.add(b"hot", ("get", "HIT", "HIT", float(i), 1))
    assert len(history) <= 10
    assert history.steps(b"hot")[-1].replied_at == 999.0
    assert history.steps(b"k999") and not history.steps(b"k0")
