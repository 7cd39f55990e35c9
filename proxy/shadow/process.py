"""The shadow in a worker process (shadow.worker: process), seen from the proxy process.

The proxy process keeps what the client path and the operators touch: the sampler (capture),
the live control, the mismatch examples (with their secret) and a mirror of the shadow's
stats for /metrics and the ramp and halt rules. Everything else, the replay on Redis, the
comparisons and their per-key state, runs in `python -m proxy.shadow.worker`, fed over a
Unix socket (wire.py). The hand-off costs the client path one tuple per sampled request and
one write per event-loop iteration; the worker's CPU, garbage collection and slow paths
never stall client traffic, and it runs niced, so when CPU is short the kernel serves
clients first and the shadow drops (and counts) what it cannot keep up with.

The proxy never waits for the worker: past PIPE_BUFFER_LIMIT bytes not yet taken by it,
batches are dropped (reason queue_full); while it is down or restarting they are dropped
with reason worker_down. A worker that dies is restarted with backoff; its successor starts
with every key cold, and its figures are added to the dead one's so counters never go back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from proxy.memcache.request import Request
from proxy.redis.store import RedisStore
from proxy.shadow.control import ControlChange, ShadowControl
from proxy.shadow.examples import MismatchExamples
from proxy.shadow.metrics import install_shadow_metrics
from proxy.shadow.sampler import KeySampler
from proxy.shadow.stats import ShadowStats, client_requests
from proxy.shadow.wire import (
    FrameDecoder,
    RequestTuple,
    WireError,
    add_states,
    apply_stats_state,
    empty_state,
    encode,
    pack_request,
)

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.metrics import ProxyMetrics

log = logging.getLogger("memshadow.shadow")

PIPE_BUFFER_LIMIT: Final = 8 * 1024 * 1024
"""Bytes handed to the worker but not taken by it yet (on top of the kernel's socket buffer),
plus the batch being built, past which new requests are dropped (queue_full) instead: about
40,000 small requests. A single request bigger than this is never handed over."""
FRAME_BYTES: Final = 1024 * 1024
"""A batch is written as soon as it holds this much, without waiting for the loop iteration
to end, so no frame is much bigger (the worker refuses frames over wire.MAX_FRAME)."""
LOST_KEYS_LIMIT: Final = 10_000
"""Keys of dropped requests remembered until the worker can be told; past it every key is
made cold instead (one message, whatever was dropped)."""
READY_TIMEOUT: Final = 10.0
TICK_INTERVAL: Final = 0.05
"""How often the worker hears that it has everything observed so far (seconds)."""

HEARTBEAT_TIMEOUT: Final = 10.0
"""A worker silent this long (it reports every STATS_INTERVAL) is stuck: it is killed and
restarted."""
BACKOFF_INITIAL: Final = 0.5
BACKOFF_MAX: Final = 10.0
STABLE_AFTER: Final = 30.0  # a worker that lived this long restarts with the initial backoff
ITEM_OVERHEAD: Final = 64  # bytes a request tuple takes in a frame beyond its line, data, reply

Group = tuple[int, float, list[RequestTuple]]


class _WorkerLink(asyncio.Protocol):
    """The proxy's end of the socket: decodes the worker's messages."""

    def __init__(self, owner: ShadowProcess) -> None:
        self.owner = owner
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except WireError as exc:
            log.error("shadow worker: %s; restarting it", exc)
            assert self.transport is not None
            self.transport.abort()
            return
        for message in messages:
            self.owner._received(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class ShadowProcess:
    """The shadow service whose replay runs in a worker process."""

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
        # One connection of the proxy's own for the operators' Redis INFO.
        # The proxy's own connection(s), one per primary, for the operators' Redis INFO.
        self._info = RedisStore.from_url(
            shadow.redis,
            size=1,
            timeout=shadow.redis_timeout,
            cluster=shadow.redis_cluster,
            connect_timeout=config.upstream_connect_timeout,
        )
        self._config_blob = pickle.dumps(config)
        self._batch: list[Group] = []
        self._batch_items = 0
        self._batch_bytes = 0
        self._sent = 0  # requests handed to the current worker
        self._received_by_worker = 0  # of those, taken by it (at its last report)
        self._last_heard = time.monotonic()
        self._flush_handle: asyncio.Handle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._link: _WorkerLink | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._lost: set[bytes] = set()
        self._lost_overflow = False
        # Figures of workers that exited, and the proxy process's own drops and errors.
        self._base_state = empty_state()
        self._state = empty_state()
        self._dropped: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._idle_token = 0
        self._idle_waiters: dict[int, asyncio.Future[None]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._exited = 0  # workers that ended; their figures are in _base_state
        self.control.add_listener(self._control_changed)
        install_shadow_metrics(metrics.registry, self.stats, self.control)

    # -- the client path's two hooks (never wait) -----------------------------------------

    def capture(self, request: Request) -> bool:
        return self.sampler.decide(request)

    def observe(self, requests: list[Request], session: int) -> None:
        shadowed = self.stats.shadowed
        transport = self._writer()
        if transport is None or self._stopping:
            for request in requests:
                if request.capture:
                    shadowed[request.command] += 1
                    self._drop("worker_down", request)
            return
        room = PIPE_BUFFER_LIMIT - transport.get_write_buffer_size() - self._batch_bytes
        items: list[RequestTuple] = []
        for request in requests:
            if not request.capture:
                continue
            shadowed[request.command] += 1
            size = ITEM_OVERHEAD + len(request.line) + len(request.response or b"")
            if request.data is not None:
                size += len(request.data)
            if size > room:
                self._drop("queue_full", request)
                continue
            room -= size
            self._batch_bytes += size
            items.append(pack_request(request))
        if not items:
            return
        self._batch.append((session, time.perf_counter(), items))
        self._batch_items += len(items)
        self.stats.queue_depth = self._state["queue_depth"] + self._batch_items
        if self._batch_bytes >= FRAME_BYTES:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Once per loop iteration (or per FRAME_BYTES): hand the batch to the worker."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batch_bytes = 0
        items = self._batch_items
        self._batch_items = 0
        transport = self._writer()
        if transport is None:
            self._dropped["worker_down"] += items
            self.stats.dropped["worker_down"] += items
            return
        if self._lost_overflow:
            transport.writelines(encode(("epoch",)))
        elif self._lost:
            transport.writelines(encode(("lost", list(self._lost))))
        self._lost.clear()
        self._lost_overflow = False
        transport.writelines(encode(("batch", batch, time.perf_counter())))
        self._sent += items

    def _tick(self) -> None:
        """Tell the worker, every TICK_INTERVAL, that it has everything observed until now:
        a verdict that needs ordered evidence waits for that (Scheduler.caught_up)."""
        self._flush()
        transport = self._writer()
        if transport is not None and not self._stopping:
            transport.writelines(encode(("tick", time.perf_counter())))
        self._tick_handle = asyncio.get_running_loop().call_later(TICK_INTERVAL, self._tick)

    def _drop(self, reason: str, request: Request) -> None:
        self._dropped[reason] += 1
        self.stats.dropped[reason] += 1
        if reason == "worker_down" or self._lost_overflow:
            return  # (a new worker starts with every key cold anyway)
        self._lost.update(request.keys)
        if len(self._lost) > LOST_KEYS_LIMIT:
            self._lost.clear()
            self._lost_overflow = True

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker; wait (up to READY_TIMEOUT) until it replays, or its first exit."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._supervisor = loop.create_task(self._supervise(), name="shadow-worker")
        self._tick_handle = loop.call_later(TICK_INTERVAL, self._tick)
        info = loop.create_task(self._info.start())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        if not self._ready.done():
            log.warning("shadow worker not ready after %gs; carrying on", READY_TIMEOUT)
            self._ready.cancel()
        await info

    async def stop(self, timeout: float = 2.0) -> None:
        """Let the worker finish what it has (within `timeout`), then end it."""
        link = self._link
        transport = self._writer()
        if link is not None and transport is not None:
            self._flush()
            self._stopping = True
            transport.writelines(encode(("stop", timeout)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.closed), timeout + 2.0)
        self._stopping = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._end_process()
        self._release_waiters()
        await self._info.close()

    async def idle(self) -> None:
        """Wait until the worker has judged everything handed to it (tests, shutdown)."""
        transport = self._writer()
        if transport is None:
            return
        self._flush()
        self._idle_token += 1
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters[self._idle_token] = waiter
        transport.writelines(encode(("idle", self._idle_token)))
        await waiter

    def _writer(self) -> asyncio.Transport | None:
        """The socket to the current worker, if one is up and the socket still open."""
        link = self._link
        transport = link.transport if link is not None else None
        return None if transport is None or transport.is_closing() else transport

    def redis_primaries(self) -> list[Callable[..., Awaitable[Any]]]:
        return [conn.execute for conn in self._info.pool.primaries()]

    @property
    def worker_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _supervise(self) -> None:
        backoff = BACKOFF_INITIAL
        while not self._stopping:
            started = time.monotonic()
            try:
                link = await self._spawn()
            except Exception as exc:  # whatever it is, try again later
                log.error("cannot start the shadow worker: %s", exc)
                self._errors["worker_exit"] += 1
                self._refresh_stats()
                await self._end_process()
            else:
                await self._watch(link)
                self._link = None
                self._worker_gone()
                if self._stopping:
                    return
                code = await self._end_process()
                self._errors["worker_exit"] += 1
                self._refresh_stats()
                if time.monotonic() - started >= STABLE_AFTER:
                    backoff = BACKOFF_INITIAL
                log.error(
                    "shadow worker exited (status %s); restarting it in %.1fs", code, backoff
                )
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)  # start() waits no longer for a failing worker
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _watch(self, link: _WorkerLink) -> None:
        """Until the worker's socket closes; kill the worker if it stops reporting."""
        while not link.closed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.closed), 1.0)
            silent = time.monotonic() - self._last_heard
            if not link.closed.done() and silent > HEARTBEAT_TIMEOUT and not self._stopping:
                log.error("shadow worker silent for %.0fs; killing it", silent)
                if self._process is not None:
                    self._process.kill()
                if link.transport is not None:
                    link.transport.abort()
                await link.closed

    async def _spawn(self) -> _WorkerLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # -P: never import from the working directory. Its own process group: a Ctrl-C
            # or a group SIGTERM is for the proxy, which drains clients, then stops it.
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-m", "proxy.shadow.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                close_fds=True,
                env=_worker_environment(),
                process_group=0,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        link = _WorkerLink(self)
        try:
            ours.setblocking(False)
            await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=ours)
        except BaseException:
            ours.close()
            self._process.kill()
            raise
        assert link.transport is not None
        # The worker starts cold and takes the live rate from here.
        self._lost.clear()
        self._lost_overflow = False
        self._sent = 0
        self._received_by_worker = 0
        self._last_heard = time.monotonic()
        link.transport.writelines(
            encode(
                (
                    "start",
                    self._config_blob,
                    self.control.sample_rate,
                    self.control.enabled,
                    self.config.shadow.worker_nice,
                )
            )
        )
        self._link = link
        return link

    def _worker_gone(self) -> None:
        """Keep the dead worker's figures, count what it took with it, release waiters."""
        # Handed over but not yet taken at its last report, plus what it still had queued
        # then: lost with it (requests it was replaying at that moment are not counted).
        lost = max(0, self._sent - self._received_by_worker) + self._state["queue_depth"]
        if lost:
            self._dropped["worker_down"] += lost
        self._base_state = add_states(self._base_state, self._state)
        self._state = empty_state()
        self._exited += 1
        self._refresh_stats()
        self._release_waiters()

    def _release_waiters(self) -> None:
        for waiter in self._idle_waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._idle_waiters.clear()

    async def _end_process(self) -> int | None:
        process = self._process
        if process is None:
            return None
        self._process = None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, process.wait, 2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            return await loop.run_in_executor(None, process.wait)
        except asyncio.CancelledError:
            process.kill()
            raise

    # -- messages from the worker ---------------------------------------------------------

    def _received(self, message: tuple[Any, ...]) -> None:
        self._last_heard = time.monotonic()
        kind = message[0]
        if kind == "stats":
            self._state = message[1]
            self._received_by_worker = message[2]
            self._refresh_stats()
        elif kind == "example":
            _, example_kind, command, key, memcached, redis, detail, story = message
            self.examples.record(example_kind, command, key, memcached, redis, detail, story)
        elif kind == "idle":
            waiter = self._idle_waiters.pop(message[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        else:
            log.warning("shadow worker: unknown message %r", kind)

    def _refresh_stats(self) -> None:
        state = self._state if not self._exited else add_states(self._base_state, self._state)
        apply_stats_state(
            self.stats,
            state,
            extra_dropped=self._dropped,
            extra_errors=self._errors,
            extra_queue=self._batch_items,
        )

    def _control_changed(self, change: ControlChange) -> None:
        transport = self._writer()
        if transport is not None:
            transport.writelines(
                encode(("rate", self.control.sample_rate, self.control.enabled))
            )


def _worker_environment() -> dict[str, str]:
    """The proxy's environment, with this very package importable (a source checkout run
    from another directory, a test runner's sys.path). An installed package is found by the
    interpreter anyway, and putting site-packages on PYTHONPATH would put it before the
    standard library."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    if root.name not in ("site-packages", "dist-packages"):
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(root) if not path else os.pathsep.join((str(root), path))
    return env


__all__ = ["PIPE_BUFFER_LIMIT", "ShadowProcess"]
