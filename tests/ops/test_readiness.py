"""The migration readiness report: exact bounds, the verdict line, per-step figures, the
API and its printable page."""

from __future__ import annotations

import pytest

from proxy.config import AdminConfig
from proxy.ops.readiness import _binomial_cdf, build_readiness, per_step, to_html, upper_bound
from proxy.ops.timeline import EMPTY_BUCKETS, MAX_STEPS, Reading, Timeline
from proxy.shadow.stats import ShadowStats
from tests.ops.support import feed, requests
from tests.ops.test_control_api import Env, config


def test_with_no_mismatch_the_bound_is_about_three_over_n() -> None:
    assert upper_bound(0, 30_000) == pytest.approx(3 / 30_000, rel=0.01)
    assert upper_bound(0, 0) is None
    assert upper_bound(10, 10) == 1.0


@pytest.mark.parametrize(("k", "n", "bound"), [(1, 100, 0.0466), (5, 1000, 0.0105)])
def test_the_bound_is_the_exact_clopper_pearson_one(k: int, n: int, bound: float) -> None:
    found = upper_bound(k, n)
    assert found == pytest.approx(bound, abs=5e-4)
    assert _binomial_cdf(k, n, found) == pytest.approx(0.05, abs=1e-6)  # type: ignore[arg-type]


def test_many_mismatches_use_wilson_close_to_the_rate() -> None:
    bound = upper_bound(5_000, 1_000_000)
    assert bound is not None and 0.005 < bound < 0.0052


def _stats(match: int = 0, mismatch: int = 0, noise: int = 0) -> ShadowStats:
    stats = ShadowStats()
    feed(stats, match=match, mismatch=mismatch, noise=noise)
    return stats


def _report(stats: ShadowStats, **changes: object) -> dict[str, object]:
    values: dict[str, object] = {
        "started_at": 1_000.0,
        "now": 1_000.0 + 6 * 86400,
        "sample_rate": 1.0,
        "client_requests": 100_000,
        "history": {"points": [], "events": []},
        "halts": [],
        "halted": None,
        "what_if": {},
    }
    values.update(changes)
    return build_readiness(stats, **values)  # type: ignore[arg-type]


def test_ready_says_how_much_evidence_there_is() -> None:
    report = _report(_stats(match=40_000, noise=12))
    assert report["ready"] is True
    assert report["verdict"] == (
        "Ready: 0 mismatches in 40k comparisons over 6.0 days, upper bound 0.007489%, from "
        "40.01% of the client requests"
    )
    assert report["noise_reasons"] == {"transient_race": 12}
    assert report["coverage"]["traffic_share"] == pytest.approx(0.40012)  # type: ignore[index]


def test_what_blocks_readiness_is_said_plainly() -> None:
    few = _report(_stats(match=1_000))
    assert few["ready"] is False and "not enough evidence" in few["verdict"]  # type: ignore[operator]
    bad = _report(_stats(match=50_000, mismatch=3))
    assert "3 mismatches (value 3)" in bad["verdict"]  # type: ignore[operator]
    (row,) = bad["commands"]  # type: ignore[misc]
    assert row["mismatch"] == 3 and row["kinds"] == {"value": 3}
    halted = _report(_stats(match=50_000), halted={"rule": "errors", "reason": "too many"})
    assert "halted (errors: too many)" in halted["verdict"]  # type: ignore[operator]


def test_evidence_from_too_little_of_the_traffic_cannot_pass() -> None:
    # 1% of the keys, a skewed key mix: the sampled keys carried 0.012% of the requests.
    report = _report(_stats(match=40_000), sample_rate=0.01, client_requests=333_000_000)
    assert report["ready"] is False
    assert "too little of the traffic: the comparisons come from 0.01201% of the client " \
        "requests (at least 1% needed); the sampled keys (1% of keys) are not the ones that " \
        "carry the traffic: raise the sample rate" in report["verdict"]  # fmt: skip
    loose = _report(_stats(match=40_000), client_requests=333_000_000, min_traffic=0.0001)
    assert loose["ready"] is True


def test_redis_evictions_are_a_capacity_finding_never_a_mismatch() -> None:
    stats = _stats(match=50_000)
    for _ in range(120):
        stats.count_comparison("get", "noise", "redis_evicted")
    report = _report(stats)
    assert report["ready"] is False
    assert report["totals"]["mismatch"] == 0
    assert "Redis evicted 120 keys Memcached still held: this working set needs more than " \
        "maxmemory" in report["verdict"]  # fmt: skip
    assert report["capacity_findings"] == [
        {
            "finding": "redis_evicted",
            "count": 120,
            "text": "Redis evicted 120 keys Memcached still held: this working set needs more "
            "than maxmemory (a capacity result, not a protocol mismatch)",
        }
    ]
    page = to_html(report)
    assert "Redis evicted 120 keys Memcached still held" in page
    assert "Redis evicted no key" in to_html(_report(_stats(match=50_000)))


