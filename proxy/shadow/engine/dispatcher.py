"""Dispatcher: the shadow engine wired together, from an observed request to its verdict.

The scheduler (scheduler.py) queues what the client path observed and runs each key's
operations in Memcached's reply order; the executor (executor.py) replays them on the target
(target.py) and says what Redis's answer means. The dispatcher counts what matched and hands
a difference to the judge (verdict.py), which re-reads and repairs through repair.py and
tells a mismatch's story with story.py.

A difference is classified (classify.py) before it is reported: races between connections,
cold keys, expiry boundaries, evictions and evidence that cannot be ordered with the key's
operations are noise; a mismatch is reported only when an ordered re-read proves Redis
diverged. Every difference ends with Redis repaired from Memcached, fenced so that the
operations the copy already holds are not replayed on top of it: one divergence is reported
once, and nothing is applied twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.redis.errors import (
    RedisBusy,
    RedisError,
    RedisGaveUp,
    RedisTimeout,
    RedisUnavailable,
    ShadowStarved,
)
from proxy.shadow.engine.classify import SUBSUMED, flush_window, place
from proxy.shadow.engine.compare import Difference
from proxy.shadow.engine.evictions import MEMCACHED, EvictionWatch
from proxy.shadow.engine.executor import DONE, Executor
from proxy.shadow.engine.history import HISTORY_STEPS, OpHistory
from proxy.shadow.engine.keystate import (
    EVICTED,
    HASH_SPACE,
    REDIS_EVICTED,
    CasMap,
    KeyState,
    KeyStates,
    wall_offset,
)
from proxy.shadow.engine.mcreader import MemcachedReader
from proxy.shadow.engine.repair import Repairer, error_kind
from proxy.shadow.engine.scheduler import Scheduler
from proxy.shadow.engine.story import answer_words
from proxy.shadow.engine.target import ShadowTarget
from proxy.shadow.engine.translate import READ, ShadowOp, flush_delay
from proxy.shadow.engine.verdict import ExampleSink, Judge
from proxy.shadow.stats import ShadowStats
from proxy.shadow.words import DropReason, ErrorKind, SkipReason

log = logging.getLogger("memshadow.shadow")


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
        self.repairer = Repairer(
            readers=self.readers,
            target=store,
            keys=keys,
            casmap=self.casmap,
            scheduler=self.scheduler,
            evictions=evictions,
            stats=stats,
            reread_delay=settings.reread_delay,
            race_window=settings.race_window,
        )
        self.judge = Judge(
            stats=stats,
            keys=keys,
            history=self.history,
            repairer=self.repairer,
            examples=examples,
            expiry_tolerance=settings.expiry_tolerance,
            backfill=settings.backfill,
            verify_writes=settings.verify_writes,
        )
        self._verify_rate = settings.verify_writes

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

    async def settle(self, key: bytes, state: KeyState) -> None:
        """After a burst of racing writers: make Redis equal Memcached for this key."""
        await self.repairer.settle(key, state)

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
        self._history(op, answer_words(answer))
        if diff is None:
            if op.mc_status is not None:
                stats.comparisons[figures.match] += 1
            if full_state and state.ttl_known:  # (a read alone does not tell the TTL)
                state.mark_synced(op.seq)
        else:
            verdict = await self.judge.classify(op, diff, state, answer, expires_at, clock)
            stats.count_comparison(op.command, verdict.outcome, verdict.reason)
        self._finished(op, started)
        if diff is None and self._verify_rate and op.action != READ and self.judge.verify_due():
            await self.judge.verify(op, state)

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
            self.stats.errors[error_kind(exc)] += 1

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
                self._history(op, answer_words(answer))
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
                if self._verify_rate and op.action != READ and self.judge.verify_due():
                    self.scheduler.hold(op.key, self.judge.verify(op, state))
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
        verdict = await self.judge.classify(op, diff, state, answer, expires_at, clock)
        self.stats.count_comparison(op.command, verdict.outcome, verdict.reason)
        self._finished(op, started)

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
        kind = error_kind(exc)
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


__all__ = ["DispatcherSettings", "ShadowDispatcher"]
