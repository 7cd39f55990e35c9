"""The processes memshadow starts (shadow workers, the extra proxy processes of
`workers: N`): started on a private socketpair, supervised (ready, heartbeat, restart with
backoff) by one ChildSlot each, and reaped without blocking the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

from proxy.messages import Handlers, Message
from proxy.shadow.wire import FrameDecoder, WireError, encode

REAP_TIMEOUT: Final = 2.0  # seconds a child has to exit once told, before it is killed
READY_TIMEOUT: Final = 10.0  # seconds start() waits for its children to say they are ready
HEARTBEAT_TIMEOUT: Final = 10.0
"""A child silent this long (each reports at least every second) is stuck: it is killed and
started again."""
BACKOFF_INITIAL: Final = 0.5
BACKOFF_MAX: Final = 10.0
STABLE_AFTER: Final = 30.0  # a child that lived this long restarts with the initial backoff


def start_child(
    module: str, fds: tuple[int, ...] = ()
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """`python -P -m MODULE FD`, FD being its end of a new socketpair; returns the process
    and our end. `fds` are passed too (listen sockets). Its own process group: a Ctrl-C or
    a group SIGTERM is for the first process, which drains clients, then stops its
    children. -P: never import from the working directory."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", module, str(theirs.fileno())],
            pass_fds=(theirs.fileno(), *fds),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            env=child_environment(),
            process_group=0,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


async def reap(process: subprocess.Popen[bytes]) -> int:
    """Wait for a child that was told to end (killing it after REAP_TIMEOUT)."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, process.wait, REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        return await loop.run_in_executor(None, process.wait)
    except asyncio.CancelledError:
        process.kill()
        raise


def child_environment() -> dict[str, str]:
    """The proxy's environment, with this very package importable (a source checkout run
    from another directory, a test runner's sys.path). An installed package is found by the
    interpreter anyway, and putting site-packages on PYTHONPATH would put it before the
    standard library."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if root.name not in ("site-packages", "dist-packages"):
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(root) if not path else os.pathsep.join((str(root), path))
    return env


def deliver(handlers: Handlers, message: Message, log: logging.Logger, name: str) -> None:
    """Call the handler of the message's kind with its fields (a kind without one is
    logged and skipped: `name` is who sent it)."""
    handler = handlers.get(message[0])
    if handler is None:
        log.warning("%s: unknown message %r", name, message[0])
        return
    handler(*message[1:])


