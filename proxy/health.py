"""Is the upstream Memcached reachable? Known from connects alone, so that Memcached counts
not one byte of it: the proxy's own connections to it, and one idle connection kept open.

Memcached closes every connection when it stops, and the kept one with them: that close is
noticed at once and a new connect tells whether it is back. While it is not, a connect is
tried every RETRY_INTERVAL. TCP keep-alive (the kernels' own packets, which Memcached never
sees) finds a Memcached host that vanished without a word. No request is ever sent, so a
Memcached that speaks only the binary protocol, or wants SASL first, is ready like any other.

What it leaves in Memcached's `stats`: the kept connection in `curr_connections` (+1), and
one in `total_connections` per connect (at start, after each restart of Memcached or close of
the idle connection by its `-o idle_timeout`, and after a failed client connect);
`bytes_read` and `bytes_written` nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Protocol, cast

from proxy.address import HostPort

log = logging.getLogger("memshadow.health")

# While Memcached is unreachable, a connect every RETRY_INTERVAL seconds: clients are refused
# for at most about this long after it is back. A refused connect costs ~0.1 ms of CPU, and
# Memcached sees none of them.
RETRY_INTERVAL = 0.1
# After note_failure() asks for an early connect, wait at least this long after the previous
# one, so a burst of failing client connections cannot turn into a burst of connects.
MIN_PROBE_GAP = 0.1
# TCP keep-alive on the kept connection: probes after KEEPALIVE_IDLE seconds of silence, one
# a second, KEEPALIVE_COUNT unanswered ones close it (a silent loss is seen in about 4 s).
KEEPALIVE_IDLE = 1
KEEPALIVE_COUNT = 3
# At its -c limit Memcached accepts a connection, says "ERROR Too many open connections" and
# closes it: it answers, so it stays ready, and the next connect waits, doubling from
# RETRY_INTERVAL up to MAX_BACKOFF (not a connection every RETRY_INTERVAL while it is full).
MAX_BACKOFF = 5.0

ReadyListener = Callable[[bool], None]


class MemcachedState(Protocol):
    """What the client path tells about, and learns from, the state of its Memcached."""

    @property
    def ready(self) -> bool: ...

    def add_listener(self, listener: ReadyListener) -> None: ...

    def note_success(self) -> None: ...

    def note_failure(self, reason: str = ...) -> None: ...


class _Kept(asyncio.Protocol):
    """The idle connection: reads nothing it expects, tells when it ends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()
        self.error: Exception | None = None
        self.refused = False  # Memcached said something: only ever its "too many" ERROR

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _keep_alive(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        self.refused = True  # "ERROR Too many open connections", then a close (its -c)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self.lost.set()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _keep_alive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # (the TCP_KEEP* names are Linux's)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


class UpstreamHealth:
    """Readiness of one Memcached server, kept current while start()ed; listeners hear every
    change (each listen socket of memshadow is closed while its Memcached is not ready)."""

    def __init__(
        self,
        address: HostPort,
        *,
        timeout: float = 1.0,
        retry: float = RETRY_INTERVAL,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retry = retry
        self._kept: _Kept | None = None
        self._ready = False
        self._reason = "not probed yet"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_probe = -MIN_PROBE_GAP
        self._logged: bool | None = None  # the state last logged, to log changes only
        self._listeners: list[ReadyListener] = []
        self._refusals = 0  # kept connections in a row that Memcached refused (its -c)
        self.connects = 0  # connections the probe opened (each one counts in Memcached)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reason(self) -> str:
        """Why memshadow is not ready; empty while it is."""
        return self._reason

    def add_listener(self, listener: ReadyListener) -> None:
        """Call `listener(ready)` at every change of readiness."""
        self._listeners.append(listener)

    def note_success(self) -> None:
        """The proxy just reached Memcached: ready now, without waiting for a probe."""
        self._set(None)

    def note_failure(self, reason: str = "a proxy connection to memcached failed") -> None:
        """The proxy could not reach Memcached: not ready now, and connect again soon to find
        out when it is back."""
        self._set(reason)
        self._wake.set()

    async def probe(self) -> str | None:
        """Connect to Memcached; None if it accepted (the connection is kept, in place of the
        one kept so far), else what went wrong. Does not change ready/reason (check() does)."""
        where = f"memcached at {self.address}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, kept = await loop.create_connection(
                    _Kept, self.address.host, self.address.port
                )
        except TimeoutError:
            return f"{where} did not accept a connection within {self.timeout:g}s"
        except socket.gaierror as exc:  # os.strerror() knows no resolver errors (-2...)
            return f"cannot resolve the host of {where}: {exc.strerror}"
        except OSError as exc:
            # asyncio's own message is "Connect call failed (host, port)"; the errno says why.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            return f"cannot connect to {where}: {why}"
        self.connects += 1
        self._drop()
        self._kept = kept
        return None

    def _drop(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.close()

    async def check(self) -> bool:
        """Connect now and update ready/reason; returns ready."""
        self._last_probe = time.monotonic()
        failure = await self.probe()
        if failure is not None:
            self._drop()
        self._set(failure)
        return self._ready

    async def start(self) -> None:
        """Connect once (so readiness is known when this returns), then watch."""
        if self._task is not None:
            return
        await self.check()
        self._task = asyncio.create_task(self._run(), name="memshadow-upstream-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop()

    async def _run(self) -> None:
        while True:
            kept = self._kept
            if kept is not None:
                await self._until_lost_or_woken(kept)
                if kept.lost.is_set() and kept is self._kept:
                    self._kept = None
                    log.debug("memcached at %s closed the idle connection: %s",
                              self.address, kept.error)  # fmt: skip
                    if kept.refused:
                        self._refusals += 1
                        await self._woken_within(min(self.retry * 2**self._refusals, MAX_BACKOFF))
                    else:  # stopped, restarted, or its idle_timeout: connect again at once
                        self._refusals = 0
            else:
                await self._woken_within(self.retry)
            self._wake.clear()
            gap = self._last_probe + MIN_PROBE_GAP - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            try:
                await self.check()
            except Exception:  # keep watching whatever happened; a dead watch means stale state
                log.exception("upstream health probe crashed")
                await asyncio.sleep(self.retry)

    async def _woken_within(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _until_lost_or_woken(self, kept: _Kept) -> None:
        lost = asyncio.ensure_future(kept.lost.wait())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({lost, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            woken.cancel()

    def _set(self, failure: str | None) -> None:
        ready = failure is None
        if ready != self._logged:
            self._logged = ready
            if ready:
                log.info("memcached at %s is reachable; ready", self.address)
            else:
                log.warning("not ready: %s", failure)
        changed = ready != self._ready
        self._ready = ready
        self._reason = failure or ""
        if changed:
            for listener in list(self._listeners):
                listener(ready)
