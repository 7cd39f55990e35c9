"""Shared fixtures: real memcached and redis-server on free loopback ports, and memshadow."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.support import ProxyThread, ServerProcess, memcached_argv, proxy_config, redis_argv

# Property tests judge what code does, never how fast: hypothesis's default 200 ms deadline per
# example (and its "too slow" health check) would fail one on a host that stalls.
settings.register_profile(
    "memshadow", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("memshadow")


@pytest.fixture
def memcached() -> Iterator[ServerProcess]:
    server = ServerProcess(memcached_argv())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server() -> Iterator[ServerProcess]:
    server = ServerProcess(redis_argv())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def proxy(memcached: ServerProcess) -> Iterator[ProxyThread]:
    thread = ProxyThread(proxy_config(memcached))
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture(autouse=True)
def no_exception_left_set() -> Iterator[None]:
    """After every test, no exception is left set as being handled in the test's thread (code
    compiled by mypyc once left one whenever a coroutine waited inside an except block: every
    later exception in the process then carried it as its context)."""
    yield
    assert sys.exc_info() == (None, None, None)
