"""The what-if report: latency side by side, and the capacity projection with its intervals,
from known figures and from a real redis-server's INFO."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.address import HostPort
from proxy.admin import AdminServer
from proxy.config import Config, ShadowConfig
from proxy.metrics import ProxyMetrics
from proxy.ops.operations import Operations, redis_info_from
from proxy.ops.report import (
    TrafficWindow,
    build_report,
    key_count_interval,
    memory_projection,
    ops_projection,
    poisson_interval,
    service_times,
)
from proxy.redis.connection import ConnectionOptions, RedisConnection
from proxy.redis.resp import parse_info
from proxy.redis.url import RedisURL
from proxy.shadow.control import ShadowControl
from proxy.shadow.stats import ShadowStats
from tests.ops.http import call
from tests.ops.support import Clock, feed
from tests.support import ServerProcess


def test_latency_side_by_side() -> None:
    stats = ShadowStats()
    for _ in range(99):
        stats.histogram(stats.memcached_latency, "get").observe(0.0002)
        stats.histogram(stats.redis_latency, "get").observe(0.0004)
    stats.histogram(stats.memcached_latency, "get").observe(0.002)
    stats.histogram(stats.redis_latency, "set").observe(0.001)
    report = build_report(stats, sample_rate=0.0, window=None, redis_info=None, now=1.0)
    get, set_ = report["latency"]
    assert get["command"] == "get" and get["memcached"]["samples"] == 100
    assert get["memcached"]["p50"] == pytest.approx(0.0001 + 0.00015 * 50 / 99)
    assert get["redis"]["p99"] == pytest.approx(0.00025 + 0.00025 * 0.99)  # 99 in (250, 500] us
    assert get["memcached"]["mean"] == pytest.approx((99 * 0.0002 + 0.002) / 100)
    assert get["p99_ratio"] == pytest.approx(get["redis"]["p99"] / get["memcached"]["p99"])
    assert set_["memcached"] == {"samples": 0, "p50": None, "p99": None, "mean": None}
    assert set_["p99_ratio"] is None
    assert report["capacity"] == {
        "sample_rate": 0.0,
        "note": "the sample rate is 0: nothing to extrapolate from",
    }


def test_key_count_interval() -> None:
    estimate, low, high = key_count_interval(100, 0.1)
    assert estimate == 1000
    spread = 1.959963984540054 * (100 * 0.9) ** 0.5 / 0.1
    assert (low, high) == pytest.approx((1000 - spread, 1000 + spread))
    # At 100% there is no sampling error; the low end never drops below what is seen.
    assert key_count_interval(50, 1.0) == (50, 50, 50)
    assert key_count_interval(1, 0.001)[1] == 1


def test_poisson_interval() -> None:
    low, high = poisson_interval(100)
    assert (low, high) == pytest.approx((82.23, 121.61), abs=0.01)
    low, high = poisson_interval(0)
    assert low == 0 and high == pytest.approx(3.84, abs=0.01)


def test_memory_projection() -> None:
    info = {"used_memory": "1000000", "used_memory_startup": "800000", "db2": "keys=100,expires=4"}
    projection = memory_projection(info, 0.1, 2)
    assert projection["bytes_per_key"] == 2000
    assert projection["projected_keys"] == 1000
    assert projection["estimate_bytes"] == 800_000 + 2000 * 1000
    low, high = key_count_interval(100, 0.1)[1:]
    assert projection["low_bytes"] == pytest.approx(800_000 + 2000 * low)
    assert projection["high_bytes"] == pytest.approx(800_000 + 2000 * high)
    empty = memory_projection({"used_memory": "900000"}, 0.1, 0)
    assert empty["estimate_bytes"] is None
    assert empty["note"] == "no keys in Redis db 0 yet: nothing to extrapolate"


def test_ops_projection() -> None:
    window = TrafficWindow(seconds=10.0, shadowed=100, redis_commands=250, client_requests=9000)
    ops = ops_projection(window, 0.1)
    assert ops["estimate_per_second"] == pytest.approx(100.0)
    assert (ops["low_per_second"], ops["high_per_second"]) == pytest.approx(
        (82.23, 121.61), abs=0.01
    )
    assert ops["client_requests_per_second"] == 900
    assert ops["redis_commands_per_request"] == 2.5
    assert ops["redis_commands_per_second_estimate"] == pytest.approx(250.0)


def test_info_parsing() -> None:
    text = (
        b"# Memory\r\nused_memory:123\r\nused_memory_human:123B\r\n\r\n# Keyspace\r\ndb0:keys=1\r\n"
    )
    assert parse_info(text) == {"used_memory": "123", "used_memory_human": "123B", "db0": "keys=1"}


def test_bad_info_is_reported_not_raised() -> None:
    report = build_report(
        ShadowStats(), sample_rate=0.5, window=None, redis_info={"nothing": "here"}, now=1.0
    )
    assert report["capacity"]["memory"] == {
        "error": "INFO reply lacks a usable field: 'used_memory'"
    }
    assert report["capacity"]["ops"] == {
        "error": "not enough traffic history at this sample rate yet"
    }


async def test_report_from_a_real_redis(redis_server: ServerProcess) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    connection = RedisConnection(url)
    assert await connection.start()
    try:
        for i in range(200):
            await connection.execute("SET", f"key:{i}", "x" * 100)
        clock = Clock()
        metrics = ProxyMetrics()
        control = ShadowControl(0.5)
        stats = ShadowStats()
        admin = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
        shadow = ShadowConfig(redis=RedisURL.parse(url), sample_rate=0.5)
        ops = Operations(
            dataclasses.replace(Config(), shadow=shadow),
            admin=admin,
            control=control,
            stats=stats,
            metrics=metrics,
            redis_info=redis_info_from(lambda: [connection.execute]),
            environ={},
            clock=clock,
            handle_sighup=False,
        )
        await admin.start()
        try:
            ops.autopilot.tick()
            feed(stats, match=400)
            stats.redis_commands += 800
            clock.advance(10)
            ops.autopilot.tick()
            report = (await call(admin.address[1], "GET", "/api/report")).json()
        finally:
            await admin.stop()
    finally:
        await connection.close()
    memory = report["capacity"]["memory"]
    assert memory["keys"] == 200
    assert memory["used_memory_bytes"] > memory["startup_memory_bytes"] > 0
    assert memory["projected_keys"] == 400
    assert memory["low_bytes"] < memory["estimate_bytes"] < memory["high_bytes"]
    # Redis's own figures, for the cross-check: it ran SET 200 times (at least).
    own = report["service_time"]["redis_own"]
    assert own["available"] is True
    row = next(r for r in own["commands"] if r["command"] == "set")
    assert row["calls"] >= 200 and row["usec_per_call"] > 0
    assert row["p99_usec"] is not None  # Redis 7's latencystats
    ops_figures = report["capacity"]["ops"]
    assert ops_figures["window_seconds"] == 10
    assert ops_figures["estimate_per_second"] == pytest.approx(400 / 10 / 0.5)
    assert ops_figures["redis_commands_per_request"] == 2.0


async def test_report_when_redis_is_down() -> None:
    connection = RedisConnection("redis://127.0.0.1:1/0", ConnectionOptions(connect_timeout=0.2))
    await connection.start()
    try:
        info = redis_info_from(lambda: [connection.execute])
        metrics = ProxyMetrics()
        admin = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
        Operations(
            Config(),
            admin=admin,
            control=ShadowControl(0.5),
            stats=ShadowStats(),
            metrics=metrics,
            redis_info=info,
            environ={},
            handle_sighup=False,
        )
        await admin.start()
        try:
            report = (await call(admin.address[1], "GET", "/api/report")).json()
        finally:
            await admin.stop()
    finally:
        await connection.close()
    assert report["capacity"]["memory"]["error"].startswith("cannot read Redis INFO: ")


def test_service_times_put_every_memcached_command_beside_redis_and_the_queueing_apart() -> None:
    stats = ShadowStats()
    stats.histogram(stats.memcached_latency, "get").observe(0.0002)
    stats.histogram(stats.memcached_latency, "set").observe(0.0002)
    stats.histogram(stats.memcached_latency, "set").observe(0.0004)
    stats.redis_service.observe(0.0004)
    stats.queueing.observe(0.003)
    times = service_times(stats)
    assert times["memcached"]["samples"] == 3
    assert times["memcached"]["mean"] == pytest.approx(0.0008 / 3)
    assert times["redis"]["samples"] == 1 and times["redis"]["mean"] == pytest.approx(0.0004)
    assert times["p99_ratio"] == pytest.approx(times["redis"]["p99"] / times["memcached"]["p99"])
    assert times["shadow_queueing"]["samples"] == 1


def test_info_of_a_cluster_s_primaries_is_summed() -> None:
    from proxy.ops.report import merge_info

    parts = [
        {"used_memory": "1000", "used_memory_startup": "100", "db0": "keys=3,expires=1,avg_ttl=5",
         "redis_version": "7.0.15"},
        {"used_memory": "2000", "used_memory_startup": "100", "db0": "keys=4,expires=0,avg_ttl=0"},
        {"used_memory": "500", "used_memory_startup": "100"},
    ]  # fmt: skip
    merged = merge_info(parts)
    assert merged["used_memory"] == "3500" and merged["used_memory_startup"] == "300"
    assert merged["db0"] == "keys=7,expires=1,avg_ttl=5"
    assert merged["redis_version"] == "7.0.15"
    assert merge_info([]) == {}


INFO = {
    "cmdstat_get": "calls=1000,usec=2000,usec_per_call=2.00,rejected_calls=0,failed_calls=0",
    "cmdstat_fcall": "calls=500,usec=29500,usec_per_call=59.00,rejected_calls=0,failed_calls=0",
    "cmdstat_info": "calls=3,usec=300,usec_per_call=100.00,rejected_calls=0,failed_calls=0",
    "latency_percentiles_usec_get": "p50=2.003,p99=5.023,p99.9=12.031",
    "used_memory": "1000",
}


def test_redis_s_own_figures_over_a_recent_window() -> None:
    from proxy.ops.report import parse_commandstats, parse_latencystats, redis_own

    assert parse_commandstats(INFO)["get"] == (1000, 2000.0)
    assert parse_latencystats(INFO) == {"get": {"p50": 2.003, "p99": 5.023, "p99.9": 12.031}}
    since_start = redis_own(INFO)
    assert [r["command"] for r in since_start["commands"]] == ["get", "fcall", "info"]
    assert since_start["commands"][0]["p99_usec"] == 5.023
    later = dict(INFO, cmdstat_get="calls=1100,usec=2500")
    recent = redis_own(later, parse_commandstats(INFO), 60.0)
    assert recent["over_seconds"] == 60.0
    assert recent["commands"] == [
        {"command": "get", "calls": 100, "usec_per_call": 5.0, "p99_usec": 5.023}
    ]


def test_a_starved_worker_makes_the_service_time_untrustworthy_in_words() -> None:
    from proxy.ops.report import redis_own, trust

    stats = ShadowStats()
    stats.redis_service.observe(0.017)
    own = redis_own(INFO)
    starved = service_times(
        stats, worker={"seconds": 60.0, "cpu_share": 0.97, "wait_share": 0.38, "workers": 1},
        own=own,
    )  # fmt: skip
    assert starved["trust"] == {
        "trustworthy": False,
        "sentence": "Not trustworthy: the shadow worker used 97% of a core and waited for a CPU "
        "38.0% of the time over the last 60 s, so Redis's replies waited to be read and the "
        "service time above includes that wait: it blames Redis for the shadow's own CPU "
        "starvation. Redis itself reports GET 2 µs, FCALL 59 µs, INFO 100 µs per call (INFO "
        "commandstats). Lower the sample rate, give the worker a core of its own, or judge "
        "Redis by its own figures.",
    }
    assert starved["worker"]["wait_share"] == 0.38
    fine = trust({}, {"seconds": 60.0, "cpu_share": 0.3, "wait_share": 0.001}, own)
    assert fine["trustworthy"] is True and fine["sentence"].startswith(
        "Trustworthy: the shadow worker used 30% of a core and waited for a CPU 0.1% of the "
        "time over the last 60 s"
    )
    unknown = trust({}, None, redis_own(None))
    assert unknown["trustworthy"] is None and "cannot be checked" in unknown["sentence"]
    # Without a readable schedstat, a busy worker alone is reason enough.
    busy = trust({}, {"seconds": 10.0, "cpu_share": 0.95, "wait_share": None}, own)
    assert busy["trustworthy"] is False


def test_a_cluster_s_command_statistics_are_summed() -> None:
    from proxy.ops.report import merge_info, parse_commandstats

    merged = merge_info([INFO, {"cmdstat_get": "calls=10,usec=40"}])
    assert parse_commandstats(merged)["get"] == (1010, 2040.0)
