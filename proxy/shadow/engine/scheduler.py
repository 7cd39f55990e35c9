"""Scheduler: the shadow's bounded queue and its per-key chains, in Memcached's reply order.

The client path hands over completed requests (`observe`); the scheduler never makes it wait:
past `queue_size` the work is dropped, counted, and the keys turn cold. A task takes the queue
in batches, translates each request into operations and runs each key's operations strictly
one after the other (a chain), at most `max_inflight` chains at once, so the target sees a
key's writes in Memcached's order. What an operation *does* is the runner's business (the
dispatcher); the scheduler only knows when the key's next one may start.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from proxy.memcache.request import Captured
from proxy.redis.layout import DEFAULT_ITEM_SIZE_MAX
from proxy.shadow.engine.classify import STEP_SECONDS
from proxy.shadow.engine.executor import ASYNC, SENT
from proxy.shadow.engine.keystate import EVICTED, MISSED, NEVER, KeyState, KeyStates, wall_offset
from proxy.shadow.engine.translate import FLUSH, READ, ShadowOp, Skip, translate
from proxy.shadow.stats import ShadowStats
from proxy.shadow.words import DropReason, ErrorKind

log = logging.getLogger("memshadow.shadow")


class ChainRunner(Protocol):
    """What the scheduler asks of the dispatcher, one key's operation at a time."""

    def run(self, op: ShadowOp, state: KeyState, started: float, batch: bool = False) -> int:
        """Start op (nothing else of its key is in flight): executor.SENT (its completion
        hands the chain back with `advance`), DONE (it ended at once) or ASYNC (run_slow).
        `batch`: the key's first operation in a while: it may wait for flush_reads()."""
        ...

    def flush_reads(self) -> None:
        """The reads that waited (run with batch) go out: the scheduler's round is over."""
        ...

    async def run_slow(self, op: ShadowOp) -> None:
        """The rest of an ASYNC operation, awaited while its chain is held."""
        ...

    async def settle(self, key: bytes, state: KeyState) -> None:
        """Racing writers are done with the key for now: make the stores equal."""
        ...

    def flush(self, op: ShadowOp) -> None:
        """A flush_all: no key, no chain."""
        ...


