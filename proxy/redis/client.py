"""Pipelined asyncio Redis client on hiredis.Reader: bounded connections that reconnect.

A RedisConnection writes every command issued in one loop iteration with a single write and
matches replies to their commands in FIFO order: each command completes a future (`send`) or
calls a callback (`send_callback`, no future and no task: the shadow's hot path). Calls never
wait for a connection or for room: they fail at once with RedisUnavailable or RedisBusy, and a
reply that does not come in time fails with RedisTimeout and resets the connection (later
replies would be misaligned). A RedisPool maps each key to one connection with a stable hash,
so the commands of a key stay in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias, cast

import hiredis

from proxy.config import RedisURL
from proxy.redis.errors import (
    NotPrimary,
    RedisBusy,
    RedisError,
    RedisGaveUp,
    RedisProtocolError,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    ShadowStarved,
)
from proxy.redis.topology import WriteLog, cluster_reply, is_cluster_refusal
from proxy.shadow.words import ConnectFailure, DropReason

log = logging.getLogger(__name__)

OUTAGE_SUMMARY_INTERVAL = 60.0
LATE_TIMER: Final = 0.05
"""A reply deadline timer that runs this much late says the event loop was held up: the
replies are read before any command is called timed out."""
"""While a Redis stays unreachable, one summary line per this many seconds (every connection
of a pool retries on its own, a few times a second in all: one line per attempt would flood
the log for as long as the outage lasts)."""


class _Outage:
    """The connect failures to one Redis, whichever connection of a pool made them: logged
    when they start, summarised every OUTAGE_SUMMARY_INTERVAL, and once when a connection
    succeeds again."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.since: float | None = None
        self.attempts = 0
        self.logged_at = 0.0

    def failed(self, error: str) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.since is None:
            self.since = self.logged_at = now
            log.warning(
                "%s: connect failed: %s (retrying; a summary every %gs while it lasts)",
                self.where,
                error,
                OUTAGE_SUMMARY_INTERVAL,
            )
        elif now - self.logged_at >= OUTAGE_SUMMARY_INTERVAL:
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


Reply: TypeAlias = bytes | int | float | list["Reply"] | None
"""A decoded RESP2 reply (error replies are raised as RedisReplyError instead)."""

Arg: TypeAlias = bytes | str | int | float
"""One command argument; str is UTF-8 encoded, numbers are sent in decimal."""

ReplyCallback: TypeAlias = Callable[[Reply, RedisError | None], None]
"""Completion of one command sent with send_callback: called exactly once, with (reply, None)
or (None, the RedisError), never from inside the send call itself."""

_MISSING_FUNCTION_PREFIXES = ("ERR Function not found", "NOSCRIPT")

Refusals: TypeAlias = Callable[[bytes, RedisReplyError, ReplyCallback], None]
"""Where a connection sends a cluster's refusal of a command (MOVED, ASK, READONLY, LOADING,
TRYAGAIN, CLUSTERDOWN, MASTERDOWN) instead of to its caller: the encoded command, the error,
and the completion, which the handler must call exactly once (after retrying, or not)."""

ASKING = b"*1\r\n$6\r\nASKING\r\n"


# URLs ---------------------------------------------------------------------------------------


def parse_url(url: str) -> RedisURL:
    """Parse a redis:// or rediss:// URL (config.RedisURL, the one URL type, with its query
    options: ``timeout``, ``ssl_cert_reqs=none``, ``ssl_ca_certs``, ``ssl_certfile``,
    ``ssl_keyfile``); ValueError when it is not one."""
    return RedisURL.parse(url, options=True)


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


# encoding -----------------------------------------------------------------------------------


