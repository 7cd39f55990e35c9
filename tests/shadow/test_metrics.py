"""The memshadow_shadow_* exposition: exact names, labels, pre-seeded zeros and histograms."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.metrics import ProxyMetrics
from proxy.shadow.control import ShadowControl
from proxy.shadow.metrics import (
    CONNECT_FAILURE_REASONS,
    DROP_REASONS,
    ERROR_KINDS,
    ShadowCollector,
    install_shadow_metrics,
)
from proxy.shadow.stats import ShadowStats
from tests.test_metrics import EXPECTED_BOUNDS

BOUNDS = EXPECTED_BOUNDS  # the documented bucket bounds, as exported


def render(registry: CollectorRegistry) -> list[str]:
    return bytes(generate_latest(registry)).decode().splitlines()


def samples(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if line.startswith((name + "{", name + " "))]


def setup(rate: float = 0.25) -> tuple[CollectorRegistry, ShadowStats, ShadowControl]:
    registry = CollectorRegistry()
    stats = ShadowStats()
    control = ShadowControl(rate)
    install_shadow_metrics(registry, stats, control)
    return registry, stats, control


def test_fresh_exposition_has_every_family() -> None:
    registry, _, _ = setup()
    lines = render(registry)
    types = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE")}
    assert types == {
        "memshadow_shadow_sample_rate": "gauge",
        "memshadow_shadow_requests_total": "counter",
        "memshadow_shadow_comparisons_total": "counter",
        "memshadow_shadow_mismatches_total": "counter",
        "memshadow_shadow_noise_total": "counter",
        "memshadow_shadow_skipped_total": "counter",
        "memshadow_shadow_dropped_total": "counter",
        "memshadow_shadow_errors_total": "counter",
        "memshadow_shadow_redis_connect_failures_total": "counter",
        "memshadow_shadow_evictions_total": "counter",
        "memshadow_shadow_duration_seconds": "histogram",
        "memshadow_shadow_redis_service_seconds": "histogram",
        "memshadow_shadow_queueing_seconds": "histogram",
        "memshadow_shadow_lag_seconds": "histogram",
        "memshadow_shadow_queue_depth": "gauge",
        "memshadow_shadow_cas_map_entries": "gauge",
        "memshadow_shadow_redis_commands_total": "counter",
    }
    assert samples(lines, "memshadow_shadow_sample_rate") == ["memshadow_shadow_sample_rate 0.25"]
    assert samples(lines, "memshadow_shadow_queue_depth") == ["memshadow_shadow_queue_depth 0.0"]
    assert samples(lines, "memshadow_shadow_redis_commands_total") == [
        "memshadow_shadow_redis_commands_total 0.0"
    ]
    # Labelled counters nobody has touched: only the pre-seeded drop reasons and error kinds.
    for name in (
        "memshadow_shadow_requests_total",
        "memshadow_shadow_comparisons_total",
        "memshadow_shadow_mismatches_total",
        "memshadow_shadow_noise_total",
        "memshadow_shadow_skipped_total",
        "memshadow_shadow_duration_seconds_bucket",
    ):
        assert samples(lines, name) == [], name
    assert samples(lines, "memshadow_shadow_dropped_total") == [
        f'memshadow_shadow_dropped_total{{reason="{r}"}} 0.0' for r in sorted(DROP_REASONS)
    ]
    assert samples(lines, "memshadow_shadow_errors_total") == [
        f'memshadow_shadow_errors_total{{kind="{k}"}} 0.0' for k in sorted(ERROR_KINDS)
    ]
    assert samples(lines, "memshadow_shadow_redis_connect_failures_total") == [
        f'memshadow_shadow_redis_connect_failures_total{{reason="{r}"}} 0.0'
        for r in sorted(CONNECT_FAILURE_REASONS)
    ]
    assert samples(lines, "memshadow_shadow_lag_seconds_bucket") == [
        f'memshadow_shadow_lag_seconds_bucket{{le="{b}"}} 0.0' for b in BOUNDS
    ]
    assert samples(lines, "memshadow_shadow_lag_seconds_count") == [
        "memshadow_shadow_lag_seconds_count 0.0"
    ]
    assert samples(lines, "memshadow_shadow_lag_seconds_sum") == [
        "memshadow_shadow_lag_seconds_sum 0.0"
    ]


def test_counts_are_exported_with_outcomes_seeded_per_command() -> None:
    registry, stats, _ = setup()
    stats.shadowed["get"] += 3
    stats.shadowed["set"] += 1
    stats.count_comparison("get", "match")
    stats.count_comparison("get", "match")
    stats.count_comparison("get", "mismatch", "value")
    stats.count_comparison("mg", "noise", "cold_key")  # compared without a shadowed count
    stats.skipped["non_canonical"] += 2
    stats.dropped["queue_full"] += 5
    stats.errors["redis_timeout"] += 1
    stats.errors["something_new"] += 1
    stats.redis_commands = 42
    stats.queue_depth = 7
    stats.cas_map_entries = 11
    lines = render(registry)
    assert samples(lines, "memshadow_shadow_cas_map_entries") == [
        "memshadow_shadow_cas_map_entries 11.0"
    ]
    assert samples(lines, "memshadow_shadow_requests_total") == [
        'memshadow_shadow_requests_total{command="get"} 3.0',
        'memshadow_shadow_requests_total{command="set"} 1.0',
    ]
    assert samples(lines, "memshadow_shadow_comparisons_total") == [
        'memshadow_shadow_comparisons_total{command="get",outcome="match"} 2.0',
        'memshadow_shadow_comparisons_total{command="get",outcome="mismatch"} 1.0',
        'memshadow_shadow_comparisons_total{command="get",outcome="noise"} 0.0',
        'memshadow_shadow_comparisons_total{command="mg",outcome="match"} 0.0',
        'memshadow_shadow_comparisons_total{command="mg",outcome="mismatch"} 0.0',
        'memshadow_shadow_comparisons_total{command="mg",outcome="noise"} 1.0',
        'memshadow_shadow_comparisons_total{command="set",outcome="match"} 0.0',
        'memshadow_shadow_comparisons_total{command="set",outcome="mismatch"} 0.0',
        'memshadow_shadow_comparisons_total{command="set",outcome="noise"} 0.0',
    ]
    assert samples(lines, "memshadow_shadow_mismatches_total") == [
        'memshadow_shadow_mismatches_total{command="get",kind="value"} 1.0'
    ]
    assert samples(lines, "memshadow_shadow_noise_total") == [
        'memshadow_shadow_noise_total{command="mg",reason="cold_key"} 1.0'
    ]
    assert samples(lines, "memshadow_shadow_skipped_total") == [
        'memshadow_shadow_skipped_total{reason="non_canonical"} 2.0'
    ]
    assert 'memshadow_shadow_dropped_total{reason="queue_full"} 5.0' in lines
    assert 'memshadow_shadow_dropped_total{reason="timeout"} 0.0' in lines
    assert 'memshadow_shadow_errors_total{kind="redis_timeout"} 1.0' in lines
    assert 'memshadow_shadow_errors_total{kind="something_new"} 1.0' in lines
    assert "memshadow_shadow_redis_commands_total 42.0" in lines
    assert "memshadow_shadow_queue_depth 7.0" in lines


def test_histograms_are_cumulative_with_the_request_buckets() -> None:
    registry, stats, _ = setup()
    duration = stats.histogram(stats.shadow_duration, "get")
    for seconds in (0.00005, 0.0003, 0.0003, 0.02, 3.0):  # 5e-05 is in its own bucket (le)
        duration.observe(seconds)
    stats.lag.observe(0.004)
    lines = render(registry)
    counts = [1, 1, 1, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5]
    assert samples(lines, "memshadow_shadow_duration_seconds_bucket") == [
        f'memshadow_shadow_duration_seconds_bucket{{command="get",le="{b}"}} {n}.0'
        for b, n in zip(BOUNDS, counts, strict=True)
    ]
    assert samples(lines, "memshadow_shadow_duration_seconds_count") == [
        'memshadow_shadow_duration_seconds_count{command="get"} 5.0'
    ]
    [total] = samples(lines, "memshadow_shadow_duration_seconds_sum")
    assert total.startswith('memshadow_shadow_duration_seconds_sum{command="get"} 3.0206')
    assert 'memshadow_shadow_lag_seconds_bucket{le="0.0025"} 0.0' in lines
    assert 'memshadow_shadow_lag_seconds_bucket{le="0.005"} 1.0' in lines
    assert "memshadow_shadow_lag_seconds_count 1.0" in lines


def test_sample_rate_is_the_rate_in_force() -> None:
    registry, _, control = setup(0.5)
    assert "memshadow_shadow_sample_rate 0.5" in render(registry)
    control.set_enabled(False, "test")  # kill switch / halt
    assert "memshadow_shadow_sample_rate 0.0" in render(registry)
    control.set_enabled(True, "test")
    control.set_rate(0.01, "test")
    assert "memshadow_shadow_sample_rate 0.01" in render(registry)


def test_installs_on_the_proxy_registry_once() -> None:
    metrics = ProxyMetrics()
    stats, control = ShadowStats(), ShadowControl(1.0)
    install_shadow_metrics(metrics.registry, stats, control)
    stats.shadowed["get"] += 1
    text = metrics.render().decode()
    assert 'memshadow_shadow_requests_total{command="get"} 1.0' in text
    assert "# TYPE memshadow_requests_total counter" in text  # the proxy's own still there
    with pytest.raises(ValueError):
        install_shadow_metrics(metrics.registry, stats, control)


def test_seeds_are_configurable() -> None:
    registry = CollectorRegistry()
    collector = ShadowCollector(
        ShadowStats(),
        ShadowControl(),
        dropped_reasons=(),
        error_kinds=("x",),
        skipped_reasons=("non_canonical",),
    )
    registry.register(collector)
    lines = render(registry)
    assert samples(lines, "memshadow_shadow_dropped_total") == []
    assert samples(lines, "memshadow_shadow_errors_total") == [
        'memshadow_shadow_errors_total{kind="x"} 0.0'
    ]
    assert samples(lines, "memshadow_shadow_skipped_total") == [
        'memshadow_shadow_skipped_total{reason="non_canonical"} 0.0'
    ]