class ChildSlot:
    """One child process that is kept running: started (`python -m MODULE FD`) on a
    socketpair of its own, whose messages (wire.py frames) go to `handlers` by kind; killed
    when silent for HEARTBEAT_TIMEOUT, started again with backoff when it exits, and reaped.

    A subclass adds what is its own: what it sends, its handlers, and the hooks below
    (`launching`, `launched`, `gone`, `start_failed`, `exited`). `ready` is done once the
    subclass calls `set_ready()`, or once the first life failed (nobody waits for it)."""

    def __init__(
        self,
        what: str,
        index: int,
        module: str,
        stopping: Callable[[], bool],
        logger: logging.Logger,
    ) -> None:
        self.index = index
        self.name = f"{what} {index}"  # in log lines: "proxy process 1", "shadow worker 0"
        self.module = module
        self.log = logger
        self._stopping = stopping
        self.handlers: Handlers = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] | None = None  # the current life's socket closed
        self.ready: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.restarts = 0
        self.last_heard = time.monotonic()
        self.fds: tuple[int, ...] = ()  # the descriptors passed to the current child

    # -- what the owner calls -------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (the first child is started at once)."""
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.task = loop.create_task(self._supervise(), name=self.name.replace(" ", "-"))

    async def stop(self) -> None:
        """Stop supervising; end the child (killed after REAP_TIMEOUT if it does not exit)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.end()

    def send(self, message: Message) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(encode(message))

    def dispatch(self, message: Message) -> None:
        """A message from the child (each one is a sign of life)."""
        self.last_heard = time.monotonic()
        deliver(self.handlers, message, self.log, self.name)

    def set_ready(self) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(None)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def end(self) -> int | None:
        """Reap the current child (its exit status; None without one)."""
        process = self.process
        if process is None:
            return None
        self.process = None
        return await reap(process)

    # -- hooks ----------------------------------------------------------------------------

    def launching(self) -> list[socket.socket]:
        """Before each start: sockets to pass to the child (closed here once it holds them)."""
        return []

    def launched(self) -> None:
        """The child runs and its socket is connected: tell it what to do."""

    def gone(self) -> None:
        """Its socket closed (it exited, or was killed): forget what died with it."""

    def start_failed(self) -> None:
        """It could not be started (logged already)."""

    def exited(self, code: int | None) -> None:
        """It was reaped (not at a stop); it is started again after the backoff."""

    # -- supervision ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = BACKOFF_INITIAL
        while not self._stopping():
            started = time.monotonic()
            try:
                await self._spawn()
            except Exception as exc:  # whatever it is, try again later
                self.log.error("cannot start %s: %s", self.name, exc)
                self.start_failed()
                await self.end()
            else:
                await self._watch()
                self.transport = None
                self.gone()
                if self._stopping():
                    return
                code = await self.end()
                self.exited(code)
                if time.monotonic() - started >= STABLE_AFTER:
                    backoff = BACKOFF_INITIAL
                self.log.error(
                    "%s exited (status %s); restarting it in %.1fs", self.name, code, backoff
                )
            self.restarts += 1
            self.set_ready()  # start() waits no longer for a failing child
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _spawn(self) -> None:
        passed = self.launching()
        try:
            self.fds = tuple(sock.fileno() for sock in passed)
            self.process, ours = start_child(self.module, self.fds)
        finally:
            for sock in passed:  # the child holds them now
                sock.close()
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        try:
            ours.setblocking(False)
            await loop.create_unix_connection(lambda: _ChildLink(self), sock=ours)
        except BaseException:
            ours.close()
            self.process.kill()
            await self.end()
            raise
        self.last_heard = time.monotonic()
        self.launched()

    async def _watch(self) -> None:
        """Until the child's socket closes; kill it if it stops reporting."""
        closed = self.closed
        assert closed is not None
        self.last_heard = time.monotonic()
        while not closed.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), 1.0)
            silent = time.monotonic() - self.last_heard
            if not closed.done() and silent > HEARTBEAT_TIMEOUT and not self._stopping():
                self.log.error("%s silent for %.0fs; killing it", self.name, silent)
                if self.process is not None:
                    self.process.kill()
                if self.transport is not None:
                    self.transport.abort()
                await closed


class StopReading(Exception):
    """Raised by a handler of a ParentLink: the rest of what was read is not for us (logged
    by the handler, which also started what follows)."""


class ParentLink(asyncio.Protocol):
    """A child's end of its socket to the process that started it: messages to `handlers`
    by kind (a subclass sets them, and the hooks `broken` and `connection_lost`)."""

    name = "child"  # in log lines
    log = logging.getLogger("memshadow")

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.handlers: Handlers = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except WireError as exc:
            self.broken(exc)
            return
        try:
            for message in messages:
                self.handle(message)
        except StopReading:
            return

    def handle(self, message: Message) -> None:
        deliver(self.handlers, message, self.log, self.name)

    def send(self, message: Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(encode(message))

    def broken(self, exc: WireError) -> None:
        """What came is not a frame of ours (the stream cannot be read on)."""


class _ChildLink(asyncio.Protocol):
    """Our end of one child's socket: frames in, messages to the slot."""

    def __init__(self, slot: ChildSlot) -> None:
        self.slot = slot
        self.decoder = FrameDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.slot.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        slot = self.slot
        try:
            messages = self.decoder.feed(data)
        except WireError as exc:
            slot.log.error("%s: %s; restarting it", slot.name, exc)
            if slot.transport is not None:
                slot.transport.abort()
            return
        for message in messages:
            slot.dispatch(message)

    def connection_lost(self, exc: Exception | None) -> None:
        closed = self.slot.closed
        if closed is not None and not closed.done():
            closed.set_result(None)


__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "HEARTBEAT_TIMEOUT",
    "READY_TIMEOUT",
    "STABLE_AFTER",
    "ChildSlot",
    "ParentLink",
    "StopReading",
    "child_environment",
    "deliver",
    "reap",
    "start_child",
]
