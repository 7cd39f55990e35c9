"""Every Prometheus metric memshadow exports, defined in one place on a private registry.

The request path never calls prometheus_client: RequestStats.observe() only bumps plain Python
ints, and a custom collector turns them into a counter and a histogram when /metrics is
scraped. Measured on the 2-core dev machine (Python 3.11.7, 1M calls, best of 5; reproduce
with MEMSHADOW_BENCH=1 pytest tests/test_metrics.py -k bench -s):
RequestStats.observe 0.15-0.17 us, prometheus Histogram child.observe 0.69-0.72 us,
Histogram.labels(cmd).observe 1.57-1.64 us: 4x and 10x the cost of observe().
"""

from __future__ import annotations

import asyncio
import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy import __version__, buildinfo

# prometheus_client's counters export a `_created` sample (their creation time), which the
# text format 0.0.4 shows as one more gauge family per counter, with the counter's help
# repeated: noise on a dashboard and a series per label set for nothing. memshadow exports
# none (this is process-wide, and memshadow's process is its own).
_disable_created: Callable[[], None] = disable_created_metrics  # untyped upstream
_disable_created()

# Upper bounds (le) of the request latency histogram; +Inf is implicit. Sub-millisecond
# resolution because a proxied get on loopback takes tens of microseconds.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

# Label values come from what clients send; at most this many series (OTHER_COMMAND included)
# exist, later new commands counting as OTHER_COMMAND, so a client cannot grow the exposition.
MAX_COMMANDS: Final = 64
DEFAULT_LISTENER: Final = "default"
OTHER_COMMAND: Final = "other"

# Bucket labels spelled exactly as prometheus_client's own Histogram spells them ("5e-05").
_go_float: Callable[[float], str] = floatToGoString  # untyped upstream
_BUCKET_LABELS: Final = (*(_go_float(b) for b in DURATION_BUCKETS), "+Inf")


class LatencyHistogram:
    """Latency observations: counts per bucket of DURATION_BUCKETS (not cumulative; the last
    slot is +Inf) and their sum. The one histogram type: the client path's per-command
    figures, the shadow's, the guards' windows and the reports read it."""

    __slots__ = ("buckets", "total")

    def __init__(self, buckets: Sequence[int] | None = None, total: float = 0.0) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1) if buckets is None else list(buckets)
        self.total = total

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs in that bound's bucket (le is <=).
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[int]:
        """Bucket counts as Prometheus exports them: cumulative, ending with +Inf."""
        return list(accumulate(self.buckets))

    def quantile(self, q: float) -> float | None:
        return bucket_quantile(self.buckets, q)

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self.buckets, self.total)


