"""KeyStates: when a key counts as in step (warm), across flush epochs."""

from __future__ import annotations

from proxy.shadow.keystate import KeyState, KeyStates, wall_offset


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
