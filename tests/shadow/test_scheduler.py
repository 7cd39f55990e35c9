"""The scheduler alone: per-key order, bounds and drops, with a runner that records what it is
asked to run and finishes each operation a little later (the way a target's reply does)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from proxy.memcache.request import Captured, RequestFramer
from proxy.shadow.engine.executor import ASYNC, DONE, SENT
from proxy.shadow.engine.keystate import EVICTED, KeyState, KeyStates
from proxy.shadow.engine.scheduler import Scheduler
from proxy.shadow.engine.translate import ShadowOp
from proxy.shadow.stats import ShadowStats
from tests.support import wait_until_async


class Runner:
    """Finishes each operation after a random short delay, like a target's reply; records the
    order operations started in, per key, and the most chains ever in flight at once."""

    def __init__(self, outcome: int = SENT) -> None:
        self.outcome = outcome
        self.started: list[tuple[bytes, int]] = []
        self.in_flight: set[bytes] = set()
        self.most_in_flight = 0
        self.slow_done: list[bytes] = []
        self.scheduler: Scheduler | None = None

    def flush_reads(self) -> None:
        pass

    def run(self, op: ShadowOp, state: KeyState, started: float, batch: bool = False) -> int:
        assert op.key not in self.in_flight, "two operations of one key in flight"
        self.started.append((op.key, op.seq))
        if self.outcome != SENT:
            return self.outcome
        self.in_flight.add(op.key)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        asyncio.get_running_loop().call_later(random.random() / 500, self._reply, op.key)
        return SENT

    def _reply(self, key: bytes) -> None:
        self.in_flight.discard(key)
        assert self.scheduler is not None
        self.scheduler.advance(key)

    async def run_slow(self, op: ShadowOp) -> None:
        assert op.key not in self.in_flight
        self.in_flight.add(op.key)
        await asyncio.sleep(0.002)
        self.in_flight.discard(op.key)
        self.slow_done.append(op.key)

    async def settle(self, key: bytes, state: KeyState) -> None:
        state.contended_until = 0.0

    def flush(self, op: ShadowOp) -> None:
        pass


def make(runner: Runner, **limits: int) -> tuple[Scheduler, ShadowStats, KeyStates]:
    stats = ShadowStats()
    keys = KeyStates(1000, race_window=0.0)
    scheduler = Scheduler(
        runner=runner,
        keys=keys,
        sampled=lambda key: True,
        stats=stats,
        queue_size=limits.get("queue_size", 10_000),
        max_inflight=limits.get("max_inflight", 512),
        batch_window=0.0,
        batch_size=64,
        ticked=bool(limits.get("ticked", 0)),
    )
    runner.scheduler = scheduler
    return scheduler, stats, keys


def get(key: bytes) -> Captured:
    requests, _ = RequestFramer(capture=lambda r: True).feed(b"get " + key + b"\r\n")
    request = requests[0]
    request.started = time.perf_counter()
    request.response = b"END\r\n"
    return request.captured()


async def test_each_key_runs_in_reply_order_one_operation_at_a_time() -> None:
    runner = Runner()
    scheduler, _, _ = make(runner, max_inflight=4)
    scheduler.start()
    keys = [b"k%d" % (i % 7) for i in range(400)]
    for start in range(0, len(keys), 25):
        scheduler.observe([get(key) for key in keys[start : start + 25]], session=1)
        await asyncio.sleep(0)
    await asyncio.wait_for(scheduler.idle(), 10)
    await scheduler.stop(1.0)
    assert len(runner.started) == 400
    for key in set(keys):
        seqs = [seq for started, seq in runner.started if started == key]
        assert seqs == sorted(seqs)
    assert runner.most_in_flight <= 4  # max_inflight chains at once


async def test_a_full_queue_drops_and_turns_the_key_cold() -> None:
    runner = Runner()
    scheduler, stats, keys = make(runner, queue_size=3)
    keys.get(b"k").mark_synced(0)
    scheduler.observe([get(b"a"), get(b"b"), get(b"c"), get(b"k")], session=1)
    assert stats.dropped == {"queue_full": 1}
    assert not keys.get(b"k").warm
    scheduler.start()
    await asyncio.wait_for(scheduler.idle(), 10)
    await scheduler.stop(1.0)
    assert [key for key, _ in runner.started] == [b"a", b"b", b"c"]


class Stuck(Runner):
    """Finishes no operation until released (Redis stalled): each key's chain only grows."""

    stuck = True

    def run(self, op: ShadowOp, state: KeyState, started: float, batch: bool = False) -> int:
        if not self.stuck:
            return super().run(op, state, started, batch)
        self.started.append((op.key, op.seq))
        return SENT


