"""What the shadow remembers per key, bounded: is Redis known to be in step, and the cas map.

A key is "warm" once a write through the proxy (or a repair) has defined it in both stores
since the current epoch and no later change was lost (sequence numbers in reply order make
"later" exact even though keys are processed concurrently); a flush_all that is not replayed
starts a new epoch, which makes every key cold again. Differences on cold keys are expected
noise, never mismatches. Both tables are LRU-bounded: a key that falls out is simply cold
again (noise, not a false alarm).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from proxy.redis.layout import REALTIME_MAXDELTA


def wall_offset() -> float:
    """The wall clock's offset from the monotonic one: it moves only when the wall clock is
    stepped (Linux slews CLOCK_MONOTONIC along with it)."""
    return time.time() - time.perf_counter()


class KeyState:
    """Per-key facts used to classify a difference."""

    __slots__ = (
        "contended_until",
        "epoch",
        "expires_at",
        "expiry_clock",
        "fence_hi",
        "fence_lo",
        "last_seen",
        "last_session",
        "lost",
        "raced_at",
        "replayed_seq",
        "synced",
        "touches",
        "ttl_known",
    )

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        # Sequence numbers (reply order) of the last operation that left both stores defined
        # and equal, and of the last one Redis missed or whose effect is unknown.
        self.synced = -1
        self.lost = -1
        self.expires_at: float | None = None  # unix time memcached should expire it (None: never)
        # Whether expires_at comes from a write seen in this epoch. A read that finds both
        # stores equal does not say when the item expires: it cannot make the key warm
        # alone, or an expiry set before (another worker's life, another epoch) would read
        # as a mismatch when it comes.
        self.ttl_known = False
        # The wall clock's offset from the monotonic one (time.time() - perf_counter()) when
        # expires_at was computed: a later offset tells how far the wall clock stepped since
        # (Redis expires by the wall clock, memcached by a monotonic one).
        self.expiry_clock = 0.0
        self.last_session = 0
        self.last_seen = 0.0  # perf_counter time of the latest reply seen for this key
        self.contended_until = 0.0  # perf_counter: until then, other connections raced on it
        self.raced_at = -1e18  # perf_counter time two connections last raced on it
        self.touches = 0  # operations dispatched for the key so far
        self.replayed_seq = -1  # sequence number of the key's last operation started on Redis
        # The last repair copied Memcached's item read between these perf_counter times: an
        # operation answered before fence_lo is already in the copy (classify.place).
        self.fence_lo = -1e18
        self.fence_hi = -1e18

    @property
    def warm(self) -> bool:
        """Redis is known to be in step: nothing was lost since it last was."""
        return self.synced > self.lost

    def mark_synced(self, seq: int) -> None:
        if seq > self.synced:  # max(), without the builtin call: once per operation
            self.synced = seq

    def mark_lost(self, seq: int) -> None:
        """An operation Redis missed, or whose effect is unknown. The key's expiry is no
        longer known either (the operation may have set it: a touch, a gat, a write with a
        TTL), so a read that finds both stores equal cannot make the key warm again: only a
        write seen from now on, or a repair, can (a touch that overlapped a repair left
        memcached's TTL at seconds and Redis's at an hour: a false unexpected_in_redis)."""
        if seq > self.lost:
            self.lost = seq
        self.ttl_known = False

    def note_expiry(self, exptime: int, clock: float | None = None) -> None:
        """Memcached applied `exptime` to the key now (its rule: 0 never, negative at
        once, up to 30 days relative, beyond that a unix time). clock: the wall clock's
        offset from the monotonic one when an absolute exptime was computed (default: now)."""
        self.ttl_known = True
        if exptime == 0:
            self.expires_at = None
            return
        now = time.perf_counter()
        wall = time.time()
        if exptime < 0:
            self.expires_at = wall
        elif exptime <= REALTIME_MAXDELTA:
            self.expires_at = wall + exptime
        else:
            self.expires_at = float(exptime)
        self.expiry_clock = wall - now if clock is None else clock


class KeyStates:
    """LRU-bounded KeyState table plus the flush epoch."""

    def __init__(self, capacity: int, race_window: float) -> None:
        self.capacity = capacity
        self.race_window = race_window
        self.epoch = 0
        # Sequence number at which the current epoch began: an operation observed before it
        # but replayed after it must not make a key of the new epoch warm.
        self.epoch_seq = -1
        self._states: OrderedDict[bytes, KeyState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: bytes) -> KeyState:
        state = self._states.get(key)
        if state is None or state.epoch != self.epoch:
            state = KeyState(self.epoch)
            state.lost = self.epoch_seq
            self._states[key] = state
            if len(self._states) > self.capacity:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        return state

    def peek(self, key: bytes) -> KeyState | None:
        state = self._states.get(key)
        return state if state is not None and state.epoch == self.epoch else None

    def touch(
        self, key: bytes, session: int, started: float, replied_at: float, now: float
    ) -> KeyState:
        """Record an operation on `key`: `session` sent it at `started`, its reply came at
        `replied_at`, it is dispatched at `now` (perf_counter times).

        Two connections' operations are ordered when one's reply came back before the other
        was sent; when their [sent, replied] intervals overlap, Memcached may have run them in
        either order, so they race.
        """
        state = self._states.get(key)
        if state is None or state.epoch != self.epoch:
            state = self.get(key)
        else:
            self._states.move_to_end(key)  # get(), inlined: this runs for every operation
        state.touches += 1
        last = state.last_session
        if last and last != session and started < state.last_seen:
            state.contended_until = now + self.race_window
            state.raced_at = replied_at
        state.last_session = session
        if replied_at > state.last_seen:
            state.last_seen = replied_at
        return state

    def raced_near(self, state: KeyState, when: float) -> bool:
        """Did another connection touch the key within the race window around `when`?"""
        return state.raced_at >= when - self.race_window

    def new_epoch(self, seq: int) -> None:
        """flush_all (at sequence number `seq`) not replayed on Redis, or changes lost in bulk:
        nothing is known to be in step any more, whatever was observed up to `seq`."""
        self.epoch += 1
        self.epoch_seq = max(self.epoch_seq, seq)
        self._states.clear()


class CasMap:
    """(key, memcached cas) -> redis cas, LRU-bounded (REFERENCE 4.6)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map: OrderedDict[tuple[bytes, int], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def put(self, key: bytes, memcached_cas: int, redis_cas: int) -> None:
        self._map[(key, memcached_cas)] = redis_cas
        self._map.move_to_end((key, memcached_cas))
        if len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def get(self, key: bytes, memcached_cas: int) -> int | None:
        return self._map.get((key, memcached_cas))

    def clear(self) -> None:
        self._map.clear()
