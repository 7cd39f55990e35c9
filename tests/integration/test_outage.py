"""Memcached down, memshadow up: what a client sees directly and through memshadow must be
the same. New clients are refused, as a dead Memcached refuses them (per listener, in every
proxy process of `workers: N`), so pymemcache's noreply `set` raises instead of returning
True for a write that is lost; connections already open see what they would directly; the
listener opens again as soon as Memcached answers, from startup on. memshadow's watch
on Memcached is a connect: a Memcached that speaks only binary, or wants authentication
first, is served."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from pymemcache.client.base import Client

from proxy.address import HostPort
from proxy.config import ListenerConfig
from tests.support import (
    ProxyThread,
    RawClient,
    ServerProcess,
    auth_file,
    memcached_argv,
    proxy_config,
    start_memshadow,
    wait_until,
)


def _set(port: int, noreply: bool = True) -> str:
    """A new pymemcache client's `set` (noreply by default, as pymemcache's is): "True", or
    the name of what it raised."""
    client = Client(("127.0.0.1", port), connect_timeout=5, timeout=5)
    try:
        return str(client.set("k", b"v", noreply=noreply))
    except Exception as exc:
        return type(exc).__name__
    finally:
        client.close()


def _sets(port: int, n: int = 20, noreply: bool = True) -> set[str]:
    """The outcomes of n new clients' sets: with `workers: N` the kernel spreads them over
    every process."""
    return {_set(port, noreply) for _ in range(n)}


def _outcome(client: Client, call: str) -> str:
    try:
        return repr(client.get("k") if call == "get" else client.set("k", b"w"))
    except Exception as exc:
        return type(exc).__name__


class _Memshadow:
    """memshadow itself (python -m proxy), its log drained."""

    def __init__(self, *args: str) -> None:
        self.proc, self.port = start_memshadow(
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", *args
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        self._pump = threading.Thread(target=lambda: self.lines.extend(stderr), daemon=True)
        self._pump.start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def memshadow_factory() -> Iterator[type[_Memshadow]]:
    started: list[_Memshadow] = []

    class Started(_Memshadow):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Started
    for one in started:
        one.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_memcached_down_and_back_as_a_pymemcache_client_sees_it_directly(
    memcached: ServerProcess,
    memshadow_factory: type[_Memshadow],
    workers: int,
    record_property: pytest.RecordProperty,
) -> None:
    memshadow = memshadow_factory("--memcached", str(memcached.address), "--workers", str(workers))
    direct, proxied = memcached.port, memshadow.port
    # (STORED awaited: a noreply set may still be in memcached's queue when a get comes)
    assert _sets(direct, 1, noreply=False) == _sets(proxied, noreply=False) == {"True"}
    # Connections open before the outage.
    open_direct = Client(("127.0.0.1", direct), connect_timeout=5, timeout=5)
    open_proxied = Client(("127.0.0.1", proxied), connect_timeout=5, timeout=5)
    assert _outcome(open_direct, "get") == _outcome(open_proxied, "get") == "b'v'"

    memcached.stop()
    assert _sets(direct, 1) == {"ConnectionRefusedError"}
    # memshadow knows at once (its idle connection to Memcached closed); every process.
    wait_until(lambda: _sets(proxied) == {"ConnectionRefusedError"}, what="memshadow refuses")
    assert _sets(proxied, 40) == {"ConnectionRefusedError"}  # (one open process would take them)
    assert _sets(proxied, 5, noreply=False) == {"ConnectionRefusedError"}
    # An open connection: closed under its next request, then refused on reconnecting.
    for call in ("get", "set"):
        assert _outcome(open_direct, call) == _outcome(open_proxied, call), call
    assert _outcome(open_proxied, "set") == "ConnectionRefusedError"

    memcached.start()  # returns once memcached accepts connections
    back = time.monotonic()
    wait_until(lambda: _set(proxied, noreply=False) == "True", what="memshadow serves again")
    record_property("reopen_delay_ms", round((time.monotonic() - back) * 1000, 1))
    assert _sets(proxied, 40, noreply=False) == {"True"}
    assert _sets(direct, 1) == {"True"}
    open_direct.close()
    open_proxied.close()
    assert any("refusing new clients" in line for line in memshadow.lines), memshadow.lines


def test_started_before_memcached_it_refuses_until_memcached_answers(
    memcached: ServerProcess, memshadow_factory: type[_Memshadow]
) -> None:
    """The race at startup: memshadow never accepts a client before its Memcached has
    accepted a connection."""
    memcached.stop()
    memshadow = memshadow_factory("--memcached", str(memcached.address), "--workers", "2")
    assert _sets(memshadow.port) == _sets(memcached.port, 1) == {"ConnectionRefusedError"}
    memcached.start()
    wait_until(lambda: _sets(memshadow.port, noreply=False) == {"True"}, what="memshadow serves")


def test_each_listener_refuses_only_while_its_own_memcached_is_down(
    memcached: ServerProcess,
) -> None:
    other = ServerProcess(memcached_argv()).start()
    any_port = HostPort("127.0.0.1", 0)
    config = replace(
        proxy_config(memcached),
        listeners=(
            ListenerConfig(any_port, memcached.address, "a"),
            ListenerConfig(any_port, other.address, "b"),
        ),
    )
    proxy = ProxyThread(config, follow_memcached=True)
    proxy.start()
    try:
        a, b = proxy.ports
        assert _sets(a) == _sets(b) == {"True"}
        other.stop()
        wait_until(lambda: _sets(b) == {"ConnectionRefusedError"}, what="listener b refuses")
        assert _sets(a, noreply=False) == {"True"}
        other.start()
        wait_until(lambda: _sets(b, noreply=False) == {"True"}, what="listener b serves again")
    finally:
        proxy.stop()
        other.stop()


def test_a_binary_only_memcached_is_served(memcached_binary: ServerProcess) -> None:
    """memcached -B binary: ready (the listener opens), and a binary request through
    memshadow gets the reply it gets directly."""
    proxy = ProxyThread(proxy_config(memcached_binary), follow_memcached=True)
    proxy.start()
    try:
        version = bytes([0x80, 0x0B]) + bytes(22)  # binary `version`
        replies = []
        for port in (memcached_binary.port, proxy.port):
            client = RawClient(port)
            client.send(version)
            replies.append(client.read_quiet(30, limit=30, until=b"1.6.18"))
            client.close()
        assert replies[0] == replies[1] and replies[0].endswith(b"1.6.18")
        assert proxy.healths[0].ready
    finally:
        proxy.stop()


def test_a_memcached_that_wants_authentication_is_served_as_directly() -> None:
    """memcached -Y: ready, and a client's authentication and requests through memshadow
    get what they get directly."""
    with auth_file("user:pass") as auth:
        server = ServerProcess(memcached_argv("-Y", auth)).start()
        proxy = ProxyThread(proxy_config(server), follow_memcached=True)
        proxy.start()
        try:
            assert proxy.healths[0].ready
            steps = [
                (b"get k\r\n", b"\r\n"),
                (b"set auth 0 0 9\r\nuser pass\r\n", b"\r\n"),
                (b"set k 0 0 1\r\nv\r\nget k\r\n", b"END\r\n"),
            ]
            replies = []
            for port in (server.port, proxy.port):
                client = RawClient(port)
                for request, end in steps:
                    client.send(request)
                    replies.append(client.read_until(end))
                client.close()
            assert replies[:3] == replies[3:]
            assert replies[:3] == [
                b"CLIENT_ERROR unauthenticated\r\n",
                b"STORED\r\n",
                b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n",
            ]
        finally:
            proxy.stop()
            server.stop()


@pytest.fixture
def memcached_binary() -> Iterator[ServerProcess]:
    server = ServerProcess(memcached_argv("-B", "binary")).start()
    yield server
    server.stop()

