"""Is the upstream Memcached reachable? A periodic `version` probe, nudged by the proxy's own
connection successes and failures so /readyz reacts faster than the probe interval.

The probe leaves as little trace in Memcached as it can, so that `stats` and `watch
connevents` show what clients do: it keeps one connection open (no connection event per
probe), and sends nothing while client traffic proves Memcached alive (replies arriving).
While no client traffic flows, each probe adds one `version` exchange (9 bytes read, about
16 written) to memcached's byte counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from proxy.config import HostPort

log = logging.getLogger("memshadow.health")

# After note_failure() asks for an early probe, wait at least this long after the previous
# probe, so a burst of failing client connections cannot turn into a burst of probes.
MIN_PROBE_GAP = 0.1
_MAX_REPLY = 1024
_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class UpstreamHealth:
    """Readiness of one Memcached server, kept current while start()ed."""

    def __init__(
        self,
        address: HostPort,
        *,
        interval: float = 1.0,
        timeout: float = 1.0,
        activity: Callable[[], int] | None = None,
    ) -> None:
        self.address = address
        self.interval = interval
        self.timeout = timeout
        # A count that grows whenever Memcached answers a client (replies seen): while it
        # grows, Memcached is alive and the probe sends nothing.
        self.activity = activity
        self._seen_activity = -1
        self._conn: _Connection | None = None
        self._ready = False
        self._reason = "not probed yet"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_probe = -MIN_PROBE_GAP
        self._logged: bool | None = None  # the state last logged, to log changes only

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reason(self) -> str:
        """Why memshadow is not ready; empty while it is."""
        return self._reason

    def note_success(self) -> None:
        """The proxy just reached Memcached: ready now, without waiting for a probe."""
        self._set(None)

    def note_failure(self, reason: str = "a proxy connection to memcached failed") -> None:
        """The proxy could not reach Memcached: not ready now, and probe again soon to find
        out when it is back."""
        self._set(reason)
        self._wake.set()

    async def probe(self) -> str | None:
        """Send one `version` request on the kept connection (a new one if there is none, or
        if the kept one turns out closed); None if Memcached answered, else what went wrong.
        Does not change ready/reason (check() does)."""
        if self._conn is not None:
            failure, stale = await self._exchange(self._conn)
            if not stale:
                return failure
            # Closed since the last probe (Memcached restarted, or dropped an idle
            # connection): try again on a new one.
        where = f"memcached at {self.address}"
        try:
            async with asyncio.timeout(self.timeout):
                self._conn = await asyncio.open_connection(
                    self.address.host, self.address.port, limit=_MAX_REPLY
                )
        except TimeoutError:
            return f"{where} did not accept a connection within {self.timeout:g}s"
        except socket.gaierror as exc:  # os.strerror() knows no resolver errors (-2...)
            return f"cannot resolve the host of {where}: {exc.strerror}"
        except OSError as exc:
            # asyncio's own message is "Connect call failed (host, port)"; the errno says why.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            return f"cannot connect to {where}: {why}"
        failure, _ = await self._exchange(self._conn)
        return failure

    async def _exchange(self, conn: _Connection) -> tuple[str | None, bool]:
        """One version request on `conn`: (what went wrong or None, whether the connection
        was found closed, which a new one may not be). The connection is dropped on any
        failure: a late reply must never be read as the answer to the next probe."""
        reader, writer = conn
        where = f"memcached at {self.address}"
        stale = False
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(b"version\r\n")
                line = await reader.readline()
        except TimeoutError:
            failure = f"{where} did not answer within {self.timeout:g}s"
        except ValueError:  # reply line longer than _MAX_REPLY
            failure = f"{where} sent an over-long reply to version"
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            failure, stale = f"{where}: {why}", True
        else:
            if line.startswith(b"VERSION "):
                return None, False
            if line:
                failure = f"{where} answered version with {line[:60]!r}"
            else:
                failure, stale = f"{where} closed the connection without answering version", True
        self._drop_connection()
        return failure, stale

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()

    async def check(self) -> bool:
        """Probe now and update ready/reason; returns ready."""
        self._last_probe = time.monotonic()
        self._set(await self.probe())
        return self._ready

    async def start(self) -> None:
        """Probe once (so readiness is known when this returns), then every interval."""
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
        conn = self._conn
        self._drop_connection()
        if conn is not None:
            with contextlib.suppress(OSError):
                await conn[1].wait_closed()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._ready and self._traffic_seen():
                continue  # Memcached is answering clients: no need to ask it anything
            gap = self._last_probe + MIN_PROBE_GAP - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            try:
                await self.check()
            except Exception:  # keep probing whatever happened; a dead prober means stale state
                log.exception("upstream health probe crashed")

    def _traffic_seen(self) -> bool:
        """Did Memcached answer a client since the last look?"""
        if self.activity is None:
            return False
        seen, self._seen_activity = self._seen_activity, self.activity()
        return self._seen_activity != seen

    def _set(self, failure: str | None) -> None:
        ready = failure is None
        if ready != self._logged:
            self._logged = ready
            if ready:
                log.info("memcached at %s is reachable; ready", self.address)
            else:
                log.warning("not ready: %s", failure)
        self._ready = ready
        self._reason = failure or ""
