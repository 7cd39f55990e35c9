"""Several Memcached backends: one listener in front of each, the apps' client-side hashing
unchanged (pymemcache's HashClient over the listeners), one shadow for all.

Each key must stay on the Memcached its listener fronts, the client-path figures carry the
listener's name, and the shadow must re-read a key on the Memcached it lives on: a value
changed behind the proxy on the second backend is a `value` mismatch, found there.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheClientError

from proxy.address import HostPort
from proxy.config import Config, ListenerConfig
from proxy.redis.layout import unpack_value
from tests.integration.hammer import figures
from tests.integration.test_shadow import mc_call, mc_item, redis_call
from tests.support import (
    ProxyThread,
    ServerProcess,
    find_divergence,
    memcached_argv,
    proxy_config,
)


@pytest.fixture(params=["process", "inline"])
def worker_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def memcached_b() -> Iterator[ServerProcess]:
    server = ServerProcess(memcached_argv()).start()
    yield server
    server.stop()


def _config(a: ServerProcess, b: ServerProcess, redis: ServerProcess, worker: str) -> Config:
    config = proxy_config(a, redis, 1.0, worker=worker, backfill=True)
    any_port = HostPort("127.0.0.1", 0)
    return replace(
        config,
        listeners=(
            ListenerConfig(any_port, a.address, "cache-a"),
            ListenerConfig(any_port, b.address, "cache-b"),
        ),
    )


def test_two_listeners_a_hashing_client_and_one_shadow(
    worker_mode: str,
    memcached: ServerProcess,
    memcached_b: ServerProcess,
    redis_server: ServerProcess,
) -> None:
    proxy = ProxyThread(_config(memcached, memcached_b, redis_server, worker_mode))
    proxy.start()
    servers = [("127.0.0.1", port) for port in proxy.ports]
    backend_of = dict(zip(proxy.ports, (memcached, memcached_b), strict=True))
    keys = [f"user:{i}" for i in range(200)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        client = HashClient(servers, default_noreply=False, timeout=10, use_pooling=False)
        try:
            for _ in range(400):
                key = rng.choice(keys)
                op = rng.random()
                if op < 0.4:
                    client.get(key)
                elif op < 0.7:
                    client.set(key, rng.randbytes(rng.choice((1, 50, 500))), expire=3600)
                elif op < 0.8:
                    client.set(key, b"10")
                    with contextlib.suppress(MemcacheClientError):  # another thread's append
                        client.incr(key, 5)
                elif op < 0.9:
                    client.append(key, b"-tail")
                else:
                    client.delete(key)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    try:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        proxy.settle(60)

        # Each key lives on the Memcached behind the listener the hashing client chose.
        router = HashClient(servers, default_noreply=False, timeout=10)
        for key in keys:
            port = router._get_client(key).server[1]
            home = backend_of[port]
            other = memcached_b if home is memcached else memcached
            assert mc_item(other.port, key) is None, key
            item = mc_item(home.port, key)
            assert (item[1] if item else None) == router.get(key), key

        # The client-path figures carry each listener's name.
        for name in ("cache-a", "cache-b"):
            assert proxy.metrics.requests_for(name).total() > 500, name
        text = proxy.metrics.render().decode()
        assert 'listener="cache-a"' in text and 'listener="cache-b"' in text

        result = figures(proxy)
        assert result["outcomes"].get("mismatch", 0) == 0, result["mismatches"]  # type: ignore[union-attr]
        assert result["outcomes"]["match"] > 1000  # type: ignore[index]

        # A key written on the second backend behind the proxy, then read through it: the
        # shadow backfills it from the Memcached it lives on (read on the first, it would
        # copy a miss, and the next read would be a false missing_in_redis).
        key = next(
            k for k in (f"outside:{i}" for i in range(100)) if _home(router, proxy.ports, k) == 1
        )
        mc_call(memcached_b.port, b"set %s 5 3600 7\r\noutside\r\n" % key.encode())
        assert router.get(key) == b"outside"
        proxy.settle(30)
        raw = redis_call(redis_server.port, "GET", key)
        assert isinstance(raw, bytes) and unpack_value(raw).data == b"outside"
        router.get(key)
        proxy.settle(30)
        assert figures(proxy)["mismatches"] == {}

        def homed(listener: int) -> Callable[[int], str]:
            """Keys the hashing client sends to `listener`."""
            return lambda attempt: next(
                k
                for k in (f"probe:{listener}:{attempt}:{i}" for i in range(100))
                if _home(router, proxy.ports, k) == listener
            )

        def establish(key: str) -> None:
            router.set(key, b"original", expire=3600)
            router.get(key)

        # A key of the second backend changed behind the proxy: re-read there, a `value`
        # mismatch (re-read on the first backend, it would look missing instead).
        find_divergence(
            proxy,
            "on cache-b",
            "value",
            establish,
            lambda key: mc_call(memcached_b.port, b"set %s 0 3600 5\r\nother\r\n" % key.encode()),
            router.get,
            keys=homed(1),
        )
        assert figures(proxy)["mismatches"] == {"get:value": 1}
        # A key of the first backend deleted in Redis: missing_in_redis.
        find_divergence(
            proxy,
            "on cache-a",
            "missing_in_redis",
            establish,
            lambda key: redis_call(redis_server.port, "DEL", key),
            router.get,
            keys=homed(0),
        )
        assert figures(proxy)["mismatches"] == {"get:value": 1, "get:missing_in_redis": 1}
        router.close()
    finally:
        proxy.stop()


def _home(router: HashClient, ports: list[int], key: str) -> int:
    """Which listener (0 or 1) the hashing client sends `key` to."""
    return ports.index(router._get_client(key).server[1])
