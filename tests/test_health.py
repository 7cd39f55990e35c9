"""UpstreamHealth against a real memcached (text, binary-only, with ascii auth, at its
connection limit), a closed port and fake servers: ready from connects alone, never a byte
sent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from proxy.address import HostPort
from proxy.health import UpstreamHealth
from tests.support import (
    ServerProcess,
    auth_file,
    memcached_argv,
    memcached_stats,
    wait_until_async,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def closed_port() -> Iterator[HostPort]:
    # Bound but never listening: connecting is refused, and no other test can take the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield HostPort("127.0.0.1", sock.getsockname()[1])


@contextlib.asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[HostPort]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield HostPort("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def test_not_ready_before_the_first_probe(closed_port: HostPort) -> None:
    health = UpstreamHealth(closed_port)
    assert not health.ready
    assert health.reason == "not probed yet"


async def test_ready_against_real_memcached_and_not_a_byte_sent(memcached: ServerProcess) -> None:
    health = UpstreamHealth(memcached.address)
    await health.start()
    try:
        assert health.ready
        assert health.reason == ""
        assert await health.probe() is None
        stats = memcached_stats(memcached.port)  # the first request memcached ever answers
        assert (stats["bytes_read"], stats["bytes_written"]) == ("7", "0")  # its own "stats"
    finally:
        await health.stop()


async def test_not_ready_against_a_closed_port(closed_port: HostPort) -> None:
    health = UpstreamHealth(closed_port, timeout=2.0)
    await health.start()
    try:
        assert not health.ready
        assert health.reason == f"cannot connect to memcached at {closed_port}: Connection refused"
    finally:
        await health.stop()


async def test_follows_memcached_going_down_and_coming_back(memcached: ServerProcess) -> None:
    health = UpstreamHealth(memcached.address, retry=0.02, timeout=1.0)
    changes: list[bool] = []
    health.add_listener(changes.append)
    await health.start()
    try:
        assert health.ready and changes == [True]
        memcached.stop()  # the kept connection closes: a connect right away is refused
        await wait_until_async(lambda: not health.ready)
        assert health.reason.startswith(f"cannot connect to memcached at {memcached.address}")
        memcached.start()
        await wait_until_async(lambda: health.ready)
        assert health.reason == ""
        assert changes == [True, False, True]
    finally:
        await health.stop()


async def test_a_restart_is_seen_through_the_kept_connection_alone(
    memcached: ServerProcess,
) -> None:
    """Nothing is sent and nothing polls while the kept connection is open: a restart is
    noticed because memcached closes it, and a new connection is kept."""
    health = UpstreamHealth(memcached.address, retry=3600)
    await health.start()
    try:
        assert health.connects == 1
        memcached.restart()
        await wait_until_async(lambda: health.connects == 2)
        assert health.ready
    finally:
        await health.stop()


async def test_note_failure_is_immediate_and_triggers_an_early_connect(
    memcached: ServerProcess,
) -> None:
    # The retry period is far longer than the test may take: only the early connect recovers.
    health = UpstreamHealth(memcached.address, retry=3600)
    await health.start()
    try:
        health.note_failure("connect to 127.0.0.1:1 refused")
        assert not health.ready
        assert health.reason == "connect to 127.0.0.1:1 refused"
        await wait_until_async(lambda: health.ready)
        assert health.connects == 2
    finally:
        await health.stop()


async def test_note_success_is_immediate(closed_port: HostPort) -> None:
    health = UpstreamHealth(closed_port, retry=3600)
    await health.start()
    try:
        assert not health.ready
        health.note_success()
        assert health.ready
        assert health.reason == ""
        health.note_failure()
        assert not health.ready
        assert health.reason == "a proxy connection to memcached failed"
    finally:
        await health.stop()


async def test_a_server_that_accepts_is_ready_whatever_it_says() -> None:
    """Readiness is a connect: a server that speaks no text protocol is not held against."""

    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # says nothing; the probe never asks anything
        writer.close()

    async with fake_server(rude) as address:
        health = UpstreamHealth(address)
        assert await health.check() is True
        await health.stop()


@pytest.mark.parametrize(
    "flags",
    [("-B", "binary"), ("-Y", "AUTH_FILE")],
    ids=["binary-only", "ascii-auth"],
)
async def test_binary_only_and_auth_requiring_memcacheds_are_ready(
    flags: tuple[str, str],
) -> None:
    """memcached -B binary closes a connection at its first text byte; -Y answers any
    command before authentication with CLIENT_ERROR unauthenticated: neither is ever asked
    anything, so both are ready."""
    with auth_file() as auth:
        server = ServerProcess(memcached_argv(*(auth if f == "AUTH_FILE" else f for f in flags)))
        server.start()
        health = UpstreamHealth(server.address, retry=0.05)
        try:
            await health.start()
            await asyncio.sleep(0.3)  # a few retry periods: nothing changes
            assert health.ready and health.connects == 1
        finally:
            await health.stop()
            server.stop()


async def test_at_its_connection_limit_memcached_is_ready_and_not_hammered() -> None:
    """Past -c memcached accepts, says "ERROR Too many open connections" and closes: it
    answers (a client gets that same line), so it is ready; the kept connection is then made
    again after a doubling backoff, not every retry period."""
    server = ServerProcess(memcached_argv("-c", "30", threads=1))
    server.start()
    held: list[socket.socket] = []
    health = UpstreamHealth(server.address, retry=0.05)
    try:
        while True:  # fill it: a new connection is told it is one too many
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            held.append(sock)
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                if sock.recv(100).startswith(b"ERROR Too many"):
                    break
        await health.start()
        assert health.ready
        await asyncio.sleep(1.0)  # 0.1 + 0.2 + 0.4: three more at most, not twenty
        assert health.ready and health.connects <= 5
    finally:
        await health.stop()
        for sock in held:
            sock.close()
        server.stop()


async def test_the_kept_connection_has_tcp_keepalive(memcached: ServerProcess) -> None:
    """A Memcached host that vanishes without a word (no FIN) is found by the kernels' own
    keep-alive packets, which memcached never sees."""
    health = UpstreamHealth(memcached.address)
    await health.start()
    try:
        assert health._kept is not None and health._kept.transport is not None
        sock = health._kept.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
    finally:
        await health.stop()


async def test_start_twice_and_stop_twice_are_harmless(memcached: ServerProcess) -> None:
    health = UpstreamHealth(memcached.address)
    await health.start()
    await health.start()
    await health.stop()
    await health.stop()
    assert health.ready  # the last known state is kept


async def test_a_host_name_that_does_not_resolve_is_named() -> None:
    health = UpstreamHealth(HostPort("no-such-host.invalid", 11211), timeout=5.0)
    failure = await health.probe()
    assert failure is not None
    where = "memcached at no-such-host.invalid:11211"
    assert failure.startswith(f"cannot resolve the host of {where}: ")
    assert "Unknown error" not in failure