class Scheduler:
    """A bounded queue of observed requests and one chain per key with work in flight."""

    def __init__(
        self,
        *,
        runner: ChainRunner,
        keys: KeyStates,
        sampled: Callable[[bytes], bool],
        stats: ShadowStats,
        queue_size: int,
        max_inflight: int,
        batch_window: float,
        batch_size: int,
        ticked: bool = False,
    ) -> None:
        self.runner = runner
        self.keys = keys
        self.sampled = sampled
        self.stats = stats
        self.queue_size = queue_size
        self.max_inflight = max_inflight
        self.batch_window = batch_window
        self.batch_size = batch_size
        # Worker mode (ticked): what the proxy process has handed over is known from the
        # times it sends (tick); inline, everything observed so far is in the queue.
        self._ticked = ticked
        self._horizon = 0.0
        self._wall_offset = wall_offset()  # to see the host's wall clock step
        self._queue: deque[tuple[Captured, float, int, int]] = deque()
        self.seq = 0  # requests observed so far: a total order of replies
        self.item_size_max = DEFAULT_ITEM_SIZE_MAX  # memcached's (`stats settings`)
        self._wakeup = asyncio.Event()
        # Per key with an operation in flight: the key's operations waiting for their turn.
        self._chains: dict[bytes, deque[ShadowOp]] = {}
        # Operations waiting in the chains: with the queue, bounded by queue_size (a hot key's
        # chain would otherwise grow for as long as Redis or the worker falls behind).
        self._chained = 0
        self._chain_done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        # What each proxy process's stream covers (coverage()); the shadow covers the least.
        self._coverage: dict[int, int] = {0: keys.coverage}
        # Events at a time in reply order (at()): (when, order, flush or None).
        self._timed: list[tuple[float, int, Callable[[], Awaitable[None]] | None]] = []
        self._timed_order = itertools.count()
        # Memcached's evictions waiting for the proxy's horizon to reach them: (when, keys, why)
        self._evictions: deque[tuple[float, list[bytes], int]] = deque()
        self.stopping = False
        self.closed = False  # stopped: chains still in flight end without going on

    # -- the hand-off (synchronous, never waits) --------------------------------------------

    def observe(
        self, requests: list[Captured], session: int, replied_at: float | None = None
    ) -> None:
        """Queue the captured requests of one reply chunk; replied_at (perf_counter time,
        now by default) is when their replies came back."""
        now = time.perf_counter() if replied_at is None else replied_at
        queue = self._queue
        shadowed = self.stats.shadowed
        limit = self.queue_size
        for request in requests:
            shadowed[request.command] += 1  # dropped ones included: drops/requests <= 1
            self.seq = seq = self.seq + 1
            # (a multi-key get counts once while queued, once per key in the chains; a
            # keyless flush_all is never dropped for room: losing one makes every key cold
            # and its delay unknown)
            if (len(queue) + self._chained >= limit and request.keys) or self.stopping:
                self.drop(DropReason.QUEUE_FULL, request.keys, seq)
                continue
            queue.append((request, now, session, seq))
        self.stats.queue_depth = len(queue) + self._chained
        if queue:
            self._wakeup.set()

    def lose(self, keys: list[bytes] | None, why: int = MISSED) -> None:
        """Changes of these keys (None: of any key) were missed before now: none of them is
        known to be in step any more, whatever came before (the requests still queued for
        them included)."""
        self.seq += 1
        if keys is None:
            self.keys.new_epoch(self.seq)
        else:
            self.keys.lose(keys, self.seq, why)

    def forget(self, keys: list[bytes]) -> None:
        """Changes of these keys were lost before they reached the queue."""
        self.lose(keys)

    def evicted(self, keys: list[bytes], why: int = EVICTED, in_order: bool = True) -> None:
        """A store evicted these keys (before now): each sampled one turns cold with that
        reason, a key with operations still queued included. `in_order`: Memcached's
        eviction is placed after every operation Memcached answered before now, those
        still on their way from the proxy process included (it happened before now; an
        operation answered before it must not establish the key after it). Redis's
        evictions are Redis's side of the replay: they count from now, as they come."""
        sampled = self.sampled
        keys = [key for key in keys if sampled(key)]
        if not keys:
            return
        if in_order and self._ticked and self._horizon < time.perf_counter():
            self._evictions.append((time.perf_counter(), keys, why))
            return
        self.seq += 1
        self.keys.lose(keys, self.seq, why)

    def _evictions_due(self) -> None:
        """Memcached's evictions whose time every proxy process has handed over by now."""
        pending = self._evictions
        while pending and pending[0][0] <= self._horizon:
            _, keys, why = pending.popleft()
            self.seq += 1
            self.keys.lose(keys, self.seq, why)

    def new_epoch(self, why: int = NEVER) -> None:
        """Every key turns cold (a flush_all not replayed; too many changes lost to list; a
        store that dropped keys without naming them: `why`)."""
        self.seq += 1
        self.keys.new_epoch(self.seq, why)

    def drop(self, reason: str, keys: list[bytes] | tuple[bytes, ...], seq: int) -> None:
        """A request (sequence number `seq`) was not replayed, or its outcome is unknown:
        its keys turn cold there; a keyless one (flush_all) makes every key cold."""
        self.stats.dropped[reason] += 1
        if keys:
            self.keys.lose(keys, seq)
        else:
            self.keys.new_epoch(seq)

    def coverage(self, stream: int, threshold: int, since: float) -> None:
        """Proxy process `stream` now hands over every request of the keys hashed below
        `threshold`: for a rise, of those sent from `since` on. The sample the shadow
        covers is what every proxy process covers."""
        self._coverage[stream] = threshold
        self._covered_changed(since)

    def stream_closed(self, stream: int) -> None:
        """A proxy process's stream ended: it no longer narrows what is covered."""
        if self._coverage.pop(stream, None) is not None and self._coverage:
            self._covered_changed(time.perf_counter())

    def _covered_changed(self, since: float) -> None:
        threshold = min(self._coverage.values())
        if threshold != self.keys.coverage:
            self.seq += 1
            self.keys.coverage_changed(threshold, since, self.seq)

    def at(self, when: float, flush: Callable[[], Awaitable[None]] | None = None) -> None:
        """At `when` (perf_counter), in reply order: every key turns cold, after `flush()`
        has run with no operation in flight (a flush_all replayed on the target). It happens
        before the first operation Memcached answered at or after `when`."""
        bisect.insort(self._timed, (when, next(self._timed_order), flush))
        delay = when - time.perf_counter()
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, delay), self._wakeup.set)

    def tick(self, now: float) -> None:
        """The proxy process has handed over everything it observed before `now` (worker
        mode: the observed replies reach the scheduler through a pipe)."""
        if now > self._horizon:
            self._horizon = now
            if self._evictions:
                self._evictions_due()
            if self._timed and self._timed[0][0] <= now:
                self._wakeup.set()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="shadow-queue")

    async def stop(self, timeout: float) -> None:
        """Stop taking work; give in-flight chains `timeout` seconds, then cancel."""
        self.stopping = True
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), timeout)
        self.closed = True
        tasks = (self._worker, *self._tasks)
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # Chains whose operation never finished (Redis stalled): nothing will run them now.
        self._chains.clear()
        self._chained = 0
        self.stats.queue_depth = len(self._queue)

    async def idle(self) -> None:
        """Wait until the queue is empty and no chain is running (tests, shutdown)."""
        while self._queue or self._chains:
            self._chain_done.clear()
            # asyncio.wait, not a nested wait_for: on Python 3.11 an inner wait_for that
            # finishes as the caller's own wait_for times out swallows the cancellation, and
            # this loop (and whoever bounded it) would never end.
            waiter = asyncio.ensure_future(self._chain_done.wait())
            try:
                await asyncio.wait((waiter,), timeout=0.05)
            finally:
                waiter.cancel()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run work that holds no chain (a replayed flush_all); cancelled by stop()."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the queue --------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self._queue
        timed = self._timed
        while True:
            await self._wakeup.wait()
            if self.batch_window > 0 and len(queue) < self.batch_size:
                await asyncio.sleep(self.batch_window)
            self._wakeup.clear()
            flush_reads = self.runner.flush_reads
            while queue:
                if len(self._chains) >= self.max_inflight:
                    flush_reads()  # (the reads waiting hold chains: they must go first)
                    self.stats.queue_depth = len(queue) + self._chained
                    while len(self._chains) >= self.max_inflight:
                        self._chain_done.clear()
                        await self._chain_done.wait()
                request, replied_at, session, seq = queue[0]
                if timed and timed[0][0] <= replied_at:
                    flush_reads()
                    await self._fire(seq - 1)  # (everything before this op is dispatched)
                    continue
                queue.popleft()
                try:
                    self._dispatch(request, replied_at, session, seq)
                except Exception:  # a shadow bug must never reach the client path
                    log.exception("shadow: cannot handle %r", request)
                    self.stats.errors[ErrorKind.INTERNAL] += 1
            flush_reads()  # the round's reads: one MGET per connection
            while timed and not queue and timed[0][0] <= self._dispatched_until(timed=False):
                await self._fire(self.seq)
            self.stats.queue_depth = self._chained
            if self.stopping and not queue:
                return

    async def _fire(self, seq: int) -> None:
        """The first timed event (at()) is due: everything up to `seq` is before it. Every
        key turns cold first (a verdict waiting for its evidence then stops waiting, as
        unverified), then a flush runs once what is in flight has reached the target."""
        _, _, flush = self._timed.pop(0)
        self.keys.new_epoch(seq)
        if flush is not None and not self.stopping:
            while self._chains:  # (no operation is dispatched meanwhile)
                self._chain_done.clear()
                waiter = asyncio.ensure_future(self._chain_done.wait())
                try:
                    await asyncio.wait((waiter,), timeout=0.05)
                finally:
                    waiter.cancel()
            await flush()

    def _clock_stepped(self, offset: float) -> None:
        log.warning(
            "shadow: the host's wall clock stepped by %+.2f s. Redis keeps expiry times on "
            "the wall clock and memcached counts TTLs on a monotonic one, so keys whose TTL "
            "ends near the step may expire that far apart in the two stores (noise: "
            "clock_step)",
            offset - self._wall_offset,
        )
        self._wall_offset = offset

    def _dispatch(self, request: Captured, replied_at: float, session: int, seq: int) -> None:
        sent_at = request.started
        if sent_at:
            self.stats.for_command(request.command).memcached_latency.observe(replied_at - sent_at)
        now = time.perf_counter()
        wall = time.time()
        replied_wall = wall - (now - replied_at)
        if abs(wall - now - self._wall_offset) > STEP_SECONDS:
            self._clock_stepped(wall - now)
        seen = (seq, session, sent_at, replied_at, replied_wall)
        plan = translate(request, self.sampled, seen, self.item_size_max)
        if isinstance(plan, Skip):
            self.stats.skipped[plan.reason] += 1
            for key in plan.keys:
                self.keys.get(key, seq).mark_lost(seq)
            return
        chains = self._chains
        for op in plan:
            if op.action == FLUSH:
                self.runner.flush(op)
                continue
            # Contention is judged in reply-arrival order, before any of the key's queued
            # operations run, so an operation that raced with a later one is known to.
            key = op.key
            state = self.keys.touch(key, session, op.sent_at, replied_at, now, seq)
            chain = chains.get(key)
            if chain is not None:
                chain.append(op)
                self._chained += 1
                continue
            chain = chains[key] = deque()
            self._start(key, chain, op, state, now, True)

    # -- a key's chain: one operation in flight at a time, in reply order -------------------
    #
    # The common operation runs with no task and no future: its command goes out with a
    # completion callback, which records the verdict and hands the chain back (advance). A
    # task takes over only for what must wait (hold): a difference to classify, an
    # operation that needs other target work first, the settling of a raced key. Everything
    # that acts on evidence runs while it holds the chain, so it is ordered with the key's
    # operations.
    # Measured (bench load: 90/10 get/set, 16 connections, rate 1, inline, 2-core VM: proxy
    # CPU per request at rate 1 minus rate 0): the shadow's cost went from 27.4 to 19.4 us
    # (with the plain-get translation shortcut and the per-command figures).

    def _start(
        self,
        key: bytes,
        chain: deque[ShadowOp],
        op: ShadowOp,
        state: KeyState,
        started: float,
        batch: bool = False,
    ) -> None:
        """Run `op`, the key's next operation, and the ones after it for as long as they end
        at once (fenced, target down or busy). `batch`: the first of a new chain."""
        run = self.runner.run
        try:
            while True:
                sent = run(op, state, started, batch)
                batch = False
                if sent == SENT:
                    return
                if sent == ASYNC:
                    self.hold(key, self.runner.run_slow(op))
                    return
                if not chain:
                    self._chain_idle(key)
                    return
                op = chain.popleft()
                self._chained -= 1
                state = self.keys.get(key, op.seq)
                started = time.perf_counter()
        except BaseException:
            self._abandon(key)  # (a chain left behind would hold its key, and its count)
            raise

    def advance(self, key: bytes) -> None:
        """The key's operation in flight is finished: start the next one, or settle the key,
        or end the chain."""
        chain = self._chains.get(key)
        if chain is None:
            return
        if self.closed:
            self._end_chain(key)
        elif chain:
            op = chain.popleft()
            self._chained -= 1
            self._start(key, chain, op, self.keys.get(key, op.seq), time.perf_counter())
        else:
            self._chain_idle(key)

    def hold(self, key: bytes, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in a task while it holds the key's chain; the chain goes on after it."""
        self._task(key, self._held(key, coro))

    def pending_write(self, key: bytes, sent_before: float) -> bool:
        """Does a write of the key that the proxy sent before `sent_before` wait in its chain?"""
        chain = self._chains.get(key, ())
        return any(op.action != READ and op.sent_at <= sent_before for op in chain)

    async def caught_up(self, until: float, give_up_after: float) -> bool:
        """Wait until every operation answered before `until` has been dispatched to its
        chain (a reply sent before a snapshot may still be on its way: a busy loop reads
        sockets late, and the worker's pipe adds its own delay). False if that takes longer
        than `give_up_after` seconds: the evidence then cannot be ordered."""
        give_up = time.perf_counter() + give_up_after
        while self._dispatched_until() < until:
            if self.closed or time.perf_counter() > give_up:
                return False
            await asyncio.sleep(min(0.02, max(0.001, until - time.perf_counter())))
        return True

    def _dispatched_until(self, timed: bool = True) -> float:
        """Every operation Memcached answered before this perf_counter time is dispatched
        (and, unless `timed` is False, every timed event before it has happened)."""
        queue = self._queue
        until = self._horizon if self._ticked else time.perf_counter()
        if queue and queue[0][1] < until:
            # (never past the horizon: with several proxy processes, requests of one may be
            # queued while another has not vouched for their time yet)
            until = queue[0][1]
        if timed and self._timed and self._timed[0][0] <= until:
            return self._timed[0][0] - 1e-6  # (the run loop fires it: wait for that)
        return until

    def _chain_idle(self, key: bytes) -> None:
        """Nothing of the key waits: settle it if writers raced on it, else end its chain."""
        state = self.keys.peek(key)
        if state is None or not state.contended_until or self.stopping:
            self._end_chain(key)
        else:
            # Racing writers are done for now: make the stores equal. Operations that
            # arrive meanwhile join the chain and run after it.
            self._task(key, self._settled(key, state))

    def _end_chain(self, key: bytes) -> None:
        chain = self._chains.pop(key, None)
        if chain:  # (closing, or a chain that broke: what waited is not replayed)
            self._chained -= len(chain)
        self.stats.queue_depth = len(self._queue) + self._chained
        self._chain_done.set()

    def _abandon(self, key: bytes) -> None:
        """The key's chain broke (a shadow bug): what waited in it is not replayed, so Redis
        may have missed changes of the key, which turns cold."""
        if not self.closed:
            state = self.keys.peek(key)
            if state is not None:
                state.mark_lost(self.seq)
        self._end_chain(key)

    def _task(self, key: bytes, coro: Coroutine[Any, Any, None]) -> None:
        if self.closed:
            coro.close()
            self._end_chain(key)
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _held(self, key: bytes, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
            self.advance(key)
        except Exception:  # a shadow bug: counted and logged, the key no longer trusted
            self._broken(key)
        except BaseException:
            self._abandon(key)
            raise

    async def _settled(self, key: bytes, state: KeyState) -> None:
        try:
            await self.runner.settle(key, state)
            if self._chains.get(key):
                self.advance(key)
            else:
                self._end_chain(key)  # settled once; operations to come start a new chain
        except Exception:
            self._broken(key)
        except BaseException:
            self._abandon(key)
            raise

    def _broken(self, key: bytes) -> None:
        log.exception("shadow: the chain of operations of a key broke")
        self.stats.errors[ErrorKind.INTERNAL] += 1
        self._abandon(key)


__all__ = ["ChainRunner", "Scheduler"]
