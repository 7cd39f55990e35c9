"""KeyStates: when a key counts as in step (warm), across flush epochs."""

from __future__ import annotations

from proxy.shadow.engine.keystate import (
    EVICTED,
    HASH_SPACE,
    NEVER,
    KeyState,
    KeyStates,
    sample_hash,
    wall_offset,
)


def test_a_key_is_warm_once_synced_after_its_last_loss() -> None:
    keys = KeyStates(capacity=10, race_window=1.0)
    state = keys.get(b"k")
    assert not state.warm
    state.mark_synced(3)
    assert state.warm
    state.mark_lost(5)
    assert not state.warm
    state.mark_synced(4)  # an older sync does not undo a later loss
    assert not state.warm
    state.mark_synced(6)
    assert state.warm


def test_an_operation_from_before_the_epoch_cannot_warm_a_key_of_the_new_one() -> None:
    # set (seq 1) observed, then flush_all (seq 2); the set is replayed after the flush was
    # dispatched: its success says nothing about the key after the flush.
    keys = KeyStates(capacity=10, race_window=1.0)
    keys.get(b"k").mark_synced(1)
    keys.new_epoch(2)
    state = keys.get(b"k")
    state.mark_synced(1)
    assert not state.warm
    state.mark_synced(3)  # a read after the flush that found both stores equal
    assert state.warm


def test_the_table_is_bounded_and_forgets_the_least_recently_used() -> None:
    keys = KeyStates(capacity=2, race_window=1.0)
    keys.get(b"a").mark_synced(1)
    keys.get(b"b").mark_synced(2)
    keys.get(b"a")
    keys.get(b"c")
    assert len(keys) == 2
    assert keys.peek(b"b") is None
    assert keys.peek(b"a") is not None and keys.peek(b"a").warm  # type: ignore[union-attr]


def test_a_lost_operation_makes_the_expiry_unknown_again() -> None:
    """The soak-under-load false unexpected_in_redis: a touch that overlapped a repair was
    lost (memcached's TTL now seconds, Redis's an hour); an equal read must not then make
    the key warm with the repair's expiry."""
    state = KeyStates(10, 0.2).get(b"k")
    state.note_expiry(3600)  # the repair's copy
    state.mark_synced(1)
    assert state.warm and state.ttl_known
    state.mark_lost(2)  # the overlapping touch
    assert not state.warm and not state.ttl_known  # an equal read (the dispatcher) waits
    state.note_expiry(5)  # a write seen from now on tells it again
    assert state.ttl_known


def test_an_expiry_remembers_the_wall_clock_it_was_computed_on() -> None:
    """A later offset tells how far the wall clock stepped since (the classifier's
    clock_step): the caller's offset when it anchored the exptime, or now's."""
    state = KeyState(0)
    state.note_expiry(1_900_000_000, clock=123.5)
    assert (state.expires_at, state.expiry_clock) == (1_900_000_000.0, 123.5)
    before = wall_offset()
    state.note_expiry(30)
    assert before - 0.01 <= state.expiry_clock <= wall_offset() + 0.01
    state.note_expiry(0)  # never expires: the clock no longer matters
    assert state.expires_at is None


# -- the one invariant: every way of missing an operation turns the key cold ----------------


def test_a_loss_for_a_key_not_seen_yet_keeps_its_queued_operations_from_warming_it() -> None:
    """Cause 1 of the dark-launch issue: `set K` queued (seq 1), `incr K` dropped (seq 3):
    the set, replayed later, must not make K in step."""
    keys = KeyStates(capacity=10, race_window=1.0)
    keys.lose([b"K"], 3)
    state = keys.touch(b"K", 1, 0.0, 0.1, 0.2, seq=1)
    state.mark_synced(1)
    assert not state.warm
    later = keys.touch(b"K", 1, 0.3, 0.4, 0.5, seq=4)  # a write seen after the drop
    later.mark_synced(4)
    assert later.warm


def test_a_forgotten_key_is_cold_as_of_the_newest_loss_the_lru_forgot() -> None:
    keys = KeyStates(capacity=2, race_window=1.0)
    keys.lose([b"K"], 10)  # K's state (lost at 10) ...
    keys.get(b"a", 11)
    keys.get(b"b", 12)  # ... is forgotten
    assert keys.peek(b"K") is None
    state = keys.get(b"K", 5)  # an operation of K from before the loss, replayed late
    state.mark_synced(5)
    assert not state.warm


