"""One TCP/TLS connection to Redis as an asyncio.Protocol: commands written in one batch per
loop iteration, replies read with hiredis.Reader and matched in FIFO order, each command's
deadline counted from its write."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypeAlias, cast

import hiredis

from proxy.redis.errors import (
    RedisError,
    RedisProtocolError,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    ShadowStarved,
)
from proxy.redis.resp import Reply
from proxy.redis.topology import is_cluster_refusal

log = logging.getLogger(__name__)

LATE_TIMER: Final = 0.05
"""A reply deadline timer that runs this much late says the event loop was held up: the
replies are read before any command is called timed out."""


ReplyCallback: TypeAlias = Callable[[Reply, RedisError | None], None]
"""Completion of one command sent with send_callback: called exactly once, with (reply, None)
or (None, the RedisError), never from inside the send call itself."""

Refusals: TypeAlias = Callable[[bytes, RedisReplyError, ReplyCallback], None]
"""Where a connection sends a cluster's refusal of a command (MOVED, ASK, READONLY, LOADING,
TRYAGAIN, CLUSTERDOWN, MASTERDOWN) instead of to its caller: the encoded command, the error,
and the completion, which the handler must call exactly once (after retrying, or not)."""


def deliver(callback: ReplyCallback, reply: Reply, error: RedisError | None) -> None:
    """Call a command's callback; a failing callback must not stop the other replies."""
    try:
        callback(reply, error)
    except Exception:
        log.exception("redis: reply callback %r failed", callback)


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


class RespProtocol(asyncio.Protocol):
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
        on_down: Callable[[RespProtocol], None],
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
        self.batches = 0
        """Writes made: each carries every command queued in one loop iteration."""

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
        self.batches += 1
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
