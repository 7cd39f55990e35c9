"""Dispatcher: replays sampled requests on Redis off the client path and records verdicts.

The client path calls `capture` (sample or not) and `observe` (the completed requests of a
reply chunk, in Memcached's reply order). `observe` only appends to a bounded queue and never
waits: when the queue is full the work is dropped and counted. A worker task takes the queue
in batches, translates the requests and runs each key's operations strictly in order (one
chain per key, at most `max_inflight` chains at once), so Redis sees a key's writes in
Memcached's order. An operation normally costs no task and no future: its Redis command
carries a completion callback that records the verdict and starts the key's next operation.

A difference is classified before it is reported (REFERENCE 4.10): races between connections,
cold keys, expiry boundaries and evictions are noise; the rest is a mismatch. Every
difference ends with Redis repaired from Memcached, so one divergence is reported once.
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

from proxy.memcache.arguments import decode_base64_key
from proxy.memcache.request import Request
from proxy.redis.errors import (
    RedisBusy,
    RedisError,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
)
from proxy.redis.layout import REALTIME_MAXDELTA, Item
from proxy.redis.store import DeleteStatus, DeltaResult, RedisStore, StoreResult, TouchStatus
from proxy.shadow.compare import (
    CAS_UNMAPPED,
    PADDING,
    Difference,
    compare_outcome,
    compare_read,
    state_equal,
)
from proxy.shadow.control import ShadowControl
from proxy.shadow.keystate import CasMap, KeyState, KeyStates
from proxy.shadow.mcreader import McItem, MemcachedReader, MemcachedUnavailable
from proxy.shadow.stats import ShadowStats
from proxy.shadow.translate import (
    DELETED,
    MISS,
    NOT_FOUND,
    STORED,
    TOO_LARGE,
    TOUCHED,
    McValue,
    ShadowOp,
    Skip,
    translate,
)

log = logging.getLogger("memshadow.shadow")

ExampleSink = Callable[[str, str, bytes, dict[str, Any], dict[str, Any], str], None]

# What _send did with an operation.
_SENT: Final = 1  # its command is on its way; the callback goes on with the chain
_FAILED: Final = 2  # it could not be sent (counted): the chain goes on at once
_ASYNC: Final = 3  # it needs other Redis work first: a task runs it


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
        store: RedisStore,
        reader: MemcachedReader,
        control: ShadowControl,
        sampled: Callable[[bytes], bool],
        stats: ShadowStats,
        settings: DispatcherSettings | None = None,
        examples: ExampleSink | None = None,
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
        self._queue: deque[tuple[Request, float, int, int]] = deque()
        self._seq = 0  # requests observed so far: a total order of replies
        self._wakeup = asyncio.Event()
        # Per key with an operation in flight: the key's operations waiting for their turn.
        self._chains: dict[bytes, deque[tuple[ShadowOp, float]]] = {}
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._chain_done.wait(), 0.05)

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
        chains = self._chains
        for op in plan:
            op.seq = seq
            if op.action == "flush":
                self._flush(op)
                continue
            _anchor_expiry(op, replied_wall)
            # Contention is judged in reply-arrival order, before any of the key's queued
            # operations run, so an operation that raced with a later one is known to.
            key = op.key
            state = self.keys.touch(key, session, sent_at or replied_at, replied_at, now)
            chain = chains.get(key)
            if chain is not None:
                chain.append((op, replied_at))
                continue
            chain = chains[key] = deque()
            self._start(key, chain, op, replied_at, state, now)

    # -- a key's chain: one operation in flight at a time, in reply order -----------------
    #
    # The common operation runs with no task and no future: its Redis command goes out with a
    # completion callback (_send), which records the verdict when Redis agrees and starts the
    # key's next operation (_advance). A task takes over only for what must wait: a
    # difference to classify (_judge), an operation that needs other Redis work first (_slow)
    # and the settling of a raced key (_settle_chain). Each hands the chain back to _advance.
    # Measured (bench load: 90/10 get/set, 16 connections, rate 1, inline, 2-core VM: proxy
    # CPU per request at rate 1 minus rate 0): the shadow's cost went from 27.4 to 19.4 us
    # (with the plain-get translation shortcut and the per-command figures).

    def _start(
        self,
        key: bytes,
        chain: deque[tuple[ShadowOp, float]],
        op: ShadowOp,
        replied_at: float,
        state: KeyState,
        started: float,
    ) -> None:
        """Run `op`, the key's next operation (nothing else of the key is in flight), and
        the ones after it for as long as they fail at once (Redis down or busy)."""
        while True:
            try:
                sent = self._send(op, state, replied_at, started)
            except Exception:  # a shadow bug: the key can no longer be trusted
                self._internal_error(op, state)
                sent = _FAILED
            if sent is _SENT:
                return
            if sent is _ASYNC:
                self._spawn(key, self._slow(key, op, replied_at))
                return
            if not chain:
                self._chain_idle(key)
                return
            op, replied_at = chain.popleft()
            state = self.keys.get(key)
            started = time.perf_counter()

    def _advance(self, key: bytes) -> None:
        """The key's operation in flight is finished: start the next one, or settle the key,
        or end the chain."""
        chain = self._chains.get(key)
        if chain is None:
            return
        if self._closed:
            self._end_chain(key)
        elif chain:
            op, replied_at = chain.popleft()
            self._start(key, chain, op, replied_at, self.keys.get(key), time.perf_counter())
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

    async def _slow(self, key: bytes, op: ShadowOp, replied_at: float) -> None:
        try:
            await self._one(op, replied_at)
        except BaseException:
            self._end_chain(key)
            raise
        self._advance(key)

    async def _judge(
        self, op: ShadowOp, diff: Difference, state: KeyState, replied_at: float, started: float
    ) -> None:
        try:
            outcome, detail = await self._classify(op, diff, state, replied_at)
            self.stats.count_comparison(op.command, outcome, detail)
            self._finished(op, replied_at, started)
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

    def _send(self, op: ShadowOp, state: KeyState, replied_at: float, started: float) -> int:
        """Send op's Redis command with a completion callback: _SENT, _FAILED (it could not
        be sent, which is counted) or _ASYNC (it needs other Redis work first: the slow path)."""
        action = op.action
        store = self.store
        stats = self.stats
        try:
            if action == "read":
                done = partial(self._completed, op, state, replied_at, started, self._read_result)
                stats.redis_commands += 1
                if op.exptime is None:
                    store.get_callback(done, op.key)
                else:
                    store.gat_callback(done, op.exptime, op.key)
            elif action == "store":
                if op.mc_status == TOO_LARGE and not op.data and op.data_len:
                    return _ASYNC
                cas = op.cas
                if op.mode == "cas" or (cas and op.mode in ("append", "prepend")):
                    cas = self.casmap.get(op.key, cas or 0)
                    if cas is None:
                        return _ASYNC
                done = partial(self._completed, op, state, replied_at, started, self._store_result)
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
                done = partial(self._completed, op, state, replied_at, started, self._delta_result)
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
                done = partial(self._completed, op, state, replied_at, started, self._touch_result)
                stats.redis_commands += 1
                store.touch_callback(done, op.key, op.exptime or 0)
            elif action == "delete":
                cas = op.cas
                if cas is not None:
                    cas = self.casmap.get(op.key, cas)
                    if cas is None:
                        return _ASYNC
                done = partial(self._completed, op, state, replied_at, started, self._delete_result)
                stats.redis_commands += 1
                store.delete_callback(done, op.key, cas)
            else:
                return _ASYNC  # the slow path reports it
        except RedisError as exc:  # not sent: Redis down or busy
            self._failed(op, state, exc, started)
            return _FAILED
        return _SENT

    def _completed(
        self,
        op: ShadowOp,
        state: KeyState,
        replied_at: float,
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
                diff, full = interpret(op, state, result)
                now = time.perf_counter()
                figures = self.stats.for_command(op.command)
                figures.redis_latency.observe(now - started)
                if diff is not None:
                    self._spawn(op.key, self._judge(op, diff, state, replied_at, started))
                    return  # _judge goes on with the chain once it has classified it
                if op.mc_status is not None:
                    self.stats.comparisons[figures.match] += 1
                if full:
                    state.mark_synced(op.seq)
                figures.duration.observe(now - started)
                self.stats.lag.observe(now - replied_at)
        except Exception:  # a shadow bug: the key can no longer be trusted
            self._internal_error(op, state)
        self._advance(op.key)

    def _failed(self, op: ShadowOp, state: KeyState, exc: RedisError, started: float) -> None:
        """Count an operation Redis did not carry out (or whose outcome is unknown)."""
        stats = self.stats
        stats.for_command(op.command).redis_latency.observe(time.perf_counter() - started)
        stats.errors[_error_kind(exc)] += 1
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

    async def _one(self, op: ShadowOp, replied_at: float) -> None:
        state = self.keys.get(op.key)
        started = time.perf_counter()
        try:
            diff, full_state = await self._replay(op, state)
        except RedisError as exc:
            self._failed(op, state, exc, started)
            return
        stats = self.stats
        figures = stats.for_command(op.command)
        figures.redis_latency.observe(time.perf_counter() - started)
        if diff is None:
            if op.mc_status is not None:
                stats.comparisons[figures.match] += 1
            if full_state:
                state.mark_synced(op.seq)
        else:
            outcome, detail = await self._classify(op, diff, state, replied_at)
            stats.count_comparison(op.command, outcome, detail)
        self._finished(op, replied_at, started)

    def _finished(self, op: ShadowOp, replied_at: float, started: float) -> None:
        """An operation has its verdict: how long it took, and the lag since its reply."""
        now = time.perf_counter()
        self.stats.for_command(op.command).duration.observe(now - started)
        self.stats.lag.observe(now - replied_at)

    async def _replay(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool]:
        """Apply op on Redis; (difference, whether both stores' state is now fully known)."""
        store = self.store
        self.stats.redis_commands += 1
        if op.action == "read":
            if op.exptime is None:
                item = await store.get(op.key)
            else:
                item = await store.gat(op.exptime, op.key)
            return self._read_result(op, state, item)
        if op.action == "store":
            return await self._store(op, state)
        if op.action == "delta":
            return await self._delta(op, state)
        if op.action == "touch":
            return self._touch_result(op, state, await store.touch(op.key, op.exptime or 0))
        if op.action == "delete":
            return await self._delete(op, state)
        raise ValueError(f"unknown shadow action {op.action!r}")

    async def _store(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool]:
        store = self.store
        if op.mc_status == TOO_LARGE and not op.data and op.data_len:
            # Not buffered (over the value limit): memcached refused it; set / ms delete.
            if op.mode == "set" or op.too_large_deletes:
                await store.delete(op.key)
                return None, True
            return None, False
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
                return _unmapped(op), False
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
        return self._store_result(op, state, result)

    async def _delta(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool]:
        cas = op.cas
        if cas is not None:
            mapped = self.casmap.get(op.key, cas)
            if mapped is None:
                state.mark_lost(op.seq)  # the outcome cannot be predicted
                return _unmapped(op), False
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
        return self._delta_result(op, state, result)

    async def _delete(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool]:
        cas = op.cas
        if cas is not None:
            mapped = self.casmap.get(op.key, cas)
            if mapped is None:
                if op.mc_status == DELETED:
                    await self.store.delete(op.key)
                if op.mc_status is None:
                    self.keys.get(op.key).mark_lost(op.seq)  # noreply: outcome unknown
                return _unmapped(op), False
            cas = mapped
        return self._delete_result(op, state, await self.store.delete(op.key, cas))

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
        return compare_outcome(op, status, None), defined and status == op.mc_status

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
        self, op: ShadowOp, diff: Difference, state: KeyState, replied_at: float
    ) -> tuple[str, str]:
        """(outcome, detail) for a difference; noise leaves Redis in step where it can."""
        if diff.kind in (PADDING, CAS_UNMAPPED):
            return "noise", diff.kind
        if self.keys.raced_near(state, replied_at):
            return "noise", "transient_race"  # the chain settles the key once it is idle
        if not state.warm:
            if self.settings.backfill:
                await self._repair(op.key, state)
            return "noise", "cold_key"
        if state.expires_at is not None and (
            abs(time.time() - state.expires_at) <= self.settings.expiry_tolerance
        ):
            return "noise", "expiry_boundary"
        # A reply from another connection that raced with this one may still be on its way
        # (a busy loop reads sockets late): wait out the race window before judging.
        wait = replied_at + self.settings.race_window - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        if self.keys.raced_near(state, replied_at):
            await self._repair(op.key, state)
            return "noise", "transient_race"
        try:
            mc, redis = await self._reread(op.key)
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[_error_kind(exc)] += 1
            state.mark_lost(op.seq)
            return "noise", "unverified"
        if state_equal(mc, redis) and not self._chains.get(op.key):
            # Equal now, and no later operation of the key is waiting to be replayed (were
            # one waiting, Memcached would already include it and the re-read would prove
            # nothing): someone else wrote the key meanwhile (another proxy, a direct client).
            return "noise", "transient_race"
        recent = time.monotonic() - self.settings.eviction_window
        if mc is None and redis is not None and self._mc_evicted_at > recent:
            await self._repair(op.key, state)
            return "noise", "evicted"
        if mc is not None and redis is None and self._redis_evicted_at > recent:
            await self._repair(op.key, state)
            return "noise", "evicted"
        self._example(op, diff, mc, redis)
        await self._repair(op.key, state)
        return "mismatch", diff.kind

    async def _reread(self, key: bytes) -> tuple[McValue | None, Item | None]:
        await asyncio.sleep(self.settings.reread_delay)
        mc_item = await self.reader.get(key)
        redis = await self.store.get(key)
        self.stats.redis_commands += 1
        return _mc_value(mc_item), redis

    async def _settle(self, key: bytes, state: KeyState) -> None:
        """After a burst of racing writers: make Redis equal Memcached for this key."""
        touches = state.touches
        try:
            mc, redis = await self._reread(key)
            if not state_equal(mc, redis):
                await self._repair(key, state)
            else:
                state.mark_synced(self._seq)
            state.settled_at = time.perf_counter()
            if state.touches == touches:
                state.contended_until = 0.0  # nothing arrived meanwhile: done
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[_error_kind(exc)] += 1
            state.mark_lost(self._seq)

    async def _repair(self, key: bytes, state: KeyState) -> None:
        """Copy Memcached's item (value, flags, remaining TTL) into Redis, or delete it."""
        try:
            item = await self.reader.get(key)
            self.stats.redis_commands += 1
            if item is None:
                await self.store.delete(key)
                state.expires_at = None
            else:
                exptime = item.ttl if item.ttl > 0 else 0
                await self.store.store("set", key, item.flags, exptime, item.data)
                self._note_expiry(state, exptime)
            state.mark_synced(self._seq)
            state.settled_at = time.perf_counter()
            self.stats.repairs += 1
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[_error_kind(exc)] += 1
            state.mark_lost(self._seq)

    def _example(
        self, op: ShadowOp, diff: Difference, mc: McValue | None, redis: Item | None
    ) -> None:
        if self.examples is None:
            return
        # Statuses are protocol words and safe to show; values and numbers go in the dicts
        # as bytes, which the example store hashes unless plain text is allowed.
        detail = f"memcached={diff.memcached} redis={diff.redis}" if diff.kind == "status" else ""
        memcached = _describe_mc(mc)
        redis_side = _describe_redis(redis)
        if op.mc_number is not None:
            memcached["reply"] = str(op.mc_number).encode()
        self.examples(diff.kind, op.command, op.key, memcached, redis_side, detail)

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


def state_keys(request: Request) -> list[bytes]:
    """The keys a request's shadow state is filed under (meta `b` keys decoded)."""
    if request.command in ("mg", "ms", "md", "ma") and b"b" in request.words[2:]:
        key = decode_base64_key(request.words[1]) if len(request.words) > 1 else None
        return [key] if key else []
    return request.keys


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


def _describe_mc(mc: McValue | None) -> dict[str, Any]:
    if mc is None:
        return {"present": False}
    return {"present": True, "flags": mc.flags, "value": mc.data}


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


__all__ = ["DispatcherSettings", "ShadowDispatcher", "state_keys"]
