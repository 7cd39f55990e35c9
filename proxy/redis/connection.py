"""A Redis connection kept up by a background task: it reconnects with backoff, runs the
handshake (AUTH, SELECT, the primary check, the Functions library) and reloads a library the
server lost; its options (ConnectionOptions) are built once and shared by every connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, final

from proxy.redis.errors import (
    NotPrimary,
    RedisBusy,
    RedisError,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
)
from proxy.redis.protocol import Refusals, ReplyCallback, RespProtocol, deliver
from proxy.redis.resp import ASKING, Arg, Reply, arg_bytes, encode_command, parse_info
from proxy.redis.url import RedisURL, parse_url
from proxy.shadow.words import ConnectFailure

log = logging.getLogger(__name__)

OUTAGE_SUMMARY_INTERVAL: Final = 60.0
"""While a Redis stays unreachable, one summary line per this many seconds (every connection
of a pool retries on its own, a few times a second in all: one line per attempt would flood
the log for as long as the outage lasts)."""


class _Outage:
    """The connect failures to one Redis, whichever connection of a pool made them: logged
    when they start, summarised every `interval` seconds, and once when a connection
    succeeds again."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.since: float | None = None
        self.attempts = 0
        self.logged_at = 0.0

    def failed(self, error: str, interval: float) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.since is None:
            self.since = self.logged_at = now
            log.warning(
                "%s: connect failed: %s (retrying; a summary every %gs while it lasts)",
                self.where,
                error,
                interval,
            )
        elif now - self.logged_at >= interval:
            self.logged_at = now
            log.warning(
                "%s: unreachable for %.0f s, %d connect attempts; last error: %s",
                self.where,
                now - self.since,
                self.attempts,
                error,
            )

    def recovered(self) -> None:
        if self.since is not None:
            log.info(
                "%s: connected again after %.0f s unreachable (%d failed connect attempts)",
                self.where,
                time.monotonic() - self.since,
                self.attempts,
            )
            self.since = None
            self.attempts = 0


_OUTAGES: dict[str, _Outage] = {}


def _outage(url: RedisURL) -> _Outage:
    where = f"redis {url}"  # (str() of a RedisURL leaves the password out)
    outage = _OUTAGES.get(where)
    if outage is None:
        outage = _OUTAGES[where] = _Outage(where)
    return outage


def _describe_failure(exc: BaseException, url: RedisURL) -> str:
    if isinstance(exc, socket.gaierror):  # "[Errno -2] ..." does not say which name failed
        return f"cannot resolve the host {url.host!r}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


_AUTH_REFUSALS: Final = (
    "WRONGPASS",
    "NOAUTH",
    "ERR invalid password",
    "ERR invalid username-password pair",
    "ERR Client sent AUTH, but no password is set",
    "ERR AUTH <password> called without any password configured",
)
"""How Redis (5 to 7) refuses a password or asks for one, at the start of its error reply."""


def failure_reason(exc: BaseException) -> ConnectFailure:
    """Why a connection attempt failed, as a metric label: tls (the certificate or its host
    name refused, ours refused by the server, or no TLS), auth (the password refused or
    missing), permission (the ACL user may not run a command memshadow needs), dns,
    refused, timeout, replica (the endpoint leads to a replica) or other."""
    cause: BaseException | None = exc
    while cause is not None:  # (a TLS 1.3 refusal of our certificate ends the connection)
        if isinstance(cause, ssl.SSLError):
            return ConnectFailure.TLS
        cause = cause.__cause__
    if isinstance(exc, socket.gaierror):
        return ConnectFailure.DNS
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailure.REFUSED
    if isinstance(exc, TimeoutError | RedisTimeout):
        return ConnectFailure.TIMEOUT
    if isinstance(exc, NotPrimary):
        return ConnectFailure.REPLICA
    if isinstance(exc, RedisReplyError):
        reply = str(exc).partition(" failed: ")[2]  # (the handshake names its command)
        if reply.startswith(_AUTH_REFUSALS):
            return ConnectFailure.AUTH
        if reply.startswith("NOPERM"):
            return ConnectFailure.PERMISSION
    return ConnectFailure.OTHER


_MISSING_FUNCTION_PREFIXES = ("ERR Function not found", "NOSCRIPT")


def missing_function(exc: RedisReplyError) -> bool:
    return exc.message.startswith(_MISSING_FUNCTION_PREFIXES)


def _consume_result(future: asyncio.Future[Reply]) -> None:
    """Mark a failure as seen, for futures that may end up with no one awaiting them."""
    if future.done() and not future.cancelled():
        future.exception()


