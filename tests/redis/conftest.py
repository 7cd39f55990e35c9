"""Fixtures of the Redis-side tests: real memcached and redis-server on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop

from proxy.redis.layout import DEFAULT_ITEM_SIZE_MAX, DEFAULT_SLAB_CHUNK_MAX
from tests.redis.twin import Twin

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

SMALL_ITEM_SIZE_MAX = 4096
"""The differential memcached runs with -I 4k so that size-limit cases stay cheap."""
SMALL_SLAB_CHUNK_MAX = 2048


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.01)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Server:
    """A server process on a fixed loopback port; it can be stopped, paused and restarted."""

    def __init__(self, argv: Callable[[int], list[str]]) -> None:
        self.argv = argv
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            self.argv(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def url(self, db: int = 0, auth: str = "") -> str:
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"


DETERMINISTIC_LRU = "no_lru_maintainer,no_lru_crawler"
"""With the LRU maintainer on, a read can leave an async LRU bump holding a reference to the
item; incr/decr then writes a new, unpadded item instead of padding in place (observed: 10
of 40 decrs of "100" gave "99" instead of "99 "). The differential needs exact padding."""


def memcached_argv(*extra: str) -> Callable[[int], list[str]]:
    user = ["-u", "root"] if os.geteuid() == 0 else []
    return lambda port: [
        MEMCACHED,
        *user,
        "-p",
        str(port),
        "-l",
        "127.0.0.1",
        "-U",
        "0",
        "-t",
        "1",
        *extra,
    ]


def redis_argv(*extra: str) -> Callable[[int], list[str]]:
    return lambda port: [
        REDIS_SERVER,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        *extra,
    ]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The proxy runs on uvloop, so the async tests here run on it too."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def mc_default() -> Iterator[Server]:
    """memcached with default limits (-I 1m)."""
    server = Server(memcached_argv("-o", DETERMINISTIC_LRU)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mc_small() -> Iterator[Server]:
    """memcached with -I 4k and a 2 KiB slab_chunk_max."""
    server = Server(
        memcached_argv(
            "-I",
            str(SMALL_ITEM_SIZE_MAX),
            "-o",
            f"slab_chunk_max={SMALL_SLAB_CHUNK_MAX},{DETERMINISTIC_LRU}",
        )
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_shared() -> Iterator[Server]:
    """One redis-server for the tests that do not stop or reconfigure it."""
    server = Server(redis_argv()).start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., Server]]:
    """Start private redis-servers (extra arguments allowed); all are killed at teardown."""
    started: list[Server] = []

    def start(*extra: str) -> Server:
        server = Server(redis_argv(*extra)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def twin(mc_default: Server, redis_shared: Server) -> Iterator[Twin]:
    """memcached (-I 1m) and the Redis store (DB 1), both empty."""
    loop = uvloop.new_event_loop()
    pair = Twin(
        loop,
        mc_default.port,
        redis_shared.url(db=1),
        item_size_max=DEFAULT_ITEM_SIZE_MAX,
        slab_chunk_max=DEFAULT_SLAB_CHUNK_MAX,
    )
    pair.reset()
    yield pair
    pair.close()
    loop.close()


@pytest.fixture
def twin_small(mc_small: Server, redis_shared: Server) -> Iterator[Twin]:
    """memcached (-I 4k, slab_chunk_max 2 KiB) and the Redis store (DB 2), both empty."""
    loop = uvloop.new_event_loop()
    pair = Twin(
        loop,
        mc_small.port,
        redis_shared.url(db=2),
        item_size_max=SMALL_ITEM_SIZE_MAX,
        slab_chunk_max=SMALL_SLAB_CHUNK_MAX,
    )
    pair.reset()
    yield pair
    pair.close()
    loop.close()
