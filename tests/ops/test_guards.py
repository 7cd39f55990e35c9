"""Halt rules without sockets: each rule's window, minimum count and threshold on figures fed
by hand, then the autopilot applying hold / step_back / stop to a real ShadowControl, and
lifting a halt."""

from __future__ import annotations

import dataclasses

from proxy.config import (
    DropRuleConfig,
    GuardRuleConfig,
    GuardsConfig,
    LatencyGuardConfig,
    MismatchRuleConfig,
    RampConfig,
    ShadowConfig,
)
from proxy.metrics import RequestStats
from proxy.ops.audit import AuditLog
from proxy.ops.autopilot import Autopilot
from proxy.ops.guards import Action, Exposure, GuardPolicy, request_buckets
from proxy.shadow.control import ShadowControl
from proxy.shadow.stats import ShadowStats
from tests.ops.support import Clock, feed, requests

T0 = 1000.0
NO_LATENCY = LatencyGuardConfig(enabled=False)


def guards(**rules: object) -> GuardsConfig:
    return dataclasses.replace(GuardsConfig(latency=NO_LATENCY), **rules)  # type: ignore[arg-type]


class Figures:
    """ShadowStats and client request latencies fed to a GuardPolicy at chosen times."""

    def __init__(self, config: GuardsConfig) -> None:
        self.stats = ShadowStats()
        self.requests = RequestStats()
        self.policy = GuardPolicy(config, now=T0)

    def observe(self, at: float, exposure: Exposure = Exposure.ON) -> list[str]:
        trips = self.policy.observe(
            at, self.stats.snapshot(), request_buckets(self.requests.snapshot()), exposure
        )
        return [f"{t.rule}:{t.action}" for t in trips]

    def detail(self, rule: str) -> str:
        return next(s.detail for s in self.policy.status() if s.rule == rule)


# --- the rules ---------------------------------------------------------------------------------


def test_mismatch_rule_waits_for_its_minimum_count() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=949, mismatch=50)
    assert figures.observe(T0 + 10) == []
    assert figures.detail("mismatch") == "waiting for 1000 comparisons (999 so far)"
    feed(figures.stats, match=1)
    assert figures.observe(T0 + 20) == ["mismatch:hold"]
    trip = figures.policy.observe(
        T0 + 21, figures.stats.snapshot(), request_buckets([]), Exposure.ON
    )[0]
    assert trip.reason == (
        "mismatches ratio 5.00% over the last 300s (50 of 1000 comparisons) >= 1.00%"
    )


def test_mismatch_rule_ignores_noise_and_figures_older_than_its_window() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=900, mismatch=100, noise=5000)
    figures.observe(T0 + 10)  # trips here, but look at what the window holds later:
    feed(figures.stats, match=2000)
    assert figures.observe(T0 + 400) == []
    assert figures.detail("mismatch").startswith("mismatches ratio 0.00% over the last 300s")


def test_error_rule_stops() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=190, errors=9)
    assert figures.observe(T0 + 5) == []  # 199 shadowed: not enough to judge
    feed(figures.stats, errors=1)
    assert figures.observe(T0 + 10) == ["errors:stop"]
    assert figures.detail("errors") == (
        "Redis errors ratio 5.00% over the last 60s (10 of 200 shadowed requests)"
    )


def test_error_rule_counts_redis_faults_only() -> None:
    # Redis down (refused connections, LOADING), the shadow's own troubles (a restarted
    # worker, a bug, the re-reader) and its local in-flight bound are not Redis's faults.
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=1000, shadowed=3000)
    errors = figures.stats.errors
    errors["redis_unavailable"] += 1500
    errors["redis_loading"] += 100
    errors["worker_exit"] += 1
    errors["internal"] += 2
    errors["memcached_reader"] += 3
    errors["redis_busy"] += 40
    assert figures.observe(T0 + 10) == []
    assert figures.detail("errors") == (
        "Redis errors ratio 0.00% over the last 60s (0 of 3000 shadowed requests); not "
        "counted: 1600 while Redis was unreachable (the shadow resumes by itself); 46 of the "
        "shadow's own"
    )
    for kind in ("redis_timeout", "redis_reply", "shadow_oom", "redis_other"):
        one = Figures(guards())
        one.observe(T0)
        feed(one.stats, match=100, shadowed=200)
        one.stats.errors[kind] += 10
        assert one.observe(T0 + 10) == ["errors:stop"], kind


