"""The pipes between memshadow's processes, sans-IO: length-prefixed marshal frames, and the
shadow's data that travels in them (requests, stats).

A proxy process and a child of its (a shadow worker, an extra proxy process of `workers: N`)
exchange messages over one Unix stream socket. A frame is a 4-byte big-endian length and a
`marshal` payload (both ends run the same interpreter and code, and marshal is the cheapest
C-level encoder of tuples of bytes, str and numbers). A message is a plain tuple whose first
item names its kind; the kinds and their fields, of both kinds of child, are defined in
messages.py.

Times in requests are time.perf_counter() values of the proxy process: on Linux that is
CLOCK_MONOTONIC, one clock for every process of the host, so the worker can compare them
with its own.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Callable
from typing import Any, Final

from proxy.errors import MemshadowError
from proxy.memcache.request import Captured, Request
from proxy.metrics import LatencyHistogram
from proxy.shadow.stats import ShadowStats

_HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 256 * 1024 * 1024
"""A frame longer than this is a broken peer, not a big batch (values are at most 1 GiB in
memcached, but a batch holds what one loop iteration saw)."""

RequestTuple = tuple[str, list[bytes], int, bool, bytes | None, bytes | None, float]

Group = tuple[int, float, Any]
"""One item of a batch: (session, replied_at, [request tuple, ...]), or a marker in its place
in reply order: (MARKER, time, keys or None): changes of those keys (None: of any key) were
lost before `time`; (COVERAGE, time, (threshold, since)): from here on the stream hands over
every request of the keys hashed below threshold (coverage.CoverageAnnouncer; the worker puts
the stream's number in front when it merges several)."""
MARKER: Final = -1  # (session numbers are positive)
COVERAGE: Final = -2


class WireError(MemshadowError):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: tuple[Any, ...]) -> list[bytes]:
    """The frame of a message, as (header, payload) for transport.writelines (no copy)."""
    try:
        payload = marshal.dumps(message)
    except ValueError:  # a str subclass (a StrEnum word) somewhere in it: sent as plain str
        payload = marshal.dumps(_plain_value(message))
    return [_HEADER.pack(len(payload)), payload]


def _plain_value(value: Any) -> Any:
    """`value` with every str subclass inside it a plain str (what marshal can write)."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, tuple):
        return tuple(_plain_value(v) for v in value)
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    if isinstance(value, dict):
        return {_plain_value(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return type(value)(_plain_value(v) for v in value)
    return value


class FrameDecoder:
    """Feed bytes, get whole messages; a partial frame waits for the rest."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes, limit: int = -1) -> list[tuple[Any, ...]]:
        """The whole messages in what came so far; at most `limit` of them (the rest stays
        buffered for the next call) when limit >= 0."""
        buffer = self._buffer
        buffer += data
        messages: list[tuple[Any, ...]] = []
        offset = 0
        end = len(buffer)
        while end - offset >= 4 and len(messages) != limit:
            (size,) = _HEADER.unpack_from(buffer, offset)
            if size > self.max_frame:
                raise WireError(f"frame of {size} bytes is over the {self.max_frame} limit")
            if end - offset - 4 < size:
                break
            start = offset + 4
            try:
                message = marshal.loads(memoryview(buffer)[start : start + size])
            except (EOFError, ValueError, TypeError) as exc:
                raise WireError(f"undecodable frame: {exc}") from None
            if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
                raise WireError(f"not a message: {type(message).__name__}")
            messages.append(message)
            offset = start + size
        if offset:
            del buffer[:offset]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


# -- requests ---------------------------------------------------------------------------------


def pack_request(request: Request) -> RequestTuple:
    """A captured request as marshal takes it: Captured's fields, in its order, in a plain
    tuple (marshal refuses tuple subclasses; this skips building a Captured first)."""
    return (
        request.command,
        request.words,
        request.data_len,
        request.data_ok,
        request.data,
        request.response,
        request.started,
    )


unpack_request: Final[Callable[[RequestTuple], Captured]] = Captured._make


# -- stats ------------------------------------------------------------------------------------


_COUNTERS: Final = (
    "comparisons",
    "mismatches",
    "noise",
    "skipped",
    "dropped",
    "errors",
    "connect_failures",
    "evictions",
)
_HISTOGRAM_TABLES: Final = ("memcached_latency", "redis_latency", "shadow_duration")
_HISTOGRAMS: Final = ("lag", "redis_service", "queueing")  # one histogram each, no command label