def _ignore(reply: Reply, error: RedisError | None) -> None:
    """The completion of ASKING: its reply matters to nobody (the command after it tells)."""


@final
@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """How every connection of a client is made and kept: built once by the caller (from the
    config) and passed down, through a pool or a cluster's node pools, to each connection."""

    timeout: float = 1.0
    """Seconds a reply may take, from the write of its command (a URL's ?timeout= wins)."""
    connect_timeout: float = 2.0
    """Seconds to connect: TCP, TLS and the handshake, each reply of it."""
    max_inflight: int = 1024
    """Commands a connection may have waiting for their replies; more fail with RedisBusy."""
    backoff_initial: float = 0.05
    """Seconds before the first new attempt after a failed connect; doubled each time..."""
    backoff_max: float = 2.0
    """...up to this."""
    library: str | None = None
    """The Functions library loaded (FUNCTION LOAD REPLACE) on connect, and again when the
    server has lost it; None: none."""
    ssl_context: ssl.SSLContext | None = None
    """For rediss:// URLs, instead of the TLS settings the URL gives (url.tls_context())."""
    require_primary: bool = False
    """Refuse to talk to a replica (INFO replication in the handshake): after a failover the
    endpoint may still lead to the old primary for a while, and it must not be written to."""
    service_time: Callable[[float], None] | None = None
    """Observes each reply's service time: seconds from the write to the read."""
    failures: Counter[str] | None = None
    """Counts each failed connection attempt by failure_reason (shared by the connections of
    a shadow, for its metrics)."""
    outage_summary: float = OUTAGE_SUMMARY_INTERVAL
    """Seconds between two log lines that sum up the connect failures of an outage."""

    def probe(self) -> ConnectionOptions:
        """The options of a one-off connection that asks a node something (whether it is a
        cluster, its slot map): the connect timeout for every reply, no library, no role
        check; the same TLS and the same failure counts."""
        return ConnectionOptions(
            timeout=self.connect_timeout,
            connect_timeout=self.connect_timeout,
            ssl_context=self.ssl_context,
            failures=self.failures,
            outage_summary=self.outage_summary,
        )


DEFAULT_OPTIONS: Final = ConnectionOptions()


