"""The shadow in worker processes (shadow.worker: process), seen from the proxy process.

The proxy process keeps what the client path and the operators touch: the sampler (capture),
the live control, the mismatch examples (with their secret) and a mirror of the shadow's
stats for /metrics and the ramp and halt rules. Everything else, the replay on Redis, the
comparisons and their per-key state, runs in `python -m proxy.shadow.engine.worker`, fed over a
Unix socket (wire.py) by the hand-off (handoff.py). The hand-off costs the client path one
tuple per sampled request and one write per event-loop iteration; the worker's CPU, garbage
collection and slow paths never stall client traffic, and it runs niced, so when CPU is
short the kernel serves clients first and the shadow drops (and counts) what it cannot keep
up with.

With `workers: N` there are N workers, each owning the keys of its shard (merge.shard_of),
and every proxy process feeds all of them (processes.py): the workers listen for the other
proxy processes on a private socket whose address and token only this process hands out.

A worker that dies is restarted with backoff; its successor starts with every key of its
shard cold, and its figures are added to the dead one's so counters never go back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from proxy import messages
from proxy.children import READY_TIMEOUT, ChildSlot
from proxy.memcache.request import Request
from proxy.redis.connection import ConnectionOptions
from proxy.redis.store import (
    RedisStore,
)
from proxy.shadow.control import ShadowControl
from proxy.shadow.coverage import CoverageAnnouncer, InFlight
from proxy.shadow.examples import MismatchExamples
from proxy.shadow.handoff import Handoff
from proxy.shadow.metrics import install_shadow_metrics
from proxy.shadow.sampler import KeySampler
from proxy.shadow.stats import ShadowStats, client_requests
from proxy.shadow.wire import add_states, apply_stats_state, empty_state
from proxy.shadow.words import DropReason, ErrorKind

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.metrics import ProxyMetrics

log = logging.getLogger("memshadow.shadow")

TICK_INTERVAL: Final = 0.05
"""How often the workers hear that they have everything observed so far (seconds)."""
MERGE_TICK_INTERVAL: Final = 0.01
"""The same with several proxy processes: a worker releases one proxy's requests only once
every proxy's horizon has passed them (merge.Merger), so an idle proxy's ticks pace them."""

FeedsChanged = Callable[[list[str | None]], None]
"""Told the workers' feed addresses (None: that worker is down) whenever one changes."""


class _Worker(ChildSlot):
    """One shard's worker process, as its supervisor sees it."""

    def __init__(self, owner: ShadowProcess, shard: int) -> None:
        super().__init__(
            "shadow worker", shard, "proxy.shadow.engine.worker", owner.stopping, log
        )
        self.owner = owner
        self.shard = shard
        self.state = empty_state()  # the live worker's last report
        self.base = empty_state()  # the figures of this shard's workers that exited
        self.exited_count = 0
        self.received = 0  # of the requests handed to the live worker, taken (last report)
        self.feed_address: str | None = None
        self.handlers = {
            "stats": self._stats,
            "example": owner.examples.record,
            "idle": partial(owner._idle_answered, shard),
            "ready": self._ready,
        }

    def totals(self) -> dict[str, Any]:
        return self.state if not self.exited_count else add_states(self.base, self.state)

    def launched(self) -> None:
        self.owner._launched(self)

    def gone(self) -> None:
        self.owner._worker_gone(self)
        self.owner.handoff.connect(self.shard, None)

    def start_failed(self) -> None:
        self.owner._count_exit()

    def exited(self, code: int | None) -> None:
        self.owner._count_exit()

    def _stats(self, state: dict[str, Any], received: int) -> None:
        self.state = state
        self.received = received
        self.owner._refresh_stats()

    def _ready(self, address: str | None = None) -> None:
        if address != self.feed_address:
            self.feed_address = address
            self.owner._feeds_changed()
        self.set_ready()


