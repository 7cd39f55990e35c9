"""Verdicts through a real dark launch: the operator and the faults in the room.

Each test runs real memcached and redis-server processes, in both worker modes, with what an
operator or production does to a shadow mid-flight: pauses and resumes, rates lowered and
raised, a queue too small for the load, flush_all (at once and delayed), stores that evict,
repairs. Whatever happens, no false mismatch; what the shadow could not see turns keys cold
(noise), evictions are named as such, and real divergences are still found afterwards.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pymemcache.client.base import Client

from proxy.redis.layout import pack_value
from proxy.shadow.control import ShadowControl
from tests.integration.hammer import Hammer, figures
from tests.integration.test_shadow import mc_call, mc_item, redis_call
from tests.support import (
    ProxyThread,
    RawClient,
    ServerProcess,
    find_divergence,
    memcached_argv,
    mismatch_kinds,
    noise_reasons,
    proxy_config,
    redis_argv,
    wait_until,
)


@pytest.fixture(params=["process", "inline"])
def worker_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def _shadow(
    memcached: ServerProcess, redis: ServerProcess, worker: str, rate: float = 1.0, **shadow: object
) -> Iterator[ProxyThread]:
    proxy = ProxyThread(proxy_config(memcached, redis, rate, worker=worker, **shadow))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _operate(proxy: ProxyThread, action: Callable[[ShadowControl], object]) -> None:
    """An operator's change of the live control, then wait until the shadow has been told
    which keys it now sees every request of (a rise waits for the requests in flight)."""
    shadow = proxy.shadow
    proxy.call(lambda: action(shadow.control))
    wait_until(
        lambda: proxy.call(lambda: shadow.coverage.announced == shadow.control.threshold),
        what="the sample announced",
    )


def _inject_and_find(proxy: ProxyThread, client: Client, redis: ServerProcess, name: str) -> None:
    """A real divergence on a key established now: Redis loses it; the next read finds it."""

    def establish(key: str) -> None:
        client.set(key, b"profile", flags=3)
        assert client.get(key) == b"profile"

    find_divergence(
        proxy,
        name,
        "missing_in_redis",
        establish,
        lambda key: redis_call(redis.port, "DEL", key),
        client.get,
    )


HOT = [f"hot{i}" for i in range(4)]


# -- the operator's own actions ----------------------------------------------------------


def test_pauses_and_rate_changes_under_load_give_no_false_alarm(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    """Cause 6: pausing, lowering the rate, or halting left keys that stopped being shadowed
    "in step"; when they came back, the writes they missed read as mismatches (509 after one
    20 s pause). Keys out of the sample now turn cold, and those that come back are
    established again by their next write. Divergences injected after each return are
    still found."""
    actions: list[tuple[str, Callable[[ShadowControl], object]]] = [
        ("pause", lambda c: c.set_enabled(False, "test")),
        ("resume", lambda c: c.set_enabled(True, "test")),
        ("rate 0.25", lambda c: c.set_rate(0.25, "test")),
        ("rate 1.0", lambda c: c.set_rate(1.0, "test")),
        ("rate 0.05", lambda c: c.set_rate(0.05, "test")),
        ("rate 1.0 again", lambda c: c.set_rate(1.0, "test")),
    ]
    with _shadow(memcached, redis_server, worker_mode) as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)
        injected = 0
        try:
            for name, action in actions:
                # The action under load; the keys written while out of the sample (or
                # coming back) are read by the hammer afterwards.
                hammer = Hammer(proxy.port, 16, 120.0, own_keys=10, shared=HOT)
                time.sleep(1.0)
                _operate(proxy, action)
                time.sleep(1.5)
                hammer.stop()
                hammer.join()
                assert hammer.result.errors == []
                # Then, once the shadow has judged it all, a real divergence on a key
                # established now is still found (not made noise by the action).
                proxy.settle(120)
                if proxy.shadow.control.threshold == 1 << 32:
                    _inject_and_find(proxy, client, redis_server, "after-" + name.replace(" ", "-"))
                    injected += 1
        finally:
            client.close()
        proxy.settle(120)
        out = figures(proxy)
        print(f"\noperator actions ({worker_mode}): {out}")
        assert out["mismatches"] == {"get:missing_in_redis": injected}, out["mismatches"]
        assert injected == 3


def test_a_queue_too_small_for_the_load_drops_and_never_cries_wolf(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    """Drops anywhere (the queue, hand-offs, in flight) turn their keys cold at their place in
    reply order, keys not seen yet included; the rest is still judged."""
    with _shadow(memcached, redis_server, worker_mode, queue_size=20) as proxy:
        hammer = Hammer(proxy.port, 16, 6.0, own_keys=10, shared=HOT)
        hammer.join()
        assert hammer.result.errors == []
        proxy.settle(120)
        out = figures(proxy)
        print(f"\nsmall queue ({worker_mode}): {out}")
        assert out["dropped"].get("queue_full", 0) > 0, out  # type: ignore[union-attr]
        assert out["outcomes"].get("mismatch", 0) == 0, out["mismatches"]  # type: ignore[union-attr]
        assert out["outcomes"].get("match", 0) > 0  # type: ignore[union-attr]


def test_a_dropped_write_of_a_key_with_no_state_yet_keeps_it_cold(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    """Cause 1, as reproduced: one write holds `set K`, 500 gets of other keys (the queue of
    20 overflows) and `incr K 5`: the incr is dropped before K has any state. The queued set
    must not make K in step: 3 s later `incr K 1` is noise, not incr:value."""
    with _shadow(memcached, redis_server, worker_mode, queue_size=20) as proxy:
        raw = RawClient(proxy.port)
        stream = b"set K 0 0 3\r\n100\r\n"
        stream += b"".join(b"get other%d\r\n" % i for i in range(500))
        stream += b"incr K 5\r\n"
        raw.send(stream)
        assert raw.read_until(b"105\r\n").endswith(b"105\r\n")
        proxy.settle()
        raw.send(b"incr K 1\r\n")
        assert raw.read_until(b"\r\n") == b"106\r\n"
        raw.close()
        proxy.settle()
        assert proxy.call(lambda: mismatch_kinds(proxy)) == {}
        assert proxy.call(lambda: noise_reasons(proxy)).get("cold_key", 0) >= 1


def test_a_flush_all_behind_a_full_queue_still_makes_every_key_cold(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    """Cause 2: a flush_all lost to a full queue made nothing cold, and the 20 keys read
    after it were 20 unexpected_in_redis. A flush_all is never dropped for room."""
    with _shadow(memcached, redis_server, worker_mode, queue_size=5) as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)
        keys = [f"f{i}" for i in range(20)]
        for key in keys:
            client.set(key, b"v")
            client.get(key)
        proxy.settle()
        raw = RawClient(proxy.port)
        raw.send(b"".join(b"get other%d\r\n" % i for i in range(50)) + b"flush_all\r\n")
        assert raw.read_until(b"OK\r\n").endswith(b"OK\r\n")
        raw.close()
        assert all(client.get(key) is None for key in keys)
        client.close()
        proxy.settle()
        assert proxy.call(lambda: mismatch_kinds(proxy)) == {}


@pytest.mark.parametrize("noreply", [False, True])
def test_a_delayed_flush_all_is_judged_on_memcached_s_clock(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess, noreply: bool
) -> None:
    """Cause 3: memcached applies `flush_all 2` at a tick of its own clock (1-2 s on), and
    drops what is written until the next tick; the shadow turned keys cold 2 s after it
    handled the reply. Reads and writes all through the window: no false alarm."""
    with _shadow(memcached, redis_server, worker_mode) as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)
        keys = [f"d{i}" for i in range(20)]
        for key in keys:
            client.set(key, b"before")
            client.get(key)
        proxy.settle()
        raw = RawClient(proxy.port)
        raw.send(b"flush_all 2 noreply\r\nmn\r\n" if noreply else b"flush_all 2\r\n")
        assert raw.read_until(b"MN\r\n" if noreply else b"OK\r\n")
        raw.close()
        deadline = time.monotonic() + 4.0
        i = 0
        while time.monotonic() < deadline:  # every key read and rewritten throughout
            key = keys[i % len(keys)]
            client.get(key)
            if i % 3 == 0:
                client.set(key, b"during %d" % i)
            i += 1
            time.sleep(0.01)
        for key in keys:
            client.get(key)
        client.close()
        proxy.settle()
        assert proxy.call(lambda: mismatch_kinds(proxy)) == {}
        # Memcached did flush (and then kept what was written after the window).
        item = mc_item(memcached.port, "d0")
        assert item is None or item[1].startswith(b"during")


# -- stores that evict ---------------------------------------------------------------------


def _big_writers(port: int, seconds: float, keys: int = 300, writers: int = 8) -> list[str]:
    """Writers of 10-100 KB values (replied and noreply sets, appends, adds, touches), then
    the names of every key they used."""
    names = [f"big{i}" for i in range(keys)]
    counters = [f"count{i}" for i in range(keys // 10)]
    errors: list[str] = []

    def write(seed: int) -> None:
        import random

        rng = random.Random(seed)
        client = Client(("127.0.0.1", port), default_noreply=False, timeout=10)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                key = rng.choice(names)
                value = rng.randbytes(rng.randrange(10_000, 100_000))
                choice = rng.random()
                if choice < 0.4:
                    client.set(key, value)
                elif choice < 0.6:
                    client.set(key, value, noreply=True)
                elif choice < 0.7:
                    client.add(key, value)
                elif choice < 0.8:
                    client.touch(key, 3600)
                elif choice < 0.85:
                    client.append(key, b"tail")
                elif choice < 0.9:
                    _count(client, rng.choice(counters))
                else:
                    client.get(key)
        except Exception as exc:  # any client-visible error fails the test
            errors.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    assert errors == []
    return names + counters


def _count(client: Client, key: str) -> None:
    """`ma` with autovivification (N): where Redis evicted the key, it creates it afresh."""
    client.raw_command(b"ma %s N0 J1 v\r\nmn" % key.encode(), b"MN\r\n")


def _read_every_key(port: int, keys: list[str]) -> None:
    client = Client(("127.0.0.1", port), timeout=10)
    for key in keys:
        if key.startswith("count"):
            _count(client, key)
        else:
            client.get(key)
    client.close()


def test_memcached_evicting_is_noise_named_key_by_key(
    worker_mode: str, redis_server: ServerProcess
) -> None:
    """Cause 5: evictions explained a difference only inside a global 10 s window, and only
    for presence; memcached -m 8 under 10-100 KB writes gave ~500 false mismatches. Its
    `watch evictions` stream names each key: a difference on one is noise `evicted`, at any
    distance in time."""
    memcached = ServerProcess(memcached_argv("-m", "8")).start()
    try:
        with _shadow(memcached, redis_server, worker_mode) as proxy:
            keys = _big_writers(proxy.port, 5.0)
            time.sleep(2.0)  # (read long after the evictions: no window explains them)
            _read_every_key(proxy.port, keys)
            proxy.settle(120)
            out = figures(proxy)
            evictions = dict(proxy.call(lambda: proxy.shadow.stats.evictions))
            print(f"\nmemcached -m 8 ({worker_mode}): {out}, evictions {evictions}")
            assert out["outcomes"].get("mismatch", 0) == 0, out["mismatches"]  # type: ignore[union-attr]
            assert evictions.get("memcached", 0) > 0
            assert out["noise"].get("evicted", 0) > 0  # type: ignore[union-attr]
    finally:
        memcached.stop()


def test_redis_evicting_is_a_capacity_finding_never_a_mismatch(
    worker_mode: str, memcached: ServerProcess
) -> None:
    """Redis with maxmemory 2mb and allkeys-lru: what it evicts is a real difference, but a
    capacity result (`redis_evicted`), named by its keyspace notifications: never a
    protocol mismatch (33-238 were), never silent; `ma N` on a key Redis evicted
    autovivifies there and is noise too."""
    redis = ServerProcess(
        redis_argv("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    ).start()
    try:
        with _shadow(memcached, redis, worker_mode) as proxy:
            keys = _big_writers(proxy.port, 5.0, keys=100)
            _read_every_key(proxy.port, keys)
            _read_every_key(proxy.port, keys)
            proxy.settle(120)
            out = figures(proxy)
            evictions = dict(proxy.call(lambda: proxy.shadow.stats.evictions))
            print(f"\nredis maxmemory 2mb ({worker_mode}): {out}, evictions {evictions}")
            assert out["outcomes"].get("mismatch", 0) == 0, out["mismatches"]  # type: ignore[union-attr]
            assert evictions.get("redis", 0) > 0
            assert out["noise"].get("redis_evicted", 0) > 0  # type: ignore[union-attr]
    finally:
        redis.stop()


# -- repairs ---------------------------------------------------------------------------------


def test_a_repair_restores_the_ttl_even_when_value_and_flags_are_equal(
    memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    """Cause 4: a repair that found value and flags equal wrote nothing, though the
    operations it fenced off had changed the TTL: Redis kept the old one and the key later
    read as a mismatch. It now writes value, flags and Memcached's remaining TTL (and maps
    the cas pair)."""
    with _shadow(memcached, redis_server, "inline") as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)
        client.set("k", b"v", flags=5)
        client.get("k")
        proxy.settle()
        # Behind the shadow's back: Memcached's TTL is now 30 s, Redis's none.
        mc_call(memcached.port, b"touch k 30\r\n")
        dispatcher = proxy.shadow.engine.dispatcher

        async def repair() -> str:
            state = dispatcher.keys.get(b"k")
            return await dispatcher.repairer.repair(b"k", state, state.synced, None)

        assert proxy.run(repair) == "copied to redis"
        ttl = redis_call(redis_server.port, "TTL", "k")
        assert isinstance(ttl, int) and 25 <= ttl <= 31, ttl
        client.close()


def test_every_divergence_is_still_found_with_redis_values_changed_behind_the_shadow(
    worker_mode: str, memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    """The exactness holds without faults: a counter changed in Redis is found by the next
    incr (the guard against making everything noise)."""
    with _shadow(memcached, redis_server, worker_mode) as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)

        def establish(key: str) -> None:
            client.set(key, b"100", flags=3)
            client.get(key)

        def trigger(key: str) -> None:
            assert client.incr(key, 1) == 101

        find_divergence(
            proxy,
            "c",
            "value",
            establish,
            lambda key: redis_call(redis_server.port, "SET", key, pack_value(3, 1, b"500")),
            trigger,
        )
        client.close()
        assert proxy.call(lambda: mismatch_kinds(proxy)) == {"value": 1}