def test_a_starved_worker_is_a_drop_for_the_drops_rule_never_a_redis_error() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=190, shadowed=200)
    figures.stats.dropped["shadow_starved"] += 10
    assert figures.observe(T0 + 10) == ["drops:step_back"]
    assert figures.detail("errors").startswith("Redis errors ratio 0.00%")


def test_drop_rule_leaves_out_redis_outages_and_restarts() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=100, shadowed=1000)
    for reason, count in (("redis_down", 800), ("failover", 50), ("memcached_restart", 1),
                          ("worker_down", 20), ("timeout", 30), ("redis_readonly", 5)):
        figures.stats.dropped[reason] += count  # fmt: skip
    assert figures.observe(T0 + 10) == []
    assert figures.detail("drops").endswith(
        "(0 of 1000 shadowed requests); not counted: 906 for other causes (Redis down or "
        "failing, restarts)"
    )


def test_every_counted_kind_and_reason_has_a_cause() -> None:
    from proxy.ops.causes import DROP_REASONS as CAUSED_DROPS
    from proxy.ops.causes import ERROR_KINDS as CAUSED_ERRORS
    from proxy.shadow.metrics import DROP_REASONS, ERROR_KINDS

    assert set(ERROR_KINDS) <= set(CAUSED_ERRORS)
    assert set(DROP_REASONS) <= set(CAUSED_DROPS)


def test_drop_rule_steps_back() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=197, dropped=2, shadowed=200)
    assert figures.observe(T0 + 10) == ["drops:step_back"]


def test_a_ratio_below_the_threshold_does_not_trip() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, match=10_000, mismatch=99, errors=400, dropped=99, shadowed=10_499)
    assert figures.observe(T0 + 10) == []


def test_a_disabled_rule_never_trips() -> None:
    off = GuardRuleConfig(enabled=False)
    figures = Figures(guards(errors=off))
    figures.observe(T0)
    feed(figures.stats, errors=1000)
    assert figures.observe(T0 + 10) == []
    assert figures.detail("errors") == "rule disabled"


def test_trips_come_most_severe_first() -> None:
    figures = Figures(guards())
    figures.observe(T0)
    feed(figures.stats, mismatch=1000, errors=1000, dropped=1000)
    assert figures.observe(T0 + 10) == ["errors:stop", "drops:step_back", "mismatch:hold"]


# --- the latency rule --------------------------------------------------------------------------

LATENCY = LatencyGuardConfig(
    window=60.0, min_count=1000, threshold=2.0, min_increase=0.001, sustain=10.0
)


def latency_figures(
    baseline: float, shadowing: float, config: LatencyGuardConfig = LATENCY
) -> Figures:
    """1000 requests a 5 s with the shadow off, a mixed interval, then 1000 in 4 s while
    shadowing (200 and 250 requests a second: comparable loads)."""
    figures = Figures(guards(latency=config))
    figures.observe(T0, Exposure.OFF)
    requests(figures.requests, 1000, baseline)
    figures.observe(T0 + 5, Exposure.OFF)
    requests(figures.requests, 5000, 0.5)  # while the rate changed: counts for neither side
    figures.observe(T0 + 6, Exposure.MIXED)
    requests(figures.requests, 1000, shadowing)
    feed(figures.stats, match=10)  # something was shadowed
    return figures


def test_latency_rule_trips_on_a_sustained_doubled_p99() -> None:
    figures = latency_figures(baseline=0.0004, shadowing=0.004)
    assert figures.observe(T0 + 10) == []  # a breach, not yet sustained
    assert figures.detail("latency") == (
        "client p99 4.98 ms while shadowing (1000 requests at 250 requests/s, 10 shadowed) vs "
        "0.497 ms with the shadow off (1000 requests at 200 requests/s, the newest 5s ago): "
        "10.00x; >= 2x and at least 1 ms slower for 0s of the 10s it must last"
    )
    requests(figures.requests, 1000, 0.004)
    assert figures.observe(T0 + 15) == []
    requests(figures.requests, 1000, 0.004)
    assert figures.observe(T0 + 20) == ["latency:stop"]


