"""UpstreamHealth against a real memcached, a closed port and misbehaving fake servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from proxy.config import HostPort
from proxy.health import UpstreamHealth
from tests.support import ServerProcess

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


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    # A generous bound so a slow CI machine does not fail; the check is behaviour, not speed.
    async with asyncio.timeout(limit):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_not_ready_before_the_first_probe(closed_port: HostPort) -> None:
    health = UpstreamHealth(closed_port)
    assert not health.ready
    assert health.reason == "not probed yet"


async def test_ready_against_real_memcached(memcached: ServerProcess) -> None:
    health = UpstreamHealth(memcached.address, interval=0.05)
    await health.start()
    try:
        assert health.ready
        assert health.reason == ""
        assert await health.probe() is None
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
    health = UpstreamHealth(memcached.address, interval=0.02, timeout=1.0)
    await health.start()
    try:
        assert health.ready
        memcached.stop()
        await wait_until(lambda: not health.ready)
        assert health.reason.startswith(f"cannot connect to memcached at {memcached.address}")
        memcached.start()
        await wait_until(lambda: health.ready)
        assert health.reason == ""
    finally:
        await health.stop()


async def test_note_failure_is_immediate_and_triggers_an_early_probe(
    memcached: ServerProcess,
) -> None:
    # The interval is far longer than the test may take: only the early probe can recover.
    health = UpstreamHealth(memcached.address, interval=3600)
    await health.start()
    try:
        health.note_failure("connect to 127.0.0.1:1 refused")
        assert not health.ready
        assert health.reason == "connect to 127.0.0.1:1 refused"
        await wait_until(lambda: health.ready)
    finally:
        await health.stop()


async def test_note_success_is_immediate(closed_port: HostPort) -> None:
    health = UpstreamHealth(closed_port, interval=3600)
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


async def test_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answer; the client gives up first
        writer.close()

    async with fake_server(silent) as address:
        health = UpstreamHealth(address, timeout=0.2)
        assert await health.check() is False
        assert health.reason == f"memcached at {address} did not answer within 0.2s"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"ERROR\r\n", "answered version with b'ERROR\\r\\n'"),
        (b"", "closed the connection without answering version"),
        (b"x" * 5000, "sent an over-long reply to version"),
        (b"VERSION", "answered version with b'VERSION'"),  # cut short, then closed
    ],
)
async def test_unexpected_replies(reply: bytes, reason: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(reply)
        await writer.drain()
        writer.close()

    async with fake_server(answer) as address:
        health = UpstreamHealth(address)
        assert await health.check() is False
        assert health.reason == f"memcached at {address} {reason}"


async def test_fake_version_reply_is_ready() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"version\r\n"
        writer.write(b"VERSION 1.6.18\r\n")
        await writer.drain()
        writer.close()

    async with fake_server(answer) as address:
        health = UpstreamHealth(address)
        assert await health.check() is True


async def test_start_twice_and_stop_twice_are_harmless(memcached: ServerProcess) -> None:
    health = UpstreamHealth(memcached.address)
    await health.start()
    await health.start()
    await health.stop()
    await health.stop()
    assert health.ready  # the last known state is kept


async def counting_server(counts: dict[str, int]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts["connections"] += 1
        while line := await reader.readline():
            if line == b"version\r\n":
                counts["versions"] += 1
                writer.write(b"VERSION 1.6.18\r\n")
        writer.close()

    return handle


async def test_the_probe_keeps_one_connection_and_is_quiet_while_clients_get_answers() -> None:
    counts = {"connections": 0, "versions": 0}
    traffic = {"busy": False, "answered": 0}

    def answered() -> int:  # replies to clients: growing between any two looks while busy
        if traffic["busy"]:
            traffic["answered"] += 1
        return traffic["answered"]

    async with fake_server(await counting_server(counts)) as address:
        health = UpstreamHealth(address, interval=0.02, activity=answered)
        await health.start()
        try:
            await wait_until(lambda: counts["versions"] >= 5)  # no client traffic: probes
            assert counts["connections"] == 1  # all on one connection: no connection events
            traffic["busy"] = True
            await asyncio.sleep(0.05)  # a probe under way when traffic started may end
            quiet = counts["versions"]
            await asyncio.sleep(0.3)
            assert counts["versions"] == quiet  # clients get answers: nothing is sent
            assert health.ready
            traffic["busy"] = False
            await wait_until(lambda: counts["versions"] >= quiet + 3)  # idle again: probes
            assert counts["connections"] == 1
        finally:
            await health.stop()


async def test_a_kept_connection_closed_by_a_restart_is_replaced_within_one_probe(
    memcached: ServerProcess,
) -> None:
    health = UpstreamHealth(memcached.address, interval=3600)
    await health.start()
    try:
        assert health.ready
        memcached.stop()
        memcached.start()
        # The kept connection is dead; the next probe notices and connects again at once.
        assert await health.probe() is None
    finally:
        await health.stop()


async def test_a_host_name_that_does_not_resolve_is_named() -> None:
    health = UpstreamHealth(HostPort("no-such-host.invalid", 11211), timeout=5.0)
    failure = await health.probe()
    assert failure is not None
    where = "memcached at no-such-host.invalid:11211"
    assert failure.startswith(f"cannot resolve the host of {where}: ")
    assert "Unknown error" not in failure
