"""The shadow, assembled: sampler, Redis store, Memcached reader, dispatcher, examples, metrics.

This is the one place the shadow's pieces are wired together. The client path sees only
`capture` (sample this request?) and `observe` (these requests got their replies).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from proxy.memcache.request import Request
from proxy.redis.store import RedisStore
from proxy.shadow.control import ShadowControl
from proxy.shadow.dispatcher import DispatcherSettings, ShadowDispatcher
from proxy.shadow.examples import MismatchExamples
from proxy.shadow.mcreader import MemcachedReader, MemcachedUnavailable
from proxy.shadow.metrics import install_shadow_metrics
from proxy.shadow.sampler import KeySampler
from proxy.shadow.stats import ShadowStats

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.metrics import ProxyMetrics

log = logging.getLogger("memshadow.shadow")


class Shadow:
    """Everything needed to replay sampled keys on Redis and judge the answers."""

    def __init__(
        self, config: Config, metrics: ProxyMetrics, control: ShadowControl | None = None
    ) -> None:
        shadow = config.shadow
        if shadow.redis is None:
            raise ValueError("the shadow needs shadow.redis")
        self.config = config
        self.control = control or ShadowControl(shadow.sample_rate)
        self.stats = ShadowStats()
        requests = metrics.requests
        self.stats.client_requests_fn = lambda: sum(
            requests.count(command) for command, _, _ in requests.snapshot()
        )
        self.sampler = KeySampler(self.control)
        self.store = RedisStore.from_url(
            shadow.redis.to_url(),
            size=shadow.redis_connections,
            timeout=shadow.redis_timeout,
            max_inflight=max(64, shadow.max_inflight * 2),
        )
        self.reader = MemcachedReader(
            config.memcached.host, config.memcached.port, timeout=config.upstream_connect_timeout
        )
        self.examples = MismatchExamples(
            per_kind=shadow.examples_per_kind, reveal=shadow.reveal_examples
        )
        self.dispatcher = ShadowDispatcher(
            store=self.store,
            reader=self.reader,
            control=self.control,
            sampled=self.sampler.sampled,
            stats=self.stats,
            settings=DispatcherSettings(
                queue_size=shadow.queue_size,
                max_inflight=shadow.max_inflight,
                race_window=shadow.race_window,
                reread_delay=shadow.reread_delay,
                key_state_size=shadow.key_state_size,
                cas_map_size=shadow.cas_map_size,
                backfill=shadow.backfill,
                replay_flush_all=shadow.replay_flush_all,
            ),
            examples=self._record_example,
        )
        install_shadow_metrics(metrics.registry, self.stats, self.control)

    # The client path's two hooks.
    def capture(self, request: Request) -> bool:
        return self.sampler.decide(request)

    def observe(self, requests: list[Request], session: int) -> None:
        self.dispatcher.observe(requests, session)

    def _record_example(
        self,
        kind: str,
        command: str,
        key: bytes,
        memcached: dict[str, Any],
        redis: dict[str, Any],
        detail: str,
    ) -> None:
        self.examples.record(kind, command, key, memcached, redis, detail)

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
            chunk = settings.get("slab_chunk_max")
            if chunk is not None:
                self.store.slab_chunk_max = int(chunk)
        except (MemcachedUnavailable, ValueError) as exc:
            log.warning("shadow: cannot read memcached settings (%s); assuming 1 MiB items", exc)
        await self.dispatcher.start()

    async def stop(self, timeout: float = 2.0) -> None:
        await self.dispatcher.stop(timeout)
        await self.store.close()
        await self.reader.close()
