"""The shadow worker process: `python -m proxy.shadow.engine.worker FD`, started by process.py.

It runs a ShadowEngine (Redis store, Memcached reader, dispatcher) on its own event loop,
fed with the proxy's observed requests over the Unix socket FD (wire.py), and reports its
stats every STATS_INTERVAL seconds and its mismatch examples as they happen. It exits when
told to stop or when the proxy process goes away (end of file on the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import secrets
import signal
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any, Final, cast

from proxy import messages
from proxy.children import ParentLink
from proxy.shadow.engine.merge import Merger
from proxy.shadow.stats import ShadowStats
from proxy.shadow.wire import (
    COVERAGE,
    MARKER,
    MAX_FRAME,
    FrameDecoder,
    Group,
    WireError,
    stats_state,
    unpack_request,
)
from proxy.shadow.words import DropReason, ErrorKind

if TYPE_CHECKING:
    from proxy.shadow.service import ShadowEngine

log = logging.getLogger("memshadow.shadow")

STATS_INTERVAL: Final = 0.5
RELEASE_INTERVAL: Final = 0.05
"""With several proxy processes: how often the merge is looked at without a message (so a
proxy that stopped ticking holds the others back for merge.Merger's stall at most)."""
LATE: Final = DropReason.LATE_HANDOFF
"""Drop reason: another proxy process's requests came after later ones had been replayed
(it was stalled): their keys turn cold instead of being replayed out of order."""


_MERGED: Final = frozenset({"batch", "tick", "epoch"})
"""With several proxy processes, what the first one sends of its stream on the main socket
is merged with the feeds' (feed(0, ...)); the rest is handled at once."""


class WorkerSession(ParentLink):
    """The worker's end of the socket: runs the engine the proxy asks for."""

    name = "shadow worker"
    log = log

    def __init__(self) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.engine: ShadowEngine | None = None
        self.stats = ShadowStats()
        self.exit_code = 0
        self.received = 0  # requests taken from batches
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._examples_per_kind = 20
        self._example_windows: dict[str, tuple[float, int]] = {}
        # workers: N: the other proxy processes' streams, interleaved in reply order.
        self.merger: Merger | None = None
        self.feed_token = ""
        self._feed_server: asyncio.AbstractServer | None = None
        self._feeds = 0
        self.handlers = {
            "start": self._start,
            "batch": self._batch,
            "tick": self._tick,
            "epoch": self._epoch,
            "flush": self._flush,
            "idle": self._told_idle,
            "stop": self._told_stop,
        }
        self._feed_handlers: messages.Handlers = {
            "batch": self._feed_batch,
            "tick": self._feed_tick,
            "epoch": self._feed_epoch,
            "flush": self._feed_flush,
        }

    # -- socket -------------------------------------------------------------------------

    def broken(self, exc: WireError) -> None:
        log.error("shadow worker: %s", exc)
        self._spawn(self._stop(0.5))

    def handle(self, message: tuple[Any, ...]) -> None:
        try:
            if self.merger is not None and message[0] in _MERGED:
                self.feed(0, message)
            else:
                super().handle(message)
        except Exception:  # a bad message must not end the worker's other work
            log.exception("shadow worker: cannot handle %r", message[0])
            self.stats.errors[ErrorKind.INTERNAL] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        # The proxy process is gone (or told us to stop and closed): finish quickly.
        self.transport = None
        self._spawn(self._stop(0.5))

    # -- messages -----------------------------------------------------------------------

    def _batch(self, groups: list[Group], sent_at: float) -> None:
        engine = self.engine
        if engine is None:  # never: "start" comes first, and a failed start exits
            return
        dispatcher = engine.dispatcher
        for session, replied_at, items in groups:
            if session > 0:
                self.received += len(items)
                dispatcher.observe(
                    [unpack_request(item) for item in items], session, replied_at=replied_at
                )
            elif session == MARKER:  # requests of these keys were dropped on the way
                _forget(dispatcher, items)
            elif session == COVERAGE:
                dispatcher.coverage(0, *items)
        dispatcher.tick(sent_at)

    def _tick(self, now: float) -> None:
        if self.engine is not None:
            self.engine.dispatcher.tick(now)

    def _epoch(self, at: float) -> None:
        if self.engine is not None:
            self.engine.dispatcher.forget_all()

    def _flush(self, sent: float, replied: float, words: Any) -> None:
        if self.engine is not None:  # a flush_all from before this socket (flush_seen)
            self.engine.dispatcher.flush_seen(sent, replied, words)

    def _told_idle(self, token: int) -> None:
        self._spawn(self._idle(token))

    def _told_stop(self, timeout: float) -> None:
        self._spawn(self._stop(float(timeout)))

    def _start(
        self,
        config_blob: bytes,
        coverage: int,
        nice: int,
        shard: int = 0,
        shards: int = 1,
        token: str = "",
        since: float = 0.0,
    ) -> None:
        """coverage: the sample the proxy hands every request of (a sampler threshold);
        since: the proxy's perf_counter time when it began handing requests over (the
        start of its stream: with several proxies, the merge waits for nothing earlier)."""
        from proxy.runtime import configure_logging, tune_gc
        from proxy.shadow.service import ShadowEngine

        try:
            config = pickle.loads(config_blob)
            configure_logging(config.log)
            if nice:
                with contextlib.suppress(OSError):
                    os.nice(nice)
            self._examples_per_kind = config.shadow.examples_per_kind
            self.engine = ShadowEngine(
                config, self.stats, coverage, self._example, ticked=True, shard=(shard, shards)
            )
        except Exception:
            log.exception("shadow worker: cannot start")
            self._fail()
            return
        tune_gc()
        self._spawn(self._report())
        if shards > 1:
            self.merger = Merger(feeds=shards - 1)  # (one proxy process per shard)
            self.merger.open(0, since)
            self.feed_token = token
            self._spawn(self._merge_clock())
        task = self._spawn(self._begin(shard))
        task.add_done_callback(self._started)

    async def _begin(self, shard: int) -> None:
        assert self.engine is not None
        await self.engine.start()
        if self.merger is not None:
            self._feed_server = await _listen_for_feeds(self, shard)

    def _started(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("shadow worker: cannot start", exc_info=task.exception())
            self._fail()
            return
        address = None
        if self._feed_server is not None:
            address = _address_of(self._feed_server)
        self.send(messages.worker_ready(address))

    # -- workers: N: every proxy process's stream, merged -----------------------------------

    def feed_opened(self, since: float, coverage: int) -> int:
        """A proxy process's feed joined, handing over what it observes from `since` on,
        every request of the keys hashed below `coverage`; its stream number."""
        assert self.merger is not None and self.engine is not None
        self._feeds += 1
        self.merger.open(self._feeds, since, feed=True)
        self.engine.dispatcher.coverage(self._feeds, coverage, since)
        return self._feeds

    def feed_closed(self, stream: int, clean: bool) -> None:
        """A feed ended; without its goodbye, messages may have been lost with it: every
        key turns cold, ordered after what it did deliver."""
        if self.merger is not None:
            if not clean:
                self.feed(stream, messages.epoch(time.perf_counter()))
            self.merger.close(stream)
            self._release()
            if self.engine is not None:
                self.engine.dispatcher.scheduler.stream_closed(stream)

    def feed(self, stream: int, message: tuple[Any, ...]) -> None:
        """A batch, tick or epoch message of one proxy process's stream (stream 0: the first
        process, on the main socket)."""
        if self.engine is None or self.merger is None:
            return
        handler = self._feed_handlers.get(message[0])
        if handler is None:
            raise WireError(f"unexpected {message[0]!r} on a feed")
        handler(stream, *message[1:])
        self._release()

    def _feed_batch(self, stream: int, groups: list[Group], sent_at: float) -> None:
        assert self.merger is not None
        if stream == 0:  # (`received` is what the first process handed over)
            self.received += sum(len(g[2]) for g in groups if g[0] > 0)
        if any(g[0] == COVERAGE for g in groups):  # (whose it is, once merged)
            groups = [(COVERAGE, g[1], (stream, *g[2])) if g[0] == COVERAGE else g for g in groups]
        late = self.merger.add(stream, groups, sent_at)
        if late:
            self._late(late)

    def _feed_tick(self, stream: int, now: float) -> None:
        assert self.merger is not None
        self.merger.tick(stream, now)

    def _feed_epoch(self, stream: int, at: float) -> None:
        # What this stream lost came before `at`. At once: a verdict still waiting for its
        # evidence may have missed it (it turns unverified). And in order: a request
        # released after this point from before `at` must not warm a key.
        assert self.engine is not None and self.merger is not None
        self.engine.dispatcher.forget_all()
        late = self.merger.add(stream, [(MARKER, float(at), None)], float("-inf"))
        if late:
            self._late(late)

    def _feed_flush(self, stream: int, sent: float, replied: float, words: Any) -> None:
        assert self.engine is not None
        self.engine.dispatcher.flush_seen(sent, replied, words)

    def _release(self) -> None:
        engine, merger = self.engine, self.merger
        if engine is None or merger is None:
            return
        groups, watermark = merger.release(time.perf_counter())
        dispatcher = engine.dispatcher
        for session, replied_at, items in groups:
            if session > 0:
                dispatcher.observe(
                    [unpack_request(item) for item in items], session, replied_at=replied_at
                )
            elif session == MARKER:
                _forget(dispatcher, items)
            elif session == COVERAGE:
                dispatcher.coverage(*items)
        dispatcher.tick(watermark)

    def _late(self, groups: list[Group]) -> None:
        """Requests that came after later ones were replayed: their keys turn cold (every
        key, for a keyless one: flush_all)."""
        assert self.engine is not None
        dispatcher = self.engine.dispatcher
        for session, _, items in groups:
            if session == MARKER:
                _forget(dispatcher, items)
                continue
            if session == COVERAGE:
                dispatcher.coverage(*items)
                continue
            self.stats.dropped[LATE] += len(items)
            for item in items:
                _forget(dispatcher, unpack_request(item).keys or None)

    async def _merge_clock(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RELEASE_INTERVAL)
            self._release()

    def _fail(self) -> None:
        """A worker that cannot work exits (non-zero): the proxy restarts it with backoff."""
        self.exit_code = 1
        self._stopping = True
        if self.transport is not None:
            self.transport.abort()
        if not self.finished.done():
            self.finished.set_result(None)

    async def _report(self) -> None:
        """Stats every STATS_INTERVAL: the proxy's figures, and its sign that we are alive."""
        while not self._stopping:
            self._send_stats()
            await asyncio.sleep(STATS_INTERVAL)

    def _send_stats(self) -> None:
        self.send(messages.stats(stats_state(self.stats), self.received))

    def _example(self, kind: str, *fields: Any) -> None:
        """One mismatch example: its kind, then messages.example's other fields."""
        # Recorded (hashed, logged) by the proxy process, which holds the examples' secret.
        # It keeps the last examples_per_kind of each kind: more per second than that are
        # not worth hashing there (a mismatch storm must not load the client path).
        now = time.monotonic()
        start, count = self._example_windows.get(kind, (now, 0))
        if now - start >= 1.0:
            start, count = now, 0
        if count >= self._examples_per_kind:
            return
        self._example_windows[kind] = (start, count + 1)
        self.send(messages.example(kind, *fields))

    async def _idle(self, token: int) -> None:
        if self.engine is not None:
            while self.merger is not None and self.merger.pending and not self._stopping:
                await asyncio.sleep(RELEASE_INTERVAL)  # other proxies' requests still held
            await self.engine.dispatcher.idle()
        self._send_stats()
        self.send(messages.idle(token))

    async def _stop(self, timeout: float) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._feed_server is not None:
            self._feed_server.close()
        if self.engine is not None:
            await self.engine.stop(timeout)
        self._send_stats()
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _forget(dispatcher: Any, keys: list[bytes] | None) -> None:
    if keys is None:
        dispatcher.forget_all()
    else:
        dispatcher.forget(keys)


class FeedSession(asyncio.Protocol):
    """Another proxy process's stream (workers: N): ("hello", token, since, coverage) first,
    then
    batch, tick and epoch messages as on the main socket, and ("bye",) last."""

    def __init__(self, owner: WorkerSession) -> None:
        self.owner = owner
        # Small frames only until the hello proves the peer is one of ours.
        self.decoder = FrameDecoder(max_frame=HELLO_FRAME)
        self.transport: asyncio.Transport | None = None
        self.stream: int | None = None
        self.clean = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        uid = None
        with contextlib.suppress(OSError):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            uid = _CREDS.unpack(creds)[1]
        if uid != os.getuid():
            log.warning("shadow worker: refused a feed from uid %s", uid)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            if self.stream is None:
                hello = self.decoder.feed(data, limit=1)  # (small frames only until then)
                if not hello:
                    return
                message = hello[0]
                if message[0] != "hello" or not secrets.compare_digest(
                    str(message[1]), self.owner.feed_token
                ):
                    raise WireError("a feed must start with the right hello")
                self.stream = self.owner.feed_opened(float(message[2]), int(message[3]))
                self.decoder.max_frame = MAX_FRAME
                data = b""
            for message in self.decoder.feed(data):
                if message[0] == "bye":
                    self.clean = True
                    continue
                self.owner.feed(self.stream, message)
        except WireError as exc:
            log.error("shadow worker: feed closed: %s", exc)
            self.transport.abort()
        except Exception:  # a bad message must not end the worker's other work
            log.exception("shadow worker: cannot handle a feed message; closing the feed")
            self.owner.stats.errors[ErrorKind.INTERNAL] += 1
            self.transport.abort()  # (its keys turn cold; the proxy process reconnects)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.owner.feed_closed(self.stream, self.clean)


_CREDS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
HELLO_FRAME: Final = 4096


async def _listen_for_feeds(owner: WorkerSession, shard: int) -> asyncio.AbstractServer:
    """A Unix socket in the abstract namespace (no file to clean up, nothing on a read-only
    root filesystem): only this user's processes that hold the token may feed it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0memshadow-{os.getppid()}-{shard}-{secrets.token_hex(8)}")
        sock.listen(64)
        sock.setblocking(False)
        return await asyncio.get_running_loop().create_unix_server(
            lambda: FeedSession(owner), sock=sock
        )
    except BaseException:
        sock.close()
        raise


def _address_of(server: asyncio.AbstractServer) -> str:
    sockets: tuple[Any, ...] = tuple(getattr(server, "sockets", ()))
    name = sockets[0].getsockname()
    return name.decode("latin-1") if isinstance(name, bytes) else str(name)


async def serve(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    session = WorkerSession()
    await loop.create_unix_connection(lambda: session, sock=sock)
    await session.finished
    return session.exit_code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m proxy.shadow.engine.worker FD (memshadow starts it)",
              file=sys.stderr)  # fmt: skip
        return 2
    # The worker has a process group of its own; should a Ctrl-C or a group SIGTERM reach
    # it anyway, the proxy (which drains its clients first) stops it, or its exit does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    code = 0
    with contextlib.suppress(KeyboardInterrupt):
        code = runner(serve(int(args[0])))
    return code


if __name__ == "__main__":
    sys.exit(main())
