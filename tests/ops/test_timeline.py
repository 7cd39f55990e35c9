"""The console's history: bounded points of what changed per interval, events from the
audit trail, and GET /api/history over a real admin server."""

from __future__ import annotations

import pytest

from proxy.metrics import DURATION_BUCKETS
from proxy.ops.audit import AuditLog
from proxy.ops.timeline import EMPTY_BUCKETS, FIELDS, Reading, Timeline, cumulative_to_buckets
from tests.ops.support import feed, requests
from tests.ops.test_control_api import Env, config


def _reading(**changes: object) -> Reading:
    values: dict[str, object] = {
        "sample_rate": 0.1,
        "ramp_step": 0,
        "match": 0,
        "mismatch": 0,
        "noise": 0,
        "dropped": 0,
        "errors": 0,
        "lag_buckets": EMPTY_BUCKETS,
        "client_buckets": EMPTY_BUCKETS,
    }
    values.update(changes)
    return Reading(**values)  # type: ignore[arg-type]


def _buckets(seconds: float, count: int) -> list[int]:
    buckets = [0] * (len(DURATION_BUCKETS) + 1)
    index = next((i for i, bound in enumerate(DURATION_BUCKETS) if seconds <= bound), -1)
    buckets[index] = count
    return buckets


def test_each_point_holds_what_changed_in_its_interval() -> None:
    timeline = Timeline(resolution=10, span=3600)
    timeline.sample(100.0, _reading(match=50, client_buckets=_buckets(0.0004, 100)))
    assert len(timeline.points) == 0  # the first reading is only a base
    both = [a + b for a, b in zip(_buckets(0.0004, 100), _buckets(0.002, 100), strict=True)]
    second = _reading(
        sample_rate=0.25,
        ramp_step=2,
        match=80,
        mismatch=1,
        noise=4,
        dropped=3,
        errors=2,
        lag_buckets=_buckets(0.02, 10),
        client_buckets=both,
    )
    timeline.sample(110.0, second)
    (point,) = timeline.points
    row = dict(zip(FIELDS, point, strict=True))
    assert row["t"] == 110.0 and row["sample_rate"] == 0.25 and row["ramp_step"] == 2
    assert (row["match"], row["mismatch"], row["noise"]) == (30, 1, 4)
    assert (row["dropped"], row["errors"], row["requests"]) == (3, 2, 100)
    assert 0.01 < row["lag_p99"] <= 0.025  # type: ignore[operator]
    assert 0.001 < row["client_p99"] <= 0.0025  # only the interval's requests count
    timeline.sample(120.0, second)  # nothing new
    row = dict(zip(FIELDS, timeline.points[-1], strict=True))
    assert row["match"] == 0 and row["lag_p99"] is None and row["client_p99"] is None


def test_each_period_counts_its_requests_and_what_the_shadow_saw_of_them() -> None:
    from proxy.ops.timeline import STEP_FIELDS

    timeline = Timeline(resolution=10, span=3600)
    timeline.sample(0.0, _reading())
    timeline.sample(10.0, _reading(client_buckets=_buckets(0.0004, 1000), shadowed=12))
    timeline.sample(20.0, _reading(client_buckets=_buckets(0.0004, 3000), shadowed=20))
    assert dict(zip(FIELDS, timeline.points[-1], strict=True))["shadowed"] == 8
    timeline.cut()  # the evidence restarted: a new period, though the rate is the same
    timeline.sample(30.0, _reading(client_buckets=_buckets(0.0004, 3500), shadowed=25))
    periods = [dict(zip(STEP_FIELDS, row, strict=True)) for row in timeline.steps]
    assert [(p["from"], p["requests"], p["shadowed"]) for p in periods] == [
        (10.0, 3000, 20),
        (30.0, 500, 5),
    ]


def test_the_history_is_bounded_to_its_span() -> None:
    timeline = Timeline(resolution=10, span=24 * 3600)
    for i in range(10_000):
        timeline.sample(10.0 * i, _reading(match=i))
    assert len(timeline.points) == 8_640
    assert timeline.points[-1][0] == 99_990.0
    served = timeline.to_json(since=99_900.0)
    assert served["fields"] == list(FIELDS) and len(served["points"]) == 9


def test_audit_entries_become_events_once() -> None:
    audit = AuditLog()
    timeline = Timeline()
    audit.record("ramp", "sample_rate", 0.01, 0.05, "step 2", at=50.0)
    audit.record("halt:mismatch", "halt", None, "mismatch", "too many", at=60.0)
    timeline.note(audit.entries(since=timeline.audit_seq))
    timeline.note(audit.entries(since=0))  # again: nothing new
    events = timeline.to_json()["events"]
    assert [(e["t"], e["source"], e["field"]) for e in events] == [
        (50.0, "ramp", "sample_rate"),
        (60.0, "halt:mismatch", "halt"),
    ]
    assert timeline.to_json(since=55.0)["events"] == events[1:]


def test_cumulative_counts_back_to_buckets() -> None:
    assert cumulative_to_buckets([1, 1, 4, 10]) == [1, 0, 3, 6]


async def test_api_history_serves_the_points_and_the_events() -> None:
    async with Env(config()) as env:
        start = env.clock()
        feed(env.stats, match=40, mismatch=1)
        requests(env.metrics.requests, 200, 0.0003)  # type: ignore[arg-type]
        env.clock.advance(10)
        env.ops.record_history()
        env.control.set_rate(0.5, "api", "test")
        env.clock.advance(10)
        env.ops.record_history()
        reply = await env.get("/api/history")
        assert reply.status == 200
        body = reply.json()
        assert body["resolution"] == 10.0 and body["fields"] == list(FIELDS)
        rows = [dict(zip(body["fields"], p, strict=True)) for p in body["points"]]
        assert [(r["match"], r["mismatch"], r["requests"]) for r in rows] == [
            (40, 1, 200),
            (0, 0, 0),
        ]
        assert [r["sample_rate"] for r in rows] == [0.1, 0.5]
        assert any(e["field"] == "sample_rate" and "0.5" in e["what"] for e in body["events"])
        later = (await env.get(f"/api/history?since={start + 15}")).json()
        assert len(later["points"]) == 1
        bad = await env.get("/api/history?since=yesterday")
        assert bad.status == 400 and "unix time" in bad.text


@pytest.mark.parametrize("resolution", [1.0, 10.0])
def test_memory_of_a_full_day_is_a_few_megabytes(resolution: float) -> None:
    import sys

    timeline = Timeline(resolution=resolution, span=3600 if resolution == 1.0 else 24 * 3600)
    for i in range(timeline.points.maxlen or 0):
        timeline.sample(float(i), _reading(match=i, lag_buckets=_buckets(0.01, i)))
    size = sum(sys.getsizeof(p) + sum(sys.getsizeof(v) for v in p) for p in timeline.points)
    assert size < 4 * 2**20
