"""OpHistory: the last operations of recently used keys, bounded per key and in operations."""

from __future__ import annotations

from proxy.shadow.engine.history import OpHistory, Step


def test_a_key_keeps_its_last_operations_in_order() -> None:
    history = OpHistory(steps=100, per_key=3)
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


def test_the_table_is_bounded_by_operations_and_keeps_keys_in_use() -> None:
    history = OpHistory(steps=20, per_key=2)
    history.add(b"hot", ("get", "HIT", "HIT", 0.0, 1))
    for i in range(1000):
        history.add(b"k%d" % i, ("get", "MISS", "MISS", 0.0, 1))
        if i % 3 == 0:
            history.add(b"hot", ("get", "HIT", "HIT", float(i), 1))
    assert sum(len(history.snapshot(b"k%d" % i)) for i in range(1000)) <= 20
    assert history.steps(b"hot")[-1].replied_at == 999.0
    assert history.steps(b"k999") and not history.steps(b"k0")


def test_many_keys_with_few_operations_each_are_all_kept_within_the_bound() -> None:
    """The bound is memory (operations), not a count of keys: 20,000 keys of one operation
    each fit in 65,536 steps; the story of an example at 64 clients' key counts survives."""
    history = OpHistory()
    for i in range(20_000):
        history.add(b"k%d" % i, ("set", "STORED", "STORED", float(i), 1))
    assert all(history.steps(b"k%d" % i) for i in range(0, 20_000, 997))


def test_a_snapshot_is_the_story_as_it_stood() -> None:
    history = OpHistory(steps=100, per_key=3)
    history.add(b"k", ("set", "STORED", "STORED", 1.0, 1))
    taken = history.snapshot(b"k")
    history.add(b"k", ("get", "HIT", "MISS", 2.0, 1))
    assert [step[0] for step in taken] == ["set"]
