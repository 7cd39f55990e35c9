"""The shadow's Prometheus metrics, read from ShadowStats and ShadowControl at scrape time.

The shadow path only bumps plain counters in ShadowStats; this collector turns them into the
memshadow_shadow_* families when /metrics is scraped, so no request pays for prometheus_client.
Series that alerts divide by exist from the start at 0 (see ShadowCollector), so the first
increment is never lost to rate().
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.metrics import DURATION_BUCKETS, LatencyHistogram
from proxy.shadow.control import ShadowControl
from proxy.shadow.stats import ShadowStats
from proxy.shadow.words import ConnectFailure, DropReason, ErrorKind, Outcome, Store

OUTCOMES: Final = tuple(Outcome)
"""Outcomes every shadowed command exports, at 0 until they happen."""
DROP_REASONS: Final = (
    DropReason.QUEUE_FULL,
    DropReason.SHADOW_STARVED,
    DropReason.TIMEOUT,
    DropReason.REDIS_DOWN,
    DropReason.REDIS_BUSY,
    DropReason.WORKER_DOWN,
)
"""Drop reasons exported at 0 from the start (the dispatcher's and the worker hand-off's;
shadow_starved: the worker's own CPU starvation, which the drops guard answers, never the
errors guard). proxy/ops/causes.py says which cause each one is."""
ERROR_KINDS: Final = tuple(ErrorKind)
"""Error kinds exported at 0 from the start (the dispatcher's and the worker process's)."""
CONNECT_FAILURE_REASONS: Final = (
    ConnectFailure.TLS,
    ConnectFailure.AUTH,
    ConnectFailure.DNS,
    ConnectFailure.REFUSED,
    ConnectFailure.TIMEOUT,
)
"""Reasons a connection to Redis failed, exported at 0 from the start (connection.failure_reason;
permission, replica and other appear with their first count)."""
EVICTION_STORES: Final = tuple(Store)
"""Stores whose evictions of sampled keys are counted, exported at 0 from the start."""

# Bucket labels spelled as prometheus_client's own Histogram spells them ("5e-05").
_go_float: Callable[[float], str] = floatToGoString  # untyped upstream
_BUCKET_LABELS: Final = (*(_go_float(b) for b in DURATION_BUCKETS), "+Inf")


def _buckets(histogram: LatencyHistogram) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs ending with +Inf, from LatencyHistogram's plain counts."""
    return list(zip(_BUCKET_LABELS, histogram.cumulative(), strict=True))


class ShadowCollector(Collector):
    """Exports ShadowStats and the live sample rate as the memshadow_shadow_* families.

    Pre-seeded at 0 so dashboards and alerts never see a missing series:
    comparisons_total for each outcome of every command that has been shadowed,
    dropped_total for `dropped_reasons`, errors_total for `error_kinds`, skipped_total for
    `skipped_reasons` (none by default). Mismatch kinds and noise reasons appear with their
    first count. Unlabelled metrics are always exported.
    """

    def __init__(
        self,
        stats: ShadowStats,
        control: ShadowControl,
        *,
        dropped_reasons: Iterable[str] = DROP_REASONS,
        error_kinds: Iterable[str] = ERROR_KINDS,
        skipped_reasons: Iterable[str] = (),
    ) -> None:
        self._stats = stats
        self._control = control
        self._dropped_reasons = tuple(dropped_reasons)
        self._error_kinds = tuple(error_kinds)
        self._skipped_reasons = tuple(skipped_reasons)

    def describe(self) -> Iterable[Metric]:
        # Lets the registry refuse a second collector exporting the same names.
        return _Families.new()

    def collect(self) -> Iterable[Metric]:
        stats = self._stats
        control = self._control
        families = _Families.new()

        families.rate.add_metric([], control.sample_rate if control.active else 0.0)
        for command in sorted(stats.shadowed):
            families.requests.add_metric([command], stats.shadowed[command])
        seen = set(stats.shadowed)
        seen.update(command for command, _ in stats.comparisons)
        counts: dict[tuple[str, str], int] = dict.fromkeys(
            ((c, o) for c in seen for o in OUTCOMES), 0
        )
        counts.update(stats.comparisons)
        for (command, outcome), n in sorted(counts.items()):
            families.comparisons.add_metric([command, outcome], n)
        for (command, kind), n in sorted(stats.mismatches.items()):
            families.mismatches.add_metric([command, kind], n)
        for (command, reason), n in sorted(stats.noise.items()):
            families.noise.add_metric([command, reason], n)
        for family, counter, seeds in (
            (families.skipped, stats.skipped, self._skipped_reasons),
            (families.dropped, stats.dropped, self._dropped_reasons),
            (families.errors, stats.errors, self._error_kinds),
            (families.connect_failures, stats.connect_failures, CONNECT_FAILURE_REASONS),
            (families.evictions, stats.evictions, EVICTION_STORES),
        ):
            values = dict.fromkeys(seeds, 0) | dict(counter)
            for label, n in sorted(values.items()):
                family.add_metric([label], n)
        for command in sorted(stats.shadow_duration):
            histogram = stats.shadow_duration[command]
            families.duration.add_metric([command], _buckets(histogram), histogram.total)
        families.lag.add_metric([], _buckets(stats.lag), stats.lag.total)
        service = stats.redis_service
        families.redis_service.add_metric([], _buckets(service), service.total)
        families.queueing.add_metric([], _buckets(stats.queueing), stats.queueing.total)
        families.queue_depth.add_metric([], stats.queue_depth)
        families.cas_map_entries.add_metric([], stats.cas_map_entries)
        families.redis_commands.add_metric([], stats.redis_commands)
        return families