def bucket_quantile(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile of non-cumulative bucket counts, interpolated linearly inside its
    bucket as Prometheus' histogram_quantile does (the +Inf bucket answers with the largest
    finite bound); None when there is no observation."""
    count = sum(buckets)
    if count <= 0:
        return None
    rank = q * count
    seen = 0
    for index, n in enumerate(buckets):
        if n and seen + n >= rank:
            if index == len(DURATION_BUCKETS):
                return DURATION_BUCKETS[-1]
            lower = DURATION_BUCKETS[index - 1] if index else 0.0
            upper = DURATION_BUCKETS[index]
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
    return DURATION_BUCKETS[-1]


class RequestStats:
    """Per-command request counts and latency histograms, kept as plain Python numbers.

    Single-threaded by design: observe() and the scrape both run on the event loop.
    """

    __slots__ = ("_commands",)

    def __init__(self) -> None:
        self._commands: dict[str, LatencyHistogram] = {}

    def observe(self, command: str, seconds: float) -> None:
        """Count one request of ``command`` that took ``seconds``. Hot path: keep it tiny."""
        stats = self._commands.get(command)
        if stats is None:
            stats = self._add(command)
        # LatencyHistogram.observe, inlined: a method call more costs ~0.05 us a request.
        stats.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        stats.total += seconds

    def _add(self, command: str) -> LatencyHistogram:
        if len(self._commands) >= MAX_COMMANDS - 1:  # keep the last slot for "other"
            command = OTHER_COMMAND
            existing = self._commands.get(command)
            if existing is not None:
                return existing
        stats = self._commands[command] = LatencyHistogram()
        return stats

    def total(self) -> int:
        """Requests answered so far, every command together."""
        return sum(stats.count for stats in self._commands.values())

    def count(self, command: str) -> int:
        stats = self._commands.get(command)
        return stats.count if stats is not None else 0

    def snapshot(self) -> Iterator[tuple[str, list[int], float]]:
        """(command, cumulative bucket counts ending with +Inf, sum of seconds), by command."""
        for command in sorted(self._commands):
            stats = self._commands[command]
            yield command, stats.cumulative(), stats.total

    def state(self) -> RequestState:
        """The figures as plain data (another proxy process sends them: workers: N)."""
        return {command: (list(h.buckets), h.total) for command, h in self._commands.items()}

    def load(self, state: RequestState) -> None:
        """Show exactly these figures (another process's, mirrored)."""
        self._commands = {
            command: LatencyHistogram(buckets, total)
            for command, (buckets, total) in list(state.items())[:MAX_COMMANDS]
        }


RequestState = dict[str, tuple[list[int], float]]
"""RequestStats as plain data: command -> (bucket counts, not cumulative; sum of seconds)."""


def add_request_states(a: RequestState, b: RequestState) -> RequestState:
    total = dict(a)
    for command, (buckets, seconds) in b.items():
        known = total.get(command)
        if known is None:
            total[command] = (list(buckets), seconds)
        else:
            total[command] = (
                [x + y for x, y in zip(known[0], buckets, strict=True)],
                known[1] + seconds,
            )
    return total


class RequestTotals:
    """The RequestStats of several listeners read as one (what the guards, the reports and
    the health probe need); the client path writes to each listener's own."""

    __slots__ = ("_parts",)

    def __init__(self, parts: Sequence[RequestStats | RequestTotals]) -> None:
        self._parts = tuple(parts)

    def total(self) -> int:
        return sum(part.total() for part in self._parts)

    def count(self, command: str) -> int:
        return sum(part.count(command) for part in self._parts)

    def snapshot(self) -> Iterator[tuple[str, list[int], float]]:
        merged: dict[str, tuple[list[int], float]] = {}
        for part in self._parts:
            for command, cumulative, seconds in part.snapshot():
                known = merged.get(command)
                if known is None:
                    merged[command] = (list(cumulative), seconds)
                else:
                    counts = [a + b for a, b in zip(known[0], cumulative, strict=True)]
                    merged[command] = (counts, known[1] + seconds)
        for command in sorted(merged):
            yield command, *merged[command]


RequestFigures = RequestStats | RequestTotals
"""One listener's request figures, or all listeners' together (ProxyMetrics.requests)."""


class _RequestCollector(Collector):
    """Exports each listener's RequestStats at scrape time as memshadow_requests_total and
    memshadow_request_duration_seconds, labelled by command and listener."""

    def __init__(self, listeners: dict[str, RequestFigures]) -> None:
        self._listeners = listeners

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "memshadow_requests",
                "Client requests forwarded to Memcached, by command and listener.",
                labels=["command", "listener"],
            ),
            HistogramMetricFamily(
                "memshadow_request_duration_seconds",
                "Time from a request's arrival to its reply's, by command and listener.",
                labels=["command", "listener"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        # Lets the registry refuse a second collector exporting the same names.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        requests, durations = self._families()
        for listener, stats in self._listeners.items():
            for command, cumulative, total_seconds in stats.snapshot():
                requests.add_metric([command, listener], cumulative[-1])
                durations.add_metric(
                    [command, listener],
                    buckets=list(zip(_BUCKET_LABELS, cumulative, strict=True)),
                    sum_value=total_seconds,
                )
        return (requests, durations)


class ProxyMetrics:
    """All of memshadow's metrics on one registry of their own, so tests can make several.

    Connection-level events (open, close, upstream error, unframed relay) are rare enough
    to use prometheus_client directly; per-request figures go through ``requests``.
    """

    def __init__(
        self,
        *,
        version: str = __version__,
        listeners: Sequence[str] = (DEFAULT_LISTENER,),
        processes: int = 1,
    ) -> None:
        """listeners: the labels of the listeners (config.backends); each gets its own
        request figures (requests_for), and `requests` reads them all together.
        processes: with workers: N, the figures of the N-1 other proxy processes are
        mirrored here (`remote`) and every metric of the client path is their sum."""
        self.registry = CollectorRegistry()
        self.listeners = {label: RequestStats() for label in listeners}
        # remote[i][label]: proxy process i+1's figures, as it last reported them.
        self.remote = [{label: RequestStats() for label in listeners} for _ in range(processes - 1)]
        shown: dict[str, RequestFigures] = {
            label: RequestTotals([local, *(r[label] for r in self.remote)])
            if self.remote
            else local
            for label, local in self.listeners.items()
        }
        parts = list(shown.values())
        self.requests: RequestFigures = parts[0] if len(parts) == 1 else RequestTotals(parts)
        self.registry.register(_RequestCollector(shown))
        self.connections = 0  # client connections of this process
        self.remote_connections = [0] * (processes - 1)
        self._client_connections = Gauge(
            "memshadow_client_connections",
            "Client connections open now.",
            registry=self.registry,
        )
        self._client_connections.set_function(
            lambda: self.connections + sum(self.remote_connections)
        )
        self._upstream_errors = Counter(
            "memshadow_upstream_errors",
            "Failures talking to Memcached, by kind: connect (refused or failed), "
            "connect_timeout, disconnect (it closed a connection with requests in flight).",
            ["kind"],
            registry=self.registry,
        )
        self._closed_by_proxy = Counter(
            "memshadow_client_connections_closed_by_proxy",
            "Client connections memshadow refused or closed itself, by reason "
            "(max_connections, idle_timeout).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("max_connections", "idle_timeout"):
            self._closed_by_proxy.labels(reason)
        self._unframed = Counter(
            "memshadow_unframed_connections",
            "Client connections relayed raw without framing (and so without shadowing), "
            "by reason (binary protocol, watch, line too long).",
            ["reason"],
            registry=self.registry,
        )
        self._shadow_handoff = Counter(
            "memshadow_shadow_handoff_failures",
            "Times the shadow's hand-off raised on the client path (a bug: the client was "
            "answered and carries on, the shadow lost those requests), by stage.",
            ["stage"],
            registry=self.registry,
        )
        self._shadow_handoff.labels("observe")
        # The event loop whose tasks are counted (set by whoever runs it): a count that
        # only grows is a leak (bench/soak.py plots it).
        self.loop: asyncio.AbstractEventLoop | None = None
        tasks = Gauge(
            "memshadow_event_loop_tasks",
            "asyncio tasks alive on the (first) proxy process's event loop.",
            registry=self.registry,
        )
        tasks.set_function(lambda: len(asyncio.all_tasks(self.loop)) if self.loop else 0)
        build_info = Gauge(
            "memshadow_build_info",
            "Always 1; which memshadow is running: version, compiled (true: the mypyc "
            "build's C extensions are loaded, false: pure Python) and the Python version.",
            ["version", "compiled", "python"],
            registry=self.registry,
        )
        compiled = "true" if buildinfo.is_compiled() else "false"
        build_info.labels(version, compiled, platform.python_version()).set(1)
        ProcessCollector(registry=self.registry)

    def requests_for(self, listener: str) -> RequestStats:
        """The request figures of one listener (the only one's, whatever its label, when
        there is one: metrics made before the config was known)."""
        stats = self.listeners.get(listener)
        if stats is None:
            if len(self.listeners) != 1:
                raise KeyError(f"no listener {listener!r} in {list(self.listeners)}")
            stats = next(iter(self.listeners.values()))
        return stats

    def client_opened(self) -> None:
        self.connections += 1

    def client_closed(self) -> None:
        self.connections -= 1

    def closed_by_proxy(self, reason: str) -> None:
        self._closed_by_proxy.labels(reason).inc()

    def upstream_error(self, kind: str) -> None:
        self._upstream_errors.labels(kind).inc()

    def unframed(self, reason: str) -> None:
        self._unframed.labels(reason).inc()

    def shadow_handoff_failed(self) -> None:
        self._shadow_handoff.labels("observe").inc()

    def counters(self) -> dict[str, dict[str, float]]:
        """The connection-level counters by label value (another process sends them)."""
        values: dict[str, dict[str, float]] = {}
        for name, metric in self._labelled_counters().items():
            values[name] = {
                next(iter(sample.labels.values())): sample.value
                for family in metric.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            }
        return values

    def add_counters(self, deltas: dict[str, dict[str, float]]) -> None:
        """Add another process's increments to the connection-level counters."""
        metrics = self._labelled_counters()
        for name, values in deltas.items():
            metric = metrics.get(name)
            if metric is None:
                continue
            for label, amount in values.items():
                if amount > 0:
                    metric.labels(label).inc(amount)

    def _labelled_counters(self) -> dict[str, Counter]:
        return {
            "upstream_errors": self._upstream_errors,
            "closed_by_proxy": self._closed_by_proxy,
            "unframed": self._unframed,
            "shadow_handoff": self._shadow_handoff,
        }

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (version 0.0.4)."""
        return bytes(generate_latest(self.registry))
