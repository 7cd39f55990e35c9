"""Dispatcher: replays sampled requests on Redis off the client path and records verdicts.

The client path calls `capture` (sample or not) and `observe` (the completed requests of a
reply chunk, in Memcached's reply order). `observe` only appends to a bounded queue and never
waits: when the queue is full the work is dropped and counted. A worker task takes the queue
in batches, translates the requests and runs each key's operations strictly in order (one
chain per key, at most `max_inflight` chains at once), so Redis sees a key's writes in
Memcached's order. An operation normally costs no task and no future: its Redis command
carries a completion callback that records the verdict and starts the key's next operation.

A difference is classified (classify.py) before it is reported: races between connections,
cold keys, expiry boundaries, evictions and evidence that cannot be ordered with the key's
operations are noise; a mismatch is reported only when an ordered re-read proves Redis
diverged. Every difference ends with Redis repaired from Memcached, fenced so that the
operations the copy already holds are not replayed on top of it: one divergence is reported
once, and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from proxy.memcache.request import Request
from proxy.redis.errors import (
    RedisBusy,
    RedisError,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
)
from proxy.redis.layout import REALTIME_MAXDELTA, Item, max_value_len
from proxy.redis.store import DeleteStatus, DeltaResult, StoreResult, TouchStatus
from proxy.shadow.classify import (
    BACKFILL,
    MATCH,
    MISMATCH,
    NOISE,
    REPAIR,
    SUBSUMED,
    UNVERIFIED,
    KeyFacts,
    Reread,
    Verdict,
    blank,
    judge_at_once,
    judge_reread,
    place,
)
from proxy.shadow.compare import (
    CAS_UNMAPPED,
    PADDING,
    Difference,
    compare_outcome,
    compare_read,
    compare_values,
    state_equal,
)
from proxy.shadow.control import ShadowControl
from proxy.shadow.history import OpHistory
from proxy.shadow.keystate import CasMap, KeyState, KeyStates
from proxy.shadow.mcreader import McItem, MemcachedReader, MemcachedUnavailable
from proxy.shadow.stats import ShadowStats
from proxy.shadow.target import ShadowTarget
from proxy.shadow.translate import (
    DELETED,
    HIT,
    MISS,
    NOT_FOUND,
    STORED,
    TOO_LARGE,
    TOUCHED,
    McValue,
    ShadowOp,
    Skip,
    state_keys,
    translate,
)

log = logging.getLogger("memshadow.shadow")

VERIFY: Final = "verify"
"""The command label of shadow.verify_writes' verdicts (a read of both stores after a write)."""

# (kind, command, key, memcached's answer, redis's answer, detail, story: the re-read, the
# action taken and the key's last operations)
ExampleSink = Callable[[str, str, bytes, dict[str, Any], dict[str, Any], str, dict[str, Any]], None]

# What _send did with an operation.
_SENT: Final = 1  # its command is on its way; the callback goes on with the chain
_DONE: Final = 2  # it ended at once (not sent, counted; or fenced): the chain goes on
_ASYNC: Final = 3  # it needs other Redis work first: a task runs it


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Both stores re-read: Memcached's item read between lo and hi (perf_counter), then
    Redis's; ordered: no write of the key may lie between the judged answer and it."""

    mc: McItem | None
    redis: Item | None
    lo: float
    hi: float
    ordered: bool


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    """Limits and timings of the shadow (shadow.* in the YAML)."""

    queue_size: int = 10_000
    max_inflight: int = 512
    race_window: float = 1.0
    reread_delay: float = 0.05
    expiry_tolerance: float = 2.0
    eviction_window: float = 10.0
    key_state_size: int = 200_000
    cas_map_size: int = 100_000
    backfill: bool = False
    verify_writes: float = 0.0
    replay_flush_all: bool = False
    stats_interval: float = 1.0
    # The worker lets requests gather for batch_window seconds before replaying them, unless
    # batch_size are already waiting: the Redis commands of a batch go out in one write per
    # connection, and the replies come back in one read. Verdicts come that much later.
    # Measured (90/10 get/set, 16 connections, rate 1, 2-core VM): the shadow's CPU per
    # request went from 19.4 to 14.5 us with 2 ms (each write carried ~2.4 commands).
    batch_window: float = 0.002
    batch_size: int = 64


