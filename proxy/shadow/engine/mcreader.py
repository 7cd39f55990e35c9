"""The shadow's own small connection to Memcached: re-reads, repairs' source, eviction stats.

Used off the client path only. `mg <key> v f t u` reads a value without bumping it in the
LRU; `stats` gives the eviction counters that tell evictions apart from real differences.
Requests are pipelined on one connection and fail fast when it is down.

Each new connection first asks `stats` who answers (pid, and start time = time - uptime): a
Memcached restarted since the last connection has lost every item, and `on_restart` says so
before any read on the new connection is answered (a restart always breaks the connection).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from proxy.errors import MemshadowError

REVIVE_INITIAL: Final = 0.05
REVIVE_MAX: Final = 2.0
"""Backoff (seconds) of the reader's reconnection after its connection was lost."""


class MemcachedUnavailable(MemshadowError):
    """The shadow's Memcached connection is down (its reads are skipped, never waited on)."""


@dataclass(frozen=True, slots=True)
class McItem:
    """A value read back from Memcached: flags, data, remaining TTL (-1: none) and its cas
    (0: not told)."""

    flags: int
    data: bytes
    ttl: int
    cas: int = 0


class _Reader(asyncio.Protocol):
    def __init__(self, owner: MemcachedReader) -> None:
        self.owner = owner
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.owner._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.owner._protocol is self:  # (not a connection already given up)
            self.owner._lost(exc)


class MemcachedReader:
    """A pipelined meta-protocol reader of Memcached with a reply timeout."""

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Reader | None = None
        self._waiting: deque[tuple[str, asyncio.Future[object]]] = deque()
        self._connecting: asyncio.Task[None] | None = None
        self._identity: tuple[str, int] | None = None  # (pid, start time) last seen
        self._closed = False
        self._revive: asyncio.Task[None] | None = None
        self.restarts = 0
        self.on_restart: Callable[[str], None] | None = None
        """Called with a description when a new connection finds another Memcached process
        than the last one did (restarted: every item lost)."""

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: _Reader(self), self.host, self.port), self.timeout
        )
        self._protocol = protocol
        # Not `connected` until Memcached has said who it is: no read goes out before.
        future = self._send(transport, b"stats\r\n", "stats")
        try:
            stats = await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except BaseException:
            transport.abort()
            self._reset(MemcachedUnavailable("no answer to stats on a new connection"))
            raise
        self._transport = transport
        self._note_identity(cast("dict[str, str]", stats))

    def _note_identity(self, stats: dict[str, str]) -> None:
        try:
            identity = (stats["pid"], int(stats["time"]) - int(stats["uptime"]))
        except (KeyError, ValueError):
            return  # (not a memcached that says; nothing to compare)
        before, self._identity = self._identity, identity
        # The start time is fixed for a process's life; a second of slack for other servers
        # that compute it from a ticking clock. A new pid is a new process (outside a
        # container: in one, memcached may be pid 1 every time, and the start time tells).
        if before is not None and (identity[0] != before[0] or abs(identity[1] - before[1]) > 1):
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart(
                    f"memcached {self.host}:{self.port} restarted (pid {before[0]} -> "
                    f"{identity[0]}, up {stats.get('uptime', '?')} s)"
                )

    async def _ensure(self) -> None:
        if self.connected:
            return
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        try:
            await asyncio.shield(self._connecting)
        except MemcachedUnavailable:
            raise
        except (OSError, TimeoutError) as exc:
            raise MemcachedUnavailable(f"memcached {self.host}:{self.port}: {exc}") from exc

    async def _call(self, line: bytes, kind: str) -> object:
        await self._ensure()
        assert self._transport is not None
        future = self._send(self._transport, line, kind)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError as exc:
            self._reset(MemcachedUnavailable("memcached reply timed out"))
            raise MemcachedUnavailable("memcached reply timed out") from exc

    def _send(self, transport: asyncio.Transport, line: bytes, kind: str) -> asyncio.Future[object]:
        """Write one request; its reply resolves the future (replies come in order)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiting.append((kind, future))
        transport.write(line)
        return future

    async def get(self, key: bytes) -> McItem | None:
        """The item as Memcached has it now, without touching its LRU position."""
        result = await self._call(b"mg " + key + b" v f t c u\r\n", "mg")
        return cast("McItem | None", result)

    async def stats(self, group: bytes = b"") -> dict[str, str]:
        """`stats` (or `stats settings`...) as a name -> value dict."""
        line = b"stats " + group + b"\r\n" if group else b"stats\r\n"
        return cast("dict[str, str]", await self._call(line, "stats"))

    async def close(self) -> None:
        self._closed = True
        if self._revive is not None:
            self._revive.cancel()
        self._reset(MemcachedUnavailable("closed"))

    def _reset(self, exc: Exception) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._transport = None
        self._protocol = None
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: nobody may be waiting any more

    def _lost(self, exc: Exception | None) -> None:
        self._reset(MemcachedUnavailable(f"connection lost: {exc}"))
        if not self._closed and (self._revive is None or self._revive.done()):
            # Connect again at once: a restart is then known (on_restart) as soon as the new
            # process answers, not at the next re-read.
            self._revive = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = REVIVE_INITIAL
        while not self._closed and not self.connected:
            try:
                await self._ensure()
            except MemcachedUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, REVIVE_MAX)

    def _parse(self) -> None:
        protocol = self._protocol
        assert protocol is not None
        buf = protocol.buffer
        while self._waiting:
            kind, _future = self._waiting[0]
            if kind == "stats":
                end = buf.find(b"END\r\n")
                if end < 0:
                    error = buf.find(b"\r\n")
                    if error >= 0 and buf.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER")):
                        del buf[: error + 2]
                        self._resolve(MemcachedUnavailable("stats refused"))
                        continue
                    return
                stats: dict[str, str] = {}
                for line in bytes(buf[:end]).split(b"\r\n"):
                    parts = line.split(b" ", 2)
                    if len(parts) == 3 and parts[0] == b"STAT":
                        stats[parts[1].decode()] = parts[2].decode(errors="replace")
                del buf[: end + 5]
                self._resolve(stats)
                continue
            nl = buf.find(b"\r\n")
            if nl < 0:
                return
            line = bytes(buf[:nl])
            if line.startswith(b"VA "):
                words = line.split(b" ")
                size = int(words[1])
                if len(buf) < nl + 2 + size + 2:
                    return
                data = bytes(buf[nl + 2 : nl + 2 + size])
                del buf[: nl + 2 + size + 2]
                flags, ttl, cas = 0, -1, 0
                for word in words[2:]:
                    if word[:1] == b"f":
                        flags = int(word[1:])
                    elif word[:1] == b"t":
                        ttl = int(word[1:])
                    elif word[:1] == b"c":
                        cas = int(word[1:])
                self._resolve(McItem(flags, data, ttl, cas))
            elif line == b"EN":
                del buf[: nl + 2]
                self._resolve(None)
            else:
                del buf[: nl + 2]
                self._resolve(MemcachedUnavailable(f"unexpected reply {line[:80]!r}"))

    def _resolve(self, value: object) -> None:
        _, future = self._waiting.popleft()
        if future.done():
            return
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)
