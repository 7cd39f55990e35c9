"""Dispatcher: replays sampled requests on Redis off the client path and records verdicts.

The client path calls `capture` (sample or not) and `observe` (the completed requests of a
reply chunk, in Memcached's reply order). `observe` only appends to a bounded queue and never
waits: when the queue is full the work is dropped and counted. A worker task translates the
requests and runs each key's operations strictly in order (one chain per key, at most
`max_inflight` chains at once), so Redis sees a key's writes in Memcached's order.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.memcache.arguments import decode_base64_key
from proxy.memcache.request import Request
from proxy.redis.errors import (
    RedisBusy,
    RedisError,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
)
from proxy.redis.layout import Item
from proxy.redis.store import RedisStore
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
        self._chains: dict[bytes, deque[tuple[ShadowOp, float, int]]] = {}
        self._chain_done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._mc_evicted_at = 0.0
        self._redis_evicted_at = 0.0
        self._mc_evictions: int | None = None
        self._redis_evictions: int | None = None
        self._stopping = False

    # -- client path hand-off (synchronous, never waits) ----------------------------------

    def observe(
        self, requests: list[Request], session: int, replied_at: float | None = None
    ) -> None:
        """Queue the captured requests of one reply chunk; replied_at (perf_counter time,
        now by default) is when their replies came back."""
        now = time.perf_counter() if replied_at is None else replied_at
        queue = self._queue
        shadowed = self.stats.shadowed
        for request in requests:
            if not request.capture:
                continue
            shadowed[request.command] += 1  # dropped ones included: drops/requests <= 1
            self._seq += 1
            if len(queue) >= self.settings.queue_size or self._stopping:
                self._drop("queue_full", state_keys(request), self._seq)
                continue
            queue.append((request, now, session, self._seq))
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
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                while len(self._chains) >= self.settings.max_inflight:
                    self._chain_done.clear()
                    await self._chain_done.wait()
                request, replied_at, session, seq = self._queue.popleft()
                self.stats.queue_depth = len(self._queue)
                try:
                    self._dispatch(request, replied_at, session, seq)
                except Exception:  # a shadow bug must never reach the client path
                    log.exception("shadow: cannot handle %r", request)
                    self.stats.errors["internal"] += 1
            if self._stopping and not self._queue:
                return

    def _dispatch(self, request: Request, replied_at: float, session: int, seq: int) -> None:
        if request.started:
            self.stats.histogram(self.stats.memcached_latency, request.command).observe(
                replied_at - request.started
            )
        plan = translate(request, self.sampled)
        if isinstance(plan, Skip):
            self.stats.skipped[plan.reason] += 1
            for key in plan.keys:
                self.keys.get(key).mark_lost(seq)
            return
        for op in plan:
            op.seq = seq
            if op.action == "flush":
                self._flush(op)
                continue
            # Contention is judged in reply-arrival order, before any of the key's queued
            # operations run, so an operation that raced with a later one is known to.
            self.keys.touch(
                op.key, session, request.started or replied_at, replied_at, time.perf_counter()
            )
            chain = self._chains.get(op.key)
            if chain is not None:
                chain.append((op, replied_at, session))
                continue
            self._chains[op.key] = deque()
            task = asyncio.get_running_loop().create_task(
                self._chain(op.key, op, replied_at, session)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _chain(self, key: bytes, op: ShadowOp, replied_at: float, session: int) -> None:
        chain = self._chains[key]
        try:
            while True:
                await self._one(op, replied_at, session)
                if not chain:
                    state = self.keys.peek(key)
                    if state is None or not state.contended_until or self._stopping:
                        break
                    # Racing writers are done for now: make Redis equal Memcached. Operations
                    # that arrive meanwhile join the chain and run after it.
                    await self._settle(key, state)
                    if not chain:
                        break
                op, replied_at, session = chain.popleft()
        finally:
            self._chains.pop(key, None)
            self._chain_done.set()

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

    # -- one operation --------------------------------------------------------------------

    async def _one(self, op: ShadowOp, replied_at: float, session: int) -> None:
        stats = self.stats
        state = self.keys.get(op.key)
        started = time.perf_counter()
        try:
            diff, full_state = await self._replay(op, state)
        except (RedisUnavailable, RedisTimeout, RedisBusy) as exc:
            reason = {RedisUnavailable: "redis_down", RedisTimeout: "timeout"}.get(
                type(exc), "redis_busy"
            )
            self._drop(reason, (op.key,), op.seq)
            stats.errors[_error_kind(exc)] += 1
            return
        except RedisError as exc:  # an error reply, or one this client cannot decode
            stats.errors[_error_kind(exc)] += 1
            state.mark_lost(op.seq)
            return
        finally:
            took = time.perf_counter() - started
            stats.histogram(stats.redis_latency, op.command).observe(took)
        if diff is None:
            if op.mc_status is not None:
                stats.count_comparison(op.command, "match")
            if full_state:
                state.mark_synced(op.seq)
        else:
            outcome, detail = await self._classify(op, diff, state, replied_at)
            stats.count_comparison(op.command, outcome, detail)
        stats.histogram(stats.shadow_duration, op.command).observe(time.perf_counter() - started)
        stats.lag.observe(time.perf_counter() - replied_at)

    async def _replay(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool]:
        """Apply op on Redis; (difference, whether both stores' state is now fully known)."""
        store = self.store
        self.stats.redis_commands += 1
        if op.action == "read":
            if op.exptime is None:
                item = await store.get(op.key)
            else:
                item = await store.gat(op.exptime, op.key)
                self._note_expiry(state, op.exptime)
            if op.want_cas and item is not None and op.mc_value and op.mc_value.cas is not None:
                self.casmap.put(op.key, op.mc_value.cas, item.cas)
            # A meta get defines the key only when it returned both the value and the flags.
            value = op.mc_value
            full = not op.meta or (
                op.mc_status == MISS
                or (value is not None and value.data is not None and value.flags is not None)
            )
            return compare_read(op, item), full and op.exptime is None
        if op.action == "store":
            return await self._store(op, state)
        if op.action == "delta":
            return await self._delta(op, state)
        if op.action == "touch":
            status = await store.touch(op.key, op.exptime or 0)
            if status == TOUCHED:
                self._note_expiry(state, op.exptime or 0)
            return compare_outcome(op, str(status), None), False
        if op.action == "delete":
            return await self._delete(op)
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
        status = str(result.status)
        if status == STORED and op.mode not in ("append", "prepend"):
            self._note_expiry(state, op.exptime or 0)
        # Only outcomes that define the key in both stores make it known to be in step: a
        # value stored whole, or the key absent from both. add's NOT_STORED and cas's EXISTS
        # only say the key exists, with whatever value each store has.
        defined = (status == STORED and op.mode in ("set", "add", "replace", "cas")) or (
            (op.mode, status) in (("replace", "NOT_STORED"), ("cas", "NOT_FOUND"))
        )
        return compare_outcome(op, status, None), defined and status == op.mc_status

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
        status = str(result.status)
        if status == "CREATED" and op.create is not None:
            self._note_expiry(state, op.create)
        if op.exptime is not None and status in ("OK", "CREATED"):
            self._note_expiry(state, op.exptime)
        return compare_outcome(op, status, result.value), False

    async def _delete(self, op: ShadowOp) -> tuple[Difference | None, bool]:
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
        status = str(await self.store.delete(op.key, cas))
        full = op.mc_status in (DELETED, NOT_FOUND) and cas is None
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
