"""The shadow worker process: `python -m proxy.shadow.worker FD`, started by process.py.

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
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Final, cast

from proxy.shadow.control import ShadowControl
from proxy.shadow.stats import ShadowStats
from proxy.shadow.wire import FrameDecoder, WireError, encode, stats_state, unpack_request

if TYPE_CHECKING:
    from proxy.shadow.service import ShadowEngine

log = logging.getLogger("memshadow.shadow")

STATS_INTERVAL: Final = 0.5


class WorkerSession(asyncio.Protocol):
    """The worker's end of the socket: runs the engine the proxy asks for."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.engine: ShadowEngine | None = None
        self.control: ShadowControl | None = None
        self.stats = ShadowStats()
        self.exit_code = 0
        self.received = 0  # requests taken from batches
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._examples_per_kind = 20
        self._example_windows: dict[str, tuple[float, int]] = {}

    # -- socket -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except WireError as exc:
            log.error("shadow worker: %s", exc)
            self._spawn(self._stop(0.5))
            return
        for message in messages:
            try:
                self._handle(message)
            except Exception:  # a bad message must not end the worker's other work
                log.exception("shadow worker: cannot handle %r", message[0])
                self.stats.errors["internal"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        # The proxy process is gone (or told us to stop and closed): finish quickly.
        self.transport = None
        self._spawn(self._stop(0.5))

    def _send(self, message: tuple[Any, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(encode(message))

    # -- messages -----------------------------------------------------------------------

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        engine = self.engine
        if kind == "batch":
            if engine is None:  # never: "start" comes first, and a failed start exits
                return
            observe = engine.dispatcher.observe
            for session, replied_at, items in message[1]:
                self.received += len(items)
                observe([unpack_request(item) for item in items], session, replied_at=replied_at)
            engine.dispatcher.tick(message[2])
        elif kind == "tick":
            if engine is not None:
                engine.dispatcher.tick(message[1])
        elif kind == "lost":
            if engine is not None:
                engine.dispatcher.forget(message[1])
        elif kind == "epoch":
            if engine is not None:
                engine.dispatcher.forget_all()
        elif kind == "rate":
            if self.control is not None:
                self.control.set_rate(message[1], "proxy")
                self.control.set_enabled(message[2], "proxy")
        elif kind == "idle":
            self._spawn(self._idle(message[1]))
        elif kind == "start":
            self._start(*message[1:])
        elif kind == "stop":
            self._spawn(self._stop(float(message[1])))
        else:
            log.warning("shadow worker: unknown message %r", kind)

    def _start(self, config_blob: bytes, rate: float, enabled: bool, nice: int) -> None:
        from proxy.runtime import configure_logging, tune_gc
        from proxy.shadow.service import ShadowEngine

        try:
            config = pickle.loads(config_blob)
            configure_logging(config.log)
            if nice:
                with contextlib.suppress(OSError):
                    os.nice(nice)
            self.control = ShadowControl(rate, enabled)
            self._examples_per_kind = config.shadow.examples_per_kind
            self.engine = ShadowEngine(
                config, self.stats, self.control, self._example, ticked=True
            )
        except Exception:
            log.exception("shadow worker: cannot start")
            self._fail()
            return
        tune_gc()
        self._spawn(self._report())
        task = self._spawn(self.engine.start())
        task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("shadow worker: cannot start", exc_info=task.exception())
            self._fail()
            return
        self._send(("ready",))

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
        self._send(("stats", stats_state(self.stats), self.received))

    def _example(
        self,
        kind: str,
        command: str,
        key: bytes,
        memcached: dict[str, Any],
        redis: dict[str, Any],
        detail: str,
        story: dict[str, Any],
    ) -> None:
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
        self._send(("example", kind, command, key, memcached, redis, detail, story))

    async def _idle(self, token: int) -> None:
        if self.engine is not None:
            await self.engine.dispatcher.idle()
        self._send_stats()
        self._send(("idle", token))

    async def _stop(self, timeout: float) -> None:
        if self._stopping:
            return
        self._stopping = True
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
        print("usage: python -m proxy.shadow.worker FD (memshadow starts it)", file=sys.stderr)
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
