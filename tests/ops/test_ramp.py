"""The ramp policy without sockets: Wilson bounds, holds on too little or bad evidence, the
minimum hold time, promotion, pause/resume, step back, the baseline phase."""

from __future__ import annotations

import pytest

from proxy.config import RampConfig
from proxy.ops.ramp import RampPhase, RampPolicy, comparisons_needed, wilson_upper
from proxy.shadow.stats import ShadowStats
from tests.ops.support import feed

STEPS = (0.01, 0.05, 0.25, 1.0)
CONFIG = RampConfig(steps=STEPS, hold=60.0, mismatch_target=0.01, min_comparisons=100)
T0 = 1000.0


def policy(stats: ShadowStats, **kwargs: object) -> RampPolicy:
    return RampPolicy(CONFIG, now=T0, snapshot=stats.snapshot(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("failures", "trials", "upper"),
    [
        (0, 10, 0.2775),  # the textbook 0/10 Wilson interval is [0, 0.2775]
        (5, 100, 0.1118),  # 5/100: [0.0215, 0.1118]
        (50, 100, 0.5962),
        (0, 3838, 0.000999),
    ],
)
def test_wilson_upper_bound(failures: int, trials: int, upper: float) -> None:
    assert wilson_upper(failures, trials) == pytest.approx(upper, abs=5e-5)


def test_wilson_without_trials_rules_nothing_out() -> None:
    assert wilson_upper(0, 0) == 1.0


def test_comparisons_needed_is_where_a_clean_run_can_first_pass() -> None:
    assert comparisons_needed(0.001, 1000) == 3838
    assert wilson_upper(0, 3838) < 0.001 <= wilson_upper(0, 3837)
    assert comparisons_needed(0.01, 100) == 381
    assert comparisons_needed(0.01, 5000) == 5000
    with pytest.raises(ValueError, match="between 0 and 1"):
        comparisons_needed(0.0, 10)


def test_starts_on_the_first_step() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    move = ramp.start()
    assert move is not None and move.rate == 0.01 and move.step == 0
    assert ramp.phase is RampPhase.RAMPING
    assert ramp.next_change_at() == T0 + 60


def test_starts_at_the_highest_step_at_or_below_the_configured_rate() -> None:
    stats = ShadowStats()
    assert policy(stats, start_rate=0.3).rate == 0.25
    assert policy(stats, start_rate=0.001).rate == 0.01
    assert policy(stats, start_rate=1.0).phase is RampPhase.DONE


def test_too_few_comparisons_holds_however_long_and_clean() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    feed(stats, match=380)
    assert ramp.tick(T0 + 10_000, stats.snapshot()) is None
    assert ramp.reason == "hold: too few comparisons (380/381)"
    assert ramp.evidence is not None and ramp.evidence.compared == 380


def test_noise_is_not_evidence() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    feed(stats, match=300, noise=500)
    assert ramp.tick(T0 + 10_000, stats.snapshot()) is None
    assert ramp.reason == "hold: too few comparisons (300/381)"


def test_good_evidence_still_waits_for_the_minimum_hold() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    feed(stats, match=1000)
    assert ramp.tick(T0 + 30, stats.snapshot()) is None
    assert ramp.reason == "hold: evidence is good; minimum hold time, 30s left"


def test_promotes_when_held_long_enough_with_a_low_upper_bound() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    feed(stats, match=1000, mismatch=1)  # upper bound 0.56% < 1%
    move = ramp.tick(T0 + 60, stats.snapshot())
    assert move is not None
    assert (move.rate, move.step) == (0.05, 1)
    assert move.reason.startswith("promoted after 60s: 1 mismatches in 1001 comparisons")
    # The next step collects its own evidence from zero.
    assert ramp.tick(T0 + 200, stats.snapshot()) is None
    assert ramp.reason == "hold: too few comparisons (0/381)"
    assert ramp.next_change_at() == T0 + 120


def test_mismatches_hold_the_step() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    feed(stats, match=990, mismatch=10)  # 1% observed: the bound is well above 1%
    assert ramp.tick(T0 + 3600, stats.snapshot()) is None
    assert ramp.reason.startswith("hold: mismatch ratio may be as high as 1.8")
    assert "(10/1000, 95% upper bound), target 1%" in ramp.reason


def test_the_last_step_is_done() -> None:
    stats = ShadowStats()
    ramp = policy(stats, start_rate=0.25)
    feed(stats, match=2000)
    move = ramp.tick(T0 + 60, stats.snapshot())
    assert move is not None and move.rate == 1.0
    assert ramp.phase is RampPhase.DONE and ramp.reason.startswith("done: promoted")
    assert ramp.next_change_at() is None
    feed(stats, match=2000)
    assert ramp.tick(T0 + 600, stats.snapshot()) is None


def test_pause_stops_promotion_and_resume_restarts_the_hold() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    assert ramp.pause("paused by an operator")
    assert not ramp.pause("again")
    feed(stats, match=1000)
    assert ramp.tick(T0 + 600, stats.snapshot()) is None
    assert ramp.reason == "paused: paused by an operator"
    assert ramp.next_change_at() is None
    # The operator moved the rate meanwhile: the ramp goes on from the step below it.
    move = ramp.resume(T0 + 700, stats.snapshot(), current_rate=0.3)
    assert move is not None and move.rate == 0.25 and move.step == 2
    assert ramp.next_change_at() == T0 + 760
    assert ramp.resume(T0 + 700, stats.snapshot(), current_rate=0.3) is None  # not paused


def test_resume_on_a_step_needs_no_move() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    ramp.pause("x")
    assert ramp.resume(T0, stats.snapshot(), current_rate=0.01) is None
    assert ramp.reason == "resumed: on step 1/4 (0.01)"


def test_halted_and_switched_off_never_promote() -> None:
    stats = ShadowStats()
    ramp = policy(stats)
    feed(stats, match=1000)
    ramp.halted = True
    assert ramp.tick(T0 + 600, stats.snapshot()) is None
    assert ramp.reason.startswith("halted:")
    ramp.halted = False
    assert ramp.tick(T0 + 600, stats.snapshot(), shadow_enabled=False) is None
    assert ramp.reason == "hold: shadowing is switched off (kill switch)"


def test_step_back() -> None:
    stats = ShadowStats()
    ramp = policy(stats, start_rate=0.25)
    move = ramp.step_back(T0, stats.snapshot(), 0.25)
    assert move is not None and move.rate == 0.05
    assert move.reason == "stepped back from 0.25 to step 2/4 (0.05), the step below it"
    ramp.step_back(T0, stats.snapshot(), 0.05)
    assert ramp.rate == 0.01
    assert ramp.step_back(T0, stats.snapshot(), 0.01) is None  # nothing below the first step


def test_step_back_is_from_the_current_rate_not_the_ramp_s_pointer() -> None:
    stats = ShadowStats()
    ramp = policy(stats, start_rate=0.01)  # the pointer on step 1
    move = ramp.step_back(T0, stats.snapshot(), 1.0)  # the rate was set to 1.0 by hand
    assert move is not None and move.rate == 0.25 and ramp.index == 2
    move = ramp.step_back(T0, stats.snapshot(), 0.1)  # between steps
    assert move is not None and move.rate == 0.05
    assert ramp.step_back(T0, stats.snapshot(), 0.005) is None


def test_a_step_whose_keys_carry_little_traffic_says_so() -> None:
    stats = ShadowStats()
    requests = [0]
    stats.client_requests_fn = lambda: requests[0]
    ramp = policy(stats)
    feed(stats, match=12)
    requests[0] = 100_000  # 1% of the keys carried 0.012% of the requests
    assert ramp.tick(T0 + 600, stats.snapshot()) is None
    assert ramp.reason == (
        "hold: too few comparisons (12/381): the sampled keys (1% of keys) carried only "
        "0.012% of this step's 100000 requests"
    )
    assert ramp.evidence is not None
    assert ramp.evidence.as_json()["traffic_share"] == pytest.approx(0.00012)


def test_baseline_phase_keeps_the_shadow_off_until_measured() -> None:
    stats = ShadowStats()
    ramp = policy(stats, baseline_first=True)
    first = ramp.start()
    assert first is not None and first.rate == 0.0 and ramp.phase is RampPhase.BASELINE
    assert ramp.tick(T0 + 5, stats.snapshot(), baseline=(10, 1000)) is None
    assert ramp.reason == "hold: measuring the shadow-off latency baseline (10/1000 requests)"
    move = ramp.tick(T0 + 10, stats.snapshot(), baseline=(1000, 1000))
    assert move is not None and move.rate == 0.01 and move.step == 0
    assert ramp.step_started == T0 + 10


def test_without_steps_there_is_no_ramp() -> None:
    stats = ShadowStats()
    ramp = RampPolicy(RampConfig(), now=T0, snapshot=stats.snapshot(), start_rate=0.5)
    assert not ramp.configured and ramp.start() is None
    assert ramp.tick(T0, stats.snapshot()) is None
    assert not ramp.pause("x")
    assert ramp.status()["phase"] == "off"