class RedisConnection:
    """One Redis connection kept up by a background task, with Functions loaded on connect."""

    def __init__(
        self,
        url: str | RedisURL,
        options: ConnectionOptions = DEFAULT_OPTIONS,
        *,
        name: str = "redis",
        refusals: Refusals | None = None,
        on_push: Callable[[list[Any]], None] | None = None,
    ) -> None:
        """on_push: takes the messages published to a subscribed connection."""
        self.options = options
        self._on_push = on_push
        self.url = parse_url(url)
        self.refusals = refusals
        self.replication = ("", "")
        """(master_replid, master_replid2) of the server at the last connect (learnt when
        options.require_primary): a promoted replica keeps its old primary's id as
        replid2; a restarted server has new ones."""
        self.on_connect: Callable[[RedisConnection], None] | None = None
        """Called once a connection is up, before any command can use it."""
        self.timeout = self.url.timeout if self.url.timeout is not None else options.timeout
        self.library = options.library
        self.max_inflight = options.max_inflight  # (read by every send)
        self.name = name
        self._protocol: RespProtocol | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._attempted = asyncio.Event()
        self._closing = False
        self._reload: asyncio.Future[Reply] | None = None
        self.connects = 0
        """Successful connections (handshake included) since start."""
        self.reconnects = 0
        """Successful connections after the first one."""
        self.connect_failures = 0
        self.timeouts = 0
        """Commands that failed with RedisTimeout."""
        self.function_reloads = 0
        self.last_error: str | None = None
        self._last_read = 0.0

    # lifecycle

    @property
    def is_connected(self) -> bool:
        return self._protocol is not None and self._protocol.is_open

    @property
    def inflight(self) -> int:
        return self._protocol.inflight if self._protocol is not None else 0

    async def start(self) -> bool:
        """Start the reconnecting task and wait for its first attempt; True if it connected."""
        if self._supervisor is None:
            self._closing = False
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"redis-{self.name}"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), self.options.connect_timeout + 1.0)
        return self.is_connected

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the connection is up (or the timeout passes); True if it is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self.is_connected

    async def close(self) -> None:
        self._closing = True
        task, self._supervisor = self._supervisor, None
        if self._protocol is not None:
            self._protocol.abort(RedisUnavailable("connection closed by the client"))
        while task is not None and not task.done():
            # On Python 3.11 a wait_for that completes as it is cancelled swallows the
            # cancellation: the supervisor may come back with a live connection and wait on
            # it. Abort whatever it holds and cancel again until it has ended.
            if self._protocol is not None:
                self._protocol.abort(RedisUnavailable("connection closed by the client"))
            task.cancel()
            await asyncio.wait((task,), timeout=0.1)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: it ended by our cancellation either way
        self._protocol = None
        self._connected.clear()

    async def _supervise(self) -> None:
        delay = self.options.backoff_initial
        while not self._closing:
            protocol: RespProtocol | None
            try:
                protocol = await self._connect_once()
            except (OSError, TimeoutError, RedisError) as exc:
                self._connect_failed(exc)
                protocol = None
            if protocol is None:
                # (the wait is outside the except block: compiled with mypyc, a coroutine
                # suspended in one leaves its exception set for the whole thread)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.options.backoff_max)
                continue
            if self._closing:  # close() came while connecting
                protocol.abort(RedisUnavailable("connection closed by the client"))
                return
            delay = self.options.backoff_initial
            _outage(self.url).recovered()
            if self.connects:
                self.reconnects += 1
            self.connects += 1
            if self.on_connect is not None:
                try:
                    self.on_connect(self)
                except Exception:
                    log.exception("redis %s (%s): connect hook failed", self.name, self.url)
            self._protocol = protocol
            self._connected.set()
            self._attempted.set()
            try:
                await protocol.lost
            finally:
                self._connected.clear()
                self._last_read = protocol.last_read
                self._protocol = None
            if not self._closing:
                log.warning("redis %s (%s): connection lost, reconnecting", self.name, self.url)

    def _connect_failed(self, exc: BaseException) -> None:
        self.connect_failures += 1
        failures = self.options.failures
        if failures is not None:
            failures[failure_reason(exc)] += 1
        self.last_error = _describe_failure(exc, self.url)
        self._attempted.set()
        _outage(self.url).failed(self.last_error, self.options.outage_summary)

    async def _connect_once(self) -> RespProtocol:
        loop = asyncio.get_running_loop()
        url = self.url
        if url.username is not None and url.password is None:
            raise RedisUnavailable(f"the URL names the user {url.username!r} but no password")
        # (built at each connect: a renewed certificate or CA file is read the next time)
        ssl_ctx = (self.options.ssl_context or url.tls_context()) if url.tls else None

        service_time = self.options.service_time

        def factory() -> RespProtocol:
            return RespProtocol(
                loop, self._count_timeouts, self._protocol_down, service_time, self._on_push
            )

        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                factory,
                url.host,
                url.port,
                ssl=ssl_ctx,
                server_hostname=url.host if ssl_ctx else None,
            ),
            self.options.connect_timeout,
        )
        futures: list[asyncio.Future[Reply]] = []
        try:
            handshake: list[tuple[Arg, ...]] = []
            if url.password is not None:
                if url.username:
                    handshake.append((b"AUTH", url.username, url.password))
                else:
                    handshake.append((b"AUTH", url.password))
            if url.db:
                handshake.append((b"SELECT", url.db))
            if self.options.require_primary:
                handshake.append((b"INFO", b"replication"))
            if self.library is not None:
                handshake.append((b"FUNCTION", b"LOAD", b"REPLACE", self.library))
            # a stopped server still completes TCP handshakes; count it up once it answers
            handshake.append((b"PING",))
            for cmd in handshake:
                futures.append(protocol.send(encode_command(cmd), self.options.connect_timeout))
            for cmd, future in zip(handshake, futures, strict=True):
                try:
                    reply = await future
                except RedisReplyError as exc:
                    raise RedisReplyError(f"{arg_bytes(cmd[0]).decode()} failed: {exc}") from None
                if cmd[0] == b"INFO":
                    info = parse_info(reply)
                    if info.get("role", "master") != "master":
                        raise NotPrimary(f"{url.host}:{url.port} is a replica, not a primary")
                    self.replication = (
                        info.get("master_replid", ""),
                        info.get("master_replid2", ""),
                    )
            protocol.refusals = self.refusals
        except BaseException:
            protocol.abort(RedisUnavailable("handshake failed"))
            for future in futures:
                _consume_result(future)
            raise
        return protocol

    def _protocol_down(self, protocol: RespProtocol) -> None:
        if protocol is self._protocol:
            self._connected.clear()

    def _count_timeouts(self, count: int) -> None:
        self.timeouts += count
        log.warning("redis %s (%s): %d command(s) timed out; resetting", self.name, self.url, count)

    # commands

    def send(self, *args: Arg, timeout: float | None = None) -> asyncio.Future[Reply]:
        """Queue a command and return the future of its reply, or fail at once.

        Raises RedisUnavailable when the connection is down and RedisBusy when max_inflight
        commands are already waiting. The future fails with RedisReplyError, RedisTimeout or
        RedisUnavailable.
        """
        return self._ready().send(
            encode_command(args), self.timeout if timeout is None else timeout
        )

    def send_callback(
        self, callback: ReplyCallback, *args: Arg, timeout: float | None = None
    ) -> None:
        """send() without a future: queue a command whose reply or error goes to `callback`.

        Raises RedisUnavailable or RedisBusy at once, as send() does (`callback` is then never
        called); otherwise `callback` is called exactly once, later, with the reply or with
        RedisReplyError, RedisTimeout or RedisUnavailable.
        """
        self._ready().send_callback(
            encode_command(args), self.timeout if timeout is None else timeout, callback
        )

    def send_payload(
        self, payload: bytes, callback: ReplyCallback, *, asking: bool = False
    ) -> None:
        """Send an already encoded command (a cluster client resending a refused one), after
        ASKING when `asking`; raises and calls back as send_callback() does."""
        protocol = self._ready()
        if asking:
            protocol.send_callback(ASKING, self.timeout, _ignore)
        protocol.send_callback(payload, self.timeout, callback)

    def reset(self, exc: RedisError) -> None:
        """Drop the connection now (failing what waits on it); the supervisor reconnects."""
        if self._protocol is not None:
            self._protocol.abort(exc)

    @property
    def last_read(self) -> float:
        """perf_counter() time of the last reply read on this connection (0: none yet)."""
        return self._protocol.last_read if self._protocol is not None else self._last_read

    def _ready(self) -> RespProtocol:
        protocol = self._protocol
        if protocol is None or not protocol.is_open:
            raise RedisUnavailable(f"redis {self.name} ({self.url}) is not connected")
        if protocol.inflight >= self.max_inflight:
            raise RedisBusy(f"redis {self.name}: {protocol.inflight} commands already in flight")
        return protocol

    async def execute(self, *args: Arg, timeout: float | None = None) -> Reply:
        """Run one command and return its reply (see send() for the failures)."""
        return await self.send(*args, timeout=timeout)

    async def fcall(self, function: str, key: bytes, *args: Arg) -> Reply:
        """FCALL a function of the loaded library on one key; reload the library once if missing."""
        try:
            return await self.send(b"FCALL", function, 1, key, *args)
        except RedisReplyError as exc:
            if self.library is None or not missing_function(exc):
                raise
        await self.reload_library()
        return await self.send(b"FCALL", function, 1, key, *args)

    def fcall_callback(
        self, callback: ReplyCallback, function: str, key: bytes, *args: Arg
    ) -> None:
        """fcall() with a callback (see send_callback): a missing library is reloaded once and
        the call sent again before `callback` hears of it."""
        command = (b"FCALL", function, 1, key, *args)
        if self.library is None:
            self.send_callback(callback, *command)
            return

        def first_reply(reply: Reply, error: RedisError | None) -> None:
            if isinstance(error, RedisReplyError) and missing_function(error):
                self.after_reload(callback, command)
            else:
                callback(reply, error)

        self.send_callback(first_reply, *command)

    def after_reload(self, callback: ReplyCallback, command: tuple[Arg, ...]) -> None:
        try:
            reload = self._start_reload()
        except RedisError as exc:
            deliver(callback, None, exc)
            return

        def resend(done: asyncio.Future[Reply]) -> None:
            error: RedisError | None = None
            if done.cancelled():
                error = RedisUnavailable("function reload cancelled")
            else:
                exc = done.exception()
                if exc is not None:
                    error = exc if isinstance(exc, RedisError) else RedisError(str(exc))
            if error is None:
                try:
                    self.send_callback(callback, *command)
                    return
                except RedisError as exc:
                    error = exc
            deliver(callback, None, error)

        reload.add_done_callback(resend)

    async def reload_library(self) -> None:
        """FUNCTION LOAD REPLACE the library; concurrent callers share one load."""
        if self.library is None:
            return
        await asyncio.shield(self._start_reload())

    def _start_reload(self) -> asyncio.Future[Reply]:
        """The library load in progress, or a new one (raises when it cannot be sent)."""
        assert self.library is not None
        if self._reload is None or self._reload.done():
            self._reload = self.send(b"FUNCTION", b"LOAD", b"REPLACE", self.library)
            self._reload.add_done_callback(_consume_result)
            self.function_reloads += 1
            log.warning("redis %s (%s): function library missing, reloading", self.name, self.url)
        return self._reload
