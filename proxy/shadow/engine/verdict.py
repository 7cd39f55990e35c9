"""The verdict on a difference: classify.py's rules driven with the key's facts and, when they
ask for it, a re-read ordered with the key's operations; then the repair and the example the
verdict calls for. Also shadow.verify_writes: both stores read after a replayed write."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from proxy.redis.errors import RedisError
from proxy.shadow.engine.classify import (
    BACKFILL,
    MATCH,
    MISMATCH,
    NOISE,
    REPAIR,
    UNVERIFIED,
    KeyFacts,
    Reread,
    Verdict,
    blank,
    judge_at_once,
    judge_reread,
    signed_overflow,
)
from proxy.shadow.engine.compare import PADDING, Difference, compare_values, state_equal
from proxy.shadow.engine.history import OpHistory, StepTuple
from proxy.shadow.engine.keystate import KeyState, KeyStates, wall_offset
from proxy.shadow.engine.mcreader import MemcachedUnavailable
from proxy.shadow.engine.repair import Repairer, Snapshot, error_kind, mc_value
from proxy.shadow.engine.story import (
    describe_mc,
    describe_mc_answer,
    describe_redis,
    describe_redis_answer,
    story,
)
from proxy.shadow.engine.translate import ShadowOp
from proxy.shadow.stats import ShadowStats
from proxy.shadow.words import DiffKind

VERIFY: Final = "verify"
"""The command label of shadow.verify_writes' verdicts (a read of both stores after a write)."""

# (kind, command, key, memcached's answer, redis's answer, detail, story: the re-read, the
# action taken and the key's last operations)
ExampleSink = Callable[[str, str, bytes, dict[str, Any], dict[str, Any], str, dict[str, Any]], None]


class Judge:
    """Decides the verdict on a difference, carries it out (repair, example) and verifies
    writes. Its callers hold the key's chain, so its evidence is ordered with the key's
    operations."""

    def __init__(
        self,
        *,
        stats: ShadowStats,
        keys: KeyStates,
        history: OpHistory,
        repairer: Repairer,
        examples: ExampleSink | None,
        expiry_tolerance: float,
        backfill: bool,
        verify_writes: float,
    ) -> None:
        """expiry_tolerance, backfill, verify_writes: DispatcherSettings'."""
        self.stats = stats
        self.keys = keys
        self.history = history
        self.repairer = repairer
        self.examples = examples
        self.expiry_tolerance = expiry_tolerance
        self.backfill = backfill
        self._verify_rate = verify_writes
        self._verify_credit = 0.0  # verify_writes accumulated: a write is verified at 1

    async def classify(
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
            diff, self._facts(op, state, expires_at, clock), self.expiry_tolerance
        )
        snapshot: Snapshot | None = None
        steps: list[StepTuple] | None = None
        if verdict is None:
            steps = self.history.snapshot(op.key)  # the story as it stood when it was seen
            try:
                snapshot = await self.repairer.reread(op.key, ordered_after=op)
            except (RedisError, MemcachedUnavailable) as exc:
                self.stats.errors[error_kind(exc)] += 1
                state.mark_lost(op.seq)
                return Verdict(NOISE, UNVERIFIED)
            verdict = judge_reread(diff, self._evidence(op, state, snapshot))
        answers = (describe_mc_answer(op), describe_redis_answer(op, answer))
        await self._act(op, op.command, state, verdict, diff, snapshot, expires_at, answers, steps)
        return verdict

    def verify_due(self) -> bool:
        """shadow.verify_writes: is this replayed write followed by a verification?"""
        self._verify_credit += self._verify_rate
        if self._verify_credit < 1.0:
            return False
        self._verify_credit -= 1.0
        return True

    async def verify(self, op: ShadowOp, state: KeyState) -> None:
        """shadow.verify_writes: read both stores after a replayed write (its chain held) and
        compare them; the verdict is counted under the command "verify"."""
        try:
            snapshot = await self.repairer.reread(op.key, ordered_after=op)
        except (RedisError, MemcachedUnavailable) as exc:
            self.stats.errors[error_kind(exc)] += 1
            self.stats.count_comparison(VERIFY, NOISE, UNVERIFIED)
            return
        mc = mc_value(snapshot.mc)
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
        verdict = judge_at_once(diff, facts, self.expiry_tolerance) or judge_reread(
            diff, self._evidence(op, state, snapshot)
        )
        answers = (describe_mc(mc), describe_redis(snapshot.redis))
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

    def _evidence(self, op: ShadowOp, state: KeyState, snapshot: Snapshot) -> Reread:
        return Reread(
            ordered=snapshot.ordered,
            memcached_present=snapshot.mc is not None,
            redis_present=snapshot.redis is not None,
            equal=state_equal(mc_value(snapshot.mc), snapshot.redis),
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
        snapshot: Snapshot | None,
        expires_at: float | None,
        answers: tuple[dict[str, Any], dict[str, Any]],
        steps: list[StepTuple] | None,
    ) -> None:
        """Carry out a verdict: repair the key if it says so, keep an example of a mismatch."""
        action = "none"
        if verdict.action == REPAIR or (verdict.action == BACKFILL and self.backfill):
            action = await self.repairer.repair(op.key, state, op.seq, snapshot)
        if verdict.outcome == MISMATCH:
            self._example(op, command, diff, answers, snapshot, action, expires_at, steps)

    def _example(
        self,
        op: ShadowOp,
        command: str,
        diff: Difference,
        answers: tuple[dict[str, Any], dict[str, Any]],
        snapshot: Snapshot | None,
        action: str,
        expires_at: float | None,
        steps: list[StepTuple] | None,
    ) -> None:
        if self.examples is None:
            return
        # Statuses are protocol words and safe to show; values and numbers go in the dicts
        # as bytes, which the example store hashes unless plain text is allowed.
        detail = (
            f"memcached={diff.memcached} redis={diff.redis}" if diff.kind == DiffKind.STATUS else ""
        )
        if steps is None:
            steps = self.history.snapshot(op.key)
        told = story(op, steps, snapshot, action, expires_at)
        memcached, redis = answers
        # (the kind as plain text: it crosses the worker's pipe, and marshal refuses enums)
        self.examples(str(diff.kind), command, op.key, memcached, redis, detail, told)


__all__ = ["VERIFY", "ExampleSink", "Judge"]
