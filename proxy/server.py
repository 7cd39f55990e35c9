"""The client path: listener, client sessions and their Memcached upstream connections.

Each client connection gets its own upstream connection. Client bytes go upstream unchanged
(an `mn` sentinel is inserted after requests whose reply count is unknown), replies come back
unchanged (minus the sentinels' `MN`), and every (request, reply) pair is handed to an
optional observer: the shadow's one narrow entry point. While Memcached is known to be down
the listener is closed: new clients are refused, as by a dead Memcached (listener.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxy.config import LISTENER_BITS, PROCESS_BITS
from proxy.listener import Listener, bind_sockets
from proxy.memcache.request import Expect, FramingLimits, Request, RequestFramer
from proxy.memcache.response import ResponseFramer

if TYPE_CHECKING:
    from proxy.config import Config, ListenerConfig
    from proxy.health import MemcachedState
    from proxy.metrics import ProxyMetrics

log = logging.getLogger("memshadow.server")
_session_numbers = itertools.count(1)
REOPEN_RETRY = 1.0  # seconds between attempts to listen again when listen() fails
TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"  # memcached's, past its -c
OBSERVER_LOG_INTERVAL = 60.0  # seconds between log lines about a failing shadow hand-off

# Why the client side of a session is not being read (a bit each).
_PAUSE_UPSTREAM_FULL = 1  # Memcached's socket buffer is full
_PAUSE_PENDING = 2  # too many requests await a reply
_PAUSE_CONNECTING = 4  # the upstream connection is not up yet

# Called with the sampled (captured) requests completed by one reply chunk, in Memcached's
# reply order, and the number of the client session they came from. Session numbers are
# unique in the memshadow; their low LISTENER_BITS bits are the listener's index
# (config.backends), so the shadow knows which Memcached a key lives on, and the next
# PROCESS_BITS say which of the `workers` processes serves the session.
_TAG_BITS = LISTENER_BITS + PROCESS_BITS
ReplyObserver = Callable[[list[Request], int], None]
CaptureDecider = Callable[[Request], bool]


class _Upstream(asyncio.Protocol):
    """The Memcached side of one session; everything it hears goes to the session."""

    __slots__ = ("session", "transport")

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        _set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_client(_PAUSE_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.session.resume_client(_PAUSE_UPSTREAM_FULL)


class ClientSession(asyncio.Protocol):
    """One client connection and its private Memcached connection."""

    # Slots, not a __dict__: thousands of sessions are held at once (see
    # tests/integration/test_connections_held.py for what one costs).
    __slots__ = (
        "_client_eof",
        "_closed",
        "_connect_task",
        "_early",
        "_observe",
        "_paused",
        "_unframed_reported",
        "activity",
        "idle_since",
        "max_pending",
        "number",
        "pending",
        "proxy",
        "replies",
        "requests",
        "swept_activity",
        "transport",
        "upstream",
    )

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        config = proxy.config
        limits = config.limits
        self.pending: deque[Request] = deque()
        self.requests = RequestFramer(
            FramingLimits(
                max_line_bytes=limits.max_line_bytes,
                max_get_line_bytes=limits.max_get_line_bytes,
                max_value_bytes=limits.max_value_bytes,
            ),
            capture=proxy.capture,
            pending=self.pending,
        )
        self.replies = ResponseFramer(self.pending)
        self.max_pending = limits.max_pending_requests
        self._observe = proxy.requests.observe
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self._paused = 0
        self._closed = False
        self._client_eof = False
        self._connect_task: asyncio.Task[None] | None = None
        self._unframed_reported = False
        self._early: list[bytes] = []
        self.number = next(_session_numbers) << _TAG_BITS | proxy.tag
        # Chunks received either way; the idle sweep (ProxyServer) sees whether it moved.
        # Two increments a request, ~35 ns each (timeit): 0.15% of the client path's CPU.
        self.activity = 0
        self.swept_activity = -1
        self.idle_since = 0.0

    # -- client side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        proxy = self.proxy
        if len(proxy.sessions) >= proxy.config.limits.max_connections:
            # What memcached does past its own -c limit: one error line, then close.
            self._closed = True
            self.transport.pause_reading()
            self.transport.write(TOO_MANY_CONNECTIONS)
            self.transport.close()
            proxy.metrics.closed_by_proxy("max_connections")
            return
        _set_nodelay(transport)
        limits = proxy.config.limits
        self.transport.set_write_buffer_limits(limits.write_buffer_high, limits.write_buffer_low)
        proxy.session_opened(self)
        self.pause_client(_PAUSE_CONNECTING)
        self._connect_task = asyncio.get_running_loop().create_task(self._connect())
        self._connect_task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[None]) -> None:
        # A finished task kept by its session costs ~0.9 KB (its frame) for as long as the
        # session lives: 4.88 -> 3.95 KB of RSS per idle connection (2,000 held).
        if self._connect_task is task:
            self._connect_task = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("session %d: cannot set up its memcached connection", self.number,
                      exc_info=exc)  # fmt: skip

    async def _connect(self) -> None:
        proxy = self.proxy
        target = proxy.listener.memcached
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self), target.host, target.port),
                proxy.config.upstream_connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            kind = "connect_timeout" if isinstance(exc, asyncio.TimeoutError) else "connect"
            proxy.upstream_failed(kind, exc)
            self.close()
            return
        transport = upstream.transport
        if self._closed or transport is None or transport.is_closing():
            # The client left meanwhile, or Memcached hung up at once: at its connection
            # limit it answers "ERROR Too many open connections" and closes, which reached
            # the client already (upstream_data), and its close closes the client too.
            if transport is not None:
                transport.close()
            return
        proxy.upstream_ok()
        self.upstream = upstream
        limits = proxy.config.limits
        transport.set_write_buffer_limits(limits.write_buffer_high, limits.write_buffer_low)
        early, self._early = self._early, []
        for chunk in early:
            self.data_received(chunk)
        self.resume_client(_PAUSE_CONNECTING)
        if self._client_eof:
            self._forward_eof()

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            # uvloop may deliver data before pause_reading() from connection_made applies.
            self._early.append(data)
            return
        requests, out = self.requests.feed(data)
        if requests:
            now = time.perf_counter()
            for request in requests:
                request.started = now
            pending = self.pending
            pending.extend(requests)
            if len(pending) >= self.max_pending:
                self.pause_client(_PAUSE_PENDING)
        if self.requests.raw and not self._unframed_reported:
            self._unframed_reported = True
            self.proxy.metrics.unframed(self.requests.raw_reason)
        if len(out) == 1:
            upstream.transport.write(out[0])
        elif out:
            upstream.transport.write(b"".join(out))
        if self.proxy.draining:
            self._close_if_idle()

    def eof_received(self) -> bool:
        # Half-close: let Memcached see the EOF after our forwarded bytes, as it would directly.
        self._client_eof = True
        if self.upstream is not None:
            self._forward_eof()
        return True

    def _forward_eof(self) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return
        if upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        else:
            upstream.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        observer = self.proxy.observer
        if observer is not None and self.pending:
            # Forwarded, never answered (a client that closes right after a noreply write):
            # Memcached may have run them. Handed over without a reply, they make their keys
            # cold in the shadow instead of silently missing from Redis.
            unanswered = [r for r in self.pending if r.capture and r.response is None]
            if unanswered:
                try:
                    observer(unanswered, self.number)
                except Exception as exc:  # (see upstream_data)
                    self.proxy.observer_failed(exc)
        self.pending.clear()
        self.proxy.session_closed(self)

    def pause_writing(self) -> None:
        # The client reads slowly: stop reading Memcached's replies for it.
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # -- upstream side -------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self.activity += 1
        transport = self.transport
        if transport is None or self._closed:
            return
        pieces, done = self.replies.feed(data)
        if len(pieces) == 1:
            if pieces[0]:
                transport.write(pieces[0])
        else:
            transport.write(b"".join(pieces))
        if done:
            now = time.perf_counter()
            observe = self._observe
            for request in done:
                if not request.synthetic:
                    observe(request.command, now - request.started)
            observer = self.proxy.observer
            if observer is not None:
                # Only sampled requests cross over; at rate 0 the shadow is not even called.
                captured = [r for r in done if r.capture]
                if captured:
                    try:
                        observer(captured, self.number)
                    except Exception as exc:  # a shadow bug never costs a client anything
                        self.proxy.observer_failed(exc)
            if self._paused & _PAUSE_PENDING and len(self.pending) < self.max_pending // 2:
                self.resume_client(_PAUSE_PENDING)
        if self.proxy.draining:
            self._close_if_idle()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        if self.pending and self.pending[0].expect != Expect.CLOSE and not self.proxy.draining:
            self.proxy.upstream_failed("disconnect", exc)
        self.close()

    # -- flow control and life cycle -----------------------------------------------------

    def pause_client(self, reason: int) -> None:
        was = self._paused
        self._paused |= reason
        if not was and self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_client(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def drain(self) -> None:
        """Shutdown: close as soon as no request is in flight (the caller bounds the wait).

        Reading goes on meanwhile, so a request whose bytes are still arriving completes.
        """
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        idle = not self.pending and self.requests.at_boundary
        if idle or self.upstream is None or self.requests.raw:
            self.close()

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered, then connection_lost

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ProxyServer:
    """Accepts clients and runs a ClientSession for each."""

    def __init__(
        self,
        config: Config,
        metrics: ProxyMetrics,
        health: MemcachedState | None = None,
        *,
        capture: CaptureDecider | None = None,
        observer: ReplyObserver | None = None,
        index: int = 0,
        process: int = 0,
    ) -> None:
        """index: which of config.backends this server listens for (its listen address and
        its Memcached); health: that Memcached's state, which the listener follows (none:
        always listening); process: which of the `workers` this process is."""
        self.config = config
        self.index = index
        self.tag = process << LISTENER_BITS | index
        self.listener: ListenerConfig = config.backends[index]
        self.metrics = metrics
        self.requests = metrics.requests_for(self.listener.label)
        self.health = health
        self.capture = capture
        self.observer = observer
        self.sessions: set[ClientSession] = set()
        self.draining = False
        self._listening: Listener | None = None
        self._want_open = False
        self._opening = False
        self._follower: asyncio.Task[None] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._address: tuple[str, int] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._observer_failures = 0  # since the last line logged about them
        self._observer_logged = -OBSERVER_LOG_INTERVAL

    def observer_failed(self, exc: Exception) -> None:
        """The shadow's hand-off raised (a bug): the client's reply went out already and its
        connection carries on; the shadow lost those requests. Counted; logged with its
        traceback at most once every OBSERVER_LOG_INTERVAL seconds, with how many since."""
        self.metrics.shadow_handoff_failed()
        self._observer_failures += 1
        now = time.monotonic()
        if now - self._observer_logged >= OBSERVER_LOG_INTERVAL:
            log.error(
                "shadow hand-off failed (%d times since the last report); clients unaffected, "
                "the shadow lost those requests",
                self._observer_failures,
                exc_info=exc,
            )
            self._observer_failures = 0
            self._observer_logged = now

    @property
    def listen_address(self) -> tuple[str, int]:
        """Where the proxy listens (the real port when the configured one was 0)."""
        assert self._address is not None, "start() first"
        return self._address

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind the configured address, or take `sock` (bound already: workers: N), and
        listen while Memcached is reachable (when this returns, if it is)."""
        if sock is None:
            listen = self.listener.listen
            socks = bind_sockets(listen.host, listen.port)
        else:
            socks = [sock]
        self._listening = Listener(socks, lambda: ClientSession(self))
        self._address = self._listening.address
        if self.health is None:
            self._want_open = True
        else:
            self.health.add_listener(self.accept_clients)
            self._want_open = self.health.ready
        if self._want_open:
            self._opening = True
            try:
                await self._listening.open()  # (a failure here is the caller's to report)
            finally:
                self._opening = False
            self.accept_clients(self._want_open)  # (Memcached may have gone away meanwhile)
        else:
            log.warning("refusing new clients on %s until memcached at %s accepts a connection",
                        self.listener.listen, self.listener.memcached)  # fmt: skip
        timeout = self.config.limits.idle_timeout
        if timeout > 0:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.create_task(self._sweep_idle(timeout), name="idle-sweep")

    def accept_clients(self, on: bool) -> None:
        """Open the listener (on), or close it: new clients are then refused, as by a dead
        Memcached; connections already open carry on."""
        self._want_open = on
        listening = self._listening
        if listening is None or self.draining or self._opening:
            return  # (an open under way looks at _want_open again when it is done)
        if not on:
            self._refuse()  # at once: no new client gets a connection that goes nowhere
        elif not listening.is_open and (self._follower is None or self._follower.done()):
            self._follower = asyncio.get_running_loop().create_task(
                self._follow(), name="listener"
            )

    async def _follow(self) -> None:
        """Open or close the listener until it is as wanted (_want_open)."""
        listening = self._listening
        while listening is not None and not self.draining:
            want = self._want_open
            if want == listening.is_open:
                return
            if not want:
                self._refuse()
                continue
            self._opening = True
            try:
                await listening.open()
            except OSError as exc:
                log.error("cannot listen for clients on %s again: %s; retrying every %gs",
                          self.listener.listen, exc, REOPEN_RETRY)  # fmt: skip
                await asyncio.sleep(REOPEN_RETRY)
            else:
                log.info("accepting clients on %s again", self.listener.listen)
            finally:
                self._opening = False

    def _refuse(self) -> None:
        if self._listening is not None and self._listening.is_open:
            self._listening.close()
            log.warning("refusing new clients on %s while memcached at %s is unreachable",
                        self.listener.listen, self.listener.memcached)  # fmt: skip

    async def _sweep_idle(self, timeout: float) -> None:
        """Close client connections that moved no byte either way for `timeout` seconds and
        wait for no reply (memcached's -o idle_timeout). One sweep every quarter timeout, at
        most a second apart: the client path only counts chunks, it never reads a clock."""
        period = min(1.0, timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session in list(self.sessions):
                if session.activity != session.swept_activity or session.pending:
                    session.swept_activity = session.activity
                    session.idle_since = now
                elif now - session.idle_since >= timeout and not session.closing:
                    self.metrics.closed_by_proxy("idle_timeout")
                    session.close()

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish within `timeout`, then close all."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._follower is not None:
            self._follower.cancel()
        if self._listening is not None:
            self._listening.release()
        for session in list(self.sessions):
            session.drain()
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout)
        except TimeoutError:
            log.warning("shutdown: %d connections still busy, closing them", len(self.sessions))
            for session in list(self.sessions):
                session.abort()

    def session_opened(self, session: ClientSession) -> None:
        self.sessions.add(session)
        self._all_closed.clear()
        self.metrics.client_opened()
        if self.draining:
            session.close()

    def session_closed(self, session: ClientSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.metrics.client_closed()
        if not self.sessions:
            self._all_closed.set()

    def upstream_failed(self, kind: str, exc: BaseException | None) -> None:
        self.metrics.upstream_error(kind)
        if self.health is not None and kind.startswith("connect"):
            why = "timed out" if kind == "connect_timeout" else _why(exc)
            where = self.listener.memcached
            self.health.note_failure(f"a client's connection to memcached at {where}: {why}")
        log.debug("upstream %s: %s", kind, exc)

    def upstream_ok(self) -> None:
        if self.health is not None:
            self.health.note_success()


def _why(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
