"""Dispatcher: the shadow engine wired together, and the verdict on every replayed request.

The scheduler (scheduler.py) queues what the client path observed and runs each key's
operations in Memcached's reply order; the executor (executor.py) replays them on the target
(target.py) and says what Redis's answer means. The dispatcher decides the verdict.

A difference is classified (classify.py) before it is reported: races between connections,
cold keys, expiry boundaries, evictions and evidence that cannot be ordered with the key's
operations are noise; a mismatch is reported only when an ordered re-read proves Redis
diverged. Every difference ends with Redis repaired from Memcached, fenced so that the
operations the copy already holds are not replayed on top of it: one divergence is reported
once, and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxy.config import LISTENER_BITS
from proxy.redis.errors import (
    RedisBusy,
    RedisError,
    RedisGaveUp,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    ShadowStarved,
)
from proxy.redis.layout import Item
from proxy.redis.store import (
    DeltaResult,
    StoreResult,
)
from proxy.shadow.engine.classify import (
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
    flush_window,
    judge_at_once,
    judge_reread,
    place,
    signed_overflow,
)
from proxy.shadow.engine.compare import PADDING, STATUS, Difference, compare_values, state_equal
from proxy.shadow.engine.evictions import MEMCACHED, EvictionWatch
from proxy.shadow.engine.executor import DONE, Executor
from proxy.shadow.engine.history import HISTORY_STEPS, OpHistory, StepTuple, describe_steps
from proxy.shadow.engine.keystate import (
    EVICTED,
    HASH_SPACE,
    REDIS_EVICTED,
    CasMap,
    KeyState,
    KeyStates,
    wall_offset,
)
from proxy.shadow.engine.mcreader import McItem, MemcachedReader, MemcachedUnavailable
from proxy.shadow.engine.scheduler import Scheduler
from proxy.shadow.engine.target import ShadowTarget
from proxy.shadow.engine.translate import HIT, MISS, READ, McValue, ShadowOp, flush_delay
from proxy.shadow.stats import ShadowStats
from proxy.shadow.words import DropReason, ErrorKind, SkipReason

LISTENER_MASK: Final = (1 << LISTENER_BITS) - 1

log = logging.getLogger("memshadow.shadow")

VERIFY: Final = "verify"
"""The command label of shadow.verify_writes' verdicts (a read of both stores after a write)."""