async def test_operations_waiting_behind_their_key_count_against_the_queue() -> None:
    # A hot key with its operation in flight: what follows waits in its chain, not in the
    # queue. Those count too, so a stalled Redis cannot make the backlog (memory) grow.
    runner = Stuck()
    scheduler, stats, _ = make(runner, queue_size=50)
    scheduler.start()
    hot = [b"hot%d" % i for i in range(5)]
    for _ in range(40):
        scheduler.observe([get(key) for key in hot], session=1)
        await asyncio.sleep(0)
    assert len(runner.started) == 5  # one in flight per key, the rest chained
    assert stats.queue_depth == 50
    assert stats.dropped == {"queue_full": 200 - 50 - 5}
    runner.stuck = False  # Redis answers again: the chains drain, the count with them
    for key in hot:
        scheduler.advance(key)
    await asyncio.wait_for(scheduler.idle(), 10)
    assert len(runner.started) == 55 and scheduler._chained == 0
    scheduler.observe([get(b"k")], session=1)
    assert stats.queue_depth == 1
    await scheduler.stop(1.0)


class Failing(Runner):
    """A shadow bug: the first operation of b"bad" raises when run; every b"slow" one needs
    the slow path, which raises."""

    def run(self, op: ShadowOp, state: KeyState, started: float, batch: bool = False) -> int:
        if op.key == b"bad" and not any(key == b"bad" for key, _ in self.started):
            self.started.append((op.key, op.seq))
            raise RuntimeError("bug")
        if op.key == b"slow":
            self.started.append((op.key, op.seq))
            return ASYNC
        return super().run(op, state, started)

    async def run_slow(self, op: ShadowOp) -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("bug")


async def test_a_broken_chain_turns_its_key_cold_and_leaves_no_count_behind() -> None:
    runner = Failing()
    scheduler, stats, keys = make(runner)
    for key in (b"bad", b"slow", b"ok"):
        keys.get(key).mark_synced(0)
    scheduler.start()
    scheduler.observe([get(b"bad"), get(b"slow"), get(b"ok"), get(b"slow"), get(b"slow")], 1)
    await asyncio.wait_for(scheduler.idle(), 10)
    scheduler.observe([get(b"bad")], session=1)  # a new chain: the key is served again
    await asyncio.wait_for(scheduler.idle(), 10)
    assert stats.errors["internal"] == 2  # the raise in the queue loop, the held task's
    assert not keys.get(b"bad").warm and not keys.get(b"slow").warm
    assert keys.get(b"ok").warm
    # b"slow": the first failed in its task, the two behind it were not replayed.
    assert [key for key, _ in runner.started].count(b"slow") == 1
    assert [key for key, _ in runner.started].count(b"bad") == 2
    assert scheduler._chained == 0 and stats.queue_depth == 0
    await scheduler.stop(1.0)


async def test_operations_that_end_at_once_run_the_chain_on() -> None:
    runner = Runner(outcome=DONE)
    scheduler, _, _ = make(runner)
    scheduler.start()
    scheduler.observe([get(b"k") for _ in range(5)], session=1)
    await asyncio.wait_for(scheduler.idle(), 10)
    await scheduler.stop(1.0)
    assert [seq for _, seq in runner.started] == [1, 2, 3, 4, 5]


