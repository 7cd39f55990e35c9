"""Is the upstream Memcached reachable? A periodic `version` probe, nudged by the proxy's own
connection successes and failures so /readyz reacts faster than the probe interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from proxy.config import HostPort

log = logging.getLogger("memshadow.health")

# After note_failure() asks for an early probe, wait at least this long after the previous
# probe, so a burst of failing client connections cannot turn into a burst of probes.
MIN_PROBE_GAP = 0.1
_MAX_REPLY = 1024


class UpstreamHealth:
    """Readiness of one Memcached server, kept current while start()ed."""

    def __init__(self, address: HostPort, *, interval: float = 1.0, timeout: float = 1.0) -> None:
        self.address = address
        self.interval = interval
        self.timeout = timeout
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
        """Send one `version` request; None if Memcached answered, else what went wrong.
        Does not change ready/reason (check() does)."""
        where = f"memcached at {self.address}"
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    self.address.host, self.address.port, limit=_MAX_REPLY
                )
                writer.write(b"version\r\n")
                line = await reader.readline()
        except TimeoutError:
            return f"{where} did not answer within {self.timeout:g}s"
        except ValueError:  # reply line longer than _MAX_REPLY
            return f"{where} sent an over-long reply to version"
        except OSError as exc:
            # asyncio's own message is "Connect call failed (host, port)"; the errno says why.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            return f"cannot connect to {where}: {why}"
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if not line:
            return f"{where} closed the connection without answering version"
        if not line.startswith(b"VERSION "):
            return f"{where} answered version with {line[:60]!r}"
        return None

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

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            gap = self._last_probe + MIN_PROBE_GAP - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            try:
                await self.check()
            except Exception:  # keep probing whatever happened; a dead prober means stale state
                log.exception("upstream health probe crashed")

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