def test_a_burst_shorter_than_sustain_does_not_trip() -> None:
    figures = latency_figures(baseline=0.0004, shadowing=0.004, config=dataclasses.replace(
        LATENCY, window=5.0))  # fmt: skip
    assert figures.observe(T0 + 10) == []  # breach starts
    expected = {15: [], 20: [], 25: [], 30: ["latency:stop"]}
    for at, seconds in ((15, 0.0004), (20, 0.004), (25, 0.004), (30, 0.004)):
        requests(figures.requests, 1000, seconds)  # gone at 15, back from 20: starts again
        feed(figures.stats, match=10)
        assert figures.observe(T0 + at) == expected[at], at


def test_latency_rule_never_fires_while_nothing_is_shadowed() -> None:
    # Rate 1%, a skewed key mix: the sampled keys get no request. Host noise doubles the
    # clients' p99: not the shadow's doing.
    figures = Figures(guards(latency=dataclasses.replace(LATENCY, sustain=1.0)))
    figures.observe(T0, Exposure.OFF)
    requests(figures.requests, 1000, 0.0009)
    figures.observe(T0 + 5, Exposure.OFF)
    for at in range(10, 100, 5):
        requests(figures.requests, 1000, 0.014)
        assert figures.observe(T0 + at) == []
    assert figures.detail("latency") == (
        "nothing shadowed in the last 60s (the sampled keys got no requests): client latency "
        "cannot be the shadow's doing"
    )


def test_latency_rule_needs_the_increase_to_matter() -> None:
    figures = latency_figures(baseline=0.00004, shadowing=0.0004)  # 8x, but only +0.36 ms
    assert figures.observe(T0 + 10) == []
    requests(figures.requests, 1000, 0.0004)
    assert figures.observe(T0 + 30) == []


def test_latency_rule_does_not_trip_on_similar_latency() -> None:
    figures = latency_figures(baseline=0.003, shadowing=0.004)
    assert figures.observe(T0 + 10) == []
    requests(figures.requests, 1000, 0.004)
    assert figures.observe(T0 + 30) == []


def test_a_baseline_at_another_load_is_not_comparable() -> None:
    # Measured while halted at a trickle (20 requests a second); now 500 a second.
    figures = Figures(guards(latency=LATENCY))
    figures.observe(T0, Exposure.OFF)
    requests(figures.requests, 1000, 0.0004)
    figures.observe(T0 + 50, Exposure.OFF)
    figures.observe(T0 + 51, Exposure.MIXED)
    for at in (56, 61, 66):
        requests(figures.requests, 2500, 0.004)
        feed(figures.stats, match=10)
        assert figures.observe(T0 + at) == []
    assert figures.detail("latency") == (
        "no comparable baseline (none comparable: 1000 requests measured with the shadow off "
        "at 20 requests/s in the last 6 h, 0 of them within 2x of today's load; 1000 are "
        "needed); the rule waits: it grows only while the shadow is off (rate 0 or "
        "disabled), or set shadow.guards.latency.baseline_p99"
    )


def test_a_baseline_older_than_its_maximum_age_is_forgotten() -> None:
    config = dataclasses.replace(LATENCY, baseline_max_age=3600.0)
    figures = Figures(guards(latency=config))
    figures.observe(T0, Exposure.OFF)
    requests(figures.requests, 1000, 0.0004)
    figures.observe(T0 + 5, Exposure.OFF)
    assert figures.policy.baseline_progress() == (1000, 1000)
    figures.observe(T0 + 3600, Exposure.MIXED)
    requests(figures.requests, 1000, 0.004)
    feed(figures.stats, match=10)
    assert figures.observe(T0 + 3606) == []
    assert figures.policy.baseline_progress() == (0, 1000)
    assert figures.detail("latency").startswith("no comparable baseline (none measured")


def test_latency_rule_without_a_baseline_waits() -> None:
    figures = Figures(guards(latency=LATENCY))
    figures.observe(T0)
    requests(figures.requests, 5000, 0.1)
    feed(figures.stats, match=10)
    assert figures.observe(T0 + 10) == []
    assert figures.detail("latency") == (
        "no comparable baseline (none measured with the shadow off yet); the rule waits: it "
        "grows only while the shadow is off (rate 0 or disabled), or set "
        "shadow.guards.latency.baseline_p99"
    )
    assert figures.policy.baseline_progress() == (0, 1000)