async def test_a_slow_operation_holds_its_key_and_not_the_others() -> None:
    runner = Runner(outcome=ASYNC)
    scheduler, _, _ = make(runner)
    scheduler.start()
    scheduler.observe([get(b"a"), get(b"a"), get(b"b")], session=1)
    await asyncio.wait_for(scheduler.idle(), 10)
    await scheduler.stop(1.0)
    assert runner.slow_done.count(b"a") == 2
    assert runner.started[:2] == [(b"a", 1), (b"b", 3)]  # b did not wait for a's chain


async def test_stop_ends_held_chains() -> None:
    runner = Runner(outcome=ASYNC)
    scheduler, _, _ = make(runner)
    scheduler.start()

    async def forever(op: ShadowOp) -> None:
        await asyncio.sleep(3600)

    runner.run_slow = forever  # type: ignore[method-assign]
    scheduler.observe([get(b"a"), get(b"b")], session=1)
    await wait_until_async(lambda: len(scheduler._chains) == 2, what="both chains held")
    # The chains would hold for an hour: only stop's own timeout can end its wait.
    await asyncio.wait_for(scheduler.stop(0.1), 30)
    assert not scheduler._chains


async def test_a_queued_request_does_not_vouch_past_the_horizon() -> None:
    # Worker mode with several proxy processes: one process's request queued here says
    # nothing of what another one, which has not ticked that far, may still send.
    scheduler, _, _ = make(Runner(), ticked=1)
    now = time.perf_counter()
    scheduler.tick(now)
    scheduler.observe([get(b"k")], session=1, replied_at=now + 1.0)  # queued, not started
    assert not await scheduler.caught_up(now + 0.5, give_up_after=0.05)
    scheduler.tick(now + 0.6)
    assert await scheduler.caught_up(now + 0.5, give_up_after=0.05)
    assert not await scheduler.caught_up(now + 1.5, give_up_after=0.05)  # the queue's head
    await scheduler.stop(1.0)