class ShadowDispatcher:
    """Owns the shadow's queue, its per-key chains and the verdict logic."""

    def __init__(
        self,
        *,
        store: ShadowTarget,
        reader: MemcachedReader,
        control: ShadowControl,
        sampled: Callable[[bytes], bool],
        stats: ShadowStats,
        settings: DispatcherSettings | None = None,
        examples: ExampleSink | None = None,
        ticked: bool = False,
    ) -> None:
        self.store = store
        self.reader = reader
        self.control = control
        self.sampled = sampled
        self.stats = stats
        self.settings = settings or DispatcherSettings()
        self.examples = examples
        self.keys = KeyStates(self.settings.key_state_size, self.settings.race_window)
        self.casmap = CasMap(self.settings.cas_map_size)
        self.history = OpHistory()
        # Worker mode (ticked): what the proxy process has handed over is known from the
        # times it sends (tick); inline, everything observed so far is in the queue.
        self._ticked = ticked
        self._horizon = 0.0
        self._verify_rate = self.settings.verify_writes
        self._verify_credit = 0.0  # verify_writes accumulated: a write is verified at 1
        self._queue: deque[tuple[Request, float, int, int]] = deque()
        self._seq = 0  # requests observed so far: a total order of replies
        self._wakeup = asyncio.Event()
        # Per key with an operation in flight: the key's operations waiting for their turn.
        self._chains: dict[bytes, deque[ShadowOp]] = {}
        self._chain_done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._mc_evicted_at = 0.0
        self._redis_evicted_at = 0.0
        self._mc_evictions: int | None = None
        self._redis_evictions: int | None = None
        self._stopping = False
        self._closed = False  # stopped: chains still in flight end without going on

    # -- client path hand-off (synchronous, never waits) ----------------------------------

    def observe(
        self, requests: list[Request], session: int, replied_at: float | None = None
    ) -> None:
        """Queue the captured requests of one reply chunk; replied_at (perf_counter time,
        now by default) is when their replies came back."""
        now = time.perf_counter() if replied_at is None else replied_at
        queue = self._queue
        shadowed = self.stats.shadowed
        limit = self.settings.queue_size
        for request in requests:
            if not request.capture:
                continue
            shadowed[request.command] += 1  # dropped ones included: drops/requests <= 1
            self._seq = seq = self._seq + 1
            if len(queue) >= limit or self._stopping:
                self._drop("queue_full", state_keys(request), seq)
                continue
            queue.append((request, now, session, seq))
        self.stats.queue_depth = len(queue)
        if queue:
            self._wakeup.set()

    def forget(self, keys: list[bytes]) -> None:
        """Changes of these keys were dropped before they reached this dispatcher (the worker
        hand-off): they are no longer known to be in step, whatever came before."""
        self._seq += 1
        for key in keys:
            state = self.keys.peek(key)
            if state is not None:
                state.mark_lost(self._seq)

    def forget_all(self) -> None:
        """Too many changes were dropped before this dispatcher to list: every key is cold."""
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._seq += 1
        self.keys.new_epoch(self._seq)

    def _drop(self, reason: str, keys: list[bytes] | tuple[bytes, ...], seq: int) -> None:
        self.stats.dropped[reason] += 1
        for key in keys:
            state = self.keys.peek(key)
            if state is not None:
                state.mark_lost(seq)  # Redis missed a change: no longer known to be in step

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._run(), name="shadow-dispatcher")
        self._monitor = loop.create_task(self._watch_evictions(), name="shadow-evictions")

    async def stop(self, timeout: float = 2.0) -> None:
        """Stop taking work; give in-flight chains `timeout` seconds, then cancel."""
        self._stopping = True
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), timeout)
        self._closed = True
        for task in (self._worker, self._monitor, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._worker, self._monitor, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

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

    # -- worker ---------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self._queue
        settings = self.settings
        while True:
            await self._wakeup.wait()
            if settings.batch_window > 0 and len(queue) < settings.batch_size:
                await asyncio.sleep(settings.batch_window)
            self._wakeup.clear()
            while queue:
                if len(self._chains) >= self.settings.max_inflight:
                    self.stats.queue_depth = len(queue)
                    while len(self._chains) >= self.settings.max_inflight:
                        self._chain_done.clear()
                        await self._chain_done.wait()
                request, replied_at, session, seq = queue.popleft()
                try:
                    self._dispatch(request, replied_at, session, seq)
                except Exception:  # a shadow bug must never reach the client path
                    log.exception("shadow: cannot handle %r", request)
                    self.stats.errors["internal"] += 1
            self.stats.queue_depth = 0
            if self._stopping and not queue:
                return

    def _dispatch(self, request: Request, replied_at: float, session: int, seq: int) -> None:
        sent_at = request.started
        if sent_at:
            self.stats.for_command(request.command).memcached_latency.observe(replied_at - sent_at)
        plan = translate(request, self.sampled)
        if isinstance(plan, Skip):
            self.stats.skipped[plan.reason] += 1
            for key in plan.keys:
                self.keys.get(key).mark_lost(seq)
            return
        now = time.perf_counter()
        replied_wall = time.time() - (now - replied_at)
        sent = sent_at or replied_at
        chains = self._chains
        for op in plan:
            op.seq = seq
            op.session = session
            op.sent_at = sent
            op.replied_at = replied_at
            op.replied_wall = replied_wall
            if op.action == "flush":
                self._flush(op)
                continue
            _anchor_expiry(op, replied_wall)
            # Contention is judged in reply-arrival order, before any of the key's queued
            # operations run, so an operation that raced with a later one is known to.
            key = op.key
            state = self.keys.touch(key, session, sent, replied_at, now)
            chain = chains.get(key)
            if chain is not None:
                chain.append(op)
                continue
            chain = chains[key] = deque()
            self._start(key, chain, op, state, now)

    # -- a key's chain: one operation in flight at a time, in reply order -----------------
    #
    # The common operation runs with no task and no future: its Redis command goes out with a
    # completion callback (_send), which records the verdict when Redis agrees and starts the
    # key's next operation (_advance). A task takes over only for what must wait: a
    # difference to classify (_judge), an operation that needs other Redis work first (_slow)
    # and the settling of a raced key (_settle_chain). Each hands the chain back to _advance.
    # Everything that acts on evidence (a re-read, a repair, a settle) runs while it holds
    # the chain, so it is ordered with the key's operations; a repair leaves a fence that
    # keeps the operations its copy already holds from being replayed again.
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
    ) -> None:
        """Run `op`, the key's next operation (nothing else of the key is in flight), and
        the ones after it for as long as they end at once (fenced, Redis down or busy)."""
        while True:
            state.replayed_seq = op.seq
            if op.sent_at <= state.fence_hi:
                sent = self._fenced(op, state)
            else:
                try:
                    sent = self._send(op, state, started)
                except Exception:  # a shadow bug: the key can no longer be trusted
                    self._internal_error(op, state)
                    sent = _DONE
            if sent is _SENT:
                return
            if sent is _ASYNC:
                self._spawn(key, self._slow(key, op))
                return
            if not chain:
                self._chain_idle(key)
                return
            op = chain.popleft()
            state = self.keys.get(key)
            started = time.perf_counter()

    def _fenced(self, op: ShadowOp, state: KeyState) -> int:
        """An operation the proxy sent before the key's last repair read Memcached: the copy
        already holds its effect (skip it), or may hold it (skip it; the key turns cold)."""
        if place(op.sent_at, op.replied_at, state.fence_lo, state.fence_hi) == SUBSUMED:
            self.stats.skipped["in_repair_copy"] += 1
            self._history(op, "in repair copy")
            return _DONE
        self.stats.skipped["repair_overlap"] += 1
        self._history(op, "overlaps repair")
        if op.action != "read":
            state.mark_lost(op.seq)
        return _DONE

    def _advance(self, key: bytes) -> None:
        """The key's operation in flight is finished: start the next one, or settle the key,
        or end the chain."""
        chain = self._chains.get(key)
        if chain is None:
            return
        if self._closed:
            self._end_chain(key)
        elif chain:
            op = chain.popleft()
            self._start(key, chain, op, self.keys.get(key), time.perf_counter())
        else:
            self._chain_idle(key)

    def _chain_idle(self, key: bytes) -> None:
        """Nothing of the key waits: settle it if writers raced on it, else end its chain."""
        state = self.keys.peek(key)
        if state is None or not state.contended_until or self._stopping:
            self._end_chain(key)
        else:
            # Racing writers are done for now: make Redis equal Memcached. Operations that
            # arrive meanwhile join the chain and run after it.
            self._spawn(key, self._settle_chain(key, state))

    def _end_chain(self, key: bytes) -> None:
        self._chains.pop(key, None)
        self._chain_done.set()

    def _spawn(self, key: bytes, coro: Coroutine[Any, Any, None]) -> None:
        """Run the rest of the key's chain in a task (it ends or hands the chain back)."""
        if self._closed:
            coro.close()
            self._end_chain(key)
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _slow(self, key: bytes, op: ShadowOp) -> None:
        try:
            await self._one(op)
        except BaseException:
            self._end_chain(key)
            raise
        self._advance(key)

    async def _judge(
        self,
        op: ShadowOp,
        diff: Difference,
        state: KeyState,
        started: float,
        answer: object,
        expires_at: float | None,
    ) -> None:
        try:
            verdict = await self._classify(op, diff, state, answer, expires_at)
            self.stats.count_comparison(op.command, verdict.outcome, verdict.reason)
            self._finished(op, started)
        except BaseException:
            self._end_chain(op.key)
            raise
        self._advance(op.key)

    async def _settle_chain(self, key: bytes, state: KeyState) -> None:
        try:
            await self._settle(key, state)
        except BaseException:
            self._end_chain(key)
            raise
        chain = self._chains.get(key)
        if chain:
            self._advance(key)
        else:
            self._end_chain(key)  # settled once; operations to come start a new chain

    def _flush(self, op: ShadowOp) -> None:
        delay = op.exptime or 0
        loop = asyncio.get_running_loop()
        if self.settings.replay_flush_all:
            if delay:
                loop.call_later(delay, self._spawn_flush)
            else:
                self._spawn_flush()
        elif delay:
            loop.call_later(delay, self._new_epoch)
        if not delay:
            self.keys.new_epoch(op.seq)
        self.casmap.clear()
        if not self.settings.replay_flush_all:
            self.stats.skipped["flush_all_not_replayed"] += 1

    def _spawn_flush(self) -> None:
        async def flush() -> None:
            try:
                await self.store.flush()
                self.stats.redis_commands += 1
            except RedisError as exc:
                self.stats.errors[_error_kind(exc)] += 1
            self._new_epoch()

        task = asyncio.get_running_loop().create_task(flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one operation, fast path: a callback per Redis command ---------------------------

    def _send(self, op: ShadowOp, state: KeyState, started: float) -> int:
        """Send op's Redis command with a completion callback: _SENT, _DONE (it could not
        be sent, which is counted) or _ASYNC (it needs other Redis work first: the slow path)."""
        action = op.action
        store = self.store
        stats = self.stats
        try:
            if action == "read":
                done = partial(self._completed, op, state, started, self._read_result)
                stats.redis_commands += 1
                if op.exptime is None:
                    store.get_callback(done, op.key)
                else:
                    store.gat_callback(done, op.exptime, op.key)
            elif action == "store":
                if op.mc_status == TOO_LARGE and not op.data and op.data_len:
                    return _ASYNC
                if op.mc_status is None and op.mode == "set" and not op.meta:
                    self._infer_stored(op)
                cas = op.cas
                if op.mode == "cas" or (cas and op.mode in ("append", "prepend")):
                    cas = self.casmap.get(op.key, cas or 0)
                    if cas is None:
                        return _ASYNC
                done = partial(self._completed, op, state, started, self._store_result)
                stats.redis_commands += 1
                store.store_callback(
                    done,
                    op.mode,
                    op.key,
                    op.flags,
                    op.exptime or 0,
                    op.data,
                    cas,
                    too_large_deletes=op.too_large_deletes,
                )
            elif action == "delta":
                cas = op.cas
                if cas is not None:
                    cas = self.casmap.get(op.key, cas)
                    if cas is None:
                        return _ASYNC
                done = partial(self._completed, op, state, started, self._delta_result)
                stats.redis_commands += 1
                store.delta_callback(
                    done,
                    op.key,
                    op.mode,
                    op.delta,
                    cas=cas,
                    create=op.create,
                    initial=op.initial,
                    ttl=op.exptime,
                )
            elif action == "touch":
                done = partial(self._completed, op, state, started, self._touch_result)
                stats.redis_commands += 1
                store.touch_callback(done, op.key, op.exptime or 0)
            elif action == "delete":
                cas = op.cas
                if cas is not None:
                    cas = self.casmap.get(op.key, cas)
                    if cas is None:
                        return _ASYNC
                done = partial(self._completed, op, state, started, self._delete_result)
                stats.redis_commands += 1
                store.delete_callback(done, op.key, cas)
            else:
                return _ASYNC  # the slow path reports it
        except RedisError as exc:  # not sent: Redis down or busy
            self._failed(op, state, exc, started)
            return _DONE
        return _SENT

    def _completed(
        self,
        op: ShadowOp,
        state: KeyState,
        started: float,
        interpret: Callable[[ShadowOp, KeyState, Any], tuple[Difference | None, bool]],
        result: object,
        error: RedisError | None,
    ) -> None:
        """The reply (or the failure) of an operation sent by _send."""
        try:
            if error is not None:
                self._failed(op, state, error, started)
            else:
                # Evidence for a difference: the expiry known before Redis's answer moved it.
                expires_at = state.expires_at
                diff, full = interpret(op, state, result)
                now = time.perf_counter()
                figures = self.stats.for_command(op.command)
                figures.redis_latency.observe(now - started)
                self._history(op, _outcome(result))
                if diff is not None:
                    judge = self._judge(op, diff, state, started, result, expires_at)
                    self._spawn(op.key, judge)
                    return  # _judge goes on with the chain once it has classified it
                if op.mc_status is not None:
                    self.stats.comparisons[figures.match] += 1
                if full:
                    state.mark_synced(op.seq)
                figures.duration.observe(now - started)
                self.stats.lag.observe(now - op.replied_at)
                if self._verify_rate and op.action != "read" and self._verify_due():
                    self._spawn(op.key, self._verify_chain(op, state))
                    return  # the verification goes on with the chain
        except Exception:  # a shadow bug: the key can no longer be trusted
            self._internal_error(op, state)
        self._advance(op.key)

    def _infer_stored(self, op: ShadowOp) -> None:
        """A classic set with noreply that memcached took without an error (the sentinel
        came back alone) and whose value fits an item: memcached stored it."""
        limit = max_value_len(self.store.item_size_max, len(op.key), op.flags)
        if len(op.data) <= limit:
            op.mc_status = STORED
            op.inferred = True

    def _verify_due(self) -> bool:
        """shadow.verify_writes: is this replayed write followed by a verification?"""
        self._verify_credit += self._verify_rate
        if self._verify_credit < 1.0:
            return False
        self._verify_credit -= 1.0
        return True

    def _history(self, op: ShadowOp, redis: str) -> None:
        self.history.add(
            op.key, (op.command, op.mc_status or "no reply", redis, op.replied_at, op.session)
        )

    def _failed(self, op: ShadowOp, state: KeyState, exc: RedisError, started: float) -> None:
        """Count an operation Redis did not carry out (or whose outcome is unknown)."""
        stats = self.stats
        stats.for_command(op.command).redis_latency.observe(time.perf_counter() - started)
        kind = _error_kind(exc)
        stats.errors[kind] += 1
        self._history(op, kind)
        if isinstance(exc, RedisUnavailable | RedisTimeout | RedisBusy):
            reason = {RedisUnavailable: "redis_down", RedisTimeout: "timeout"}.get(
                type(exc), "redis_busy"
            )
            self._drop(reason, (op.key,), op.seq)
        else:  # an error reply, or one this client cannot decode
            state.mark_lost(op.seq)

    def _internal_error(self, op: ShadowOp, state: KeyState) -> None:
        log.exception("shadow: cannot replay %s of a key", op.command)
        self.stats.errors["internal"] += 1
        state.mark_lost(op.seq)

    # -- one operation, slow path: a task ---------------------------------------------------

    async def _one(self, op: ShadowOp) -> None:
        state = self.keys.get(op.key)
        started = time.perf_counter()
        expires_at = state.expires_at  # before Redis's answer moves it
        try:
            diff, full_state, answer = await self._replay(op, state)
        except RedisError as exc:
            self._failed(op, state, exc, started)
            return
        stats = self.stats
        figures = stats.for_command(op.command)
        figures.redis_latency.observe(time.perf_counter() - started)
        self._history(op, _outcome(answer))
        if diff is None:
            if op.mc_status is not None:
                stats.comparisons[figures.match] += 1
            if full_state:
                state.mark_synced(op.seq)
        else:
            verdict = await self._classify(op, diff, state, answer, expires_at)
            stats.count_comparison(op.command, verdict.outcome, verdict.reason)
        self._finished(op, started)
        if diff is None and self._verify_rate and op.action != "read" and self._verify_due():
            await self._verify(op, state)

    def _finished(self, op: ShadowOp, started: float) -> None:
        """An operation has its verdict: how long it took, and the lag since its reply."""
        now = time.perf_counter()
        self.stats.for_command(op.command).duration.observe(now - started)
        self.stats.lag.observe(now - op.replied_at)

    async def _replay(
        self, op: ShadowOp, state: KeyState
    ) -> tuple[Difference | None, bool, object]:
        """Apply op on Redis: (difference, whether both stores' state is now fully known,
        Redis's answer)."""
        store = self.store
        self.stats.redis_commands += 1
        if op.action == "read":
            if op.exptime is None:
                item = await store.get(op.key)
            else:
                item = await store.gat(op.exptime, op.key)
            return (*self._read_result(op, state, item), item)
        if op.action == "store":
            return await self._store(op, state)
        if op.action == "delta":
            return await self._delta(op, state)
        if op.action == "touch":
            status = await store.touch(op.key, op.exptime or 0)
            return (*self._touch_result(op, state, status), status)
        if op.action == "delete":
            return await self._delete(op, state)
        raise ValueError(f"unknown shadow action {op.action!r}")

    async def _store(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool, object]:
        store = self.store
        if op.mc_status == TOO_LARGE and not op.data and op.data_len:
            # Not buffered (over the value limit): memcached refused it; set / ms delete.
            if op.mode == "set" or op.too_large_deletes:
                await store.delete(op.key)
                return None, True, TOO_LARGE
            return None, False, TOO_LARGE
        cas = op.cas
        if op.mode == "cas" or (cas and op.mode in ("append", "prepend")):
            mapped = self.casmap.get(op.key, cas or 0)
            if mapped is None:
                # No mapping: follow memcached's outcome, never guess (REFERENCE 4.6).
                if op.mc_status == STORED:
                    mode = "set" if op.mode == "cas" else op.mode
                    await store.store(mode, op.key, op.flags, op.exptime or 0, op.data)
                    self._note_expiry(state, op.exptime or 0)
                if op.mc_status is None:
                    state.mark_lost(op.seq)  # noreply: memcached's outcome is unknown
                return _unmapped(op), False, CAS_UNMAPPED
            cas = mapped
        result = await store.store(
            op.mode,
            op.key,
            op.flags,
            op.exptime or 0,
            op.data,
            cas,
            too_large_deletes=op.too_large_deletes,
        )
        return (*self._store_result(op, state, result), result)

    async def _delta(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool, object]:
        cas = op.cas
        if cas is not None:
            mapped = self.casmap.get(op.key, cas)
            if mapped is None:
                state.mark_lost(op.seq)  # the outcome cannot be predicted
                return _unmapped(op), False, CAS_UNMAPPED
            cas = mapped
        result = await self.store.delta(
            op.key,
            op.mode,
            op.delta,
            cas=cas,
            create=op.create,
            initial=op.initial,
            ttl=op.exptime,
        )
        return (*self._delta_result(op, state, result), result)

    async def _delete(
        self, op: ShadowOp, state: KeyState
    ) -> tuple[Difference | None, bool, object]:
        cas = op.cas
        if cas is not None:
            mapped = self.casmap.get(op.key, cas)
            if mapped is None:
                if op.mc_status == DELETED:
                    await self.store.delete(op.key)
                if op.mc_status is None:
                    state.mark_lost(op.seq)  # noreply: outcome unknown
                return _unmapped(op), False, CAS_UNMAPPED
            cas = mapped
        status = await self.store.delete(op.key, cas)
        return (*self._delete_result(op, state, status), status)

    # -- what a reply means: shared by both paths -----------------------------------------

    def _read_result(
        self, op: ShadowOp, state: KeyState, item: Item | None
    ) -> tuple[Difference | None, bool]:
        if op.exptime is not None:
            self._note_expiry(state, op.exptime)
        value = op.mc_value
        if op.want_cas and item is not None and value is not None and value.cas is not None:
            self.casmap.put(op.key, value.cas, item.cas)
        # A meta get defines the key only when it returned both the value and the flags.
        full = op.exptime is None and (
            not op.meta
            or op.mc_status == MISS
            or (value is not None and value.data is not None and value.flags is not None)
        )
        return compare_read(op, item), full

    def _store_result(
        self, op: ShadowOp, state: KeyState, result: StoreResult
    ) -> tuple[Difference | None, bool]:
        status = result.status
        if status == STORED and op.mode not in ("append", "prepend"):
            self._note_expiry(state, op.exptime or 0)
        # Only outcomes that define the key in both stores make it known to be in step: a
        # value stored whole, or the key absent from both. add's NOT_STORED and cas's EXISTS
        # only say the key exists, with whatever value each store has.
        defined = (status == STORED and op.mode in ("set", "add", "replace", "cas")) or (
            (op.mode, status) in (("replace", "NOT_STORED"), ("cas", "NOT_FOUND"))
        )
        defined = defined and status == op.mc_status and not op.inferred
        return compare_outcome(op, status, None), defined

    def _delta_result(
        self, op: ShadowOp, state: KeyState, result: DeltaResult
    ) -> tuple[Difference | None, bool]:
        status = result.status
        if status == "CREATED" and op.create is not None:
            self._note_expiry(state, op.create)
        if op.exptime is not None and status in ("OK", "CREATED"):
            self._note_expiry(state, op.exptime)
        return compare_outcome(op, status, result.value), False

    def _touch_result(
        self, op: ShadowOp, state: KeyState, status: TouchStatus
    ) -> tuple[Difference | None, bool]:
        if status == TOUCHED:
            self._note_expiry(state, op.exptime or 0)
        return compare_outcome(op, status, None), False

    def _delete_result(
        self, op: ShadowOp, state: KeyState, status: DeleteStatus
    ) -> tuple[Difference | None, bool]:
        full = op.mc_status in (DELETED, NOT_FOUND) and op.cas is None
        return compare_outcome(op, status, None), full

    def _note_expiry(self, state: KeyState, exptime: int) -> None:
        now = time.time()
        if exptime == 0:
            state.expires_at = None
        elif exptime < 0:
            state.expires_at = now
        elif exptime <= 2_592_000:
            state.expires_at = now + exptime
        else:
            state.expires_at = float(exptime)

    # -- classifying a difference ---------------------------------------------------------

    async def _classify(
        self,
        op: ShadowOp,
        diff: Difference,
        state: KeyState,
        answer: object,
        expires_at: float | None,
    ) -> Verdict:
        """The verdict on a difference. The key's chain is held meanwhile, so the evidence
        gathered here is ordered with the key's operations (classify.py says what it proves).
        `expires_at` is when Memcached was expected to expire the key before the operation.
        """
        verdict = judge_at_once(
            diff, self._facts(op, state, expires_at), self.settings.expiry_tolerance
        )
        snapshot: _Snapshot | None = None
        if verdict is None:
            try:
                snapshot = await self._reread(op.key, ordered_after=op)
            except (RedisError, MemcachedUnavailable) as exc:
                self.stats.errors[_error_kind(exc)] += 1
                state.mark_lost(op.seq)
                return Verdict(NOISE, UNVERIFIED)
            verdict = judge_reread(diff, self._evidence(op, state, snapshot))
        answers = (_describe_mc_answer(op), _describe_redis_answer(op, answer))
        await self._act(op, op.command, state, verdict, diff, snapshot, expires_at, answers)
        return verdict

    async def _verify_chain(self, op: ShadowOp, state: KeyState) -> None:
        try:
            await self._verify(op, state)
        except BaseException:
            self._end_chain(op.key)
            raise
        self._advance(op.key)

    async def _verify(self, op: ShadowOp, state: KeyState) -> None:
        """shadow.verify_writes: read both stores after a replayed write (its chain held) and
        compare them; the verdict is counted under the command "verify"."""
        try:
            snapshot = await self._reread(op.key, ordered_after=op)
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[_error_kind(exc)] += 1
            self.stats.count_comparison(VERIFY, NOISE, UNVERIFIED)
            return
        mc = _mc_value(snapshot.mc)
        diff = compare_values(mc, snapshot.redis)
        if diff is None or diff.kind == PADDING:
            if snapshot.ordered:
                self.stats.count_comparison(VERIFY, MATCH)
                state.mark_synced(op.seq)  # both stores seen equal just after the write
            else:
                self.stats.count_comparison(VERIFY, NOISE, UNVERIFIED)
            return
        # The write itself may have changed the TTL: judge with the expiry it left.
        expires_at = state.expires_at
        verdict = judge_at_once(
            diff, self._facts(op, state, expires_at), self.settings.expiry_tolerance
        ) or judge_reread(diff, self._evidence(op, state, snapshot))
        answers = (_describe_mc(mc), _describe_redis(snapshot.redis))
        command = f"{op.command} (verify)"
        await self._act(op, command, state, verdict, diff, snapshot, expires_at, answers)
        self.stats.count_comparison(VERIFY, verdict.outcome, verdict.reason)

    def _facts(self, op: ShadowOp, state: KeyState, expires_at: float | None) -> KeyFacts:
        return KeyFacts(
            warm=state.warm,
            raced=self.keys.raced_near(state, op.replied_at),
            expires_at=expires_at,
            replied_wall=op.replied_wall,
            judged_wall=time.time(),
        )

    def _evidence(self, op: ShadowOp, state: KeyState, snapshot: _Snapshot) -> Reread:
        recent = time.monotonic() - self.settings.eviction_window
        return Reread(
            ordered=snapshot.ordered,
            memcached_present=snapshot.mc is not None,
            redis_present=snapshot.redis is not None,
            equal=state_equal(_mc_value(snapshot.mc), snapshot.redis),
            raced=self.keys.raced_near(state, op.replied_at),
            memcached_evicted=self._mc_evicted_at > recent,
            redis_evicted=self._redis_evicted_at > recent,
            redis_blank=snapshot.redis is not None and blank(snapshot.redis.data),
        )

    async def _act(
        self,
        op: ShadowOp,
        command: str,
        state: KeyState,
        verdict: Verdict,
        diff: Difference,
        snapshot: _Snapshot | None,
        expires_at: float | None,
        answers: tuple[dict[str, Any], dict[str, Any]],
    ) -> None:
        """Carry out a verdict: repair the key if it says so, keep an example of a mismatch."""
        action = "none"
        if verdict.action == REPAIR or (verdict.action == BACKFILL and self.settings.backfill):
            action = await self._repair(op.key, state, op.seq, snapshot)
        if verdict.outcome == MISMATCH:
            self._example(op, command, diff, answers, snapshot, action, expires_at)

    async def _reread(self, key: bytes, ordered_after: ShadowOp | None = None) -> _Snapshot:
        """Read Memcached's item, then Redis's. With `ordered_after` (the operation whose
        answers differed, its chain held), also tell whether the snapshot is ordered: no write
        of the key may lie between that operation and the snapshot."""
        await asyncio.sleep(self.settings.reread_delay)
        lo = time.perf_counter()
        mc = await self.reader.get(key)
        hi = time.perf_counter()
        redis = await self.store.get(key)
        self.stats.redis_commands += 1
        ordered = False
        if ordered_after is not None:
            ordered = await self._caught_up(hi + self.settings.race_window) and not any(
                op.action != "read" and op.sent_at <= hi for op in self._chains.get(key, ())
            )
        return _Snapshot(mc, redis, lo, hi, ordered)

    async def _caught_up(self, until: float) -> bool:
        """Wait until every operation answered before `until` has been dispatched to its
        chain (a reply sent before the snapshot may still be on its way: a busy loop reads
        sockets late, and the worker's pipe adds its own delay). False if that takes too
        long: the evidence then cannot be ordered."""
        give_up = time.perf_counter() + max(1.0, 4 * self.settings.race_window)
        while self._dispatched_until() < until:
            if self._closed or time.perf_counter() > give_up:
                return False
            await asyncio.sleep(min(0.02, max(0.001, until - time.perf_counter())))
        return True

    def _dispatched_until(self) -> float:
        """Every operation Memcached answered before this perf_counter time is dispatched."""
        queue = self._queue
        if queue:
            return queue[0][1]
        return self._horizon if self._ticked else time.perf_counter()

    def tick(self, now: float) -> None:
        """The proxy process has handed over everything it observed before `now` (worker
        mode: the observed replies reach this dispatcher through a pipe)."""
        if now > self._horizon:
            self._horizon = now

    async def _settle(self, key: bytes, state: KeyState) -> None:
        """After a burst of racing writers: make Redis equal Memcached for this key."""
        touches = state.touches
        seq = state.replayed_seq
        try:
            snapshot = await self._reread(key)
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[_error_kind(exc)] += 1
            state.mark_lost(seq)
            return
        await self._repair(key, state, seq, snapshot)
        if state.touches == touches:
            state.contended_until = 0.0  # nothing arrived meanwhile: done

    async def _repair(
        self, key: bytes, state: KeyState, seq: int, snapshot: _Snapshot | None
    ) -> str:
        """Make Redis hold Memcached's item (value, flags, remaining TTL) as of `snapshot`
        (read now if None), at the chain's current place: the key's operations up to `seq`
        are replayed, and the fence keeps the later ones the copy already holds from being
        applied twice. Returns the action taken, for examples."""
        try:
            if snapshot is None:
                snapshot = await self._reread(key)
            mc = snapshot.mc
            # The remaining TTL as an absolute time, counted from the snapshot (0: none).
            exptime = 0
            if mc is not None and mc.ttl >= 0:
                wall = time.time() - (time.perf_counter() - snapshot.lo)
                exptime = int(wall) + max(mc.ttl, 1)
            action = "none needed"
            if state_equal(_mc_value(mc), snapshot.redis):
                pass  # Redis holds the snapshot already: only the fence is needed
            elif mc is None:
                await self.store.delete(key)
                self.stats.redis_commands += 1
                action = "deleted in redis"
            else:
                await self.store.store("set", key, mc.flags, exptime, mc.data)
                self.stats.redis_commands += 1
                action = "copied to redis"
            self._note_expiry(state, exptime)  # 0 (absent, or no TTL): never expires
            state.fence_lo = snapshot.lo
            state.fence_hi = snapshot.hi
            state.mark_synced(seq)
            self.stats.repairs += 1
            return action
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[_error_kind(exc)] += 1
            state.mark_lost(seq)
            return "repair failed"

    def _example(
        self,
        op: ShadowOp,
        command: str,
        diff: Difference,
        answers: tuple[dict[str, Any], dict[str, Any]],
        snapshot: _Snapshot | None,
        action: str,
        expires_at: float | None,
    ) -> None:
        if self.examples is None:
            return
        # Statuses are protocol words and safe to show; values and numbers go in the dicts
        # as bytes, which the example store hashes unless plain text is allowed.
        detail = f"memcached={diff.memcached} redis={diff.redis}" if diff.kind == "status" else ""
        story: dict[str, Any] = {
            "connection": op.session,
            "lag_ms": round((time.perf_counter() - op.replied_at) * 1000.0, 1),
            "action": action,
            "history": self.history.describe(op.key, op.replied_at),
        }
        if expires_at is not None:
            # When the shadow expected Memcached to expire the key, from its answer's time.
            story["expires_in_s"] = round(expires_at - op.replied_wall, 3)
        if snapshot is not None:
            story["reread"] = {
                "memcached": _describe_mc(_mc_value(snapshot.mc)),
                "redis": _describe_redis(snapshot.redis),
                "ordered": snapshot.ordered,
            }
        memcached, redis = answers
        self.examples(diff.kind, command, op.key, memcached, redis, detail, story)

    # -- eviction counters ----------------------------------------------------------------

    async def _watch_evictions(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            with contextlib.suppress(MemcachedUnavailable, ValueError):
                stats = await self.reader.stats()
                evictions = int(stats.get("evictions", "0"))
                if self._mc_evictions is not None and evictions > self._mc_evictions:
                    self._mc_evicted_at = time.monotonic()
                self._mc_evictions = evictions
            with contextlib.suppress(RedisError, ValueError):
                evicted = await self.store.evicted_keys()
                if self._redis_evictions is not None and evicted > self._redis_evictions:
                    self._redis_evicted_at = time.monotonic()
                self._redis_evictions = evicted


def _unmapped(op: ShadowOp) -> Difference | None:
    """The verdict of an op whose cas token has no Redis mapping: Memcached's outcome was
    followed, nothing was compared (noise; none when Memcached's outcome is unknown)."""
    if op.mc_status is None:
        return None
    return Difference(CAS_UNMAPPED, op.mc_status, "-")


def _anchor_expiry(op: ShadowOp, replied_wall: float) -> None:
    """Make relative exptimes count from Memcached's reply, not from the replay.

    memcached turns a relative exptime into "now + exptime" when it runs the request; a
    shadow replaying it later (queued, batched, a worker behind) must not add its lag to the
    item's life, or a read between the two expiries would differ. The op gets the absolute
    unix time memcached computed (exptimes over 30 days are absolute in its protocol too).
    """
    exptime = op.exptime
    if exptime is not None and 0 < exptime <= REALTIME_MAXDELTA:
        op.exptime = int(replied_wall) + exptime
    create = op.create
    if create is not None and 0 < create <= REALTIME_MAXDELTA:
        op.create = int(replied_wall) + create


def _mc_value(item: McItem | None) -> McValue | None:
    return None if item is None else McValue(item.flags, item.data, None)


def _outcome(answer: object) -> str:
    """Redis's answer in a word or two, for the key's history."""
    if answer is None:
        return MISS
    if isinstance(answer, Item):
        return HIT
    if isinstance(answer, DeltaResult):
        return str(answer.status) if answer.value is None else f"{answer.status} {answer.value}"
    if isinstance(answer, StoreResult):
        return str(answer.status)
    return str(answer)


def _describe_mc_answer(op: ShadowOp) -> dict[str, Any]:
    """What Memcached answered the operation (values and numbers as bytes: hashed unless
    revealed)."""
    if op.action == "read":
        return _describe_mc(op.mc_value if op.mc_status == HIT else None)
    shown: dict[str, Any] = {"status": op.mc_status or "no reply"}
    if op.mc_number is not None:
        shown["number"] = str(op.mc_number).encode()
    return shown


def _describe_redis_answer(op: ShadowOp, answer: object) -> dict[str, Any]:
    if op.action == "read":
        return _describe_redis(answer if isinstance(answer, Item) else None)
    if isinstance(answer, DeltaResult):
        shown: dict[str, Any] = {"status": str(answer.status)}
        if answer.value is not None:
            shown["number"] = str(answer.value).encode()
        return shown
    if isinstance(answer, StoreResult):
        return {"status": str(answer.status)}
    return {"status": str(answer)}


def _describe_mc(mc: McValue | None) -> dict[str, Any]:
    """An item Memcached returned; a meta get without f or v leaves that field out."""
    if mc is None:
        return {"present": False}
    shown: dict[str, Any] = {"present": True}
    if mc.flags is not None:
        shown["flags"] = mc.flags
    if mc.data is not None:
        shown["value"] = mc.data
    return shown


def _describe_redis(item: Item | None) -> dict[str, Any]:
    if item is None:
        return {"present": False}
    return {"present": True, "flags": item.flags, "value": item.data}


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, RedisReplyError):
        message = str(exc)
        if message.startswith("OOM"):
            return "shadow_oom"
        return "redis_reply"
    if isinstance(exc, RedisTimeout):
        return "redis_timeout"
    if isinstance(exc, RedisUnavailable):
        return "redis_unavailable"
    if isinstance(exc, RedisBusy):
        return "redis_busy"
    if isinstance(exc, MemcachedUnavailable):
        return "memcached_reader"
    return "redis_other"


__all__ = ["DispatcherSettings", "ShadowDispatcher"]
