"""ShadowDispatcher against real memcached and redis-server: requests go to memcached for their
replies, then to the dispatcher as the client path hands them over, and the verdicts and
Redis's contents are checked."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import hiredis
import pytest

from proxy.memcache.request import RequestFramer
from proxy.redis.store import RedisStore
from proxy.shadow.control import ShadowControl
from proxy.shadow.dispatcher import DispatcherSettings, ShadowDispatcher
from proxy.shadow.mcreader import MemcachedReader
from proxy.shadow.sampler import KeySampler
from proxy.shadow.stats import ShadowStats
from tests.support import RawClient, ServerProcess, memcached_argv, redis_argv


@pytest.fixture(scope="module")
def mc_server() -> Iterator[ServerProcess]:
    server = ServerProcess(memcached_argv())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[ServerProcess]:
    server = ServerProcess(redis_argv())
    server.start()
    yield server
    server.stop()


def redis_call(port: int, *args: bytes | str | int) -> object:
    """One command on a fresh connection (the test's own view of Redis)."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(hiredis.pack_command(args))
        reader = hiredis.Reader()
        while True:
            reader.feed(sock.recv(1 << 20))
            reply = reader.gets()
            if reply is not False:
                return reply


class Harness:
    """A dispatcher wired to real servers, fed the way the client path feeds it."""

    def __init__(self, mc: ServerProcess, redis: ServerProcess, **settings: float) -> None:
        self.mc_port = mc.port
        self.redis_port = redis.port
        self.store = RedisStore.from_url(redis.url(), size=2)
        self.reader = MemcachedReader("127.0.0.1", mc.port, timeout=2.0)
        control = ShadowControl(1.0)
        self.stats = ShadowStats()
        defaults: dict[str, float] = {"race_window": 0.2, "reread_delay": 0.01}
        self.dispatcher = ShadowDispatcher(
            store=self.store,
            reader=self.reader,
            control=control,
            sampled=KeySampler(control).sampled,
            stats=self.stats,
            settings=DispatcherSettings(**{**defaults, **settings}),  # type: ignore[arg-type]
        )

    async def start(self) -> None:
        assert await self.store.start()
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.store.close()
        await self.reader.close()

    def memcached(self, stream: bytes) -> bytes:
        """memcached's reply to a stream of one request (an `mn` marks its end)."""
        client = RawClient(self.mc_port)
        try:
            client.send(stream + b"mn\r\n")
            return client.read_until(b"MN\r\n")[:-4]
        finally:
            client.close()

    def send(self, stream: bytes, session: int = 1, reply: bytes | None = None) -> None:
        """Run one request on memcached (or pretend it answered `reply`) and hand it over."""
        requests, _ = RequestFramer(capture=lambda r: True).feed(stream)
        assert len(requests) == 1
        request = requests[0]
        request.started = time.perf_counter()
        request.response = self.memcached(stream) if reply is None else reply
        self.dispatcher.observe([request], session)

    async def idle(self) -> None:
        await asyncio.wait_for(self.dispatcher.idle(), 10)

    def outcomes(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for (_, outcome), n in self.stats.comparisons.items():
            counts[outcome] += n
        return dict(counts)

    def noise(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for (_, reason), n in self.stats.noise.items():
            counts[reason] += n
        return dict(counts)

    def mismatches(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for (_, kind), n in self.stats.mismatches.items():
            counts[kind] += n
        return dict(counts)


@pytest.fixture
async def shadow(mc_server: ServerProcess, redis_proc: ServerProcess) -> AsyncIterator[Harness]:
    redis_call(redis_proc.port, "FLUSHALL")
    RawClient(mc_server.port).send(b"flush_all\r\n")
    harness = Harness(mc_server, redis_proc)
    await harness.start()
    yield harness
    await harness.stop()


async def test_writes_then_reads_match(shadow: Harness) -> None:
    shadow.send(b"set k 3 0 5\r\nhello\r\n")
    shadow.send(b"get k\r\n")
    shadow.send(b"get missing\r\n")
    shadow.send(b"delete k\r\n")
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 5}
    assert redis_call(shadow.redis_port, "EXISTS", "k") == 0


async def test_cas_without_a_mapping_is_one_noise_verdict(shadow: Harness) -> None:
    shadow.send(b"set k 0 0 1\r\na\r\n")
    shadow.send(b"cas k 0 0 1 12345\r\nb\r\n")  # its gets was never shadowed
    shadow.send(b"md k C12345\r\n")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 1, "noise": 2}
    assert shadow.noise() == {"cas_unmapped": 2}


async def test_a_corrupt_redis_value_is_an_error_and_the_key_goes_on(shadow: Harness) -> None:
    shadow.send(b"set k 0 0 2\r\nok\r\n")
    await shadow.idle()
    redis_call(shadow.redis_port, "SET", "k", "short")  # shorter than the flags|cas header
    shadow.send(b"get k\r\n")
    shadow.send(b"get k\r\n")  # queued behind the first on the key's chain
    await shadow.idle()
    assert shadow.stats.errors == {"redis_other": 2}
    assert shadow.outcomes() == {"match": 1}
    redis_call(shadow.redis_port, "DEL", "k")  # mc_store refuses to overwrite it
    shadow.send(b"set k 0 0 3\r\nnew\r\n")
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 3}
