"""Fixtures of the Redis-side tests: real memcached and redis-server on free loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import uvloop

from proxy.redis.layout import DEFAULT_ITEM_SIZE_MAX, DEFAULT_SLAB_CHUNK_MAX
from tests.redis.twin import Twin
from tests.support import REDIS_SERVER, free_port, redis_argv
from tests.support import ServerProcess as Server
from tests.support import memcached_argv as shared_memcached_argv

__all__ = ["REDIS_SERVER", "Server", "free_port", "memcached_argv", "redis_argv"]

SMALL_ITEM_SIZE_MAX = 4096
"""The differential memcached runs with -I 4k so that size-limit cases stay cheap."""
SMALL_SLAB_CHUNK_MAX = 2048


DETERMINISTIC_LRU = "no_lru_maintainer,no_lru_crawler"
"""With the LRU maintainer on, a read can leave an async LRU bump holding a reference to the
item; incr/decr then writes a new, unpadded item instead of padding in place (observed: 10
of 40 decrs of "100" gave "99" instead of "99 "). The differential needs exact padding."""


def memcached_argv(*extra: str) -> Callable[[int], list[str]]:
    """One worker thread: the differential wants memcached as deterministic as it gets."""
    return shared_memcached_argv(*extra, threads=1)


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