# (kind, command, key, memcached's answer, redis's answer, detail, story: the re-read, the
# action taken and the key's last operations)
ExampleSink = Callable[[str, str, bytes, dict[str, Any], dict[str, Any], str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Both stores re-read: Memcached's item read between lo and hi (perf_counter), then
    Redis's; ordered: no write of the key may lie between the judged answer and it."""

    mc: McItem | None
    redis: Item | None
    lo: float
    hi: float
    ordered: bool
    why: int = -1  # why the key stopped being in step while it was judged (-1: it did not)


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    """Limits and timings of the shadow (shadow.* in the YAML)."""

    queue_size: int = 10_000
    max_inflight: int = 512
    race_window: float = 1.0
    reread_delay: float = 0.05
    expiry_tolerance: float = 2.0
    key_state_size: int = 200_000
    cas_map_size: int = 100_000
    backfill: bool = False
    verify_writes: float = 0.0
    replay_flush_all: bool = False
    # Operations of recently used keys kept for mismatch examples (history.OpHistory), in
    # all: about 120 bytes each.
    history_steps: int = HISTORY_STEPS
    # The worker lets requests gather for batch_window seconds before replaying them, unless
    # batch_size are already waiting: the Redis commands of a batch go out in one write per
    # connection, and the replies come back in one read. Verdicts come that much later.
    # Measured (90/10 get/set, 16 connections, rate 1, 2-core VM): the shadow's CPU per
    # request went from 19.4 to 14.5 us with 2 ms (each write carried ~2.4 commands).
    batch_window: float = 0.002
    batch_size: int = 64


class ShadowDispatcher:
    """The shadow engine: a scheduler feeds the executor, and the verdicts are decided here."""

    def __init__(
        self,
        *,
        store: ShadowTarget,
        reader: MemcachedReader | Sequence[MemcachedReader],
        stats: ShadowStats,
        settings: DispatcherSettings | None = None,
        examples: ExampleSink | None = None,
        ticked: bool = False,
        coverage: int = HASH_SPACE,
        owned: Callable[[bytes], bool] | None = None,
        evictions: EvictionWatch | None = None,
    ) -> None:
        """coverage: the sample at the start (keys hashed below it; coverage() moves it);
        owned: with several shadow workers, which keys are this one's to judge."""
        # One reader per Memcached (config.backends): a key is re-read where its last
        # request went, told by the session number's low bits (server.py).
        self.readers = (reader,) if isinstance(reader, MemcachedReader) else tuple(reader)
        for one in self.readers:
            one.on_restart = self._memcached_restarted
        self.stats = stats
        self.settings = settings = settings or DispatcherSettings()
        self.examples = examples
        self.keys = keys = KeyStates(settings.key_state_size, settings.race_window, coverage)
        self.casmap = CasMap(settings.cas_map_size)
        self.history = OpHistory(settings.history_steps)
        self.executor = Executor(store, self.casmap, keys, stats, self._completed)
        store.on_writes_lost = self._writes_lost
        covers = keys.covers
        sampled = covers if owned is None else (lambda key: covers(key) and owned(key))
        self.sampled = sampled
        self.scheduler = Scheduler(
            runner=self,
            keys=keys,
            sampled=sampled,
            stats=stats,
            queue_size=settings.queue_size,
            max_inflight=settings.max_inflight,
            batch_window=settings.batch_window,
            batch_size=settings.batch_size,
            ticked=ticked,
        )
        # The hand-off, called by the client path (inline) or the worker's reader: the
        # scheduler's own methods, not a wrapper (one call less per reply chunk).
        self.observe = self.scheduler.observe
        self.forget = self.scheduler.forget
        self.forget_all = self.scheduler.new_epoch
        self.tick = self.scheduler.tick
        self.evictions = evictions
        if evictions is not None:
            evictions.on_evicted = self._evicted
            evictions.on_unknown = self._evicted_unnamed
        self._verify_rate = settings.verify_writes
        self._verify_credit = 0.0  # verify_writes accumulated: a write is verified at 1

    @property
    def store(self) -> ShadowTarget:
        return self.executor.target

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.scheduler.start()
        if self.keys.coverage:
            await self._watch_evictions()

    async def stop(self, timeout: float = 2.0) -> None:
        """Stop taking work; give in-flight chains `timeout` seconds, then cancel."""
        await self.scheduler.stop(timeout)
        if self.evictions is not None:
            await self.evictions.stop()

    def coverage(self, stream: int, threshold: int, since: float) -> None:
        """What proxy process `stream` hands over changed (see Scheduler.coverage)."""
        self.scheduler.coverage(stream, threshold, since)
        if threshold and self.evictions is not None and not self.evictions.started:
            self.scheduler.spawn(self._watch_evictions())

    async def _watch_evictions(self) -> None:
        """Evictions matter from the first key shadowed (nothing is watched at rate 0)."""
        if self.evictions is not None:
            try:
                await self.evictions.start()
            except Exception:  # (never fatal: without it, the counters stand in)
                log.exception("shadow: cannot watch the stores' evictions")

    def _evicted(self, store: str, keys: list[bytes]) -> None:
        self.stats.evictions[store] += len(keys)
        if store == MEMCACHED:
            self.scheduler.evicted(keys, EVICTED)
        else:
            self.scheduler.evicted(keys, REDIS_EVICTED, in_order=False)

    def _evicted_unnamed(self, store: str, why: str) -> None:
        """A store dropped keys without naming them: every key turns cold."""
        log.warning("shadow: %s; every key starts cold again", why)
        self.stats.evictions[f"{store}_unnamed"] += 1
        self.scheduler.new_epoch(EVICTED if store == MEMCACHED else REDIS_EVICTED)

    async def idle(self) -> None:
        """Wait until the queue is empty and no chain is running (tests, shutdown)."""
        await self.scheduler.idle()

    # -- running a key's operation (the scheduler's ChainRunner) ---------------------------
    #
    # Everything that acts on evidence (a re-read, a repair, a settle) runs while it holds
    # the key's chain, so it is ordered with the key's operations; a repair leaves a fence
    # that keeps the operations its copy already holds from being replayed again.

    def run(self, op: ShadowOp, state: KeyState, started: float, batch: bool = False) -> int:
        state.replayed_seq = op.seq
        if op.sent_at <= state.fence_hi:
            return self._fenced(op, state)
        self.stats.queueing.observe(started - op.replied_at)
        try:
            return self.executor.send(op, state, started, batch)
        except RedisError as exc:  # not sent: Redis down or busy
            self._failed(op, state, exc, started)
        except Exception:  # a shadow bug: the key can no longer be trusted
            self._internal_error(op, state)
        return DONE

    def flush_reads(self) -> None:
        self.executor.flush_reads()

    async def run_slow(self, op: ShadowOp) -> None:
        state = self.keys.get(op.key, op.seq)
        started = time.perf_counter()
        expires_at = state.expires_at  # before Redis's answer moves it
        clock = state.expiry_clock
        try:
            diff, full_state, answer = await self.executor.replay(op, state)
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
            if full_state and state.ttl_known:  # (a read alone does not tell the TTL)
                state.mark_synced(op.seq)
        else:
            verdict = await self._classify(op, diff, state, answer, expires_at, clock)
            stats.count_comparison(op.command, verdict.outcome, verdict.reason)
        self._finished(op, started)
        if diff is None and self._verify_rate and op.action != READ and self._verify_due():
            await self._verify(op, state)

    def flush(self, op: ShadowOp) -> None:
        """A flush_all, in its place in reply order. Memcached empties itself while the
        request runs, or, delayed, at a tick of its one-second clock (flush_window): every
        key turns cold there (after FLUSHDB, when shadow.replay_flush_all), and no operation
        that may have met the flush establishes a key."""
        lo, hi, when = flush_window(op.exptime or 0, op.sent_at, op.replied_at, wall_offset())
        self.keys.untrusted(lo, hi)
        replay = self.settings.replay_flush_all
        self.scheduler.at(when, self._replay_flush if replay else None)
        self.casmap.clear()
        self.stats.cas_map_entries = 0
        if not replay:
            self.stats.skipped[SkipReason.FLUSH_ALL_NOT_REPLAYED] += 1

    def flush_seen(self, sent: float, replied: float, words: list[bytes]) -> None:
        """A flush_all the proxy handed over before this engine's stream began (a restarted
        worker): keys warmed from now on must still turn cold when its delay runs out."""
        delay = flush_delay(words)
        if delay is None:
            return
        lo, hi, when = flush_window(delay, sent, replied, wall_offset())
        if hi > time.perf_counter():
            self.keys.untrusted(lo, hi)
            self.scheduler.at(when)

    async def _replay_flush(self) -> None:
        try:
            await self.store.flush()
            self.stats.redis_commands += 1
        except RedisError as exc:  # (the keys turn cold all the same)
            self.stats.errors[_error_kind(exc)] += 1

    def _memcached_restarted(self, what: str) -> None:
        """A Memcached lost every item: every key is cold, and no operation sent before now
        establishes one (its old process may have answered it: such requests may still be
        on their way here, in the worker's pipe or held for ordering)."""
        log.warning("shadow: %s: it lost its items, so every key starts cold again", what)
        self.stats.dropped[DropReason.MEMCACHED_RESTART] += 1
        self.casmap.clear()  # (a new process hands out cas tokens from the start again)
        self.stats.cas_map_entries = 0
        self.keys.untrusted(float("-inf"), time.perf_counter())
        self.scheduler.new_epoch()

    def _fenced(self, op: ShadowOp, state: KeyState) -> int:
        """An operation the proxy sent before the key's last repair read Memcached: the copy
        already holds its effect (skip it), or may hold it (skip it; the key turns cold)."""
        if place(op.sent_at, op.replied_at, state.fence_lo, state.fence_hi) == SUBSUMED:
            self.stats.skipped[SkipReason.IN_REPAIR_COPY] += 1
            self._history(op, "in repair copy")
            return DONE
        self.stats.skipped[SkipReason.REPAIR_OVERLAP] += 1
        self._history(op, "overlaps repair")
        if op.action != READ:
            state.mark_lost(op.seq)
        return DONE

    def _completed(
        self,
        op: ShadowOp,
        state: KeyState,
        started: float,
        answer: object,
        diff: Difference | None,
        full: bool,
        expires_at: float | None,
        clock: float,
        error: Exception | None,
    ) -> None:
        """The executor's fast path finished an operation: record its verdict, go on."""
        try:
            if isinstance(error, RedisError):
                self._failed(op, state, error, started)
            elif error is not None:
                raise error
            else:
                now = time.perf_counter()
                figures = self.stats.for_command(op.command)
                figures.redis_latency.observe(now - started)
                self._history(op, _outcome(answer))
                if diff is not None:
                    judge = self._judge(op, diff, state, started, answer, expires_at, clock)
                    self.scheduler.hold(op.key, judge)
                    return  # the chain goes on once the difference is classified
                if op.mc_status is not None:
                    self.stats.comparisons[figures.match] += 1
                if full and state.ttl_known:  # (a read alone does not tell the TTL)
                    state.mark_synced(op.seq)
                figures.duration.observe(now - started)
                self.stats.lag.observe(now - op.replied_at)
                if self._verify_rate and op.action != READ and self._verify_due():
                    self.scheduler.hold(op.key, self._verify(op, state))
                    return  # the chain goes on after the verification
        except Exception:  # a shadow bug: the key can no longer be trusted
            self._internal_error(op, state)
        self.scheduler.advance(op.key)

    async def _judge(
        self,
        op: ShadowOp,
        diff: Difference,
        state: KeyState,
        started: float,
        answer: object,
        expires_at: float | None,
        clock: float,
    ) -> None:
        verdict = await self._classify(op, diff, state, answer, expires_at, clock)
        self.stats.count_comparison(op.command, verdict.outcome, verdict.reason)
        self._finished(op, started)

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
        if isinstance(exc, ShadowStarved):  # this process's own lag: a drop, not a Redis fault
            self._history(op, "shadow starved")
            self.scheduler.drop(DropReason.SHADOW_STARVED, (op.key,), op.seq)
            return
        kind = _error_kind(exc)
        stats.errors[kind] += 1
        self._history(op, kind)
        if isinstance(exc, RedisGaveUp):  # refused until the retries ran out (a failover...)
            self.scheduler.drop(kind, (op.key,), op.seq)
        elif isinstance(exc, RedisUnavailable | RedisTimeout | RedisBusy):
            reason = DropReason.REDIS_BUSY if isinstance(exc, RedisBusy) else DropReason.REDIS_DOWN
            if isinstance(exc, RedisTimeout):
                reason = DropReason.TIMEOUT
            self.scheduler.drop(reason, (op.key,), op.seq)
        else:  # an error reply, or one this client cannot decode
            state.mark_lost(op.seq)

    def _writes_lost(self, keys: list[bytes] | None, reason: str) -> None:
        """The target lost recent writes (a failover: the old primary had not replicated
        them): those keys, or every key when the target cannot say which, turn cold."""
        if keys is None:
            self.scheduler.new_epoch()
        else:
            self.scheduler.forget(keys)
        self.stats.dropped[reason] += 1 if keys is None else len(keys)
        log.warning(
            "shadow: Redis %s: %s keys written lately turn cold (their writes may be lost)",
            reason,
            "all" if keys is None else len(keys),
        )

    def _internal_error(self, op: ShadowOp, state: KeyState) -> None:
        log.exception("shadow: cannot replay %s of a key", op.command)
        self.stats.errors[ErrorKind.INTERNAL] += 1
        state.mark_lost(op.seq)

    def _finished(self, op: ShadowOp, started: float) -> None:
        """An operation has its verdict: how long it took, and the lag since its reply."""
        now = time.perf_counter()
        self.stats.for_command(op.command).duration.observe(now - started)
        self.stats.lag.observe(now - op.replied_at)

    # -- classifying a difference ---------------------------------------------------------

    async def _classify(
        self,
        op: ShadowOp,
        diff: Difference,
        state: KeyState,
        answer: object,
        expires_at: float | None,
        clock: float,
    ) -> Verdict:
        """The verdict on a difference. The key's chain is held meanwhile, so the evidence
        gathered here is ordered with the key's operations (classify.py says what it proves).
        `expires_at` is when Memcached was expected to expire the key before the operation,
        `clock` the wall clock's offset when that expiry was computed."""
        verdict = judge_at_once(
            diff, self._facts(op, state, expires_at, clock), self.settings.expiry_tolerance
        )
        snapshot: _Snapshot | None = None
        steps: list[StepTuple] | None = None
        if verdict is None:
            steps = self.history.snapshot(op.key)  # the story as it stood when it was seen
            try:
                snapshot = await self._reread(op.key, ordered_after=op)
            except (RedisError, MemcachedUnavailable) as exc:
                self.stats.errors[_error_kind(exc)] += 1
                state.mark_lost(op.seq)
                return Verdict(NOISE, UNVERIFIED)
            verdict = judge_reread(diff, self._evidence(op, state, snapshot))
        answers = (_describe_mc_answer(op), _describe_redis_answer(op, answer))
        await self._act(op, op.command, state, verdict, diff, snapshot, expires_at, answers, steps)
        return verdict

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
        facts = self._facts(op, state, expires_at, state.expiry_clock)
        verdict = judge_at_once(diff, facts, self.settings.expiry_tolerance) or judge_reread(
            diff, self._evidence(op, state, snapshot)
        )
        answers = (_describe_mc(mc), _describe_redis(snapshot.redis))
        command = f"{op.command} (verify)"
        steps = self.history.snapshot(op.key)
        await self._act(op, command, state, verdict, diff, snapshot, expires_at, answers, steps)
        self.stats.count_comparison(VERIFY, verdict.outcome, verdict.reason)

    def _facts(
        self, op: ShadowOp, state: KeyState, expires_at: float | None, clock: float
    ) -> KeyFacts:
        offset = wall_offset()
        return KeyFacts(
            warm=state.warm,
            why=state.why,
            raced=self.keys.raced_near(state, op.replied_at),
            expires_at=expires_at,
            # On today's wall clock, like judged_wall (it may have stepped since the reply).
            replied_wall=op.replied_at + offset if op.replied_wall else op.replied_wall,
            judged_wall=time.time(),
            expiry_skew=0.0 if expires_at is None else offset - clock,
        )

    def _evidence(self, op: ShadowOp, state: KeyState, snapshot: _Snapshot) -> Reread:
        return Reread(
            ordered=snapshot.ordered,
            memcached_present=snapshot.mc is not None,
            redis_present=snapshot.redis is not None,
            equal=state_equal(_mc_value(snapshot.mc), snapshot.redis),
            raced=self.keys.raced_near(state, op.replied_at),
            why=snapshot.why,
            redis_blank=snapshot.redis is not None and blank(snapshot.redis.data),
            memcached_signed_overflow=snapshot.mc is not None and signed_overflow(snapshot.mc.data),
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
        steps: list[StepTuple] | None,
    ) -> None:
        """Carry out a verdict: repair the key if it says so, keep an example of a mismatch."""
        action = "none"
        if verdict.action == REPAIR or (verdict.action == BACKFILL and self.settings.backfill):
            action = await self._repair(op.key, state, op.seq, snapshot)
        if verdict.outcome == MISMATCH:
            self._example(op, command, diff, answers, snapshot, action, expires_at, steps)

    async def _reread(self, key: bytes, ordered_after: ShadowOp | None = None) -> _Snapshot:
        """Read Memcached's item, then Redis's. With `ordered_after` (the operation whose
        answers differed, its chain held), also tell whether the snapshot is ordered: no
        change of the key may lie between that operation and the snapshot, neither an
        operation still on its way nor an eviction (every store's evictions before now are
        known first); when the key stopped being in step meanwhile, why."""
        await asyncio.sleep(self.settings.reread_delay)
        lo = time.perf_counter()
        mc = await self._reader_for(key).get(key)
        hi = time.perf_counter()
        redis = await self.store.get(key)
        self.stats.redis_commands += 1
        ordered = False
        why = -1
        if ordered_after is not None:
            race_window = self.settings.race_window
            caught_up = await self.scheduler.caught_up(hi + race_window, max(1.0, 4 * race_window))
            told = self.evictions is None or (
                await self.evictions.sync()  # (then placed in reply order, as they are due)
                and await self.scheduler.caught_up(time.perf_counter(), 1.0)
            )
            # A change of the key dropped on the way, or evicted, (known only now that
            # everything is in) leaves nothing to prove: the key is no longer in step.
            state = self.keys.peek(key)
            if state is not None and not state.warm:
                why = state.why
            ordered = (
                caught_up
                and told
                and state is not None
                and state.warm
                and not self.scheduler.pending_write(key, hi)
            )
        return _Snapshot(mc, redis, lo, hi, ordered, why)

    async def settle(self, key: bytes, state: KeyState) -> None:
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
            # Written even when value and flags are equal already: the TTL may differ (the
            # operations the fence skips may have changed it), and so may the cas pair.
            action = "none needed"
            if mc is not None:
                stored = await self.store.store("set", key, mc.flags, exptime, mc.data)
                self.stats.redis_commands += 1
                if mc.cas and stored.cas is not None:
                    self.casmap.put(key, mc.cas, stored.cas)
                    self.stats.cas_map_entries = len(self.casmap)
                action = "copied to redis"
            elif snapshot.redis is not None:
                await self.store.delete(key)
                self.stats.redis_commands += 1
                action = "deleted in redis"
            state.note_expiry(exptime)  # 0 (absent, or no TTL): never expires
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
        steps: list[StepTuple] | None,
    ) -> None:
        if self.examples is None:
            return
        # Statuses are protocol words and safe to show; values and numbers go in the dicts
        # as bytes, which the example store hashes unless plain text is allowed.
        detail = f"memcached={diff.memcached} redis={diff.redis}" if diff.kind == STATUS else ""
        story: dict[str, Any] = {
            "connection": op.session,
            "lag_ms": round((time.perf_counter() - op.replied_at) * 1000.0, 1),
            "action": action,
            "history": describe_steps(
                self.history.snapshot(op.key) if steps is None else steps, op.replied_at
            ),
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
        # (the kind as plain text: it crosses the worker's pipe, and marshal refuses enums)
        self.examples(str(diff.kind), command, op.key, memcached, redis, detail, story)

    def _reader_for(self, key: bytes) -> MemcachedReader:
        """The reader of the Memcached that holds `key`: where its last request went."""
        readers = self.readers
        if len(readers) == 1:
            return readers[0]
        state = self.keys.peek(key)
        index = state.last_session & LISTENER_MASK if state is not None else 0
        return readers[index] if index < len(readers) else readers[0]

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
    if op.action == READ:
        return _describe_mc(op.mc_value if op.mc_status == HIT else None)
    shown: dict[str, Any] = {"status": str(op.mc_status) if op.mc_status else "no reply"}
    if op.mc_number is not None:
        shown["number"] = str(op.mc_number).encode()
    return shown


def _describe_redis_answer(op: ShadowOp, answer: object) -> dict[str, Any]:
    if op.action == READ:
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
            return ErrorKind.SHADOW_OOM
        return ErrorKind.REDIS_REPLY
    if isinstance(exc, RedisGaveUp):
        return f"redis_{exc.reason}"
    if isinstance(exc, RedisTimeout):
        return ErrorKind.REDIS_TIMEOUT
    if isinstance(exc, RedisUnavailable):
        return ErrorKind.REDIS_UNAVAILABLE
    if isinstance(exc, RedisBusy):
        return ErrorKind.REDIS_BUSY
    if isinstance(exc, MemcachedUnavailable):
        return ErrorKind.MEMCACHED_READER
    return ErrorKind.REDIS_OTHER


__all__ = ["DispatcherSettings", "ShadowDispatcher"]
