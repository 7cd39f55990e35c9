"""ShadowStats: the per-command figures the dispatcher records on every operation."""

from __future__ import annotations

from proxy.shadow.stats import ShadowStats


def test_command_figures_are_looked_up_once_and_join_their_tables_when_used() -> None:
    stats = ShadowStats()
    figures = stats.for_command("get")
    assert stats.for_command("get") is figures
    assert figures.match == ("get", "match")
    assert (stats.memcached_latency, stats.redis_latency, stats.shadow_duration) == ({}, {}, {})
    figures.redis_latency.observe(0.001)
    assert list(stats.redis_latency) == ["get"] and stats.redis_latency["get"].count == 1
    assert figures.redis_latency is stats.redis_latency["get"]
    assert (stats.memcached_latency, stats.shadow_duration) == ({}, {})  # no empty series
    figures.duration.observe(0.002)
    figures.memcached_latency.observe(0.003)
    assert stats.histogram(stats.shadow_duration, "get") is figures.duration
    assert stats.histogram(stats.memcached_latency, "get") is figures.memcached_latency
