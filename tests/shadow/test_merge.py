"""The merge of several proxy processes' hand-off streams, and shard routing (sans-IO)."""

from __future__ import annotations

from collections import Counter

from proxy.shadow.control import ShadowControl
from proxy.shadow.engine.merge import Merger
from proxy.shadow.sampler import KeySampler
from proxy.shadow.shards import shard_of, shards_for


def group(session: int, at: float, name: str = "r") -> tuple[int, float, list[object]]:
    return (session, at, [name])


def test_groups_wait_until_every_stream_vouches_for_them() -> None:
    merger = Merger(stall=10.0)
    merger.open(0, 0.0)
    merger.open(1, 0.0)
    assert merger.add(0, [group(1, 1.0, "a1"), group(1, 3.0, "a3")], 3.5) == []
    out, watermark = merger.release(10.0)
    assert out == [] and watermark == 0.0  # stream 1 may still send something before 1.0
    merger.add(1, [group(2, 2.0, "b2")], 2.5)
    out, watermark = merger.release(10.0)
    assert [g[2] for g in out] == [["a1"], ["b2"]]  # in reply order across the streams
    assert watermark == 2.5
    merger.tick(1, 4.0)
    out, watermark = merger.release(10.0)
    assert [g[2] for g in out] == [["a3"]] and watermark == 3.5
    assert merger.pending == 0


def test_one_streams_groups_keep_their_order_on_equal_times() -> None:
    merger = Merger()
    merger.open(0, 0.0)
    merger.add(0, [group(1, 1.0, "x"), group(2, 1.0, "y"), group(3, 1.0, "z")], 1.0)
    out, _ = merger.release(5.0)
    assert [g[2][0] for g in out] == ["x", "y", "z"]


def test_a_stalled_stream_stops_holding_the_others_and_its_late_groups_are_returned() -> None:
    merger = Merger(stall=1.0)
    merger.open(0, 0.0)
    merger.open(1, 0.0)
    merger.add(0, [group(1, 0.5)], 0.9)
    assert merger.release(0.9)[0] == []  # stream 1 is only 0.9 behind: wait for it
    merger.tick(0, 2.0)
    out, tick = merger.release(2.0)  # stream 1 is 2.0 behind the freshest: stalled
    assert len(out) == 1 and merger.released == 2.0 and tick == 0.0
    late = merger.add(1, [group(5, 1.5, "late"), group(5, 2.5, "fine")], 2.6)
    assert [g[2] for g in late] == [["late"]]
    merger.tick(0, 3.0)
    out, _ = merger.release(3.0)
    assert [g[2] for g in out] == [["fine"]]


def test_a_slow_reader_does_not_call_every_stream_stalled() -> None:
    """The worker itself was starved: every horizon is far behind its clock, none behind
    another: nothing is released early, so nothing turns late."""
    merger = Merger(stall=1.0)
    merger.open(0, 0.0)
    merger.open(1, 0.0)
    merger.add(0, [group(1, 0.2), group(1, 0.28)], 0.3)
    merger.tick(1, 0.25)
    out, watermark = merger.release(100.0)
    assert len(out) == 1 and watermark == 0.25
    assert merger.add(1, [group(2, 0.26)], 0.4) == []


def test_a_closed_stream_holds_nobody_and_its_groups_still_come_in_order() -> None:
    merger = Merger()
    merger.open(0, 0.0)
    merger.open(1, 0.0)
    merger.add(1, [group(2, 1.0, "b1"), group(2, 5.0, "b5")], 5.0)
    merger.close(1)
    merger.add(0, [group(1, 2.0, "a2")], 3.0)
    out, watermark = merger.release(10.0)
    assert [g[2] for g in out] == [["b1"], ["a2"]] and watermark == 3.0
    assert merger.streams == 2  # b5 is still to come, after stream 0 passes it
    merger.tick(0, 6.0)
    out, _ = merger.release(10.0)
    assert [g[2] for g in out] == [["b5"]] and merger.streams == 1


def test_groups_of_an_unknown_stream_are_late() -> None:
    merger = Merger()
    assert merger.add(7, [group(1, 1.0)], 2.0) == [group(1, 1.0)]


def test_every_closed_lets_everything_out() -> None:
    merger = Merger()
    merger.open(0, 0.0)
    merger.add(0, [group(1, 9.0)], 1.0)  # (a horizon behind its own group: never, but safe)
    merger.close(0)
    out, watermark = merger.release(10.0)
    assert len(out) == 1 and watermark == 10.0


def test_shards_spread_sampled_keys_evenly() -> None:
    """Sampled keys are those with small sampler hashes; the shard hash must not care."""
    sampler = KeySampler(ShadowControl(0.01))
    keys = [f"key:{i}".encode() for i in range(200_000)]
    sampled = [key for key in keys if sampler.sampled(key)]
    counts = Counter(shard_of(key, 2) for key in sampled)
    assert len(sampled) > 1500
    assert abs(counts[0] - counts[1]) < 0.1 * len(sampled)
    counts4 = Counter(shard_of(key, 4) for key in keys)
    assert min(counts4.values()) > 0.23 * len(keys)


def test_a_request_goes_to_its_sampled_keys_shards_or_to_all_when_keyless() -> None:
    everything = ShadowControl(1.0)
    sampler = KeySampler(everything)
    keys = [f"k{i}".encode() for i in range(50)]
    assert shards_for(keys, 4, sampler.sampled) == {shard_of(k, 4) for k in keys}
    assert shards_for([], 4, sampler.sampled) == {0, 1, 2, 3}  # flush_all
    one = keys[3]
    assert shards_for([one], 4, sampler.sampled) == {shard_of(one, 4)}
    assert shards_for([one], 1, sampler.sampled) == {0}


def test_the_dispatchers_tick_waits_for_a_stalled_stream_that_no_longer_holds_releases() -> None:
    """Past a stalled stream, requests are replayed, but verdicts that need ordered
    evidence are not told that everything is in: the stalled stream may hold some."""
    merger = Merger(stall=1.0)
    merger.open(0, 0.0)
    merger.open(1, 0.0)
    merger.add(0, [group(1, 1.5)], 2.0)
    out, tick = merger.release(2.0)
    assert len(out) == 1  # stream 1 is 2 s behind: stalled, not waited for
    assert tick == 0.0  # ... but the dispatcher's horizon stays with it


def test_a_marker_is_released_after_the_requests_that_came_before_it() -> None:
    """lost/epoch come before the batch they were written with; they sort by their time."""
    merger = Merger(stall=10.0)
    merger.open(0, 0.0)
    merger.add(0, [(-1, 2.0, None)], float("-inf"))  # told at 2.0, before the batch
    merger.add(0, [group(1, 1.0, "before"), group(1, 1.5, "also")], 2.5)
    out, _ = merger.release(5.0)
    assert [g[2] for g in out] == [["before"], ["also"], None]
