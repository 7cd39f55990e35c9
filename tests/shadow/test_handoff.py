"""The hand-off to the shadow workers: routing by key shard, the shared byte budget, drops
and what the workers are told about them (wire frames read back with FrameDecoder)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.memcache.request import Request, RequestFramer
from proxy.shadow.control import ShadowControl
from proxy.shadow.handoff import COALESCE_ITEMS, Handoff
from proxy.shadow.sampler import KeySampler
from proxy.shadow.shards import shard_of
from proxy.shadow.stats import ShadowStats
from proxy.shadow.wire import MARKER, FrameDecoder
from tests.support import wait_until_async


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = FrameDecoder()
        self.messages: list[tuple[Any, ...]] = []
        self.buffered = 0
        self.closing = False

    def writelines(self, data: Any) -> None:
        self.messages += self.decoder.feed(b"".join(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing


def request(line: bytes, data: bytes | None = None, response: bytes = b"STORED\r\n") -> Request:
    """One captured request as the client path hands it over (framed, answered)."""
    wire = line + b"\r\n" + (data + b"\r\n" if data is not None else b"")
    (framed,), _ = RequestFramer(capture=lambda r: True).feed(wire)
    framed.response = response
    return framed


def handoff(shards: int) -> tuple[Handoff, list[FakeTransport]]:
    sampler = KeySampler(ShadowControl(1.0))
    hand = Handoff(shards, ShadowStats(), sampler.sampled)
    transports = [FakeTransport() for _ in range(shards)]
    for shard, transport in enumerate(transports):
        hand.connect(shard, transport)
    return hand, transports


def batches(transport: FakeTransport) -> list[Any]:
    return [m for m in transport.messages if m[0] == "batch"]


async def test_each_request_goes_to_the_worker_owning_its_key() -> None:
    hand, transports = handoff(2)
    keys = [b"k%d" % i for i in range(40)]
    hand.observe([request(b"set %s 0 0 1" % key, b"v") for key in keys], session=7)
    hand.flush()
    for shard, transport in enumerate(transports):
        ((_, groups, sent_at),) = batches(transport)
        ((session, replied_at, items),) = groups
        assert session == 7 and replied_at <= sent_at
        assert [item[1][1] for item in items] == [k for k in keys if shard_of(k, 2) == shard]


async def test_a_multi_key_get_reaches_every_owner_and_flush_all_every_worker() -> None:
    hand, transports = handoff(2)
    keys = [b"a", b"b", b"c", b"d", b"e"]
    assert {shard_of(k, 2) for k in keys} == {0, 1}
    hand.observe([request(b"get " + b" ".join(keys), None, b"END\r\n")], session=1)
    hand.observe([request(b"flush_all", None, b"OK\r\n")], session=1)
    hand.flush()
    for transport in transports:
        commands = [item[0] for _, groups, _ in batches(transport) for g in groups for item in g[2]]
        assert commands == ["get", "flush_all"]
    assert hand.stats.shadowed == {"get": 1, "flush_all": 1}  # counted once each


async def test_a_drop_is_marked_in_its_place_among_the_requests() -> None:
    """The worker must make the key cold after the requests before the drop (they may warm
    it) and before those after it (they must not be judged against a stale Redis)."""
    hand, transports = handoff(1)
    hand.budget = 256 * 1024
    big = b"b" * (300 * 1024)
    hand.observe(
        [
            request(b"set k 0 0 1", b"a"),
            request(b"set k 0 0 %d" % len(big), big),  # over the whole budget: dropped
            request(b"get k", None, b"END\r\n"),
        ],
        session=3,
    )
    assert hand.dropped == {"queue_full": 1}
    hand.flush()
    ((_, groups, _),) = batches(transports[0])
    assert [(g[0], [i[0] for i in g[2]] if g[0] != MARKER else g[2]) for g in groups] == [
        (3, ["set"]),
        (MARKER, [b"k"]),
        (3, ["get"]),
    ]


async def test_the_budget_is_one_for_the_whole_process() -> None:
    hand, transports = handoff(4)
    hand.budget = 4 * 1024 * 1024
    for transport in transports[1:]:
        transport.buffered = 1024 * 1024 + 512 * 1024  # 4.5 MB waiting in the other three
    key = next(b"y%d" % i for i in range(100) if shard_of(b"y%d" % i, 4) == 0)
    hand.observe([request(b"set %s 0 0 1" % key, b"v")], session=1)
    assert hand.dropped == {"queue_full": 1}
    hand.flush()
    ((_, groups, _),) = batches(transports[0])
    assert groups[0][0] == MARKER and groups[0][2] == [key]


async def test_drops_while_a_worker_is_down_make_its_keys_cold_on_a_feed_not_a_new_worker() -> None:
    hand, _ = handoff(1)
    hand.connect(0, None)
    hand.observe([request(b"set k 0 0 1", b"v")], session=1)
    assert hand.dropped == {"worker_down": 1}
    feed = FakeTransport()
    hand.connect(0, feed, fresh=False)  # another process's feed to a running worker
    hand.tick()
    assert [m[0] for m in feed.messages] == ["epoch", "tick"]
    hand.connect(0, None)
    hand.observe([request(b"set k 0 0 1", b"v")], session=1)
    fresh = FakeTransport()
    hand.connect(0, fresh)  # a new worker: every key is cold there anyway
    hand.tick()
    assert [m[0] for m in fresh.messages] == ["tick"]


async def test_a_clean_close_says_goodbye_after_the_last_batch() -> None:
    hand, transports = handoff(2)
    hand.observe([request(b"set k 0 0 1", b"v")], session=1)
    hand.close(goodbye=True)
    for transport in transports:
        assert transport.messages[-1] == ("bye",)
    assert sum(len(batches(t)) for t in transports) == 1
    hand.observe([request(b"set k 0 0 1", b"v")], session=1)  # after close: dropped
    assert hand.dropped == {"worker_down": 1}


async def test_a_hand_off_that_raised_makes_every_key_cold_on_every_worker() -> None:
    """After a bug in observe, which requests reached a batch is unknown: each worker gets,
    after whatever it was handed, the marker that makes every key cold."""
    hand, transports = handoff(2)
    hand.observe([request(b"set k%d 0 0 1" % i, b"v") for i in range(6)], session=5)

    def broken(key: bytes) -> bool:
        raise RuntimeError("shadow bug")

    hand.sampled = broken
    with pytest.raises(RuntimeError):
        hand.observe([request(b"set k9 0 0 1", b"v")], session=5)
    await asyncio.sleep(0)  # its flush runs on the loop
    for transport in transports:
        ((_, groups, _),) = batches(transport)
        assert groups[-1][0] == MARKER and groups[-1][2] is None


class CountingTransport(FakeTransport):
    """Counts the writes (each one a send to the worker's socket: a wake-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def writelines(self, data: Any) -> None:
        self.writes += 1
        super().writelines(data)


async def test_sparse_requests_wait_for_one_write_per_linger() -> None:
    """Sparse sampling: each request alone would cost a write and a worker wake-up; with a
    linger they are gathered, in order and with their own reply times, into one batch."""
    hand = Handoff(1, ShadowStats(), KeySampler(ShadowControl(1.0)).sampled)
    transport = CountingTransport()
    hand.connect(0, transport)
    hand.linger = 1.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(5):
        hand.observe([request(b"set k%d 0 0 1" % i, b"v")], session=i)
        await asyncio.sleep(0)  # loop iterations pass: nothing is written yet
    if loop.time() - start < hand.linger:  # (a host that stalled for the linger: it was due)
        assert transport.writes == 0 and hand.pending == 5
    await wait_until_async(lambda: transport.writes, what="the batch written")
    assert transport.writes == 1
    ((_, groups, sent_at),) = batches(transport)
    assert [g[0] for g in groups] == [0, 1, 2, 3, 4]  # (sessions, in order)
    replied = [g[1] for g in groups]
    assert replied == sorted(replied) and replied[-1] <= sent_at


async def test_a_busy_batch_does_not_linger() -> None:
    hand = Handoff(1, ShadowStats(), KeySampler(ShadowControl(1.0)).sampled)
    transport = CountingTransport()
    hand.connect(0, transport)
    hand.linger = 10.0
    hand.observe([request(b"set k%d 0 0 1" % i, b"v") for i in range(COALESCE_ITEMS)], session=1)
    await asyncio.sleep(0)
    assert transport.writes == 1 and hand.pending == 0


async def test_a_tick_carries_the_lingering_batch_in_the_same_write() -> None:
    hand = Handoff(2, ShadowStats(), KeySampler(ShadowControl(1.0)).sampled)
    transports = [CountingTransport(), CountingTransport()]
    for shard, transport in enumerate(transports):
        hand.connect(shard, transport)
    hand.linger = 10.0
    key = next(b"y%d" % i for i in range(100) if shard_of(b"y%d" % i, 2) == 0)
    hand.observe([request(b"set %s 0 0 1" % key, b"v")], session=1)
    hand.tick()
    assert [t.writes for t in transports] == [1, 1]  # the batch and the tick; the tick alone
    (batch, tick) = transports[0].messages
    assert batch[0] == "batch" and tick == ("tick", batch[2])  # one horizon for both
    assert transports[1].messages == [tick]
    assert hand.pending == 0
    await asyncio.sleep(0)
    assert [t.writes for t in transports] == [1, 1]  # (its timer was cancelled)
