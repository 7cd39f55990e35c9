"""The messages memshadow's processes send each other, defined once: each kind's name, a
constructor per kind (its fields, typed), and the kinds each side's handler table holds
(children.deliver calls the handler). The frames they travel in are wire.py's.

A message is a plain tuple whose first item is its kind's name, and whose fields are plain
data: marshal (wire.py) refuses tuple and str subclasses (NamedTuple, StrEnum members).

The first proxy process <-> an extra proxy process of `workers: N` (processes.py), on the
extra's control socket:

first -> extra
    ("start", config_pickle, index, fds, rate, enabled, feeds, token, accepting)
                                        first frame: the Config (pickled: only ever from the
                                        process that started it, over a private socketpair),
                                        its number, its listen sockets' descriptors, the live
                                        sample rate and switch, the shadow workers' feed
                                        addresses and token, which listeners accept clients
    ("rate", rate, enabled)             the live sample rate and switch changed
    ("accept", listener, ready, acknowledged)
                                        a listener's Memcached is (not) ready; acknowledged:
                                        the last of the extra's failure reports it had seen
    ("feeds", addresses)                the shadow workers' feed addresses (None: down)
    ("stop", timeout)                   drain clients within timeout and exit
extra -> first
    ("ready",)                          serving clients
    ("figures", figures)                every REPORT_INTERVAL (its heartbeat) and last
    ("memcached_failed", listener, report, reason)
                                        a client could not reach that listener's Memcached:
                                        the extra closed its listener (report: numbered from 1)

A proxy process <-> a shadow worker (shadow/process.py, shadow/engine/worker.py):

proxy -> worker (the first process, on the worker's socket)
    ("start", config_pickle, coverage, nice, shard, shards, token, since)
                                        first frame: the Config to run with; the sample the
                                        proxy hands over every request of (a sampler
                                        threshold, coverage.py); which shard of how many it
                                        judges; the token other proxy processes' feeds must
                                        show; the time from which on the proxy hands it what
                                        it observes
    ("batch", groups, sent_at)          observed requests; groups of (session, replied_at,
                                        [request tuple, ...]), see wire.pack_request, and, in
                                        their place, drop markers (-1, at, keys or None:
                                        every key) and changes of the sample (-2, at,
                                        (threshold, since)); sent_at: everything observed
                                        before it is in this frame or an earlier one
    ("tick", now)                       every TICK_INTERVAL: nothing observed before `now`
                                        is still to come (ordered evidence waits for it)
    ("epoch", at)                       what was handed over before `at` may not have
                                        reached the worker: every key is cold again
    ("flush", sent, replied, words)     a flush_all handed over before this socket (its
                                        delay may still be running: flush_seen)
    ("idle", token)                     answer ("idle", token) once everything is judged
    ("stop", timeout)                   finish (within timeout) and exit
another proxy process -> worker (workers: N; on the worker's feed socket)
    ("hello", token, since, coverage)   first; then batch, tick, epoch and flush as above,
    ("bye",)                            and last: the stream ended with nothing lost
worker -> proxy
    ("stats", state, received)          its heartbeat: ShadowStats as plain data (see
                                        wire.stats_state), and how many requests it has
                                        taken from batches so far
    ("example", kind, command, key, memcached, redis, detail, story)   one mismatch example
    ("idle", token)
    ("ready", feed_address)             replaying (Redis and Memcached contacted or
                                        retrying); where other proxy processes feed it
                                        (None with one shard)

The hand-off (handoff.py, compiled, on the client path) builds its batch, tick, epoch, flush
and bye tuples inline; they are the ones listed here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

Message = tuple[Any, ...]
Handler = Callable[..., object]
"""Called with a message's fields, in order (its kind's name left out)."""
Handlers = Mapping[str, Handler]


# -- the first proxy process and an extra proxy process (processes.py) ----------------------

TO_EXTRA: Final = frozenset({"start", "rate", "accept", "feeds", "stop"})
FROM_EXTRA: Final = frozenset({"ready", "figures", "memcached_failed"})


def start_extra(
    config_blob: bytes,
    index: int,
    fds: list[int],
    rate: float,
    enabled: bool,
    feeds: list[str | None],
    token: str,
    accepting: list[bool],
) -> Message:
    return ("start", config_blob, index, fds, rate, enabled, feeds, token, accepting)


def rate(sample_rate: float, enabled: bool) -> Message:
    return ("rate", sample_rate, enabled)


def accept(listener: int, ready: bool, acknowledged: int) -> Message:
    return ("accept", listener, ready, acknowledged)


def feeds(addresses: list[str | None]) -> Message:
    return ("feeds", addresses)


def stop(timeout: float) -> Message:
    """To an extra proxy process or a shadow worker: finish within `timeout` and exit."""
    return ("stop", timeout)


def extra_ready() -> Message:
    return ("ready",)


def figures(figures: dict[str, Any]) -> Message:
    return ("figures", figures)


def memcached_failed(listener: int, report: int, reason: str) -> Message:
    return ("memcached_failed", listener, report, reason)


# -- a proxy process and a shadow worker (shadow/process.py, shadow/engine/worker.py) --------

TO_WORKER: Final = frozenset({"start", "batch", "tick", "epoch", "flush", "idle", "stop"})
ON_FEED: Final = frozenset({"batch", "tick", "epoch", "flush"})
"""What a feed carries between its hello and its bye."""
FROM_WORKER: Final = frozenset({"stats", "example", "idle", "ready"})


def start_worker(
    config_blob: bytes,
    coverage: int,
    nice: int,
    shard: int,
    shards: int,
    token: str,
    since: float,
) -> Message:
    return ("start", config_blob, coverage, nice, shard, shards, token, since)


def idle(token: int) -> Message:
    """Asked of a shadow worker, and its answer once everything is judged."""
    return ("idle", token)


def epoch(at: float) -> Message:
    return ("epoch", at)


def hello(token: str, since: float, coverage: int) -> Message:
    return ("hello", token, since, coverage)


def stats(state: dict[str, Any], received: int) -> Message:
    return ("stats", state, received)


def example(
    kind: str,
    command: str,
    key: bytes,
    memcached: dict[str, Any],
    redis: dict[str, Any],
    detail: str,
    story: dict[str, Any],
) -> Message:
    return ("example", kind, command, key, memcached, redis, detail, story)


def worker_ready(feed_address: str | None) -> Message:
    return ("ready", feed_address)


__all__ = [
    "FROM_EXTRA",
    "FROM_WORKER",
    "ON_FEED",
    "TO_EXTRA",
    "TO_WORKER",
    "Handler",
    "Handlers",
    "Message",
    "accept",
    "epoch",
    "example",
    "extra_ready",
    "feeds",
    "figures",
    "hello",
    "idle",
    "memcached_failed",
    "rate",
    "start_extra",
    "start_worker",
    "stats",
    "stop",
    "worker_ready",
]
