"""Executor: replays one shadow operation on the target and says what the answer means.

It knows Memcached's semantics on the target (cas tokens through the cas map, values over the
limit, noreply sets) and nothing of chains or verdicts. Each operation becomes one target
Command (command(): the one switch on what it does); the fast path sends it with the
executor's completion, the slow path (work that needs something else first: a cas token
with no mapping, a value too large to have been buffered) awaits it. Plain reads of keys
with nothing of theirs in flight are gathered and sent in one MGET per connection
(flush_reads), their answers compared in one loop. Either way the result is (Redis's answer,
the difference from Memcached's, whether both stores' state is now fully known).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from proxy.memcache.words import Mode, Status
from proxy.redis.errors import RedisError
from proxy.redis.layout import Item
from proxy.redis.store import Command, DeltaResult, StoreResult
from proxy.shadow.engine.compare import CAS_UNMAPPED, Difference, compare_outcome, compare_read
from proxy.shadow.engine.keystate import CasMap, KeyState, KeyStates
from proxy.shadow.engine.target import ShadowTarget
from proxy.shadow.engine.translate import (
    DELETE,
    DELETED,
    DELTA,
    MISS,
    NOT_FOUND,
    READ,
    STORE,
    STORED,
    TOO_LARGE,
    TOUCH,
    TOUCHED,
    ShadowOp,
)
from proxy.shadow.stats import ShadowStats

# What send did with an operation.
SENT: Final = 1  # its command is on its way; the completion goes on with it
DONE: Final = 2  # it ended at once (not sent, counted; or fenced): the chain goes on
ASYNC: Final = 3  # it needs other target work first: await replay() in a task

# The completion of a sent operation: (op, state, started, answer, difference, fully known,
# the key's expiry before the answer moved it, that expiry's wall-clock offset, error). On
# an error (a RedisError, or a bug while interpreting the answer) the answer is None and
# nothing was interpreted.
Completion = Callable[
    [
        ShadowOp,
        KeyState,
        float,
        object,
        Difference | None,
        bool,
        float | None,
        float,
        Exception | None,
    ],
    None,
]

Outcome = tuple[Difference | None, bool]

_DEFINING: Final = frozenset((Mode.SET, Mode.ADD, Mode.REPLACE, Mode.CAS))
_JOINING: Final = frozenset((Mode.APPEND, Mode.PREPEND))


class Executor:
    """Replays operations on a ShadowTarget; `completed` receives the fast path's results."""

    def __init__(
        self,
        target: ShadowTarget,
        casmap: CasMap,
        keys: KeyStates,
        stats: ShadowStats,
        completed: Completion,
    ) -> None:
        self.target = target
        self.casmap = casmap
        self.keys = keys
        self.stats = stats
        self.completed = completed
        # Plain reads of quiet keys waiting for flush_reads, and whether reads batch at all.
        self._reads: list[ShadowOp] = []
        self.batch_reads = True

    # -- fast path: one command with a completion ---------------------------------------

    def send(self, op: ShadowOp, state: KeyState, started: float, batch: bool = False) -> int:
        """Send op's command: SENT (`completed` will be called once), or ASYNC (it needs
        other target work first: the caller awaits replay()). `batch`: nothing of the key
        is in flight, so a plain read may wait for flush_reads() and share an MGET. Raises
        RedisError when the command cannot be sent (the target is down or busy)."""
        if batch and op.action == READ and op.exptime is None and self.batch_reads:
            self._reads.append(op)
            return SENT
        command = self.command(op)
        if command is None:
            return ASYNC
        command.context = op
        self.stats.redis_commands += 1
        self.target.send(command, self._replied)
        return SENT

    def command(self, op: ShadowOp) -> Command | None:
        """The target command that replays `op`; None when it needs the slow path (a cas
        token with no mapping, a value too large to have been buffered). The one switch
        on what an operation does."""
        action = op.action
        target = self.target
        if action == READ:
            if op.exptime is None:
                return target.get_command(op.key)
            return target.gat_command(op.exptime, op.key)
        cas = op.cas
        if cas is not None or op.mode is Mode.CAS:
            if (op.mode is Mode.APPEND or op.mode is Mode.PREPEND) and not cas:
                cas = None  # (ms MA/MP with C0: no check)
            else:
                cas = self.casmap.get(op.key, cas or 0)
                if cas is None:
                    return None  # no mapping: follow memcached's outcome (slow path)
        if action == STORE:
            if op.mc_status == TOO_LARGE and not op.data and op.data_len:
                return None
            assert op.mode is not None
            return target.store_command(
                op.mode,
                op.key,
                op.flags,
                op.exptime or 0,
                op.data,
                cas,
                too_large_deletes=op.too_large_deletes,
            )
        if action == DELTA:
            assert op.mode is not None
            return target.delta_command(
                op.key,
                op.mode,
                op.delta,
                cas=cas,
                create=op.create,
                initial=op.initial,
                ttl=op.exptime,
            )
        if action == TOUCH:
            return target.touch_command(op.key, op.exptime or 0)
        if action == DELETE:
            return target.delete_command(op.key, cas)
        raise ValueError(f"no target command for {op!r}")

    def _replied(self, command: Command, result: Any, error: RedisError | None) -> None:
        op = command.context
        assert isinstance(op, ShadowOp)
        self._answered(op, command.sent_at, result, error)

    def _answered(self, op: ShadowOp, started: float, result: Any, error: Exception | None) -> None:
        # The key's state now (an epoch since it was sent made it a new, cold one).
        state = self.keys.get(op.key, op.seq)
        if error is not None:
            self.completed(op, state, started, None, None, False, None, 0.0, error)
            return
        expires_at = state.expires_at  # evidence for a difference: before the answer moves it
        clock = state.expiry_clock
        try:
            diff, full = self.interpret(op, state, result)
        except Exception as exc:  # a shadow bug: the caller counts it and drops the key
            self.completed(op, state, started, None, None, False, None, 0.0, exc)
            return
        self.completed(op, state, started, result, diff, full, expires_at, clock, None)

    # -- plain reads, batched -------------------------------------------------------------

    def flush_reads(self) -> None:
        """Send the plain reads gathered since the last call: one MGET per connection."""
        reads = self._reads
        if not reads:
            return
        self._reads = []
        started = time.perf_counter()
        groups = self.target.batches([op.key for op in reads])
        if groups is None:  # (a cluster: one command each)
            groups = [[position] for position in range(len(reads))]
        for positions in groups:
            ops = [reads[position] for position in positions]
            try:
                if len(ops) == 1:
                    self._send_one(ops[0])
                else:
                    self.stats.redis_commands += 1
                    keys = [op.key for op in ops]
                    self.target.send_reads(keys, self._read_many, (ops, started))
            except RedisError as exc:  # not sent: each read fails, its chain goes on
                for op in ops:
                    self._answered(op, started, None, exc)

    def _send_one(self, op: ShadowOp) -> None:
        command = self.command(op)
        assert command is not None
        command.context = op
        self.stats.redis_commands += 1
        self.target.send(command, self._replied)

    def _read_many(
        self, items: list[Item | None] | None, error: RedisError | None, context: object
    ) -> None:
        assert isinstance(context, tuple)
        ops: list[ShadowOp] = context[0]
        started: float = context[1]
        if items is None:
            for op in ops:
                self._answered(op, started, None, error)
            return
        for op, item in zip(ops, items, strict=True):
            self._answered(op, started, item, None)

    # -- slow path: awaited -----------------------------------------------------------------

    async def replay(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool, object]:
        """Apply op on the target: (difference, whether both stores' state is now fully
        known, Redis's answer). Raises RedisError."""
        command = self.command(op)
        self.stats.redis_commands += 1
        if command is not None:
            result = await self.target.call(command)
            return (*self.interpret(op, state, result), result)
        if op.action == STORE and op.mc_status == TOO_LARGE:
            # Not buffered (over the value limit): memcached refused it; set / ms delete.
            if op.mode is Mode.SET or op.too_large_deletes:
                await self.target.delete(op.key)
                return None, True, TOO_LARGE
            return None, False, TOO_LARGE
        return await self._unmapped(op, state)

    async def _unmapped(
        self, op: ShadowOp, state: KeyState
    ) -> tuple[Difference | None, bool, object]:
        """A cas token with no Redis mapping: follow memcached's outcome, never guess
        (REFERENCE 4.6); when it is unknown (noreply), the key's state is unknown too."""
        target = self.target
        status = op.mc_status
        if op.action == STORE and status == STORED:
            mode = Mode.SET if op.mode is Mode.CAS else op.mode
            assert mode is not None
            await target.store(mode, op.key, op.flags, op.exptime or 0, op.data)
            if mode is Mode.SET:
                state.note_expiry(op.exptime or 0, _clock(op))
                state.padded = False
            elif state.padded:  # (see _store_result)
                state.mark_lost(op.seq)
        elif op.action == DELETE and status == DELETED:
            await target.delete(op.key)
        if status is None or op.action == DELTA:
            state.mark_lost(op.seq)  # noreply, or arithmetic: the outcome cannot be predicted
        if status is None:
            return None, False, CAS_UNMAPPED
        return Difference(CAS_UNMAPPED, status, "-"), False, CAS_UNMAPPED

    # -- what an answer means: shared by both paths -----------------------------------------

    def interpret(self, op: ShadowOp, state: KeyState, result: Any) -> Outcome:
        """What Redis's answer to `op` means: the difference from Memcached's, and whether
        both stores' state is now fully known. The one switch on what an answer is."""
        action = op.action
        if action == READ:
            return self._read_result(op, state, result)
        if action == STORE:
            return self._store_result(op, state, result)
        if action == DELTA:
            return self._delta_result(op, state, result)
        if action == TOUCH:
            return self._touch_result(op, state, result)
        if action == DELETE:
            return self._delete_result(op, state, result)
        raise ValueError(f"no answer to interpret for {op!r}")

    def _read_result(self, op: ShadowOp, state: KeyState, item: Item | None) -> Outcome:
        if op.exptime is not None:
            state.note_expiry(op.exptime, _clock(op))
        value = op.mc_value
        if op.want_cas and item is not None and value is not None and value.cas is not None:
            self.casmap.put(op.key, value.cas, item.cas)
            self.stats.cas_map_entries = len(self.casmap)
        # A meta get defines the key only when it returned both the value and the flags.
        full = op.exptime is None and (
            not op.meta
            or op.mc_status == MISS
            or (value is not None and value.data is not None and value.flags is not None)
        )
        return compare_read(op, item), full

    def _store_result(self, op: ShadowOp, state: KeyState, result: StoreResult) -> Outcome:
        status = result.status
        mode = op.mode
        if mode in _JOINING:
            if state.padded:  # (an incr's padding may differ: the joined values may too)
                state.mark_lost(op.seq)
        elif status == STORED:
            state.note_expiry(op.exptime or 0, _clock(op))
            state.padded = False
        # Only outcomes that define the key in both stores make it known to be in step: a
        # value stored whole, or the key absent from both. add's NOT_STORED and cas's EXISTS
        # only say the key exists, with whatever value each store has.
        defined = (status == STORED and mode in _DEFINING) or (
            (mode is Mode.REPLACE and status == Status.NOT_STORED)
            or (mode is Mode.CAS and status == NOT_FOUND)
        )
        defined = defined and status == op.mc_status and not op.inferred
        return compare_outcome(op, status, None), defined

    def _delta_result(self, op: ShadowOp, state: KeyState, result: DeltaResult) -> Outcome:
        status = result.status
        if status == Status.OK:
            state.padded = True
        if status == Status.CREATED and op.create is not None:
            state.note_expiry(op.create, _clock(op))
        if op.exptime is not None and status in (Status.OK, Status.CREATED):
            state.note_expiry(op.exptime, _clock(op))
        return compare_outcome(op, status, result.value), False

    def _touch_result(self, op: ShadowOp, state: KeyState, status: Status) -> Outcome:
        if status == TOUCHED:
            state.note_expiry(op.exptime or 0, _clock(op))
        return compare_outcome(op, status, None), False

    def _delete_result(self, op: ShadowOp, state: KeyState, status: Status) -> Outcome:
        full = op.mc_status in (DELETED, NOT_FOUND) and op.cas is None
        return compare_outcome(op, status, None), full


def _clock(op: ShadowOp) -> float | None:
    """The wall clock's offset when the op's exptime was anchored (None: not seen)."""
    return op.replied_wall - op.replied_at if op.replied_wall else None


__all__ = ["ASYNC", "DONE", "SENT", "Completion", "Executor"]
