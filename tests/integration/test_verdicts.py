"""Verdicts under production-like load: dozens of connections, the whole command mix, shared
hot keys and keys of their own, short TTLs, meta commands and noreply writes, in both worker
modes. No false alarm, Redis left equal to Memcached, and real divergences injected during
the load all found with the right kind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pymemcache.client.base import Client

from proxy.redis.layout import pack_value, unpack_value
from proxy.shadow.engine.dispatcher import DispatcherSettings
from tests.integration.hammer import Hammer, figures
from tests.integration.test_shadow import mc_call, mc_item, redis_call
from tests.support import (
    ProxyThread,
    ServerProcess,
    find_divergence,
    memcached_argv,
    proxy_config,
    wait_until,
)


@pytest.fixture(params=["process", "inline"])
def worker_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def _shadow(
    memcached: ServerProcess, redis: ServerProcess, worker: str, **shadow: object
) -> Iterator[ProxyThread]:
    proxy = ProxyThread(proxy_config(memcached, redis, 1.0, worker=worker, **shadow))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


RedisGet = Callable[[str], object]
"""GET of a key straight from the shadow's Redis (test-side; the raw reply)."""


def _differing(memcached: ServerProcess, redis_get: RedisGet, keys: list[str]) -> list[str]:
    """Keys whose value or flags differ between the two stores right now."""
    differing = []
    for key in keys:
        mc = mc_item(memcached.port, key)
        raw = redis_get(key)
        theirs = None
        if isinstance(raw, bytes):
            item = unpack_value(raw)
            theirs = (item.flags, item.data)
        if mc != theirs:
            differing.append(key)
    return differing


def _read_every_key(proxy: ProxyThread, keys: list[str]) -> None:
    reader = Client(("127.0.0.1", proxy.port), timeout=10)
    for key in keys:
        reader.get(key)
    reader.close()


def _hammered(
    proxy: ProxyThread,
    connections: int,
    seconds: float,
    shared: list[str],
    during: Callable[[], None] | None = None,
    stop_when_done: bool = False,
) -> Hammer:
    """The hammer through `proxy` (`during()` run while it hammers; with stop_when_done, the
    hammer stops when during() returns, `seconds` only bounds it), finished with no client
    error, and its verdicts all in."""
    hammer = Hammer(proxy.port, connections, seconds, own_keys=10, shared=shared)
    if during is not None:
        during()
        if stop_when_done:
            hammer.stop()
    hammer.join()
    assert hammer.result.errors == []
    proxy.settle(120)
    return hammer


def hammer_gives_no_false_alarm(
    proxy: ProxyThread,
    memcached: ServerProcess,
    redis_get: RedisGet,
    seconds: float = 6.0,
    during: Callable[[], None] | None = None,
    stop_when_done: bool = False,
) -> dict[str, object]:
    """The hammer through `proxy` (shadow with backfill), `during()` run while it hammers
    (a fault, a migration): no client error, no mismatch, and every key equal in both
    stores at the end. Returns the shadow's figures."""
    hot = [f"hot{i}" for i in range(6)]
    hammer = _hammered(proxy, 32, seconds, hot, during, stop_when_done)
    during = figures(proxy)
    print(f"\nhammer: {hammer.result.operations} operations, {during}")
    assert during["outcomes"].get("mismatch", 0) == 0, during["mismatches"]  # type: ignore[union-attr]
    assert during["outcomes"]["match"] > 1000  # type: ignore[index]
    # A read of every key through the proxy: a warm key that differs is a mismatch, a
    # cold one is backfilled (backfill: the keys the shadow lost track of, noreply writes of
    # unknown outcome, repairs overlapping a write, are copied, so every key must end equal).
    _read_every_key(proxy, hammer.keys)
    proxy.settle(120)
    after = figures(proxy)
    assert after["outcomes"].get("mismatch", 0) == 0, after["mismatches"]  # type: ignore[union-attr]
    differing = _differing(memcached, redis_get, hammer.keys)
    if differing:  # 2 s TTLs: an expiry between the two reads above; wait it out
        time.sleep(3.5)  # (the TTLs' own time: whatever differed then has expired now)
        differing = _differing(memcached, redis_get, differing)
    # (On failure: both stores' items and what the shadow said, to tell the cause.)
    assert differing == [], (
        [(key, mc_item(memcached.port, key), redis_get(key)) for key in differing],
        after,
    )
    return after