def test_a_configured_baseline_arms_the_rule_until_one_is_measured() -> None:
    # Started with the shadow on (a restart): only the operator's figure can arm the rule.
    configured = dataclasses.replace(LATENCY, baseline_p99=0.0005, sustain=5.0)
    figures = Figures(guards(latency=configured))
    figures.observe(T0)
    requests(figures.requests, 1000, 0.004)
    feed(figures.stats, match=10)
    assert figures.observe(T0 + 10) == []
    assert figures.detail("latency").startswith(
        "client p99 4.98 ms while shadowing (1000 requests at 100 requests/s, 10 shadowed) vs "
        "0.497 ms configured (shadow.guards.latency.baseline_p99: 0.5 ms; measured: none "
        "measured with the shadow off yet): 10.00x"
    )
    requests(figures.requests, 1000, 0.004)
    assert figures.observe(T0 + 15) == ["latency:stop"]
    # The configured figure is read through the same buckets as the measured one: 1.1 ms
    # configured against 2.4 ms measured (read as 2.49 ms, its bucket's top) is no 2x halt.
    near = Figures(guards(latency=dataclasses.replace(configured, baseline_p99=0.0011)))
    near.observe(T0)
    requests(near.requests, 1000, 0.0024)
    feed(near.stats, match=10)
    assert near.observe(T0 + 10) == []
    requests(near.requests, 1000, 0.0024)
    assert near.observe(T0 + 20) == []
    # A measured baseline takes its place: here as slow as the shadowing figures.
    figures = Figures(guards(latency=configured))
    figures.observe(T0, Exposure.OFF)
    requests(figures.requests, 1000, 0.004)
    figures.observe(T0 + 5, Exposure.OFF)
    requests(figures.requests, 1000, 0.004)
    feed(figures.stats, match=10)
    assert figures.observe(T0 + 10) == []
    assert "with the shadow off" in figures.detail("latency")


# --- the autopilot applies them ----------------------------------------------------------------


class Pilot:
    def __init__(self, shadow: ShadowConfig, rate: float = 0.0) -> None:
        self.clock = Clock(T0)
        self.control = ShadowControl(rate)
        self.stats = ShadowStats()
        self.requests = RequestStats()
        self.audit = AuditLog()
        self.control.add_listener(self.audit.on_change)
        self.pilot = Autopilot(
            self.control, self.stats, self.requests, shadow, self.audit, clock=self.clock
        )

    def tick(self, seconds: float = 5.0) -> None:
        self.clock.advance(seconds)
        self.pilot.tick()

    def trail(self) -> list[tuple[str, str, object, object]]:
        return [(e.source, e.field, e.old, e.new) for e in self.audit.entries()]


RAMP = RampConfig(steps=(0.01, 0.05, 0.25, 1.0), hold=10.0, mismatch_target=0.01)


def test_stop_switches_shadowing_off_until_an_operator_clears_the_halt() -> None:
    p = Pilot(ShadowConfig(guards=guards()), rate=0.5)
    p.tick()
    feed(p.stats, match=100, errors=100)
    p.tick()
    assert not p.control.enabled
    halt = p.pilot.halt
    assert halt is not None and halt.rule == "errors" and halt.action is Action.STOP
    assert p.pilot.halts_total == {"errors": 1}
    assert p.trail() == [
        ("halt:errors", "enabled", True, False),
        ("halt:errors", "halt", False, True),
    ]
    p.tick(120)  # figures stay bad: nothing changes, nothing is counted twice
    assert p.pilot.halts_total == {"errors": 1}
    assert p.pilot.clear_halt("api")
    assert p.control.enabled and p.pilot.halt is None
    assert p.trail()[-2:] == [("api", "halt", True, False), ("api", "enabled", False, True)]
    p.tick()  # the old figures do not trip the rule again
    assert p.pilot.halt is None
    assert not p.pilot.clear_halt("api")