async def test_a_wall_clock_step_is_logged_once_with_its_size(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runner = Runner()
    scheduler, _, _ = make(runner)
    scheduler.start()
    scheduler.observe([get(b"before")], session=1)
    await asyncio.wait_for(scheduler.idle(), 10)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3.8)  # the host's clock jumps
    for key in (b"after", b"again", b"still"):
        scheduler.observe([get(key)], session=1)
        await asyncio.wait_for(scheduler.idle(), 10)
    monkeypatch.undo()
    await scheduler.stop(1.0)
    steps = [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert len(steps) == 1 and "+3.80 s" in steps[0], steps
    # The ops dispatched after it were anchored to the new wall clock.
    assert [key for key, _ in runner.started] == [b"before", b"after", b"again", b"still"]


def request(stream: bytes, reply: bytes) -> Captured:
    requests, _ = RequestFramer(capture=lambda r: True).feed(stream)
    captured = requests[0]
    captured.started = time.perf_counter()
    captured.response = reply
    return captured.captured()


class Syncing(Runner):
    """Marks every operation's key in step when it completes (as a matching write does)."""

    def run(self, op: ShadowOp, state: KeyState, started: float, batch: bool = False) -> int:
        state.mark_synced(op.seq)
        return DONE


async def test_a_drop_of_a_key_with_no_state_yet_keeps_it_cold() -> None:
    """Cause 1: `set K`, then gets of other keys until the small queue overflows, then
    `incr K` (dropped): the queued set, replayed later, must not make K in step."""
    scheduler, stats, keys = make(Syncing(), queue_size=3)
    chunk = [request(b"set K 0 0 3\r\n100\r\n", b"STORED\r\n")]
    chunk += [get(b"other%d" % i) for i in range(5)]
    chunk.append(request(b"incr K 5\r\n", b"105\r\n"))
    scheduler.observe(chunk, session=1)
    assert stats.dropped["queue_full"] == 4
    scheduler.start()
    await asyncio.wait_for(scheduler.idle(), 10)
    await scheduler.stop(1.0)
    state = keys.peek(b"K")
    assert state is not None and not state.warm


async def test_a_flush_all_is_never_dropped_for_room() -> None:
    """Cause 2: a flush_all lost to a full queue left every key warm. It is queued whatever
    the queue holds (it has no key: losing it would make every key cold, and its delay
    unknown)."""
    scheduler, stats, _ = make(Runner(outcome=DONE), queue_size=2)
    flushed: list[ShadowOp] = []
    scheduler.runner.flush = flushed.append  # type: ignore[method-assign]
    scheduler.observe([get(b"a"), get(b"b"), request(b"flush_all 2\r\n", b"OK\r\n")], session=1)
    assert "queue_full" not in stats.dropped
    scheduler.start()
    await asyncio.wait_for(scheduler.idle(), 10)
    await scheduler.stop(1.0)
    assert [op.exptime for op in flushed] == [2]


async def test_a_timed_event_happens_in_reply_order() -> None:
    """Every key turns cold at the time given, before the first operation answered at or
    after it, whatever the order of arrival; a queue that waits for nothing fires it once
    the time has passed."""
    scheduler, _, keys = make(Syncing())
    scheduler.start()
    now = time.perf_counter()
    scheduler.at(now + 0.05)
    scheduler.observe([get(b"before")], session=1, replied_at=now)
    await asyncio.wait_for(scheduler.idle(), 10)
    assert keys.peek(b"before").warm  # type: ignore[union-attr]
    scheduler.observe([get(b"after")], session=1, replied_at=now + 0.06)
    await asyncio.wait_for(scheduler.idle(), 10)
    assert keys.peek(b"before") is None  # (the epoch came between them)
    assert keys.peek(b"after").warm  # type: ignore[union-attr]
    scheduler.at(time.perf_counter() + 0.05)
    assert await scheduler.caught_up(time.perf_counter() + 0.1, give_up_after=30.0)
    assert keys.peek(b"after") is None
    await scheduler.stop(1.0)


async def test_the_sample_is_what_every_proxy_process_covers() -> None:
    """workers: N: a rise counts once every process has risen; a fall as soon as one has."""
    scheduler, _, keys = make(Runner())
    full = keys.coverage
    scheduler.coverage(1, full, 0.0)
    scheduler.coverage(0, full // 2, 1.0)
    assert keys.coverage == full // 2
    scheduler.coverage(0, full, 2.0)
    scheduler.coverage(1, full // 4, 2.0)
    assert keys.coverage == full // 4
    scheduler.coverage(1, full, 3.0)
    assert keys.coverage == full
    scheduler.coverage(1, 0, 4.0)
    scheduler.stream_closed(1)  # (its process is gone: it narrows nothing any more)
    assert keys.coverage == full
    await scheduler.stop(1.0)


async def test_a_memcached_eviction_comes_after_every_operation_answered_before_it() -> None:
    """Worker mode: `set K` answered, then Memcached evicts K; the eviction is named before
    the set has come through the proxy's pipe. The set, arriving later, must not establish
    K after the eviction (the false unexpected_in_redis of memcached -m 8 with drops)."""
    scheduler, _, keys = make(Syncing(), ticked=1)
    answered = time.perf_counter()
    scheduler.tick(answered - 1.0)  # the proxy has vouched for less than that so far
    scheduler.evicted([b"K"])  # named now, by the watch stream
    scheduler.observe([request(b"set K 0 0 1\r\nv\r\n", b"STORED\r\n")], 1, replied_at=answered)
    scheduler.start()
    await asyncio.wait_for(scheduler.idle(), 10)
    scheduler.tick(time.perf_counter())  # everything answered before the eviction is in
    state = keys.peek(b"K")
    assert state is not None and not state.warm and state.why == EVICTED
    await scheduler.stop(1.0)
