"""What the shadow knows per key, bounded: is Redis in step with Memcached (warm), and the cas map.

One invariant decides every verdict: a key is warm only while the shadow has seen every
operation on it since its state was last established. Events are numbered in Memcached's
reply order (sequence numbers); a KeyState holds the number of the last operation that left
both stores defined and equal (`synced`) and of the last change the shadow missed or cannot
place (`lost`), and the key is warm when synced > lost. Every way of missing an operation
raises `lost` at its place in that order:

- a request dropped anywhere, for named keys (`KeyStates.lose`, which creates the state of a
  key not seen yet, so its queued operations cannot warm it) or for every key (`new_epoch`);
- keys leaving the sample (rate lowered, shadow paused, halted or switched off): a coverage
  loss, applied to each key the next time it is looked at (`coverage_changed`);
- keys entering the sample: an operation sent before every request that was in flight under
  the old rate has been answered may race with one the shadow never saw: it cannot
  establish the key (`rise_until`);
- operations whose time in Memcached overlaps a span the shadow cannot place (a delayed
  flush_all taking effect on memcached's clock, a restart): `untrusted`;
- everything at once (a flush_all, a restart of either store or of the worker): an epoch.

A state made for a key starts lost just before the operation that makes it, and never below
the highest loss of a state the LRU bound forgot, so forgetting a key only ever makes it cold.
Differences on cold keys are expected noise, never mismatches.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final
from zlib import crc32

from proxy.redis.layout import REALTIME_MAXDELTA
from proxy.shadow.sampler import SEED

HASH_SPACE: Final = 1 << 32
"""Coverage is a sampler threshold: keys whose hash is below it are in the sample."""

# Why a key stopped being in step (KeyState.why): the noise reason of a difference on it.
NEVER: Final = 0  # not established since the key was first seen (or an epoch)
MISSED: Final = 1  # a change the shadow did not replay, or cannot place
EVICTED: Final = 2  # Memcached evicted it (its watch stream named the key)
REDIS_EVICTED: Final = 3  # Redis evicted it (a keyspace notification named the key)

MAX_COVERAGE_LOSSES: Final = 16
"""Coverage losses remembered for keys not looked at since; past it every key turns cold
(one epoch) and the list starts again."""
MAX_WINDOWS: Final = 8
WINDOW_KEEP: Final = 600.0
"""Seconds after its end an untrusted window is forgotten: no request takes that long."""


def wall_offset() -> float:
    """The wall clock's offset from the monotonic one: it moves only when the wall clock is
    stepped (Linux slews CLOCK_MONOTONIC along with it)."""
    return time.time() - time.perf_counter()


def sample_hash(key: bytes) -> int:
    """The sampler's hash of a key (sampler.KeySampler): below the coverage, it is sampled."""
    return crc32(key, SEED)