class ShadowProcess:
    """The shadow service whose replay runs in worker processes (one per shard)."""

    def __init__(
        self, config: Config, metrics: ProxyMetrics, control: ShadowControl | None = None
    ) -> None:
        shadow = config.shadow
        if shadow.redis is None:
            raise ValueError("the shadow needs shadow.redis")
        self.config = config
        self.control = control or ShadowControl(shadow.sample_rate)
        self.stats = ShadowStats()
        self.stats.client_requests_fn = client_requests(metrics)
        self.examples = MismatchExamples.for_config(config)
        self.sampler = KeySampler(self.control)
        self.shards = config.workers
        self.handoff = Handoff(self.shards, self.stats, self.sampler.sampled)
        self.coverage = CoverageAnnouncer(self.control, self.handoff.coverage)
        # The other proxy processes' feeds need the workers to listen for them.
        self.feed_token = secrets.token_hex(16) if self.shards > 1 else ""
        self.feeds_changed: FeedsChanged | None = None
        self.tick_interval = MERGE_TICK_INTERVAL if self.shards > 1 else TICK_INTERVAL
        self.handoff.linger = self.tick_interval  # (sparse sampling: one write per tick)
        # The proxy's own connection(s), one per primary, for the operators' Redis INFO; its
        # refused connects count with the workers' (a bad password shows before any replay).
        self._info_failures: Counter[str] = Counter()
        self._info = RedisStore.from_url(
            shadow.redis,
            ConnectionOptions(
                timeout=shadow.redis_timeout,
                connect_timeout=config.upstream_connect_timeout,
                failures=self._info_failures,
            ),
            size=1,
            cluster=shadow.redis_cluster,
        )
        self._config_blob = pickle.dumps(config)
        self._workers: list[_Worker] = []
        self._tick_handle: asyncio.TimerHandle | None = None
        # Drops and errors of this process (and of the other proxy processes' hand-offs).
        self._dropped: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._idle_token = 0
        self._idle_waiters: dict[tuple[int, int], asyncio.Future[None]] = {}
        self._stopping = False
        install_shadow_metrics(metrics.registry, self.stats, self.control)

    # -- the client path's two hooks (never wait) -----------------------------------------

    def capture(self, request: Request) -> bool:
        return self.sampler.decide(request)

    def observe(self, requests: list[Request], session: int) -> None:
        self.handoff.observe(requests, session)  # (a failure makes every key cold)

    def attach(self, in_flight: InFlight) -> None:
        """Where this process's client sessions keep their requests in flight."""
        self.coverage.attach(in_flight)

    def add_remote(self, shadowed: Mapping[str, int], dropped: Mapping[str, int]) -> None:
        """Another proxy process of `workers: N` handed these over or dropped them."""
        self.stats.shadowed.update(shadowed)
        self._dropped.update(dropped)
        self._refresh_stats()

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers; wait (up to READY_TIMEOUT) until they replay, or first exit."""
        loop = asyncio.get_running_loop()
        self._workers = [_Worker(self, shard) for shard in range(self.shards)]
        for worker in self._workers:
            worker.start()
        self._tick_handle = loop.call_later(self.tick_interval, self._tick)
        info = loop.create_task(self._info.start())
        readies = [worker.ready for worker in self._workers if worker.ready is not None]
        ready = asyncio.gather(*(asyncio.shield(r) for r in readies))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, READY_TIMEOUT)
        if not all(r.done() for r in readies):
            log.warning("shadow worker not ready after %gs; carrying on", READY_TIMEOUT)
            for r in readies:
                r.cancel()
        await info

    async def stop(self, timeout: float = 2.0) -> None:
        """Let the workers finish what they have (within `timeout`), then end them."""
        self.handoff.flush()
        closing = []
        for worker in self._workers:
            if (
                worker.transport is not None
                and worker.closed is not None
                and self.handoff.send(worker.shard, messages.stop(timeout))
            ):
                closing.append(asyncio.shield(worker.closed))
        self._stopping = True
        self.coverage.close()
        self.handoff.close()
        if closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*closing), timeout + 2.0)
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for worker in self._workers:
            await worker.stop()
        self._release_waiters()
        await self._info.close()

    async def idle(self) -> None:
        """Wait until the workers have judged everything handed to them (tests, shutdown)."""
        self.handoff.flush()
        self._idle_token += 1
        waiters = []
        for worker in self._workers:
            key = (worker.shard, self._idle_token)
            waiter = asyncio.get_running_loop().create_future()
            if self.handoff.send(worker.shard, messages.idle(self._idle_token)):
                self._idle_waiters[key] = waiter
                waiters.append(waiter)
        if waiters:
            await asyncio.gather(*waiters)

    def _tick(self) -> None:
        self.handoff.tick()
        self._tick_handle = asyncio.get_running_loop().call_later(self.tick_interval, self._tick)

    def redis_primaries(self) -> list[Callable[..., Awaitable[Any]]]:
        return [conn.execute for conn in self._info.pool.primaries()]

    @property
    def worker_pid(self) -> int | None:
        """The (first) worker's process id."""
        pids = self.worker_pids
        return pids[0] if pids else None

    @property
    def worker_pids(self) -> list[int | None]:
        return [worker.pid for worker in self._workers]

    @property
    def feed_addresses(self) -> list[str | None]:
        return [worker.feed_address for worker in self._workers]

    def stopping(self) -> bool:
        return self._stopping

    def _launched(self, worker: _Worker) -> None:
        # The worker starts cold and takes the live rate from here.
        worker.received = 0
        worker.send(
            messages.start_worker(
                self._config_blob,
                self.coverage.announced,
                self.config.shadow.worker_nice,
                worker.shard,
                self.shards,
                self.feed_token,
                time.perf_counter(),  # nothing observed before is handed to it
            )
        )
        self.handoff.connect(worker.shard, worker.transport)

    def _count_exit(self) -> None:
        self._errors[ErrorKind.WORKER_EXIT] += 1
        self._refresh_stats()

    def _worker_gone(self, worker: _Worker) -> None:
        """Keep the dead worker's figures, count what it took with it, release waiters."""
        # Handed over but not yet taken at its last report, plus what it still had queued
        # then: lost with it (requests it was replaying at that moment are not counted).
        lane = self.handoff.lanes[worker.shard]
        lost = max(0, lane.sent - worker.received) + worker.state["queue_depth"]
        if lost:
            self._dropped[DropReason.WORKER_DOWN] += lost
        worker.base = add_states(worker.base, worker.state)
        worker.state = empty_state()
        worker.exited_count += 1
        if worker.feed_address is not None:
            worker.feed_address = None
            self._feeds_changed()
        self._refresh_stats()
        for (shard, token), waiter in list(self._idle_waiters.items()):
            if shard == worker.shard:
                del self._idle_waiters[(shard, token)]
                if not waiter.done():
                    waiter.set_result(None)

    def _release_waiters(self) -> None:
        for waiter in self._idle_waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._idle_waiters.clear()

    def _idle_answered(self, shard: int, token: int) -> None:
        waiter = self._idle_waiters.pop((shard, token), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feeds_changed(self) -> None:
        if self.feeds_changed is not None:
            self.feeds_changed(self.feed_addresses)

    def _refresh_stats(self) -> None:
        if not self._workers:
            return
        states = [worker.totals() for worker in self._workers]
        total = states[0] if len(states) == 1 else _sum_states(states)
        queue = sum(worker.state["queue_depth"] for worker in self._workers)
        cas_pairs = sum(worker.state["cas_map_entries"] for worker in self._workers)
        self.handoff.worker_queue = queue
        apply_stats_state(
            self.stats,
            {**total, "queue_depth": queue, "cas_map_entries": cas_pairs},
            extra_dropped=self._dropped + self.handoff.dropped,
            extra_errors=self._errors,
            extra_connect_failures=self._info_failures,
            extra_queue=self.handoff.pending,
        )

def _sum_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    total = states[0]
    for state in states[1:]:
        total = add_states(total, state)
    return total


__all__ = ["ShadowProcess"]