def test_per_step_figures_cover_the_whole_run_not_only_the_history() -> None:
    # A one-hour history: the first step's points are gone, its figures are not.
    timeline = Timeline(resolution=10, span=3600)
    reading = {"sample_rate": 0.01, "ramp_step": 1, "match": 0, "mismatch": 0, "noise": 0,
               "dropped": 0, "errors": 0, "lag_buckets": EMPTY_BUCKETS,
               "client_buckets": EMPTY_BUCKETS}  # fmt: skip
    timeline.sample(0.0, Reading(**reading))  # type: ignore[arg-type]
    for i in range(1, 1001):  # step 1: 10 matches a point for 10,000 s
        reading["match"] = 10 * i
        timeline.sample(10.0 * i, Reading(**reading))  # type: ignore[arg-type]
    reading.update(sample_rate=0.05, ramp_step=2)
    for i in range(1001, 1011):  # step 2: 50 a point, 1 mismatch and 2 noise at the end
        reading["match"] = 10_000 + 50 * (i - 1000)
        timeline.sample(10.0 * i, Reading(**reading))  # type: ignore[arg-type]
    reading.update(mismatch=1, noise=2)
    timeline.sample(10_110.0, Reading(**reading))  # type: ignore[arg-type]
    history = timeline.to_json()
    assert history["points"][0][0] > 10.0  # the history no longer holds step 1's start
    steps = per_step(history)
    assert [(s["ramp_step"], s["comparisons"], s["mismatches"], s["noise"]) for s in steps] == [
        (1, 10_000, 0, 0),
        (2, 503, 1, 2),
    ]
    assert steps[0]["from"] == 10.0 and steps[0]["until"] == 10_000.0
    assert steps[1]["upper_bound"] == upper_bound(1, 501)


def test_periods_are_bounded() -> None:
    timeline = Timeline(resolution=10, span=3600)
    for i in range(MAX_STEPS + 51):  # a rate change every point (the first sets the base)
        timeline.sample(10.0 * i, Reading(i % 2 * 0.5, 0, i, 0, 0, 0, 0, EMPTY_BUCKETS,
                                          EMPTY_BUCKETS))  # fmt: skip
    assert len(timeline.steps) == MAX_STEPS
    history = timeline.to_json()
    assert history["steps_dropped"] == 50 and len(per_step(history)) == MAX_STEPS
    assert "steps" not in timeline.to_json(since=1.0)  # the console's polls do without


def test_the_printable_page_carries_the_verdict_and_escapes_what_it_shows() -> None:
    stats = _stats(match=50_000, mismatch=1)
    stats.comparisons[("<script>", "match")] += 1
    page = to_html(_report(stats))
    assert page.startswith("<!DOCTYPE html>") and "Not ready: 1 mismatches" in page
    assert "<script>" not in page and "&lt;script&gt;" in page


async def test_the_api_serves_json_and_html() -> None:
    async with Env(config()) as env:
        feed(env.stats, match=40_000)
        requests(env.metrics.requests_for("default"), 40_000, 0.0001)
        env.ops.record_history()
        reply = await env.get("/api/readiness")
        assert reply.status == 200
        body = reply.json()
        assert body["ready"] is True and body["verdict"].startswith("Ready: 0 mismatches in 40k")
        page = await env.get("/api/readiness?format=html")
        assert page.headers["content-type"].startswith("text/html")
        assert "Ready: 0 mismatches" in page.text
        strict = (await env.get("/api/readiness?target=0.00001")).json()
        assert strict["ready"] is False
        bad = await env.get("/api/readiness?target=2")
        assert bad.status == 400 and "target" in bad.text


async def test_the_evidence_restarts_only_on_purpose_and_is_audited() -> None:
    async with Env(config(admin=AdminConfig(token="t0ken-for-tests"))) as env:
        feed(env.stats, match=40_000, mismatch=3)
        requests(env.metrics.requests_for("default"), 50_000, 0.0001)
        env.ops.record_history()
        before = (await env.get("/api/readiness")).json()
        assert "3 mismatches" in before["verdict"]
        refused = await env.put({"evidence": "restart"})
        assert refused.status == 401
        bad = await env.put({"evidence": "again"}, token="t0ken-for-tests")
        assert bad.status == 400
        env.clock.advance(60)
        reply = await env.put(
            {"evidence": "restart", "reason": "maxmemory raised to 8gb"}, token="t0ken-for-tests"
        )
        assert reply.status == 200
        assert reply.json()["evidence"]["restarted"] == {
            "source": "api", "at": env.clock.now, "reason": "maxmemory raised to 8gb"
        }  # fmt: skip
        (entry,) = reply.json()["changes"]
        assert (entry["source"], entry["field"], entry["old"], entry["new"], entry["reason"]) == (
            "api", "evidence", "running", "restarted", "maxmemory raised to 8gb"
        )
        after = (await env.get("/api/readiness")).json()
        assert after["verdict"] == "Not ready: nothing compared yet"
        assert after["observed_since"] == env.clock.now
        feed(env.stats, match=40_000)
        requests(env.metrics.requests_for("default"), 40_000, 0.0001)
        env.clock.advance(10)
        env.ops.record_history()
        after = (await env.get("/api/readiness")).json()
        assert after["ready"] is True and after["totals"]["judged"] == 40_000
        assert [s["comparisons"] for s in after["steps"]] == [40_000]
        assert "Evidence restarted by api: maxmemory raised to 8gb" in (
            await env.get("/api/readiness?format=html")
        ).text


def test_the_observed_period_reads_well() -> None:
    from proxy.ops.readiness import _duration

    assert [_duration(s) for s in (30, 60, 600, 3 * 3600, 6 * 86400)] == [
        "0 minutes", "1 minute", "10 minutes", "3.0 hours", "6.0 days",
    ]  # fmt: skip