def _to_bytes(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    return repr(arg).encode() if isinstance(arg, float) else str(arg).encode()


def resp_encode(args: Sequence[Arg]) -> bytes:
    """Encode a command as a RESP array of bulk strings (fallback for hiredis.pack_command)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _to_bytes(arg)
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


def _pack_command(args: Sequence[Arg]) -> bytes:
    # cast: hiredis's stub types the argument as a 1-tuple
    return bytes(hiredis.pack_command(cast(Any, tuple(args))))


encode_command: Callable[[Sequence[Arg]], bytes] = (
    _pack_command if hasattr(hiredis, "pack_command") else resp_encode
)


# protocol -----------------------------------------------------------------------------------


def deliver(callback: ReplyCallback, reply: Reply, error: RedisError | None) -> None:
    """Call a command's callback; a failing callback must not stop the other replies."""
    try:
        callback(reply, error)
    except Exception:
        log.exception("redis: reply callback %r failed", callback)


class _RespProtocol(asyncio.Protocol):
    """One TCP/TLS connection: batched writes, FIFO replies, and the reply deadline.

    Each command waiting for its reply is a `[future, callback, deadline, payload, timeout]`
    entry of `_pending`, in send order: a future (send) or a callback (send_callback). A callback is
    set to None once called, so it is called exactly once whatever comes first: the reply,
    the deadline or the loss of the connection.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_timeout: Callable[[int], None],
        on_down: Callable[[_RespProtocol], None],
        service_time: Callable[[float], None] | None = None,
        on_push: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self._loop = loop
        # A subscribed connection's published messages (["message", channel, payload]): they
        # answer no command. None on every other connection.
        self._on_push = on_push
        # Set once the handshake is done: where a cluster's refusals (MOVED, ASK, READONLY,
        # LOADING...) go instead of to the command's caller (see Refusals).
        self.refusals: Refusals | None = None
        self.last_read = 0.0  # perf_counter() of the last reply read: the node was alive
        # Redis's service time, as Memcached's is measured on the client path: from the write
        # that carried a command to the read that brought its reply. The writes not answered
        # in full yet: [perf_counter time, commands of it still waiting].
        self._service_time = service_time
        self._writes: deque[list[Any]] = deque()
        self._on_timeout = on_timeout
        self._on_down = on_down
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._pending: deque[list[Any]] = deque()
        self._unwritten: list[list[Any]] = []  # entries of _pending not written yet
        self._outbuf: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._rechecking = False  # the deadline timer ran late: one more look after I/O
        self._held_up = 0.0  # how late it ran
        self._aborted = False
        self.lost: asyncio.Future[None] = loop.create_future()

    @property
    def inflight(self) -> int:
        return len(self._pending)

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._aborted and not self.lost.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._aborted = True
        self._on_down(self)
        lost = RedisUnavailable(f"connection lost: {exc or 'closed'}")
        lost.__cause__ = exc
        self._fail_all(lost)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._outbuf.clear()
        self._unwritten.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, payload: bytes, timeout: float) -> asyncio.Future[Reply]:
        """Queue one encoded command; it is written with the others of this loop iteration."""
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._queue([future, None, timeout, payload, timeout], payload)
        return future

    def send_callback(self, payload: bytes, timeout: float, callback: ReplyCallback) -> None:
        """send() without a future: `callback` gets the reply or the error (see ReplyCallback)."""
        self._queue([None, callback, timeout, payload, timeout], payload)

    def _queue(self, entry: list[Any], payload: bytes) -> None:
        # entry[2] holds the timeout until the command is written: its deadline counts from
        # the write (a loop that was busy before writing it is not Redis being slow).
        self._pending.append(entry)
        self._unwritten.append(entry)
        self._outbuf.append(payload)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self, exc: RedisError) -> None:
        """Drop the connection at once, failing every command still waiting for its reply."""
        self._aborted = True  # connection_lost() only comes on a later loop iteration
        self._on_down(self)
        self._fail_all(exc)
        if self._transport is not None:
            self._transport.abort()

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._outbuf or self._transport is None or self._transport.is_closing():
            return
        commands = len(self._outbuf)  # one payload a command
        data = self._outbuf[0] if commands == 1 else b"".join(self._outbuf)
        self._outbuf.clear()
        self._transport.write(data)
        if self._service_time is not None:
            self._writes.append([time.perf_counter(), commands])
        # The commands just written: their deadlines start now.
        now = self._loop.time()
        earliest = float("inf")
        for entry in self._unwritten:
            entry[2] = deadline = now + entry[2]
            if deadline < earliest:
                earliest = deadline
        self._unwritten.clear()
        if self._timer is None or earliest < self._timer_when:
            self._arm(earliest)

    def data_received(self, data: bytes) -> None:
        self.last_read = read_at = time.perf_counter()
        self._reader.feed(data)
        pending = self._pending
        writes = self._writes
        service_time = self._service_time
        push = self._on_push
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(RedisProtocolError(f"unparsable reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if push is not None and type(reply) is list and reply and reply[0] == b"message":
                push(reply)
                continue
            if not pending:
                self.abort(RedisProtocolError("reply from Redis with no command waiting for it"))
                return
            entry = pending.popleft()
            if writes:
                write = writes[0]
                service_time(read_at - write[0])  # type: ignore[misc]
                write[1] -= 1
                if not write[1]:
                    writes.popleft()
            if isinstance(reply, hiredis.ReplyError) and self._refused(entry, str(reply)):
                if self._aborted:  # the handler reset this connection (a demoted primary)
                    return
                continue
            callback = entry[1]
            if callback is not None:
                entry[1] = None
                try:  # deliver(), inlined: this runs for every reply of the shadow
                    if isinstance(reply, hiredis.ReplyError):
                        callback(None, RedisReplyError(str(reply)))
                    else:
                        callback(reply, None)
                except Exception:
                    log.exception("redis: reply callback %r failed", callback)
                if self._aborted:  # the callback closed the connection
                    return
                continue
            future = entry[0]
            if future is None or future.done():  # the caller gave up; the reply had to be read
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def _refused(self, entry: list[Any], message: str) -> bool:
        """A cluster's refusal goes to `refusals`, with the command and its completion."""
        refusals = self.refusals
        if refusals is None or not is_cluster_refusal(message):
            return False
        future, callback = entry[0], entry[1]
        entry[1] = None
        if callback is None:
            if future is None or future.done():
                return True  # nobody waits for it any more
            callback = _completing(future)
        error = RedisReplyError(message)
        try:
            refusals(entry[3], error, callback)
        except Exception:  # a bug in the handler must not lose the command's completion
            log.exception("redis: handling %r failed", message)
            deliver(callback, None, error)
        return True

    def _fail_all(self, exc: RedisError) -> None:
        # Callbacks are called once the queue is empty: one that sends a command (on another
        # connection, this one is closed) must not find the failed ones still queued.
        callbacks: list[ReplyCallback] = []
        self._writes.clear()
        while self._pending:
            entry = self._pending.popleft()
            future, callback = entry[0], entry[1]
            if callback is not None:
                entry[1] = None
                callbacks.append(callback)
            elif future is not None and not future.done():
                future.set_exception(exc)
        for callback in callbacks:
            deliver(callback, None, exc)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        now = self._loop.time()
        late = now - self._timer_when
        if late > LATE_TIMER and not self._rechecking:
            # This loop was held up (a starved worker): replies may be waiting unread in the
            # socket. Read them first (a timer 1 ms on runs after the next I/O poll).
            self._rechecking = True
            self._held_up = late
            self._arm(now + 0.001)
            return
        held_up, self._held_up = self._held_up, 0.0
        self._rechecking = False
        earliest: float | None = None
        expired: list[list[Any]] = []
        pending = self._pending
        written = len(pending) - len(self._unwritten)  # (the others hold no deadline yet)
        for index, entry in enumerate(pending):
            if index >= written:
                break
            future, callback, deadline = entry[0], entry[1], entry[2]
            if callback is None and (future is None or future.done()):
                continue  # answered, or the caller gave up waiting
            if deadline <= now:
                expired.append(entry)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if not expired:
            if earliest is not None:
                self._arm(earliest)
            return
        # Held up longer than a whole timeout: the wait measured this process, not Redis.
        error: RedisTimeout = (
            ShadowStarved("this process was too busy to read Redis's reply in time")
            if held_up >= min(entry[4] for entry in expired)
            else RedisTimeout("no reply from Redis in time")
        )
        callbacks: list[ReplyCallback] = []
        for entry in expired:
            future, callback = entry[0], entry[1]
            if callback is not None:
                entry[1] = None
                callbacks.append(callback)
            else:
                future.set_exception(error)
        if isinstance(error, ShadowStarved):
            # Nothing says the connection is at fault: it stays, and the late replies still
            # come in order, to entries that no longer wait for them.
            if earliest is not None:
                self._arm(earliest)
        else:
            self._on_timeout(len(expired))
            self.abort(RedisUnavailable("connection reset after a command timed out"))
        # (After the reset: a callback that sends again must not use this connection.)
        for callback in callbacks:
            deliver(callback, None, error)

# connection ---------------------------------------------------------------------------------


def _completing(future: asyncio.Future[Reply]) -> ReplyCallback:
    """A ReplyCallback that completes `future` (unless its waiter gave up)."""

    def complete(reply: Reply, error: RedisError | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(reply)
        else:
            future.set_exception(error)

    return complete


def _consume_result(future: asyncio.Future[Reply]) -> None:
    """Mark a failure as seen, for futures that may end up with no one awaiting them."""
    if future.done() and not future.cancelled():
        future.exception()


def parse_info(reply: Reply | str) -> dict[str, str]:
    """Redis INFO text (``field:value`` lines, ``# Section`` headers) as a dict; {} for a
    reply that is not text."""
    if isinstance(reply, bytes):
        text = reply.decode("utf-8", "replace")
    elif isinstance(reply, str):
        text = reply
    else:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def _ignore(reply: Reply, error: RedisError | None) -> None:
    """The completion of ASKING: its reply matters to nobody (the command after it tells)."""


def missing_function(exc: RedisReplyError) -> bool:
    return exc.message.startswith(_MISSING_FUNCTION_PREFIXES)


class RedisConnection:
    """One Redis connection kept up by a background task, with Functions loaded on connect."""

    def __init__(
        self,
        url: str | RedisURL,
        *,
        timeout: float = 1.0,
        connect_timeout: float = 2.0,
        max_inflight: int = 1024,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        library: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "redis",
        service_time: Callable[[float], None] | None = None,
        refusals: Refusals | None = None,
        require_primary: bool = False,
        failures: Counter[str] | None = None,
        on_push: Callable[[list[Any]], None] | None = None,
    ) -> None:
        """failures: counts each failed connection attempt by failure_reason (shared by
        the connections of a shadow, for its metrics). on_push: takes the messages
        published to a subscribed connection."""
        self._on_push = on_push
        self.url = parse_url(url) if isinstance(url, str) else url
        self.refusals = refusals
        self.failures = failures
        # Refuse to talk to a replica (INFO replication in the handshake): after a failover
        # the endpoint may still lead to the old primary for a while, and it must not be
        # written to. The handshake also learns the server's replication ids.
        self.require_primary = require_primary
        self.replication = ("", "")
        """(master_replid, master_replid2) of the server at the last connect: a promoted
        replica keeps its old primary's id as replid2; a restarted server has new ones."""
        self.on_connect: Callable[[RedisConnection], None] | None = None
        """Called once a connection is up, before any command can use it."""
        self._service_time = service_time  # observes each reply's service time (seconds)
        self.timeout = self.url.timeout if self.url.timeout is not None else timeout
        self.connect_timeout = connect_timeout
        self.max_inflight = max_inflight
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.library = library
        self.name = name
        self._ssl_context = ssl_context
        self._protocol: _RespProtocol | None = None
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
            await asyncio.wait_for(self._attempted.wait(), self.connect_timeout + 1.0)
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
        delay = self.backoff_initial
        while not self._closing:
            try:
                protocol = await self._connect_once()
            except (OSError, TimeoutError, RedisError) as exc:
                self.connect_failures += 1
                if self.failures is not None:
                    self.failures[failure_reason(exc)] += 1
                self.last_error = _describe_failure(exc, self.url)
                self._attempted.set()
                _outage(self.url).failed(self.last_error)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.backoff_max)
                continue
            if self._closing:  # close() came while connecting
                protocol.abort(RedisUnavailable("connection closed by the client"))
                return
            delay = self.backoff_initial
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

    async def _connect_once(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        url = self.url
        if url.username is not None and url.password is None:
            raise RedisUnavailable(f"the URL names the user {url.username!r} but no password")
        # (built at each connect: a renewed certificate or CA file is read the next time)
        ssl_ctx = (self._ssl_context or url.tls_context()) if url.tls else None

        def factory() -> _RespProtocol:
            return _RespProtocol(
                loop, self._count_timeouts, self._protocol_down, self._service_time, self._on_push
            )

        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                factory,
                url.host,
                url.port,
                ssl=ssl_ctx,
                server_hostname=url.host if ssl_ctx else None,
            ),
            self.connect_timeout,
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
            if self.require_primary:
                handshake.append((b"INFO", b"replication"))
            if self.library is not None:
                handshake.append((b"FUNCTION", b"LOAD", b"REPLACE", self.library))
            # a stopped server still completes TCP handshakes; count it up once it answers
            handshake.append((b"PING",))
            for cmd in handshake:
                futures.append(protocol.send(encode_command(cmd), self.connect_timeout))
            for cmd, future in zip(handshake, futures, strict=True):
                try:
                    reply = await future
                except RedisReplyError as exc:
                    raise RedisReplyError(f"{_to_bytes(cmd[0]).decode()} failed: {exc}") from None
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

    def _protocol_down(self, protocol: _RespProtocol) -> None:
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

    def _ready(self) -> _RespProtocol:
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


# pool ---------------------------------------------------------------------------------------


class Retries:
    """Refused commands waiting to be sent again: each a timer and its completion, so that
    closing fails every one of them exactly once instead of leaving it unanswered."""

    def __init__(self) -> None:
        self._waiting: dict[asyncio.TimerHandle, ReplyCallback] = {}
        self.closed = False

    def later(self, delay: float, callback: ReplyCallback, send: Callable[[], None]) -> None:
        """Call `send` after `delay` (the retry), unless closed first: then fail `callback`."""
        if self.closed:
            deliver(callback, None, RedisUnavailable("the Redis client is closed"))
            return

        def fire() -> None:
            del self._waiting[handle]
            send()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._waiting[handle] = callback

    def close(self) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for handle, callback in waiting.items():
            handle.cancel()
            deliver(callback, None, RedisUnavailable("the Redis client is closed"))


class Retry:
    """The completion of a command sent again after a refusal, and how many times it was."""

    __slots__ = ("attempts", "done")

    def __init__(self, done: ReplyCallback, attempts: int) -> None:
        self.done = done
        self.attempts = attempts

    def __call__(self, reply: Reply, error: RedisError | None) -> None:
        self.done(reply, error)

    @staticmethod
    def of(callback: ReplyCallback) -> Retry:
        """The next attempt of a refused command whose completion is `callback`."""
        if isinstance(callback, Retry):
            return Retry(callback.done, callback.attempts + 1)
        return Retry(callback, 1)


RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
"""Waits before each new attempt of a refused command (LOADING, READONLY, TRYAGAIN...): about
1.6 s in all, then it is given up (RedisGaveUp) and the shadow drops it, counted by reason."""


def give_up(retry: Retry, reason: str, what: str) -> None:
    """Fail a refused command for good: RedisGaveUp(reason)."""
    message = f"{what} (refused: {reason}; {retry.attempts} tries)"
    deliver(retry.done, None, RedisGaveUp(reason, message))


def send_later(
    retries: Retries,
    payload: bytes,
    reason: str,
    retry: Retry,
    route: Callable[[bytes], RedisConnection],
) -> None:
    """Send a refused command again after its attempt's delay, on the connection `route`
    finds for it then (RedisError there: wait again); past RETRY_DELAYS, give up."""
    if retry.attempts > len(RETRY_DELAYS):
        give_up(retry, reason, "still refused")
        return

    def send() -> None:
        try:
            route(payload).send_payload(payload, retry)
        except RedisError:  # reconnecting, or busy: wait again
            send_later(retries, payload, reason, Retry.of(retry), route)

    retries.later(RETRY_DELAYS[retry.attempts - 1], retry, send)


FAILOVER_WINDOW = 10.0
"""Seconds of writes a failed-over primary may have lost (shadow.redis_failover_window): its
replication lag and, behind one endpoint, the time between the replica's promotion and the
old primary's demotion. Their keys are reported lost, and the shadow stops trusting them."""

WritesLost: TypeAlias = Callable[[list[bytes] | None, str], None]
"""Told the (Redis) keys whose recent writes a failover may have lost, or None when the log
no longer knows which (every key), and why."""


class RedisPool:
    """A fixed set of connections; each key always uses the same one (crc32 of the key).

    A primary demoted to a replica under it (a failover behind one endpoint, as ElastiCache
    does) answers writes with READONLY: the pool redials every connection (the handshake's
    role check waits for the endpoint to lead to a primary) and sends the refused command
    again, within RETRY_DELAYS. A connection that reaches another server (its replication
    id changed) reports the writes it may lack (`on_writes_lost`) before carrying any."""

    def __init__(
        self,
        url: str | RedisURL,
        size: int = 4,
        *,
        timeout: float = 1.0,
        connect_timeout: float = 2.0,
        max_inflight: int = 1024,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        library: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        service_time: Callable[[float], None] | None = None,
        require_primary: bool = False,
        refusals: Callable[[RedisConnection], Refusals] | None = None,
        failover_window: float = FAILOVER_WINDOW,
        failures: Counter[str] | None = None,
    ) -> None:
        """refusals: builds each connection's handler of a cluster's refusals (a cluster's
        node pools); by default the pool's own, for one Redis behind one endpoint."""
        if size < 1:
            raise ValueError("a Redis pool needs at least one connection")
        self.url = parse_url(url) if isinstance(url, str) else url
        self.writes = WriteLog(failover_window)
        self.on_writes_lost: WritesLost | None = None
        self.retries = Retries()
        self._demoted_on: dict[int, int] = {}  # connection -> its connects when redialled
        self._told_cluster = False
        self.connections = [
            RedisConnection(
                self.url,
                timeout=timeout,
                connect_timeout=connect_timeout,
                max_inflight=max_inflight,
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
                library=library,
                ssl_context=ssl_context,
                name=str(index),
                service_time=service_time,
                require_primary=require_primary,
                failures=failures,
            )
            for index in range(size)
        ]
        self._replid = ""  # the server's replication id, as the connections last saw it
        for conn in self.connections:
            conn.refusals = (refusals or self._refusals)(conn)
            conn.on_connect = self._connected

    def _refusals(self, conn: RedisConnection) -> Refusals:
        def refused(payload: bytes, error: RedisReplyError, callback: ReplyCallback) -> None:
            meaning = cluster_reply(error.message)
            if not isinstance(meaning, str):  # MOVED/ASK: this is a cluster node
                if not self._told_cluster:
                    self._told_cluster = True
                    log.error(
                        "redis %s answers %r: it is a Redis Cluster node, used as a single "
                        "Redis (shadow.redis_cluster: false?); commands of keys it does not "
                        "own fail",
                        self.url,
                        error.message,
                    )
                deliver(callback, None, error)
                return
            if meaning == "readonly":
                self._demoted(conn)
            send_later(self.retries, payload, meaning, Retry.of(callback), lambda _: conn)

        return refused

    def _demoted(self, refused_on: RedisConnection) -> None:
        """The server behind the endpoint is a replica now: the endpoint must be dialled
        again to reach the new primary (whose connect reports the writes lost: _connected).
        Once per demotion: the other refusals of connections not yet redialled are the same
        one."""
        if self._demoted_on.get(id(refused_on)) == refused_on.connects:
            return
        self._demoted_on = {id(conn): conn.connects for conn in self.connections}
        log.warning(
            "redis %s answers READONLY: its primary became a replica (a failover); "
            "reconnecting to reach the new primary",
            self.url,
        )
        for conn in self.connections:
            conn.reset(RedisUnavailable("the server became a replica; reconnecting"))

    def _connected(self, conn: RedisConnection) -> None:
        """A connection is up, nothing sent on it yet. If the endpoint now leads to another
        server (a failover, or a restart), the writes the old one took may be missing on
        this one: report them before this connection carries anything, and redial the
        connections still on the old server."""
        replid, replid2 = conn.replication
        if not replid or replid == self._replid:
            return
        previous, self._replid = self._replid, replid
        if not previous:
            return  # the first server seen
        alive = max((c.last_read for c in self.connections), default=0.0)
        if replid2 == previous:  # the old primary's replica, promoted: all but the last writes
            lost, reason = self.writes.before(alive or time.perf_counter()), DropReason.FAILOVER
            what = "a replica of the previous primary (a failover)"
        else:  # another data set altogether (a restart without persistence, a new server)
            lost, reason, what = None, DropReason.REPLACED, "another server, or the same restarted"
        log.warning("redis %s now leads to %s: recent writes may be lost", self.url, what)
        if self.on_writes_lost is not None:
            self.on_writes_lost(lost, reason)
        for other in self.connections:
            if other is not conn and other.is_connected and other.replication[0] != replid:
                other.reset(RedisUnavailable("the server behind the endpoint changed"))

    def primaries(self) -> list[RedisConnection]:
        """One connection to each primary: flush_all and INFO go to every one."""
        return self.connections[:1]

    @property
    def size(self) -> int:
        return len(self.connections)

    def index_for(self, key: bytes) -> int:
        """The key's connection; keys of one index may share a multi-key command (MGET)."""
        return zlib.crc32(key) % len(self.connections)

    def connection_for(self, key: bytes) -> RedisConnection:
        """The connection of a key; the same for the life of the pool, so per-key order holds."""
        return self.connections[zlib.crc32(key) % len(self.connections)]

    async def start(self) -> bool:
        """Start every connection; True if all of them connected on the first attempt."""
        results = await asyncio.gather(*(conn.start() for conn in self.connections))
        return all(results)

    async def wait_connected(self, timeout: float) -> bool:
        results = await asyncio.gather(*(c.wait_connected(timeout) for c in self.connections))
        return all(results)

    async def close(self) -> None:
        self.retries.close()
        await asyncio.gather(*(conn.close() for conn in self.connections))

    @property
    def is_connected(self) -> bool:
        """True when every connection is up."""
        return all(conn.is_connected for conn in self.connections)

    @property
    def connected_count(self) -> int:
        return sum(conn.is_connected for conn in self.connections)

    @property
    def reconnects(self) -> int:
        return sum(conn.reconnects for conn in self.connections)

    @property
    def timeouts(self) -> int:
        return sum(conn.timeouts for conn in self.connections)

    @property
    def connect_failures(self) -> int:
        return sum(conn.connect_failures for conn in self.connections)