def test_hold_freezes_the_ramp_and_stop_escalates_it() -> None:
    p = Pilot(ShadowConfig(ramp=RAMP, guards=guards()))
    assert p.control.sample_rate == 0.01
    p.tick()
    feed(p.stats, match=900, mismatch=100)
    p.tick()
    assert p.pilot.halt is not None and p.pilot.halt.action is Action.HOLD
    assert p.control.enabled and p.control.sample_rate == 0.01
    feed(p.stats, match=10_000)
    p.tick(600)
    assert p.control.sample_rate == 0.01  # good evidence, but halted: no promotion
    assert p.pilot.ramp.reason.startswith("halted:")
    feed(p.stats, errors=2000)  # the 60s window also holds the 10000 good ones
    p.tick()
    assert p.pilot.halt is not None and p.pilot.halt.rule == "errors"
    assert not p.control.enabled
    assert p.pilot.halts_total == {"mismatch": 1, "errors": 1}


def test_step_back_goes_down_one_ramp_step() -> None:
    p = Pilot(ShadowConfig(ramp=RAMP, guards=guards()), rate=0.25)
    assert p.control.sample_rate == 0.25
    p.tick()
    feed(p.stats, match=300, dropped=30, shadowed=300)
    p.tick()
    assert p.control.sample_rate == 0.05
    assert p.trail()[-2:] == [
        ("halt:drops", "sample_rate", 0.25, 0.05),
        ("halt:drops", "halt", False, True),
    ]
    assert p.pilot.ramp_step == 2


def test_step_back_goes_below_the_current_rate_wherever_it_came_from() -> None:
    # The ramp's pointer is at 0.25; an operator sets 1.0 by hand; drops trip: the step
    # below 1.0 is 0.25 (not 0.05, one below the pointer), and the audit says why.
    p = Pilot(ShadowConfig(ramp=RAMP, guards=guards()), rate=0.25)
    p.control.set_rate(1.0, "api", "all of it")
    p.tick()
    feed(p.stats, match=300, dropped=30, shadowed=300)
    p.tick()
    assert p.control.sample_rate == 0.25
    change = p.audit.entries()[-2]
    assert (change.source, change.field, change.old, change.new) == (
        "halt:drops", "sample_rate", 1.0, 0.25
    )
    assert change.reason.endswith(
        "; stepped back from 1 to step 3/4 (0.25), the step below it (the rate 1 was set by api)"
    )
    # A rate between steps (set by hand) goes to the step below it too.
    q = Pilot(ShadowConfig(ramp=RAMP, guards=guards()), rate=0.25)
    q.control.set_rate(0.1, "api")
    q.tick()
    feed(q.stats, match=300, dropped=30, shadowed=300)
    q.tick()
    assert q.control.sample_rate == 0.05


def test_step_back_without_a_ramp_holds() -> None:
    p = Pilot(ShadowConfig(guards=guards()), rate=0.3)
    p.tick()
    feed(p.stats, match=300, dropped=30, shadowed=300)
    p.tick()
    assert p.control.sample_rate == 0.3
    assert p.pilot.halt is not None
    assert p.pilot.halt.reason.endswith(
        "; no ramp step below the current rate 0.3, so holding"
    )


def test_a_redis_outage_halts_nothing_and_the_shadow_resumes_by_itself() -> None:
    p = Pilot(ShadowConfig(ramp=RAMP, guards=guards()), rate=0.25)
    p.tick()
    feed(p.stats, match=500)
    p.tick()
    assert p.pilot.redis_state()["state"] == "reachable"
    for _ in range(4):  # 20 s of refused connections: every replay lost
        p.stats.shadowed["get"] += 1000
        p.stats.errors["redis_unavailable"] += 1000
        p.stats.dropped["redis_down"] += 1000
        p.stats.connect_failures["refused"] += 5
        p.tick()
    assert p.pilot.halt is None and p.control.enabled and p.control.sample_rate == 0.25
    down = p.pilot.redis_state()
    assert down["state"] == "unreachable" and down["since"] == T0 + 10
    window = p.pilot.figures()["window"]
    assert window["dropped"][0] == {
        "name": "redis_down", "count": 4000, "cause": "redis_down",
        "words": "Redis was not reachable",
    }  # fmt: skip
    feed(p.stats, match=200)  # Redis answers again
    p.tick()
    assert p.pilot.redis_state()["state"] == "reachable"
    assert p.pilot.halt is None and p.control.active