class KeyState:
    """Per-key facts used to classify a difference."""

    __slots__ = (
        "contended_until",
        "coverage_seen",
        "epoch",
        "expires_at",
        "expiry_clock",
        "fence_hi",
        "fence_lo",
        "last_seen",
        "last_session",
        "lost",
        "padded",
        "raced_at",
        "replayed_seq",
        "synced",
        "touches",
        "ttl_known",
        "why",
    )

    def __init__(self, epoch: int, lost: int = -1, coverage_seen: int = 0) -> None:
        self.epoch = epoch
        # Sequence numbers (reply order) of the last operation that left both stores defined
        # and equal, and of the last one Redis missed or whose effect is unknown.
        self.synced = -1
        self.lost = lost
        self.why = NEVER  # why the key is not warm (when it is not)
        # An incr or decr changed the value since it was last written whole: Redis pads a
        # shorter number with spaces, memcached only when no other request holds the item,
        # so an append or prepend from here makes values no comparison can tell apart.
        self.padded = False
        self.coverage_seen = coverage_seen  # coverage losses of KeyStates applied to it
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

    def mark_lost(self, seq: int, why: int = MISSED) -> None:
        """An operation Redis missed, or whose effect is unknown. The key's expiry is no
        longer known either (the operation may have set it: a touch, a gat, a write with a
        TTL), so a read that finds both stores equal cannot make the key warm again: only a
        write seen from now on, or a repair, can (a touch that overlapped a repair left
        memcached's TTL at seconds and Redis's at an hour: a false unexpected_in_redis)."""
        if seq >= self.lost:
            self.lost = seq
            self.why = why
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
    """LRU-bounded KeyState table, the epoch, and what the shadow covers (see module doc)."""

    def __init__(self, capacity: int, race_window: float, coverage: int = HASH_SPACE) -> None:
        self.capacity = capacity
        self.race_window = race_window
        self.epoch = 0
        # No state made from now on starts below this loss: the epoch's start, or the
        # highest loss of a state the LRU bound forgot.
        self.floor = -1
        self.floor_why = NEVER  # why a state that starts at the floor is cold
        self._states: OrderedDict[bytes, KeyState] = OrderedDict()
        # Keys whose sample hash is below `coverage` have every request seen.
        self.coverage = coverage
        # Coverage losses: (seq, threshold): keys hashed at or above it missed what came after.
        self._coverage_losses: list[tuple[int, int]] = []
        # Keys that came (back) into the sample with a hash of at least rise_floor: their
        # operations sent before rise_until may race with requests the shadow never saw.
        self.rise_floor = HASH_SPACE
        self.rise_until = float("-inf")
        # Spans of perf_counter time the shadow cannot place operations in (untrusted).
        self._windows: list[tuple[float, float]] = []
        self._windows_until = float("-inf")

    def __len__(self) -> int:
        return len(self._states)

    # -- looking a key up -------------------------------------------------------------------

    def get(self, key: bytes, seq: int = -1) -> KeyState:
        """The key's state; a new one if it has none, cold up to just before `seq` (the
        sequence number of the event that looks it up)."""
        state = self._states.get(key)
        if state is None:
            return self._new(key, seq)
        self._states.move_to_end(key)
        if state.coverage_seen != len(self._coverage_losses):
            self._apply_coverage(key, state)
        return state

    def peek(self, key: bytes) -> KeyState | None:
        state = self._states.get(key)
        if state is not None and state.coverage_seen != len(self._coverage_losses):
            self._apply_coverage(key, state)
        return state

    def _new(self, key: bytes, seq: int) -> KeyState:
        lost = seq - 1 if seq - 1 > self.floor else self.floor
        state = KeyState(self.epoch, lost)
        if lost == self.floor:
            state.why = self.floor_why
        if self._coverage_losses:  # (a loss after `seq` applies to it too)
            self._apply_coverage(key, state)
        states = self._states
        states[key] = state
        if len(states) > self.capacity:
            _, forgotten = states.popitem(last=False)
            if forgotten.lost > self.floor:
                self.floor = forgotten.lost
                self.floor_why = NEVER
        return state

    def touch(
        self,
        key: bytes,
        session: int,
        started: float,
        replied_at: float,
        now: float,
        seq: int,
    ) -> KeyState:
        """Record an operation on `key` (sequence number `seq`): `session` sent it at
        `started`, its reply came at `replied_at`, it is dispatched at `now` (perf_counter).
        An operation the shadow cannot trust to establish the key (out of the sample, racing
        with requests it never saw, in an untrusted window) makes the key lost at its place.

        Two connections' operations are ordered when one's reply came back before the other
        was sent; when their [sent, replied] intervals overlap, Memcached may have run them in
        either order, so they race.
        """
        state = self._states.get(key)
        if state is None:
            state = self._new(key, seq)
        else:
            self._states.move_to_end(key)  # get(), inlined: this runs for every operation
            if state.coverage_seen != len(self._coverage_losses):
                self._apply_coverage(key, state)
        state.touches += 1
        last = state.last_session
        if last and last != session and started < state.last_seen:
            state.contended_until = now + self.race_window
            state.raced_at = replied_at
        state.last_session = session
        if replied_at > state.last_seen:
            state.last_seen = replied_at
        if ((self.coverage < HASH_SPACE or started < self.rise_until) and not self._covered(
            key, started
        )) or (started <= self._windows_until and self._untrusted(started, replied_at)):
            state.mark_lost(seq)
        return state

    def raced_near(self, state: KeyState, when: float) -> bool:
        """Did another connection touch the key within the race window around `when`?"""
        return state.raced_at >= when - self.race_window

    # -- losses -----------------------------------------------------------------------------

    def lose(self, keys: list[bytes] | tuple[bytes, ...], seq: int, why: int = MISSED) -> None:
        """Changes of these keys were missed at `seq`: each turns cold there, a key not seen
        yet included (its operations still queued, numbered before `seq`, cannot warm it)."""
        for key in keys:
            self.get(key, seq).mark_lost(seq, why)

    def new_epoch(self, seq: int, why: int = NEVER) -> None:
        """Nothing is known to be in step any more, whatever was observed up to `seq`
        (a flush_all; changes lost in bulk; a store or the worker restarted; a store that
        dropped keys without naming them: `why`)."""
        self.epoch += 1
        if seq > self.floor:
            self.floor = seq
        self.floor_why = why
        self._states.clear()
        self._coverage_losses.clear()

    # -- the sample ---------------------------------------------------------------------------

    def covers(self, key: bytes) -> bool:
        """Is the key in the sample the shadow sees every request of?"""
        return crc32(key, SEED) < self.coverage

    def coverage_changed(self, threshold: int, since: float, seq: int) -> None:
        """The sample is now the keys hashed below `threshold`, from `seq` on. A rise counts
        for operations sent from `since` on: before it, requests of the new keys were still
        in flight uncaptured."""
        old = self.coverage
        self.coverage = threshold
        if threshold < old:
            if threshold == 0 or len(self._coverage_losses) >= MAX_COVERAGE_LOSSES:
                self.new_epoch(seq)  # (cheaper than a loss every key must look at)
            else:
                self._coverage_losses.append((seq, threshold))
        elif threshold > old:
            if self.rise_until > since - WINDOW_KEEP:  # an earlier rise may still matter
                self.rise_floor = min(self.rise_floor, old)
            else:
                self.rise_floor = old
            self.rise_until = max(self.rise_until, since)

    def _covered(self, key: bytes, started: float) -> bool:
        hashed = crc32(key, SEED)
        if hashed >= self.coverage:
            return False
        return not (started < self.rise_until and hashed >= self.rise_floor)

    def _apply_coverage(self, key: bytes, state: KeyState) -> None:
        losses = self._coverage_losses
        hashed = crc32(key, SEED)
        for seq, threshold in losses[state.coverage_seen :]:
            if hashed >= threshold:
                state.mark_lost(seq)
        state.coverage_seen = len(losses)

    # -- spans the shadow cannot place --------------------------------------------------------

    def untrusted(self, lo: float, hi: float) -> None:
        """No operation whose [sent, replied] meets [lo, hi] (perf_counter) establishes its
        key: Memcached's state changed then in a way the shadow cannot place (a delayed
        flush_all applied at memcached's clock tick, a restart)."""
        keep = hi - WINDOW_KEEP
        windows = [w for w in self._windows if w[1] >= keep]
        windows.append((lo, hi))
        windows.sort()
        while len(windows) > MAX_WINDOWS:  # merge the two oldest (wider is still sound)
            (a_lo, a_hi), (b_lo, b_hi) = windows[0], windows[1]
            windows[:2] = [(min(a_lo, b_lo), max(a_hi, b_hi))]
        self._windows = windows
        self._windows_until = max(w[1] for w in windows)

    def _untrusted(self, sent: float, replied: float) -> bool:
        return any(lo <= replied and sent <= hi for lo, hi in self._windows)


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
