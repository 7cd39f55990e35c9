"""The classifier, sans-IO: one literal case per noise reason and mismatch kind, and every
interleaving of a repair's snapshot with the key's operations."""

from __future__ import annotations

import pytest

from proxy.shadow.engine import keystate
from proxy.shadow.engine.classify import (
    AFTER,
    BACKFILL,
    CLOCK_STEP,
    COLD_KEY,
    EVICTED,
    EXPIRY_BOUNDARY,
    KEEP,
    MEMCACHED_OVERREAD,
    MISMATCH,
    NOISE,
    OVERLAPS,
    REDIS_EVICTED,
    REPAIR,
    SUBSUMED,
    TRANSIENT_RACE,
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
from proxy.shadow.engine.compare import (
    CAS_UNMAPPED,
    ERROR,
    FLAGS,
    MISSING_IN_REDIS,
    PADDING,
    STATUS,
    UNEXPECTED_IN_REDIS,
    VALUE,
    Difference,
)

NOW = 1_800_000_000.0
VALUE_DIFF = Difference(VALUE, "5 bytes", "8 bytes")


def facts(**overrides: object) -> KeyFacts:
    base: dict[str, object] = {
        "warm": True,
        "raced": False,
        "expires_at": None,
        "replied_wall": NOW - 0.5,  # Memcached answered half a second before the judgement
        "judged_wall": NOW,
    }
    base.update(overrides)
    return KeyFacts(**base)  # type: ignore[arg-type]


def reread(**overrides: object) -> Reread:
    base: dict[str, object] = {
        "ordered": True,
        "memcached_present": True,
        "redis_present": True,
        "equal": False,
        "raced": False,
    }
    base.update(overrides)
    return Reread(**base)  # type: ignore[arg-type]


# -- judged at once ------------------------------------------------------------------------


def test_padding_and_cas_unmapped_are_noise_without_a_re_read() -> None:
    assert judge_at_once(Difference(PADDING, "'9 '", "'9'"), facts(), 2.0) == Verdict(
        NOISE, PADDING
    )
    assert judge_at_once(Difference(CAS_UNMAPPED, "STORED", "-"), facts(), 2.0) == Verdict(
        NOISE, CAS_UNMAPPED
    )


def test_a_race_between_connections_is_noise_settled_later() -> None:
    assert judge_at_once(VALUE_DIFF, facts(raced=True), 2.0) == Verdict(NOISE, TRANSIENT_RACE)


def test_a_cold_key_is_noise_and_backfilled_when_enabled() -> None:
    assert judge_at_once(VALUE_DIFF, facts(warm=False), 2.0) == Verdict(NOISE, COLD_KEY, BACKFILL)


@pytest.mark.parametrize(
    ("expires_at", "boundary"),
    [
        (NOW - 0.5 - 2.0, True),  # tolerance before Memcached's answer
        (NOW - 0.5 - 2.1, False),
        (NOW - 0.2, True),  # between Memcached's answer and Redis's (a lagging replay)
        (NOW + 2.0, True),  # tolerance after the judgement
        (NOW + 2.1, False),
        (None, False),
    ],
)
def test_an_expiry_boundary_spans_both_answers_and_the_tolerance(
    expires_at: float | None, boundary: bool
) -> None:
    verdict = judge_at_once(
        Difference(MISSING_IN_REDIS, "hit", "miss"), facts(expires_at=expires_at), 2.0
    )
    if boundary:
        assert verdict == Verdict(NOISE, EXPIRY_BOUNDARY, REPAIR)
    else:
        assert verdict is None  # a re-read decides


def test_a_lag_longer_than_the_tolerance_still_covers_the_replay() -> None:
    # Memcached answered 5 s before the replay; the item expired 3 s after that answer:
    # Redis's miss is an expiry, not a divergence.
    verdict = judge_at_once(
        Difference(MISSING_IN_REDIS, "hit", "miss"),
        facts(replied_wall=NOW - 5.0, expires_at=NOW - 2.0),
        1.0,
    )
    assert verdict == Verdict(NOISE, EXPIRY_BOUNDARY, REPAIR)


MISSING = Difference(MISSING_IN_REDIS, "hit", "miss")
UNEXPECTED = Difference(UNEXPECTED_IN_REDIS, "miss", "hit")


@pytest.mark.parametrize(
    ("diff", "expires_at", "skew", "reason"),
    [
        # The soak's case: the wall clock jumped 3.8 s forward. Redis (wall clock) expired
        # the key at NOW - 2.9; memcached (monotonic) keeps it until NOW + 0.9, and answered
        # a hit at NOW - 0.5: out of the plain tolerance, explained by the step.
        (MISSING, NOW - 2.9, 3.8, CLOCK_STEP),
        (Difference(STATUS, "NOT_STORED", "STORED"), NOW - 2.9, 3.8, CLOCK_STEP),  # an add
        (MISSING, NOW - 2.9, 0.0, None),  # the same difference on a steady clock: a re-read
        (MISSING, NOW - 2.9, 0.3, None),  # a step too small to reach the answers
        (MISSING, NOW - 40.0, 3.8, None),  # expired long before, in both stores' terms
        # A forward step makes Redis expire early, never late; and a key present in both
        # stores did not expire in either: values and flags are never a step's doing.
        (UNEXPECTED, NOW - 2.9, 3.8, None),
        (VALUE_DIFF, NOW - 2.9, 3.8, None),
        (Difference(FLAGS, "1", "2"), NOW - 2.9, 3.8, None),
        # Backwards by 5 s: memcached expires it at NOW - 1.0, Redis (wall clock) at NOW + 4:
        # a miss against a hit in between is the step; the other way round it is not.
        (UNEXPECTED, NOW + 4.0, -5.0, CLOCK_STEP),
        (MISSING, NOW + 4.0, -5.0, None),
        (UNEXPECTED, NOW + 9.0, -5.0, None),  # both expiries after the judgement
        (MISSING, NOW - 1.0, 3.8, EXPIRY_BOUNDARY),  # within the plain tolerance: a boundary
    ],
)
def test_a_wall_clock_step_explains_an_expiry_that_far_apart(
    diff: Difference, expires_at: float, skew: float, reason: str | None
) -> None:
    verdict = judge_at_once(diff, facts(expires_at=expires_at, expiry_skew=skew), 2.0)
    assert verdict == (None if reason is None else Verdict(NOISE, reason, REPAIR))


def test_a_clock_step_does_not_excuse_a_key_without_expiry() -> None:
    diff = Difference(MISSING_IN_REDIS, "hit", "miss")
    assert judge_at_once(diff, facts(expires_at=None, expiry_skew=30.0), 2.0) is None


# -- judged from a re-read -----------------------------------------------------------------


@pytest.mark.parametrize(
    "diff",
    [
        VALUE_DIFF,
        Difference(FLAGS, "1", "2"),
        Difference(MISSING_IN_REDIS, "hit", "miss"),
        Difference(UNEXPECTED_IN_REDIS, "miss", "hit"),
        Difference(STATUS, "NOT_STORED", "STORED"),
        Difference(ERROR, "NON_NUMERIC", "STORED"),
    ],
)
def test_an_ordered_re_read_that_still_differs_is_a_mismatch_of_the_answer_s_kind(
    diff: Difference,
) -> None:
    assert judge_reread(diff, reread()) == Verdict(MISMATCH, diff.kind, REPAIR)


def test_an_unordered_re_read_is_unverified_never_a_mismatch() -> None:
    # A write of the key may lie between the answer and the snapshot, whether the stores
    # agree at the re-read or not.
    for equal in (True, False):
        assert judge_reread(VALUE_DIFF, reread(ordered=False, equal=equal)) == Verdict(
            NOISE, UNVERIFIED, REPAIR
        )


def test_agreement_at_an_ordered_re_read_is_a_write_from_outside() -> None:
    assert judge_reread(VALUE_DIFF, reread(equal=True)) == Verdict(NOISE, TRANSIENT_RACE, REPAIR)


def test_a_race_seen_while_gathering_evidence_is_noise() -> None:
    assert judge_reread(VALUE_DIFF, reread(raced=True)) == Verdict(NOISE, TRANSIENT_RACE, REPAIR)


def test_an_eviction_named_while_the_evidence_was_gathered_explains_the_difference() -> None:
    """Eviction evidence is per key (the stores name what they evict): a key Memcached
    evicted is noise, one Redis evicted is the capacity finding, never a mismatch; and an
    eviction of some other key (a busy store) explains nothing: no window of time does."""
    diff = Difference(UNEXPECTED_IN_REDIS, "miss", "hit")
    evicted = reread(memcached_present=False, ordered=False, why=keystate.EVICTED)
    assert judge_reread(diff, evicted) == Verdict(NOISE, EVICTED, REPAIR)
    lost = Difference(MISSING_IN_REDIS, "hit", "miss")
    by_redis = reread(redis_present=False, ordered=False, why=keystate.REDIS_EVICTED)
    assert judge_reread(lost, by_redis) == Verdict(NOISE, REDIS_EVICTED, REPAIR)
    # The key itself was not evicted: the ordered re-read proves a mismatch.
    assert judge_reread(diff, reread(memcached_present=False)).outcome == MISMATCH
    # Lost another way meanwhile (a drop): nothing proven either way.
    dropped = reread(ordered=False, why=keystate.MISSED)
    assert judge_reread(diff, dropped) == Verdict(NOISE, UNVERIFIED, REPAIR)


def test_a_cold_key_is_noise_by_why_it_is_cold() -> None:
    diff = Difference(UNEXPECTED_IN_REDIS, "miss", "hit")
    assert judge_at_once(diff, facts(warm=False), 2.0) == Verdict(NOISE, COLD_KEY, BACKFILL)
    assert judge_at_once(diff, facts(warm=False, why=keystate.MISSED), 2.0) == Verdict(
        NOISE, COLD_KEY, BACKFILL
    )
    assert judge_at_once(diff, facts(warm=False, why=keystate.EVICTED), 2.0) == Verdict(
        NOISE, EVICTED, REPAIR
    )
    assert judge_at_once(diff, facts(warm=False, why=keystate.REDIS_EVICTED), 2.0) == Verdict(
        NOISE, REDIS_EVICTED, REPAIR
    )


def test_flush_windows_follow_memcached_s_clock() -> None:
    """flush_all N: applied at a tick of memcached's one-second clock, N-2 to N-1 s after
    the command, and what is written up to the next tick is flushed too: every operation
    that meets the window is untrusted; every key turns cold from the window's start."""
    sent, replied = 100.0, 100.001
    assert flush_window(0, sent, replied, 0.0) == (sent, replied, replied)
    assert flush_window(-5, sent, replied, 0.0) == (sent, replied, replied)
    lo, hi, at = flush_window(1, sent, replied, 0.0)
    assert lo == at == sent and hi >= replied + 1.0
    lo, hi, at = flush_window(5, sent, replied, 0.0)
    assert lo == at and sent + 2.0 <= lo <= sent + 3.0 and hi >= replied + 5.0
    # Over 30 days: a unix time; here 50 s on (its perf_counter time is 150).
    lo, hi, at = flush_window(1_900_000_000, sent, replied, 1_900_000_000 - 150.0)
    assert lo == at == sent and hi >= 150.0


def test_memcached_reading_past_a_blank_value_is_noise() -> None:
    diff = Difference(ERROR, "STORED", "NON_NUMERIC")
    assert judge_reread(diff, reread(redis_blank=True)) == Verdict(
        NOISE, MEMCACHED_OVERREAD, REPAIR
    )
    assert judge_reread(diff, reread()).outcome == MISMATCH
    assert blank(b"\x0c") and blank(b" \t\r\n\v") and blank(b"  ")
    assert not blank(b"") and not blank(None) and not blank(b" 1") and not blank(b"x")


def test_a_verdict_without_a_repair_keeps_the_key() -> None:
    assert Verdict(NOISE, PADDING).action == KEEP


# -- a repair's snapshot against the key's operations ----------------------------------------
#
# The snapshot was read between lo=10.0 and hi=10.1 (perf_counter). An operation is sent at
# `sent`, answered at `replied`.


@pytest.mark.parametrize(
    ("sent", "replied", "where"),
    [
        (9.0, 9.5, SUBSUMED),  # answered before the snapshot: the copy holds it
        (9.9, 9.99, SUBSUMED),
        (9.9, 10.05, OVERLAPS),  # in flight while Memcached was read
        (10.02, 10.05, OVERLAPS),
        (10.05, 10.2, OVERLAPS),
        (9.0, 11.0, OVERLAPS),
        (10.1, 10.2, OVERLAPS),  # sent at the very end of the read: either order
        (10.11, 10.2, AFTER),  # sent after the read came back: replay it
        (12.0, 12.1, AFTER),
    ],
)
def test_an_operation_is_placed_against_the_repair_s_snapshot(
    sent: float, replied: float, where: int
) -> None:
    assert place(sent, replied, 10.0, 10.1) == where


def test_without_a_repair_everything_is_after() -> None:
    assert place(0.0, 0.0, -1e18, -1e18) == AFTER


def test_the_redis_store_is_a_shadow_target() -> None:
    from proxy.redis.store import (
        RedisStore,
    )
    from proxy.shadow.engine.target import ShadowTarget

    # mypy checks the signatures where the engine is built; this checks nothing is missing.
    assert isinstance(RedisStore.from_url("redis://127.0.0.1:1/0", size=1), ShadowTarget)


def test_a_big_number_memcached_calls_non_numeric_is_its_overread() -> None:
    assert signed_overflow(b"9223372036854775808") and signed_overflow(b" +18446744073709551615x")
    assert not signed_overflow(b"9223372036854775807") and not signed_overflow(b"abc")
    assert not signed_overflow(b"18446744073709551616") and not signed_overflow(None)
    # strtoull skips leading zeros: the number is still 2^63 or more (seen in memcached: 1 of
    # 100 decrs of 00018446744073709551614 NON_NUMERIC after freed chunks of '-')
    assert signed_overflow(b"000" + b"9" * 19) and signed_overflow(b"\t+0018446744073709551615")
    assert not signed_overflow(b"0" * 30) and not signed_overflow(b"0" * 10 + b"1" * 12)
    diff = Difference(ERROR, "NON_NUMERIC", "STORED")
    assert judge_reread(diff, reread(memcached_signed_overflow=True)) == Verdict(
        NOISE, MEMCACHED_OVERREAD, REPAIR
    )
    assert judge_reread(diff, reread()).outcome == MISMATCH  # a small number: a real one