def test_who_switched_the_shadow_off_is_kept() -> None:
    p = Pilot(ShadowConfig(guards=guards()), rate=0.5)
    assert p.pilot.enabled_set_by.source == "config"
    p.tick()
    feed(p.stats, match=100, errors=100)
    p.tick()
    assert p.pilot.enabled_set_by.source == "halt:errors"
    assert p.pilot.status()["halt"]["stopped_shadow"] is True
    p.pilot.clear_halt("api")
    p.control.set_enabled(False, "api", "maintenance")
    assert p.pilot.enabled_set_by.as_json() == {
        "source": "api", "at": p.pilot.enabled_set_by.at, "reason": "maintenance"
    }  # fmt: skip
    assert p.pilot.rate_set_by.source == "config"


def test_the_ramp_promotes_through_the_autopilot() -> None:
    config = dataclasses.replace(RAMP, min_comparisons=1)
    p = Pilot(ShadowConfig(ramp=config, guards=guards()))
    p.tick()
    feed(p.stats, match=500)
    p.tick(20)
    assert p.control.sample_rate == 0.05
    assert p.trail()[-1] == ("ramp", "sample_rate", 0.01, 0.05)
    assert p.pilot.ramp_step == 2


def test_an_operator_rate_change_pauses_the_ramp() -> None:
    p = Pilot(ShadowConfig(ramp=RAMP, guards=guards()))
    p.control.set_rate(0.3, "api")
    assert p.pilot.ramp.paused
    assert p.pilot.ramp.reason == "paused: sample_rate set to 0.3 by api"
    assert p.trail()[-1] == ("api", "ramp", "running", "paused")
    assert p.pilot.resume_ramp("api")
    assert p.control.sample_rate == 0.25


def test_the_ramp_measures_a_latency_baseline_first() -> None:
    latency = LatencyGuardConfig(min_count=100)
    p = Pilot(ShadowConfig(ramp=RAMP, guards=guards(latency=latency)), rate=0.01)
    assert p.control.sample_rate == 0.0  # shadow off while the baseline is measured
    p.tick()
    requests(p.requests, 60, 0.0002)
    p.tick()
    assert p.pilot.ramp.reason.endswith("(60/100 requests)")
    requests(p.requests, 40, 0.0002)
    p.tick()
    assert p.control.sample_rate == 0.01
    assert p.pilot.ramp.reason.startswith("baseline measured (100 requests)")


def test_latency_halt_through_the_autopilot() -> None:
    latency = LatencyGuardConfig(min_count=100, sustain=10.0)
    p = Pilot(ShadowConfig(ramp=RAMP, guards=guards(latency=latency)))
    p.tick()
    requests(p.requests, 100, 0.0002)
    p.tick()  # baseline done; the ramp starts shadowing at this tick
    p.tick()  # this interval was MIXED (the rate changed): ignored
    for _ in range(2):
        requests(p.requests, 100, 0.02)
        feed(p.stats, match=5)
        p.tick()
        assert p.pilot.halt is None  # not sustained yet
    requests(p.requests, 100, 0.02)
    p.tick()
    assert p.pilot.halt is not None and p.pilot.halt.rule == "latency"
    assert not p.control.enabled


def test_reconfigure_keeps_the_windows_and_restarts_a_changed_ramp() -> None:
    p = Pilot(ShadowConfig(guards=guards()), rate=0.3)
    p.tick()
    feed(p.stats, match=100, errors=10)
    p.tick()
    assert p.pilot.halt is None  # 110 shadowed < 200
    strict = GuardRuleConfig(min_count=100)
    p.pilot.reconfigure(ShadowConfig(ramp=RAMP, guards=guards(errors=strict)))
    assert p.control.sample_rate == 0.25  # the new ramp starts at the step below 0.3
    p.tick()
    assert p.pilot.halt is not None and p.pilot.halt.rule == "errors"


def test_rule_configs_have_their_own_defaults() -> None:
    assert MismatchRuleConfig().action == "hold" and MismatchRuleConfig().window == 300
    assert DropRuleConfig().action == "step_back" and DropRuleConfig().threshold == 0.01
    assert GuardRuleConfig().action == "stop"
