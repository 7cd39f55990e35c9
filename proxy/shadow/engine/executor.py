"""Executor: replays one shadow operation on the target and says what the answer means.

It knows Memcached's semantics on the target (cas tokens through the cas map, values over the
limit, noreply sets) and nothing of chains or verdicts: the fast path sends the command with a
completion callback, the slow path (work that needs other target calls first) is awaited.
Either way the result is (Redis's answer, the difference from Memcached's, whether both
stores' state is now fully known).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Final

from proxy.redis.errors import RedisError
from proxy.redis.layout import Item, max_value_len
from proxy.redis.store import DeleteStatus, DeltaResult, StoreResult, TouchStatus
from proxy.shadow.engine.compare import CAS_UNMAPPED, Difference, compare_outcome, compare_read
from proxy.shadow.engine.keystate import CasMap, KeyState
from proxy.shadow.engine.target import ShadowTarget
from proxy.shadow.engine.translate import (
    DELETED,
    MISS,
    NOT_FOUND,
    STORED,
    TOO_LARGE,
    TOUCHED,
    ShadowOp,
)
from proxy.shadow.stats import ShadowStats

# What send did with an operation.
SENT: Final = 1  # its command is on its way; the completion callback goes on with it
DONE: Final = 2  # it ended at once (not sent, counted; or fenced): the chain goes on
ASYNC: Final = 3  # it needs other target work first: await replay() in a task

# The completion of a sent operation: (op, state, started, answer, difference, fully known,
# the key's expiry before the answer moved it, error). On an error (a RedisError, or a bug
# while interpreting the answer) the answer is None and nothing was interpreted.
Completion = Callable[
    [ShadowOp, KeyState, float, object, Difference | None, bool, float | None, Exception | None],
    None,
]

Outcome = tuple[Difference | None, bool]
_Interpret = Callable[[ShadowOp, KeyState, Any], Outcome]


class Executor:
    """Replays operations on a ShadowTarget; `completed` receives the fast path's results."""

    def __init__(
        self, target: ShadowTarget, casmap: CasMap, stats: ShadowStats, completed: Completion
    ) -> None:
        self.target = target
        self.casmap = casmap
        self.stats = stats
        self.completed = completed

    # -- fast path: one command with a completion callback --------------------------------

    def send(self, op: ShadowOp, state: KeyState, started: float) -> int:
        """Send op's command: SENT (`completed` will be called once), or ASYNC (it needs
        other target work first: the caller awaits replay()). Raises RedisError when the
        command cannot be sent (the target is down or busy)."""
        action = op.action
        target = self.target
        if action == "read":
            done = partial(self._reply, op, state, started, self._read_result)
            self.stats.redis_commands += 1
            if op.exptime is None:
                target.get_callback(done, op.key)
            else:
                target.gat_callback(done, op.exptime, op.key)
        elif action == "store":
            if op.mc_status == TOO_LARGE and not op.data and op.data_len:
                return ASYNC
            if op.mc_status is None and op.mode == "set" and not op.meta:
                self._infer_stored(op)
            cas = op.cas
            if op.mode == "cas" or (cas and op.mode in ("append", "prepend")):
                cas = self.casmap.get(op.key, cas or 0)
                if cas is None:
                    return ASYNC
            done = partial(self._reply, op, state, started, self._store_result)
            self.stats.redis_commands += 1
            target.store_callback(
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
                    return ASYNC
            done = partial(self._reply, op, state, started, self._delta_result)
            self.stats.redis_commands += 1
            target.delta_callback(
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
            done = partial(self._reply, op, state, started, self._touch_result)
            self.stats.redis_commands += 1
            target.touch_callback(done, op.key, op.exptime or 0)
        elif action == "delete":
            cas = op.cas
            if cas is not None:
                cas = self.casmap.get(op.key, cas)
                if cas is None:
                    return ASYNC
            done = partial(self._reply, op, state, started, self._delete_result)
            self.stats.redis_commands += 1
            target.delete_callback(done, op.key, cas)
        else:
            return ASYNC  # the slow path reports it
        return SENT

    def _reply(
        self,
        op: ShadowOp,
        state: KeyState,
        started: float,
        interpret: _Interpret,
        result: object,
        error: RedisError | None,
    ) -> None:
        if error is not None:
            self.completed(op, state, started, None, None, False, None, error)
            return
        expires_at = state.expires_at  # evidence for a difference: before the answer moves it
        op.expiry_clock = state.expiry_clock
        try:
            diff, full = interpret(op, state, result)
        except Exception as exc:  # a shadow bug: the caller counts it and drops the key
            self.completed(op, state, started, None, None, False, None, exc)
            return
        self.completed(op, state, started, result, diff, full, expires_at, None)

    def _infer_stored(self, op: ShadowOp) -> None:
        """A classic set with noreply that memcached took without an error (the sentinel
        came back alone) and whose value fits an item: memcached stored it."""
        limit = max_value_len(self.target.item_size_max, len(op.key), op.flags)
        if len(op.data) <= limit:
            op.mc_status = STORED
            op.inferred = True

    # -- slow path: awaited -----------------------------------------------------------------

    async def replay(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool, object]:
        """Apply op on the target: (difference, whether both stores' state is now fully
        known, Redis's answer). Raises RedisError."""
        target = self.target
        self.stats.redis_commands += 1
        if op.action == "read":
            if op.exptime is None:
                item = await target.get(op.key)
            else:
                item = await target.gat(op.exptime, op.key)
            return (*self._read_result(op, state, item), item)
        if op.action == "store":
            return await self._store(op, state)
        if op.action == "delta":
            return await self._delta(op, state)
        if op.action == "touch":
            status = await target.touch(op.key, op.exptime or 0)
            return (*self._touch_result(op, state, status), status)
        if op.action == "delete":
            return await self._delete(op, state)
        raise ValueError(f"unknown shadow action {op.action!r}")

    async def _store(self, op: ShadowOp, state: KeyState) -> tuple[Difference | None, bool, object]:
        target = self.target
        if op.mc_status == TOO_LARGE and not op.data and op.data_len:
            # Not buffered (over the value limit): memcached refused it; set / ms delete.
            if op.mode == "set" or op.too_large_deletes:
                await target.delete(op.key)
                return None, True, TOO_LARGE
            return None, False, TOO_LARGE
        cas = op.cas
        if op.mode == "cas" or (cas and op.mode in ("append", "prepend")):
            mapped = self.casmap.get(op.key, cas or 0)
            if mapped is None:
                # No mapping: follow memcached's outcome, never guess (REFERENCE 4.6).
                if op.mc_status == STORED:
                    mode = "set" if op.mode == "cas" else op.mode
                    await target.store(mode, op.key, op.flags, op.exptime or 0, op.data)
                    if mode == "set":
                        state.note_expiry(op.exptime or 0, _clock(op))
                        state.padded = False
                    elif state.padded:  # (see _store_result)
                        state.mark_lost(op.seq)
                if op.mc_status is None:
                    state.mark_lost(op.seq)  # noreply: memcached's outcome is unknown
                return _unmapped(op), False, CAS_UNMAPPED
            cas = mapped
        result = await target.store(
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
        result = await self.target.delta(
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
                    await self.target.delete(op.key)
                if op.mc_status is None:
                    state.mark_lost(op.seq)  # noreply: outcome unknown
                return _unmapped(op), False, CAS_UNMAPPED
            cas = mapped
        status = await self.target.delete(op.key, cas)
        return (*self._delete_result(op, state, status), status)

    # -- what an answer means: shared by both paths -----------------------------------------

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
        if op.mode in ("append", "prepend"):
            if state.padded:  # (an incr's padding may differ: the joined values may too)
                state.mark_lost(op.seq)
        elif status == STORED:
            state.note_expiry(op.exptime or 0, _clock(op))
            state.padded = False
        # Only outcomes that define the key in both stores make it known to be in step: a
        # value stored whole, or the key absent from both. add's NOT_STORED and cas's EXISTS
        # only say the key exists, with whatever value each store has.
        defined = (status == STORED and op.mode in ("set", "add", "replace", "cas")) or (
            (op.mode, status) in (("replace", "NOT_STORED"), ("cas", "NOT_FOUND"))
        )
        defined = defined and status == op.mc_status and not op.inferred
        return compare_outcome(op, status, None), defined

    def _delta_result(self, op: ShadowOp, state: KeyState, result: DeltaResult) -> Outcome:
        status = result.status
        if status == "OK":
            state.padded = True
        if status == "CREATED" and op.create is not None:
            state.note_expiry(op.create, _clock(op))
        if op.exptime is not None and status in ("OK", "CREATED"):
            state.note_expiry(op.exptime, _clock(op))
        return compare_outcome(op, status, result.value), False

    def _touch_result(self, op: ShadowOp, state: KeyState, status: TouchStatus) -> Outcome:
        if status == TOUCHED:
            state.note_expiry(op.exptime or 0, _clock(op))
        return compare_outcome(op, status, None), False

    def _delete_result(self, op: ShadowOp, state: KeyState, status: DeleteStatus) -> Outcome:
        full = op.mc_status in (DELETED, NOT_FOUND) and op.cas is None
        return compare_outcome(op, status, None), full


def _clock(op: ShadowOp) -> float | None:
    """The wall clock's offset when the op's exptime was anchored (None: not dispatched)."""
    return op.replied_wall - op.replied_at if op.replied_wall else None


def _unmapped(op: ShadowOp) -> Difference | None:
    """The verdict of an op whose cas token has no Redis mapping: Memcached's outcome was
    followed, nothing was compared (noise; none when Memcached's outcome is unknown)."""
    if op.mc_status is None:
        return None
    return Difference(CAS_UNMAPPED, op.mc_status, "-")


__all__ = ["ASYNC", "DONE", "SENT", "Completion", "Executor"]
