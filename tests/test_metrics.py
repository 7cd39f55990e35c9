"""Metric names, label sets and histogram buckets as Prometheus scrapes them.

(RequestStats.observe's cost next to prometheus_client's Histogram, quoted in
proxy/metrics.py: `python bench/micro.py metrics`.)
"""

from __future__ import annotations

import asyncio
import platform

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy import __version__, buildinfo
from proxy.metrics import (
    DURATION_BUCKETS,
    MAX_COMMANDS,
    OTHER_COMMAND,
    LatencyHistogram,
    ProxyMetrics,
    RequestStats,
    bucket_quantile,
)
from proxy.shadow.control import ShadowControl
from proxy.shadow.metrics import install_shadow_metrics
from proxy.shadow.stats import ShadowStats

EXPECTED_BOUNDS = [
    "5e-05",
    "0.0001",
    "0.00025",
    "0.0005",
    "0.001",
    "0.0025",
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    "1.0",
    "2.5",
    "+Inf",
]


def samples(metrics: ProxyMetrics, name: str) -> list[Sample]:
    text = metrics.render().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def value(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(metrics, name) if labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_every_latency_family_has_the_documented_bounds() -> None:
    """One histogram type: the client path's latency and the shadow's are scraped with the
    same bucket bounds, the documented ones, so that a dashboard can set them side by side
    (and a bound changed in one place only shows here)."""
    metrics = ProxyMetrics()
    stats = ShadowStats()
    install_shadow_metrics(metrics.registry, stats, ShadowControl(1.0))
    metrics.requests.observe("get", 0.0003)
    for histogram in (
        stats.for_command("get").duration,
        stats.lag,
        stats.redis_service,
        stats.queueing,
    ):
        histogram.observe(0.0003)
    bounds: dict[str, list[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds.setdefault(sample.name, []).append(sample.labels["le"])
    assert sorted(bounds) == [
        "memshadow_request_duration_seconds_bucket",
        "memshadow_shadow_duration_seconds_bucket",
        "memshadow_shadow_lag_seconds_bucket",
        "memshadow_shadow_queueing_seconds_bucket",
        "memshadow_shadow_redis_service_seconds_bucket",
    ]
    assert all(found == EXPECTED_BOUNDS for found in bounds.values()), bounds


def test_exposition_has_every_metric_name() -> None:
    compiled = "true" if buildinfo.is_compiled() else "false"
    metrics = ProxyMetrics()
    metrics.requests.observe("get", 0.0002)
    metrics.upstream_error("connect")
    metrics.unframed("binary")
    text = metrics.render().decode()
    for line in [
        "# TYPE memshadow_client_connections gauge",
        "# TYPE memshadow_requests_total counter",
        "# TYPE memshadow_request_duration_seconds histogram",
        "# TYPE memshadow_upstream_errors_total counter",
        "# TYPE memshadow_unframed_connections_total counter",
        "# TYPE memshadow_build_info gauge",
        'memshadow_requests_total{command="get",listener="default"} 1.0',
        'memshadow_upstream_errors_total{kind="connect"} 1.0',
        'memshadow_unframed_connections_total{reason="binary"} 1.0',
        f'memshadow_build_info{{compiled="{compiled}",python="{platform.python_version()}",'
        f'version="{__version__}"}} 1.0',
        "memshadow_client_connections 0.0",
    ]:
        assert line in text.splitlines(), line


def test_histogram_buckets_after_observations() -> None:
    metrics = ProxyMetrics()
    for seconds in [0.00001, 0.00005, 0.00007, 0.0003, 0.0003, 0.004, 0.9, 1.0, 3.0]:
        metrics.requests.observe("get", seconds)
    metrics.requests.observe("set", 0.0002)

    buckets = [
        (s.labels["le"], s.value)
        for s in samples(metrics, "memshadow_request_duration_seconds_bucket")
        if s.labels["command"] == "get"
    ]
    assert [le for le, _ in buckets] == EXPECTED_BOUNDS
    # Cumulative counts; a value equal to a bound (5e-05, 1.0) falls in that bound's bucket.
    assert [count for _, count in buckets] == [2, 3, 3, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 8, 8, 9]
    assert value(metrics, "memshadow_request_duration_seconds_count", command="get") == 9
    assert value(metrics, "memshadow_request_duration_seconds_sum", command="get") == pytest.approx(
        4.90473
    )
    assert value(metrics, "memshadow_requests_total", command="get") == 9
    assert value(metrics, "memshadow_requests_total", command="set") == 1
    assert metrics.requests.count("get") == 9
    assert metrics.requests.count("delete") == 0


def test_matches_prometheus_client_histogram_exactly() -> None:
    # The hand-rolled histogram must be indistinguishable from the library's own.
    metrics = ProxyMetrics()
    registry = CollectorRegistry()
    reference = Histogram(
        "memshadow_request_duration_seconds",
        "Time from a request's arrival to its reply's, by command and listener.",
        ["command", "listener"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    observations = [("get", 0.00004), ("get", 0.0001), ("gets", 0.02), ("get", 7.5), ("set", 0.5)]
    for command, seconds in observations:
        metrics.requests_for("default").observe(command, seconds)
        reference.labels(command, "default").observe(seconds)

    def histogram_lines(text: str) -> list[str]:
        return sorted(
            line
            for line in text.splitlines()
            if line.startswith("memshadow_request_duration_seconds_")
            and not line.startswith("memshadow_request_duration_seconds_created")
        )

    ours = histogram_lines(metrics.render().decode())
    theirs = histogram_lines(generate_latest(registry).decode())
    assert ours == theirs
    assert len(ours) == 3 * (len(EXPECTED_BOUNDS) + 2)


def test_no_request_series_before_any_request() -> None:
    metrics = ProxyMetrics()
    assert samples(metrics, "memshadow_requests_total") == []
    assert samples(metrics, "memshadow_request_duration_seconds_bucket") == []


def test_client_connection_gauge() -> None:
    metrics = ProxyMetrics()
    metrics.client_opened()
    metrics.client_opened()
    metrics.client_closed()
    assert value(metrics, "memshadow_client_connections") == 1


def test_error_and_unframed_counters_by_label() -> None:
    metrics = ProxyMetrics()
    for kind in ["connect", "connect", "connect_timeout"]:
        metrics.upstream_error(kind)
    metrics.unframed("line_too_long")
    assert value(metrics, "memshadow_upstream_errors_total", kind="connect") == 2
    assert value(metrics, "memshadow_upstream_errors_total", kind="connect_timeout") == 1
    assert value(metrics, "memshadow_unframed_connections_total", reason="line_too_long") == 1


def test_build_info_version_label() -> None:
    assert value(ProxyMetrics(version="9.9.9"), "memshadow_build_info", version="9.9.9") == 1


def test_registries_are_independent() -> None:
    first, second = ProxyMetrics(), ProxyMetrics()
    first.requests.observe("get", 0.001)
    first.client_opened()
    assert value(first, "memshadow_requests_total", command="get") == 1
    assert samples(second, "memshadow_requests_total") == []
    assert value(second, "memshadow_client_connections") == 0


def test_command_label_values_are_capped() -> None:
    stats = RequestStats()
    for i in range(MAX_COMMANDS + 10):
        stats.observe(f"cmd{i}", 0.001)
    stats.observe("cmd0", 0.001)  # a known command still has its own series
    commands = [command for command, _, _ in stats.snapshot()]
    assert len(commands) == MAX_COMMANDS
    assert OTHER_COMMAND in commands
    assert stats.count("cmd0") == 2
    assert stats.count(OTHER_COMMAND) == 11


def test_render_is_text_exposition_bytes() -> None:
    text = ProxyMetrics().render()
    assert isinstance(text, bytes)
    assert text.endswith(b"\n")


def test_one_histogram_type_its_quantiles_interpolate_within_buckets() -> None:
    hist = LatencyHistogram()
    for _ in range(100):
        hist.observe(0.001)  # a bound belongs in its own bucket: (0.0005, 0.001]
    assert hist.count == 100 and hist.total == pytest.approx(0.1)
    assert hist.quantile(0.5) == pytest.approx(0.00075)
    assert hist.quantile(0.99) == pytest.approx(0.000995)
    assert hist.cumulative()[-1] == 100
    for _ in range(100):
        hist.observe(10.0)  # over the largest bound: +Inf
    assert hist.quantile(0.99) == DURATION_BUCKETS[-1]
    assert bucket_quantile(hist.buckets, 0.99) == DURATION_BUCKETS[-1]
    assert LatencyHistogram().quantile(0.5) is None


def test_request_stats_observe_is_latency_histogram_observe() -> None:
    """RequestStats.observe inlines LatencyHistogram.observe: the same buckets and sum."""
    stats, hist = RequestStats(), LatencyHistogram()
    for seconds in (0.0, 0.00005, 0.00007, 0.001, 0.3, 2.5, 9.0):
        stats.observe("get", seconds)
        hist.observe(seconds)
    ((_, cumulative, total),) = stats.snapshot()
    assert (cumulative, total) == (hist.cumulative(), hist.total)


def test_other_processes_figures_are_added_to_every_client_path_metric() -> None:
    """workers: N: the extra processes' figures, mirrored, are summed with this one's."""
    metrics = ProxyMetrics(listeners=["a", "b"], processes=3)
    metrics.requests_for("a").observe("get", 0.0001)
    metrics.client_opened()
    other = ProxyMetrics(listeners=["a", "b"])
    for _ in range(4):
        other.requests_for("a").observe("get", 0.002)
    other.requests_for("b").observe("set", 0.002)
    other.upstream_error("connect")
    other.upstream_error("connect")
    metrics.remote[0]["a"].load(other.requests_for("a").state())
    metrics.remote[0]["b"].load(other.requests_for("b").state())
    metrics.remote_connections[1] = 5
    metrics.add_counters(other.counters())
    text = metrics.render().decode()
    assert 'memshadow_requests_total{command="get",listener="a"} 5.0' in text
    assert 'memshadow_requests_total{command="set",listener="b"} 1.0' in text
    assert "memshadow_client_connections 6.0" in text
    assert 'memshadow_upstream_errors_total{kind="connect"} 2.0' in text
    assert metrics.requests.total() == 6
    assert metrics.requests_for("a").total() == 1  # what this process's client path writes
    assert other.counters()["upstream_errors"] == {"connect": 2.0}


async def test_the_event_loop_s_tasks_are_counted() -> None:
    metrics = ProxyMetrics()
    assert value(metrics, "memshadow_event_loop_tasks") == 0  # no loop given yet
    metrics.loop = asyncio.get_running_loop()
    before = value(metrics, "memshadow_event_loop_tasks")
    release = asyncio.Event()
    task = asyncio.create_task(release.wait())
    assert value(metrics, "memshadow_event_loop_tasks") == before + 1
    release.set()
    await task
    assert value(metrics, "memshadow_event_loop_tasks") == before