def test_a_new_key_is_established_by_its_first_full_operation() -> None:
    keys = KeyStates(capacity=10, race_window=1.0)
    state = keys.touch(b"new", 1, 0.0, 0.1, 0.2, seq=7)
    assert not state.warm
    state.mark_synced(7)
    assert state.warm


def test_keys_leaving_the_sample_turn_cold_when_next_looked_at() -> None:
    """Cause 6: rate 1.0 -> 0.5 -> 1.0. A key that left the sample missed its writes: it
    must come back cold, however long it was out; one that stayed in is untouched."""
    keys = KeyStates(capacity=100, race_window=1.0)
    half = HASH_SPACE // 2
    out = next(k for k in (b"k%d" % i for i in range(100)) if sample_hash(k) >= half)
    stayed = next(k for k in (b"k%d" % i for i in range(100)) if sample_hash(k) < half)
    for seq, key in enumerate((out, stayed), start=1):
        keys.touch(key, 1, 0.0, 0.1, 0.1, seq).mark_synced(seq)
    keys.coverage_changed(half, since=1.0, seq=10)  # paused for half the keys
    keys.coverage_changed(HASH_SPACE, since=2.0, seq=20)  # back
    assert keys.peek(stayed).warm  # type: ignore[union-attr]
    state = keys.peek(out)
    assert state is not None and not state.warm
    # A write sent after the rise establishes it again; one sent before cannot (it may race
    # with a request of the key sent before the rise, which was not captured).
    keys.touch(out, 1, 1.5, 2.5, 2.5, seq=21).mark_synced(21)
    assert not keys.peek(out).warm  # type: ignore[union-attr]
    keys.touch(out, 1, 2.1, 2.6, 2.6, seq=22).mark_synced(22)
    assert keys.peek(out).warm  # type: ignore[union-attr]


def test_an_operation_of_a_key_out_of_the_sample_cannot_establish_it() -> None:
    """Captured before the rate fell, answered after: replayed, but the key's next requests
    are not captured, so it must not stay in step."""
    keys = KeyStates(capacity=100, race_window=1.0, coverage=HASH_SPACE // 4)
    key = next(k for k in (b"k%d" % i for i in range(100)) if sample_hash(k) >= HASH_SPACE // 4)
    state = keys.touch(key, 1, 0.0, 0.1, 0.1, seq=3)
    state.mark_synced(3)
    assert not state.warm


def test_a_pause_to_nothing_is_an_epoch() -> None:
    keys = KeyStates(capacity=100, race_window=1.0)
    keys.touch(b"k", 1, 0.0, 0.1, 0.1, 1).mark_synced(1)
    keys.coverage_changed(0, since=1.0, seq=5)
    assert keys.peek(b"k") is None and len(keys) == 0


def test_operations_meeting_an_untrusted_window_cannot_establish_a_key() -> None:
    """A delayed flush_all applies at memcached's clock tick, a restart at some moment before
    it is seen: operations that may have run across it establish nothing."""
    keys = KeyStates(capacity=100, race_window=1.0)
    keys.untrusted(10.0, 12.0)
    cases = [
        (8.0, 9.0, True),  # before
        (9.5, 10.5, False),  # across its start
        (11.0, 11.1, False),  # inside
        (11.9, 13.0, False),  # across its end
        (12.1, 12.2, True),  # after
    ]
    for seq, (sent, replied, trusted) in enumerate(cases, start=1):
        state = keys.touch(b"k%d" % seq, 1, sent, replied, replied, seq)
        state.mark_synced(seq)
        assert state.warm is trusted, (sent, replied)


def test_an_epoch_can_say_why_every_key_is_cold() -> None:
    keys = KeyStates(capacity=100, race_window=1.0)
    keys.new_epoch(5, why=EVICTED)
    assert keys.get(b"k", 3).why == EVICTED  # (cold as of the epoch, with its reason)
    assert keys.get(b"other", 9).why == NEVER  # (made by an operation after it)