def test_the_hammer_gives_no_false_alarm_and_leaves_redis_equal(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    with _shadow(memcached, redis_server, worker_mode, backfill=True) as proxy:
        hammer_gives_no_false_alarm(
            proxy, memcached, lambda key: redis_call(redis_server.port, "GET", key)
        )


# -- divergences injected between loads -----------------------------------------------------


def test_divergences_injected_under_load_are_found_with_their_kind(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    """Real divergences, each on a key established right after a load (24 connections, the
    whole mix) has gone through the shadow: each found with its kind, and nothing else. (A
    key one of whose own operations a loaded host dropped turns cold, correctly: the
    divergence is made again on a fresh key, see find_divergence.)"""
    with _shadow(memcached, redis_server, worker_mode) as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)
        mc, rd = memcached.port, redis_server.port

        def load() -> None:
            hammer = Hammer(proxy.port, 24, 1.5, own_keys=10, shared=[f"hot{i}" for i in range(4)])
            hammer.join()
            assert hammer.result.errors == []

        def defined(value: bytes, expire: int = 0) -> Callable[[str], object]:
            def define(key: str) -> None:
                client.set(key, value, flags=3, expire=expire)
                client.get(key)  # a verdict, so the key is known to be in step

            return define

        def expired_in_memcached_then(change: Callable[[str], object]) -> Callable[[str], None]:
            """`change`, then wait until Memcached has expired the key (a 2 s TTL) and the
            shadow's expiry tolerance has passed."""

            def inject(key: str) -> None:
                written = time.time()  # (after the set's reply)
                change(key)
                wait_until(lambda: mc_item(mc, key) is None, what=f"{key} expired")
                tolerance = DispatcherSettings().expiry_tolerance
                time.sleep(max(0.0, written + 2 + tolerance + 0.5 - time.time()))

            return inject

        injections: list[
            tuple[str, str, bytes, Callable[[str], object], Callable[[str], object]]
        ] = [
            (
                "value-changed-in-memcached",
                "value",
                b"profile",
                lambda key: mc_call(mc, b"set %s 3 0 5\r\nother\r\n" % key.encode()),
                client.get,
            ),
            (
                "deleted-in-redis",
                "missing_in_redis",
                b"profile",
                lambda key: redis_call(rd, "DEL", key),
                client.get,
            ),
            (
                "flags-changed-in-redis",
                "flags",
                b"profile",
                lambda key: redis_call(rd, "SET", key, pack_value(99, 1, b"profile")),
                client.get,
            ),
            (
                "counter-changed-in-redis",
                "value",
                b"100",
                lambda key: redis_call(rd, "SET", key, pack_value(3, 1, b"500")),
                lambda key: client.incr(key, 1),
            ),
        ]
        found: list[str] = []
        try:
            for name, kind, value, inject, trigger in injections:
                found.append(
                    find_divergence(proxy, name, kind, defined(value), inject, trigger, load)
                )
            # A TTL removed in Redis: once Memcached has expired the key (and the expiry
            # tolerance has passed), Redis still serving it is a divergence.
            persist = expired_in_memcached_then(lambda key: redis_call(rd, "PERSIST", key))
            found.append(
                find_divergence(
                    proxy,
                    "ttl-removed-in-redis",
                    "unexpected_in_redis",
                    defined(b"profile", expire=2),
                    persist,
                    client.get,
                    load,
                )
            )
        finally:
            client.close()
        proxy.settle(120)
        result = figures(proxy)
        print(f"\ninjected between loads ({worker_mode}): {found}; {result}")
        # Exactly the five injected, nothing else.
        kinds: dict[str, int] = {}
        for name, n in result["mismatches"].items():  # type: ignore[union-attr]
            kinds[name.split(":")[1]] = kinds.get(name.split(":")[1], 0) + n
        assert kinds == {"value": 2, "missing_in_redis": 1, "flags": 1, "unexpected_in_redis": 1}
        examples = proxy.call(lambda: proxy.shadow.examples.to_json())["kinds"]
        hashes = {example["key"] for shown in examples.values() for example in shown}
        assert hashes == {proxy.shadow.examples.hash(k.encode()) for k in found}
        for shown in examples.values():
            for example in shown:  # each tells its story
                story = example["story"]
                assert story["history"] and story["history"][-1]["ms"] == 0.0
                assert story["reread"]["ordered"] is True
                assert story["action"] in ("copied to redis", "deleted in redis")


def test_a_shadow_behind_its_load_still_judges_short_ttls_right(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    # Keys that live 2 s, read and rewritten constantly by many connections: the replay
    # runs after Memcached's answers, so expiries fall between the two answers. They are
    # expiry boundaries, never mismatches.
    with _shadow(memcached, redis_server, worker_mode) as proxy:
        stop = threading.Event()
        errors: list[str] = []

        def churn(seed: int) -> None:
            client = Client(("127.0.0.1", proxy.port), timeout=10)
            try:
                i = 0
                while not stop.is_set():
                    key = f"short{seed}:{i % 5}"
                    if i % 7 == 0:
                        client.set(key, b"v%d" % i, expire=2)
                    elif i % 11 == 0:
                        client.touch(key, 2)
                    elif i % 13 == 0:
                        client.raw_command(b"gat 2 %s" % key.encode(), b"END\r\n")
                    else:
                        client.get(key)
                    i += 1
                    time.sleep(0.002)
            except Exception as exc:
                errors.append(repr(exc))
            finally:
                client.close()

        threads = [threading.Thread(target=churn, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(7.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert errors == []
        proxy.settle(120)
        result = figures(proxy)
        print(f"\nshort TTLs ({worker_mode}): {result}")
        assert result["outcomes"].get("mismatch", 0) == 0, result["mismatches"]  # type: ignore[union-attr]


def test_a_client_gone_before_its_noreply_write_was_answered_makes_the_key_cold(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    import socket
    import struct

    def forwarded() -> bool:
        """The raw connection's request written to Memcached (its socket), not just read."""
        waiting = [s for s in proxy.server.sessions if s.pending]
        return bool(waiting) and all(
            s.upstream is not None
            and s.upstream.transport is not None
            and s.upstream.transport.get_write_buffer_size() == 0
            for s in waiting
        )

    with _shadow(memcached, redis_server, worker_mode) as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)
        client.set("k", b"a")
        assert client.get("k") == b"a"  # the key is known in step
        proxy.settle()
        # Memcached is paused: the append reaches it only after the client has reset its
        # connection, so its sentinel's MN is never read and the shadow never replays it.
        memcached.pause()
        try:
            raw = socket.create_connection(("127.0.0.1", proxy.port))
            raw.sendall(b"append k 0 0 1 noreply\r\nb\r\n")
            wait_until(lambda: proxy.call(forwarded), what="the append forwarded")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()  # a reset
            # the proxy has seen it: the session is gone before Memcached answers
            wait_until(lambda: proxy.call(lambda: len(proxy.server.sessions)) == 1, what="reset")
        finally:
            memcached.resume()
        wait_until(lambda: mc_item(memcached.port, "k") == (0, b"ab"), what="the append applied")
        assert client.get("k") == b"ab"
        proxy.settle()
        result = figures(proxy)
        assert result["outcomes"].get("mismatch", 0) == 0, result["mismatches"]  # type: ignore[union-attr]
        assert result["noise"] == {"cold_key": 1}
        client.close()


def test_a_memcached_restart_under_the_hammer_is_no_false_alarm(
    worker_mode: str, redis_server: ServerProcess
) -> None:
    """Memcached restarted (empty) between two hammer runs on the same keys: Redis still has
    them, Memcached has none; every such difference is the restart's (cold keys), and the
    keys written again are compared again."""
    memcached = ServerProcess(memcached_argv()).start()  # its own: it is restarted
    try:
        with _shadow(memcached, redis_server, worker_mode) as proxy:
            shared = [f"hot{i}" for i in range(6)]
            first = _hammered(proxy, 16, 3.0, shared)
            memcached.restart()
            _read_every_key(proxy, first.keys)  # Memcached: none of them; Redis: most
            _hammered(proxy, 16, 3.0, shared)
            out = figures(proxy)
            print(f"\nafter the restart: {out}")
            assert out["outcomes"].get("mismatch", 0) == 0, out["mismatches"]  # type: ignore[union-attr]
            assert out["dropped"].get("memcached_restart", 0) >= 1, out  # type: ignore[union-attr]
    finally:
        memcached.stop()