class _Families(NamedTuple):
    """One scrape's metric families, in exposition order."""

    rate: GaugeMetricFamily
    requests: CounterMetricFamily
    comparisons: CounterMetricFamily
    mismatches: CounterMetricFamily
    noise: CounterMetricFamily
    skipped: CounterMetricFamily
    dropped: CounterMetricFamily
    errors: CounterMetricFamily
    connect_failures: CounterMetricFamily
    evictions: CounterMetricFamily
    duration: HistogramMetricFamily
    redis_service: HistogramMetricFamily
    queueing: HistogramMetricFamily
    lag: HistogramMetricFamily
    queue_depth: GaugeMetricFamily
    cas_map_entries: GaugeMetricFamily
    redis_commands: CounterMetricFamily

    @classmethod
    def new(cls) -> _Families:
        return cls(
            GaugeMetricFamily(
                "memshadow_shadow_sample_rate",
                "Fraction of keys shadowed now (0 while the shadow is disabled or halted).",
            ),
            CounterMetricFamily(
                "memshadow_shadow_requests",
                "Sampled requests the shadow took up for replay, by command.",
                labels=["command"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_comparisons",
                "Per-key verdicts, by command and outcome (match, mismatch, noise).",
                labels=["command", "outcome"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_mismatches",
                "Mismatches, by command and kind (value, flags, missing_in_redis, "
                "unexpected_in_redis, status, error).",
                labels=["command", "kind"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_noise",
                "Differences classified as expected noise, by command and reason.",
                labels=["command", "reason"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_skipped",
                "Sampled requests not replayed on Redis, by reason.",
                labels=["reason"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_dropped",
                "Shadow work dropped to protect clients, by reason.",
                labels=["reason"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_errors",
                "Failures of the shadow path (Redis, the Memcached re-reader, internal), by kind.",
                labels=["kind"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_redis_connect_failures",
                "Failed attempts to connect to Redis, by reason (tls: a certificate or host "
                "name refused; auth: the password refused or missing; permission: the ACL "
                "user may not run a command memshadow needs; dns, refused, timeout, replica, "
                "other).",
                labels=["reason"],
            ),
            CounterMetricFamily(
                "memshadow_shadow_evictions",
                "Sampled keys a store evicted, named by the store (memcached: its watch "
                "stream; redis: keyspace notifications), each turned cold; "
                "memcached_unnamed / redis_unnamed: times a store dropped keys it did not "
                "name, and every key turned cold.",
                labels=["store"],
            ),
            HistogramMetricFamily(
                "memshadow_shadow_duration_seconds",
                "Time to replay one shadowed key on Redis, by command.",
                labels=["command"],
            ),
            HistogramMetricFamily(
                "memshadow_shadow_redis_service_seconds",
                "Redis's own service time for the shadow's commands: from the write that "
                "carried a command to the read that brought its reply.",
            ),
            HistogramMetricFamily(
                "memshadow_shadow_queueing_seconds",
                "The shadow's own delay before Redis: from Memcached's reply to the start of "
                "the replay (hand-off, batching window, queue, the key's earlier operations).",
            ),
            HistogramMetricFamily(
                "memshadow_shadow_lag_seconds",
                "Time from Memcached's reply to the shadow's verdict.",
            ),
            GaugeMetricFamily(
                "memshadow_shadow_queue_depth",
                "Shadow work waiting: requests queued, and operations waiting behind their key's.",
            ),
            GaugeMetricFamily(
                "memshadow_shadow_cas_map_entries",
                "Memcached cas tokens the shadow maps to Redis's (at most shadow.cas_map_size "
                "per shadow worker).",
            ),
            CounterMetricFamily(
                "memshadow_shadow_redis_commands",
                "Redis commands sent for shadowed requests.",
            ),
        )


def install_shadow_metrics(
    registry: CollectorRegistry, stats: ShadowStats, control: ShadowControl
) -> ShadowCollector:
    """Register the shadow's collector on `registry` (ProxyMetrics.registry) and return it."""
    collector = ShadowCollector(stats, control)
    registry.register(collector)
    return collector
