"""The shadow, assembled: sampler, Redis store, Memcached reader, dispatcher, examples, metrics.

This is the one place the shadow's pieces are wired together. The client path sees only
`capture` (sample this request?) and `observe` (these requests got their replies). The replay
itself (ShadowEngine) runs either on the proxy's own event loop (`Shadow`, shadow.worker:
inline) or in a worker process (`ShadowProcess` in process.py, shadow.worker: process).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from proxy.memcache.request import Request
from proxy.redis.connection import ConnectionOptions, RedisConnection
from proxy.redis.resp import parse_info
from proxy.redis.store import (
    RedisStore,
)
from proxy.shadow.control import ShadowControl
from proxy.shadow.coverage import CoverageAnnouncer, InFlight
from proxy.shadow.engine.dispatcher import DispatcherSettings, ShadowDispatcher
from proxy.shadow.engine.evictions import EvictionWatch
from proxy.shadow.engine.mcreader import MemcachedReader, MemcachedUnavailable
from proxy.shadow.engine.verdict import ExampleSink
from proxy.shadow.examples import MismatchExamples
from proxy.shadow.metrics import install_shadow_metrics
from proxy.shadow.process import ShadowProcess
from proxy.shadow.sampler import KeySampler
from proxy.shadow.shards import shard_of
from proxy.shadow.stats import ShadowStats, client_requests

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.metrics import ProxyMetrics

log = logging.getLogger("memshadow.shadow")


class ShadowEngine:
    """Replays observed requests on Redis and judges them: store, reader and dispatcher."""

    def __init__(
        self,
        config: Config,
        stats: ShadowStats,
        coverage: int,
        examples: ExampleSink | None,
        ticked: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """coverage: the sample every request of which it is handed at the start (a sampler
        threshold; the hand-off moves it). shard: (this engine's shard, shards): with
        several, it judges only the keys of its own (merge.shard_of) and ignores the rest
        of a multi-key request."""
        shadow = config.shadow
        if shadow.redis is None:
            raise ValueError("the shadow needs shadow.redis")
        self.config = config
        self.stats = stats
        options = ConnectionOptions(
            timeout=shadow.redis_timeout,
            connect_timeout=config.upstream_connect_timeout,
            max_inflight=max(64, shadow.max_inflight * 2),
            service_time=stats.redis_service.observe,
            failures=stats.connect_failures,
        )
        self.store = RedisStore.from_url(
            shadow.redis,
            options,
            size=shadow.redis_connections,
            cluster=shadow.redis_cluster,
            failover_window=shadow.redis_failover_window,
        )
        self.readers = [
            MemcachedReader(
                b.memcached.host, b.memcached.port, timeout=config.upstream_connect_timeout
            )
            for b in config.backends
        ]
        self.reader = self.readers[0]  # whose `stats settings` stand for every Memcached's
        store = self.store
        self.evictions = EvictionWatch(
            self.readers,
            lambda: [(conn.url, _evicted_keys(conn)) for conn in store.pool.primaries()],
            key_prefix=store.key_prefix,
            connect_timeout=config.upstream_connect_timeout,
        )
        self.dispatcher = ShadowDispatcher(
            store=self.store,
            reader=self.readers,
            coverage=coverage,
            owned=_owned(*shard),
            evictions=self.evictions,
            stats=stats,
            settings=DispatcherSettings(
                queue_size=shadow.queue_size,
                max_inflight=shadow.max_inflight,
                race_window=shadow.race_window,
                reread_delay=shadow.reread_delay,
                key_state_size=shadow.key_state_size,
                cas_map_size=shadow.cas_map_size,
                backfill=shadow.backfill,
                verify_writes=shadow.verify_writes,
                replay_flush_all=shadow.replay_flush_all,
                batch_window=shadow.batch_window,
                batch_size=shadow.batch_size,
            ),
            examples=examples,
            ticked=ticked,
        )

    async def start(self) -> None:
        """Connect to Redis (a failure is not fatal: the pool keeps retrying) and start."""
        if not await self.store.start():
            log.warning(
                "shadow: Redis %s not reachable yet; retrying in the background",
                self.config.shadow.redis,
            )
        try:
            settings = await self.reader.stats(b"settings")
            self.store.item_size_max = int(settings.get("item_size_max", self.store.item_size_max))
            self.dispatcher.scheduler.item_size_max = self.store.item_size_max
            chunk = settings.get("slab_chunk_max")
            if chunk is not None:
                self.store.slab_chunk_max = int(chunk)
        except (MemcachedUnavailable, ValueError) as exc:
            log.warning("shadow: cannot read memcached settings (%s); assuming 1 MiB items", exc)
        await self.dispatcher.start()

    async def stop(self, timeout: float = 2.0) -> None:
        await self.dispatcher.stop(timeout)
        await self.store.close()
        for reader in self.readers:
            await reader.close()


def _owned(shard: int, shards: int) -> Callable[[bytes], bool] | None:
    """Which keys an engine judges: its shard's (None: every key, with one shard)."""
    if shards == 1:
        return None
    return lambda key: shard_of(key, shards) == shard


def _evicted_keys(conn: RedisConnection) -> Callable[[], Awaitable[int]]:
    """A Redis primary's INFO stats evicted_keys."""

    async def count() -> int:
        return int(parse_info(await conn.execute(b"INFO", b"stats")).get("evicted_keys", "0"))

    return count


class ShadowService(Protocol):
    """What the rest of the proxy uses of a shadow, inline or in a worker process."""

    control: ShadowControl
    stats: ShadowStats
    examples: MismatchExamples

    def capture(self, request: Request) -> bool: ...

    def observe(self, requests: list[Request], session: int) -> None: ...

    def attach(self, in_flight: InFlight) -> None:
        """Where this process's client sessions keep their requests in flight (coverage)."""
        ...

    async def start(self) -> None: ...

    async def stop(self, timeout: float = 2.0) -> None: ...

    async def idle(self) -> None: ...

    def redis_primaries(self) -> list[Callable[..., Awaitable[Any]]]:
        """One connection's execute(*args) to each Redis primary (the operators' INFO)."""
        ...


class Shadow:
    """The shadow on the proxy's own event loop (shadow.worker: inline)."""

    def __init__(
        self, config: Config, metrics: ProxyMetrics, control: ShadowControl | None = None
    ) -> None:
        self.config = config
        self.control = control or ShadowControl(config.shadow.sample_rate)
        self.stats = ShadowStats()
        self.stats.client_requests_fn = client_requests(metrics)
        self.examples = MismatchExamples.for_config(config)
        self.sampler = KeySampler(self.control)
        self.engine = ShadowEngine(
            config, self.stats, self.control.threshold, self._record_example
        )
        self.store = self.engine.store
        self.reader = self.engine.reader
        self.dispatcher = self.engine.dispatcher
        self.coverage = CoverageAnnouncer(
            self.control, lambda threshold, since: self.dispatcher.coverage(0, threshold, since)
        )
        install_shadow_metrics(metrics.registry, self.stats, self.control)

    def attach(self, in_flight: InFlight) -> None:
        """Where this process's client sessions keep their requests in flight."""
        self.coverage.attach(in_flight)

    # The client path's two hooks.
    def capture(self, request: Request) -> bool:
        return self.sampler.decide(request)

    def observe(self, requests: list[Request], session: int) -> None:
        try:
            self.dispatcher.observe([r.captured() for r in requests if r.capture], session)
        except Exception:
            # A bug: which of these requests were queued is unknown, so no key can be
            # trusted to be in step any more. The client path counts and logs it.
            self.dispatcher.forget_all()
            raise

    def _record_example(
        self,
        kind: str,
        command: str,
        key: bytes,
        memcached: dict[str, Any],
        redis: dict[str, Any],
        detail: str,
        story: dict[str, Any],
    ) -> None:
        self.examples.record(kind, command, key, memcached, redis, detail, story)

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self, timeout: float = 2.0) -> None:
        self.coverage.close()
        await self.engine.stop(timeout)

    async def idle(self) -> None:
        """Wait until everything handed over has been judged (tests, shutdown)."""
        await self.dispatcher.idle()

    def redis_primaries(self) -> list[Callable[..., Awaitable[Any]]]:
        # The store's pool changes once `auto` has decided: asked each time.
        return [conn.execute for conn in self.store.pool.primaries()]


def build_shadow(config: Config, metrics: ProxyMetrics) -> ShadowService:
    """The shadow the config asks for: in a worker process (default) or inline."""
    if config.shadow.worker == "process":
        return ShadowProcess(config, metrics)
    return Shadow(config, metrics)
