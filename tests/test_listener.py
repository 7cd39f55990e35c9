"""Listener: bound sockets that stop accepting (new clients refused, as by a dead memcached)
and accept again on the same port, alone and in an SO_REUSEPORT group, on uvloop and on
asyncio's own loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
import uvloop

from proxy.listener import Listener, bind_sockets


class _Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"hello")  # type: ignore[attr-defined]
        transport.close()


def _fate(port: int) -> str:
    """What a new client of 127.0.0.1:port gets: "hello", "refused" or "reset"."""
    with socket.socket() as sock:
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
            return sock.recv(100).decode() or "closed"
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"


async def _fate_of(port: int) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, _fate, port)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.param)


def _run(loop_kind: str, coro_fn: object) -> None:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro_fn())  # type: ignore[operator]


def test_closed_refuses_and_opens_again_on_the_same_port(loop_kind: str) -> None:
    async def scenario() -> None:
        (sock,) = bind_sockets("127.0.0.1", 0)  # port 0: resolved, then bound by number
        listener = Listener([sock], _Hello)
        port = listener.address[1]
        assert port > 0 and not listener.is_open
        assert await _fate_of(port) == "refused"  # bound, not listening yet
        for _ in range(3):
            await listener.open()
            assert listener.is_open and await _fate_of(port) == "hello"
            listener.close()
            assert not listener.is_open and await _fate_of(port) == "refused"
            assert listener.address == ("127.0.0.1", port)
        listener.release()
        assert sock.fileno() == -1

    _run(loop_kind, scenario)


def test_an_so_reuseport_group_refuses_only_when_every_member_is_closed(loop_kind: str) -> None:
    """`workers: N`: each process has its own socket on the address; the kernel spreads new
    clients over those that listen, and refuses them once none does."""

    async def scenario() -> None:
        (first,) = bind_sockets("127.0.0.1", 0, reuse_port=True)
        port = first.getsockname()[1]
        (second,) = bind_sockets("127.0.0.1", port, reuse_port=True)
        a, b = Listener([first], _Hello), Listener([second], _Hello)
        await a.open()
        await b.open()
        assert {await _fate_of(port) for _ in range(20)} == {"hello"}
        a.close()
        assert {await _fate_of(port) for _ in range(20)} == {"hello"}  # b takes them all
        b.close()
        assert await _fate_of(port) == "refused"
        await a.open()
        assert {await _fate_of(port) for _ in range(20)} == {"hello"}
        a.release()
        b.release()

    _run(loop_kind, scenario)


def test_every_address_of_a_host_is_bound_on_one_port() -> None:
    socks = bind_sockets("localhost", 0)
    try:
        ports = {sock.getsockname()[1] for sock in socks}
        families = {sock.family for sock in socks}
        assert len(ports) == 1 and len(socks) == len(families)
    finally:
        for sock in socks:
            sock.close()