def stats_state(stats: ShadowStats) -> dict[str, Any]:
    """ShadowStats as marshal-able plain data (everything but `shadowed`, which the proxy
    process counts itself as it hands requests over)."""
    return {
        **{name: _plain(getattr(stats, name)) for name in _COUNTERS},
        **{name: _histograms(getattr(stats, name)) for name in _HISTOGRAM_TABLES},
        "redis_commands": stats.redis_commands,
        "repairs": stats.repairs,
        **{name: _histogram(getattr(stats, name)) for name in _HISTOGRAMS},
        "queue_depth": stats.queue_depth,
        "cas_map_entries": stats.cas_map_entries,
    }


def _plain(counter: dict[Any, int]) -> dict[Any, int]:
    """A counter with its labels as plain str: marshal refuses the words' StrEnum members."""
    return {
        (tuple(str(part) for part in label) if isinstance(label, tuple) else str(label)): n
        for label, n in counter.items()
    }


def apply_stats_state(
    stats: ShadowStats,
    state: dict[str, Any],
    *,
    extra_dropped: dict[str, int] | None = None,
    extra_errors: dict[str, int] | None = None,
    extra_connect_failures: dict[str, int] | None = None,
    extra_queue: int = 0,
) -> None:
    """Make `stats` (the proxy process's mirror, shared with the metrics collector and the
    operator tools, so updated in place) show the worker's figures plus the proxy's own
    drops, errors and failed Redis connects."""
    for name in _COUNTERS:
        counter = getattr(stats, name)
        counter.clear()
        counter.update(state[name])
    if extra_dropped:
        stats.dropped.update(extra_dropped)
    if extra_errors:
        stats.errors.update(extra_errors)
    if extra_connect_failures:
        stats.connect_failures.update(extra_connect_failures)
    stats.redis_commands = state["redis_commands"]
    stats.repairs = state["repairs"]
    for name in _HISTOGRAM_TABLES:
        _load_histograms(getattr(stats, name), state[name])
    for name in _HISTOGRAMS:
        _load_histogram(getattr(stats, name), state[name])
    stats.queue_depth = state["queue_depth"] + extra_queue
    stats.cas_map_entries = state["cas_map_entries"]


def add_states(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """The sum of two stats states: the figures of a worker that exited are added to its
    successor's, so counters never go backwards (the gauges are the newer one's)."""
    total: dict[str, Any] = {}
    for name in _COUNTERS:
        merged = dict(base[name])
        for label, n in more[name].items():
            merged[label] = merged.get(label, 0) + n
        total[name] = merged
    for name in _HISTOGRAM_TABLES:
        table = dict(base[name])
        for command, histogram in more[name].items():
            earlier = table.get(command)
            table[command] = histogram if earlier is None else _add_histograms(earlier, histogram)
        total[name] = table
    for name in _HISTOGRAMS:
        total[name] = _add_histograms(base[name], more[name])
    total["redis_commands"] = base["redis_commands"] + more["redis_commands"]
    total["repairs"] = base["repairs"] + more["repairs"]
    total["queue_depth"] = more["queue_depth"]
    total["cas_map_entries"] = more["cas_map_entries"]
    return total


def empty_state() -> dict[str, Any]:
    return stats_state(ShadowStats())


# A histogram on the wire: (bucket counts, sum of seconds).
_HistogramState = tuple[list[int], float]


def _add_histograms(a: _HistogramState, b: _HistogramState) -> _HistogramState:
    return [x + y for x, y in zip(a[0], b[0], strict=True)], a[1] + b[1]


def _histogram(histogram: LatencyHistogram) -> _HistogramState:
    return list(histogram.buckets), histogram.total


def _histograms(table: dict[str, LatencyHistogram]) -> dict[str, _HistogramState]:
    return {command: _histogram(histogram) for command, histogram in table.items()}


def _load_histogram(histogram: LatencyHistogram, state: _HistogramState) -> None:
    buckets, total = state
    histogram.buckets = list(buckets)
    histogram.total = total


def _load_histograms(table: dict[str, LatencyHistogram], state: dict[str, _HistogramState]) -> None:
    for command, histogram_state in state.items():
        histogram = table.get(command)
        if histogram is None:
            histogram = table[command] = LatencyHistogram()
        _load_histogram(histogram, histogram_state)


__all__ = [
    "COVERAGE",
    "MARKER",
    "FrameDecoder",
    "Group",
    "RequestTuple",
    "WireError",
    "add_states",
    "apply_stats_state",
    "empty_state",
    "encode",
    "pack_request",
    "stats_state",
    "unpack_request",
]
