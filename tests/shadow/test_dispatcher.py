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
from proxy.redis.connection import ConnectionOptions
from proxy.redis.layout import pack_value, unpack_value
from proxy.redis.store import RedisStore
from proxy.shadow.engine.dispatcher import DispatcherSettings, ShadowDispatcher
from proxy.shadow.engine.mcreader import McItem, MemcachedReader
from proxy.shadow.stats import ShadowStats
from tests.support import (
    FaultRelay,
    RawClient,
    ServerProcess,
    memcached_argv,
    redis_argv,
    wait_until_async,
)


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


class CountingReader(MemcachedReader):
    """The dispatcher's Memcached reader, counting the reads Memcached has answered (a
    re-read's first half: a test that changes the key after it waits for it)."""

    answered = 0

    async def get(self, key: bytes) -> McItem | None:
        item = await super().get(key)
        self.answered += 1
        return item


class Harness:
    """A dispatcher wired to real servers, fed the way the client path feeds it."""

    reader: CountingReader

    def __init__(
        self, mc: ServerProcess, redis: ServerProcess, url_options: str = "", **settings: float
    ) -> None:
        self.mc_port = mc.port
        self.redis_port = redis.port
        self.store = RedisStore.from_url(redis.url() + url_options, size=2)
        self.reader = CountingReader("127.0.0.1", mc.port, timeout=2.0)
        self.stats = ShadowStats()
        defaults: dict[str, float] = {"race_window": 0.2, "reread_delay": 0.01}
        self.dispatcher = ShadowDispatcher(
            store=self.store,
            reader=self.reader,
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

    def send(
        self, stream: bytes, session: int = 1, reply: bytes | None = None, age: float = 0.0
    ) -> None:
        """Run one request on memcached (or pretend it answered `reply`) and hand it over,
        as if its reply had come back `age` seconds ago."""
        requests, _ = RequestFramer(capture=lambda r: True).feed(stream)
        assert len(requests) == 1
        request = requests[0]
        request.started = time.perf_counter() - age
        request.response = self.memcached(stream) if reply is None else reply
        self.dispatcher.observe([request.captured()], session, replied_at=time.perf_counter() - age)

    async def idle(self) -> None:
        await asyncio.wait_for(self.dispatcher.idle(), 30)

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


def _flush_memcached(mc: ServerProcess) -> None:
    """Empty memcached and wait for its OK: a request on another connection must not overtake it."""
    client = RawClient(mc.port)
    try:
        client.send(b"flush_all\r\n")
        assert client.read_until(b"\r\n") == b"OK\r\n"
    finally:
        client.close()


@pytest.fixture
async def shadow(mc_server: ServerProcess, redis_proc: ServerProcess) -> AsyncIterator[Harness]:
    redis_call(redis_proc.port, "FLUSHALL")
    _flush_memcached(mc_server)
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


async def test_a_late_replay_keeps_memcached_s_expiry(shadow: Harness) -> None:
    # Replayed 3 s after memcached answered (a shadow running behind): the item's life
    # counts from the reply, not from the replay.
    shadow.send(b"set late 0 100 1\r\nx\r\n", age=3.0)
    shadow.send(b"set gone 0 2 1\r\nx\r\n", age=3.0, reply=b"STORED\r\n")
    await shadow.idle()
    ttl = redis_call(shadow.redis_port, "PTTL", "late")
    assert isinstance(ttl, int) and 90_000 <= ttl <= 98_000  # 100 s counted from 3 s ago
    # memcached would have expired it a second ago: Redis never holds it.
    assert redis_call(shadow.redis_port, "EXISTS", "gone") == 0


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


async def test_an_append_after_an_incr_whose_padding_may_differ_makes_the_key_cold(
    shadow: Harness,
) -> None:
    """memcached pads a shorter incr/decr result with spaces only when no other request holds
    the item; Redis always does. An append then joins "99" + "5" in one store and "99 " +
    "5" in the other: the next incr answers 996 and 100 (the false incr:value of the
    64-client hammer). The append makes the key cold instead."""
    shadow.send(b"set k 0 0 3\r\n100\r\n")
    shadow.send(b"decr k 1\r\n")
    await shadow.idle()
    # As if another connection held the item: memcached wrote "99" without its padding.
    client = RawClient(shadow.mc_port)
    client.send(b"set k 0 0 2\r\n99\r\n")
    assert client.read_until(b"\r\n") == b"STORED\r\n"
    client.close()
    shadow.send(b"append k 0 0 1\r\n5\r\n")
    shadow.send(b"incr k 1\r\n")
    await shadow.idle()
    assert shadow.mismatches() == {}
    assert shadow.noise() == {"cold_key": 1}


async def test_a_key_s_operations_run_in_reply_order(shadow: Harness) -> None:
    shadow.send(b"set k 0 0 1\r\na\r\n")
    for i in range(40):  # all queued on the key's chain while the first is in flight
        shadow.send(b"append k 0 0 1\r\n%c\r\n" % (98 + i % 20))
        shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 81}
    stored = redis_call(shadow.redis_port, "GET", "k")
    assert isinstance(stored, bytes)
    assert (
        stored[12:]
        == shadow.memcached(b"mg k v\r\n").split(b"\r\n")[1]
        == b"a" + b"bcdefghijklmnopqrstu" * 2
    )


async def test_a_difference_is_judged_and_the_key_goes_on_in_order(shadow: Harness) -> None:
    shadow.send(b"set k 1 0 5\r\nhello\r\n")
    await shadow.idle()
    redis_call(shadow.redis_port, "SET", "k", pack_value(1, 1, b"tampered"))
    shadow.send(b"get k\r\n")  # a difference: classified in a task, after the race window
    # (the re-read has read Memcached before the next write reaches it)
    await wait_until_async(lambda: shadow.reader.answered == 1, what="the re-read")
    shadow.send(b"set k 1 0 3\r\nnew\r\n")  # waits for that verdict
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.mismatches() == {"value": 1}
    assert shadow.outcomes() == {"match": 3, "mismatch": 1}
    assert unpack_value(redis_call(shadow.redis_port, "GET", "k")).data == b"new"  # type: ignore[arg-type]


async def test_a_difference_with_a_write_before_the_re_read_is_unverified(
    shadow: Harness,
) -> None:
    # Memcached ran the set before the re-read: its snapshot holds a write Redis has not
    # replayed yet, so it proves nothing about the get's answers. The repair's copy already
    # holds the set: replayed on top of it, an append would be applied twice.
    shadow.send(b"set k 1 0 5\r\nhello\r\n")
    await shadow.idle()
    redis_call(shadow.redis_port, "SET", "k", pack_value(1, 1, b"tampered"))
    shadow.send(b"get k\r\n")
    shadow.send(b"append k 0 0 1\r\n!\r\n")
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.noise() == {"unverified": 1}
    assert shadow.mismatches() == {}
    assert shadow.stats.skipped["in_repair_copy"] == 2  # the append and the get after it
    assert unpack_value(redis_call(shadow.redis_port, "GET", "k")).data == b"hello!"  # type: ignore[arg-type]
    shadow.send(b"append k 0 0 1\r\n?\r\n")
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.mismatches() == {}
    assert unpack_value(redis_call(shadow.redis_port, "GET", "k")).data == b"hello!?"  # type: ignore[arg-type]


async def test_a_cas_mapped_by_a_shadowed_gets_is_compared(shadow: Harness) -> None:
    shadow.send(b"set k 0 0 1\r\na\r\n")
    reply = shadow.memcached(b"gets k\r\n")
    token = int(reply.split(b"\r\n")[0].split(b" ")[4])
    shadow.send(b"gets k\r\n", reply=reply)
    shadow.send(b"cas k 0 0 1 %d\r\nb\r\n" % token)
    shadow.send(b"cas k 0 0 1 %d\r\nc\r\n" % token)  # EXISTS in both stores
    await shadow.idle()
    assert shadow.outcomes() == {"match": 4}
    assert shadow.noise() == {}
    assert shadow.stats.cas_map_entries == 1  # the gets's token (memshadow_shadow_cas_map_entries)
    shadow.send(b"flush_all\r\n")
    await shadow.idle()
    assert shadow.stats.cas_map_entries == 0


async def test_a_missing_function_library_is_reloaded(shadow: Harness) -> None:
    redis_call(shadow.redis_port, "FUNCTION", "DELETE", "memshadow")
    shadow.send(b"set k 0 0 1\r\na\r\n")
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 2}
    assert sum(c.function_reloads for c in shadow.store.pool.connections) == 1


async def test_redis_down_drops_every_queued_operation_and_the_shadow_resumes(
    shadow: Harness, redis_proc: ServerProcess
) -> None:
    shadow.send(b"set k 0 0 1\r\na\r\n")
    await shadow.idle()
    redis_proc.stop()
    connections = shadow.store.pool.connections
    await wait_until_async(
        lambda: not any(c.is_connected for c in connections), what="the connections notice"
    )
    for _ in range(5):
        shadow.send(b"get k\r\n")
        shadow.send(b"get other\r\n")
    await shadow.idle()
    assert shadow.stats.dropped == {"redis_down": 10}
    redis_proc.start()
    assert await shadow.store.pool.wait_connected(30)
    shadow.send(b"set k 0 0 1\r\nb\r\n")
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 3}


async def test_a_paused_redis_times_out_each_operation_once(
    mc_server: ServerProcess, redis_proc: ServerProcess
) -> None:
    redis_call(redis_proc.port, "FLUSHALL")
    harness = Harness(mc_server, redis_proc, url_options="?timeout=1.0")
    await harness.start()
    try:
        redis_proc.pause()
        for key in (b"a", b"b", b"a", b"c"):
            harness.send(b"get %s\r\n" % key)
        await harness.idle()
        assert sum(harness.stats.dropped.values()) == 4
        assert harness.stats.dropped["timeout"] >= 1
        assert harness.outcomes() == {}
    finally:
        redis_proc.resume()
        await harness.stop()


async def test_stop_with_operations_in_flight(
    mc_server: ServerProcess, redis_proc: ServerProcess
) -> None:
    # Redis's replies may take an hour: only stop's own timeout can end its wait.
    harness = Harness(mc_server, redis_proc, url_options="?timeout=3600")
    await harness.start()
    redis_proc.pause()
    try:
        for i in range(20):
            harness.send(b"get k%d\r\n" % (i % 3))
        chains = harness.dispatcher.scheduler._chains
        await wait_until_async(lambda: chains, what="operations in flight")
        await asyncio.wait_for(harness.dispatcher.stop(timeout=0.2), 30)
    finally:
        redis_proc.resume()
    await harness.store.close()
    await harness.reader.close()
    assert not harness.dispatcher.scheduler._chains


async def test_requests_gather_for_the_batch_window_unless_a_batch_is_full(
    mc_server: ServerProcess, redis_proc: ServerProcess
) -> None:
    # A window of an hour: what does not wait for it is sent at once, what does is not
    # sent during the test.
    redis_call(redis_proc.port, "FLUSHALL")
    _flush_memcached(mc_server)
    harness = Harness(mc_server, redis_proc, batch_window=3600, batch_size=3)
    await harness.start()
    try:
        for _ in range(3):
            harness.send(b"get k\r\n")
        # a full batch does not wait
        await wait_until_async(lambda: harness.outcomes() == {"match": 3}, what="the batch")
        sent = harness.stats.redis_commands
        harness.send(b"set k 0 0 1\r\na\r\n")
        for _ in range(10):
            await asyncio.sleep(0.01)  # (the scheduler takes it, and waits)
        assert harness.stats.redis_commands == sent  # still gathering
    finally:
        await harness.stop()
    harness = Harness(mc_server, redis_proc, batch_window=0.05, batch_size=3)
    await harness.start()
    try:
        harness.send(b"set k 0 0 1\r\na\r\n")
        await harness.idle()  # sent once the window has passed
        assert harness.outcomes() == {"match": 1}
    finally:
        await harness.stop()


async def test_a_classic_set_with_noreply_is_compared_but_does_not_warm_the_key(
    shadow: Harness,
) -> None:
    shadow.send(b"set k 0 0 5 noreply\r\nhello\r\n", reply=b"")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 1}  # memcached took it: it stored it
    # An out-of-memory refusal would be hidden by noreply: the key is not known in step.
    redis_call(shadow.redis_port, "SET", "k", pack_value(0, 1, b"other"))
    shadow.send(b"get k\r\n", reply=b"VALUE k 0 5\r\nhello\r\nEND\r\n")
    await shadow.idle()
    assert shadow.noise() == {"cold_key": 1}
    assert shadow.mismatches() == {}


@pytest.fixture
async def verifying(mc_server: ServerProcess, redis_proc: ServerProcess) -> AsyncIterator[Harness]:
    """A harness with shadow.verify_writes: 1.0, on empty stores."""
    redis_call(redis_proc.port, "FLUSHALL")
    _flush_memcached(mc_server)
    harness = Harness(mc_server, redis_proc, verify_writes=1.0)
    await harness.start()
    yield harness
    await harness.stop()


async def test_verify_writes_gives_noreply_writes_a_verdict(verifying: Harness) -> None:
    harness, redis_port = verifying, verifying.redis_port
    harness.send(b"set k 0 0 1\r\na\r\n")
    await harness.idle()
    harness.send(b"append k 0 0 1 noreply\r\nb\r\n")
    await harness.idle()
    # The set's own verdict, then a verification after each write.
    assert harness.outcomes() == {"match": 3}
    assert harness.stats.comparisons[("verify", "match")] == 2
    # A noreply append replayed on a Redis copy that had diverged: only its
    # verification can tell.
    redis_call(redis_port, "SET", "k", pack_value(0, 1, b"X"))
    harness.send(b"append k 0 0 1 noreply\r\nc\r\n")
    await harness.idle()
    assert harness.mismatches() == {"value": 1}
    assert harness.stats.mismatches[("verify", "value")] == 1
    stored = unpack_value(redis_call(redis_port, "GET", "k"))  # type: ignore[arg-type]
    assert stored.data == b"abc"  # repaired from Memcached


async def test_a_verification_with_a_write_behind_it_proves_nothing(verifying: Harness) -> None:
    harness, redis_port = verifying, verifying.redis_port
    harness.send(b"set k 0 0 1\r\na\r\n")
    # Memcached runs this append before the verification reads it, while Redis has not
    # replayed it yet: the stores differ at the re-read, and that proves nothing. The
    # repair's copy holds the append: it is not replayed on top of it.
    harness.send(b"append k 0 0 1\r\nb\r\n")
    await harness.idle()
    assert harness.mismatches() == {}
    assert harness.stats.noise[("verify", "unverified")] == 1
    assert harness.stats.skipped["in_repair_copy"] == 1
    stored = unpack_value(redis_call(redis_port, "GET", "k"))  # type: ignore[arg-type]
    assert stored.data == b"ab"
    harness.send(b"append k 0 0 1\r\nc\r\n")
    harness.send(b"get k\r\n")
    await harness.idle()
    assert harness.mismatches() == {}
    assert harness.stats.comparisons[("verify", "match")] == 1


# --- what the what-if report's latency figures measure ------------------------------------


async def _service_and_queueing(
    mc: ServerProcess, redis_port: int, batch_window: float
) -> tuple[float, float]:
    """Replay 40 misses of distinct keys, 10 ms apart: (Redis service p50, queueing p50)."""
    stats = ShadowStats()
    store = RedisStore.from_url(
        f"redis://127.0.0.1:{redis_port}/0",
        ConnectionOptions(service_time=stats.redis_service.observe),
        size=1,
    )
    reader = MemcachedReader("127.0.0.1", mc.port, timeout=2.0)
    dispatcher = ShadowDispatcher(
        store=store,
        reader=reader,
        stats=stats,
        settings=DispatcherSettings(batch_window=batch_window, batch_size=1000),
    )
    assert await store.start()
    await dispatcher.start()
    try:
        framer = RequestFramer(capture=lambda r: True)
        for i in range(40):
            (request,), _ = framer.feed(b"get what-if-%d\r\n" % i)
            request.started = time.perf_counter()
            request.response = b"END\r\n"
            dispatcher.observe([request.captured()], 1)
            await asyncio.sleep(0.01)
        await asyncio.wait_for(dispatcher.idle(), 60)
    finally:
        await dispatcher.stop()
        await store.close()
        await reader.close()
    assert sum(n for (_, outcome), n in stats.comparisons.items() if outcome == "match") == 40
    service, queueing = stats.redis_service.quantile(0.5), stats.queueing.quantile(0.5)
    assert service is not None and queueing is not None
    return service, queueing


async def test_redis_service_time_and_the_shadow_queueing_are_measured_apart(
    mc_server: ServerProcess, redis_proc: ServerProcess
) -> None:
    """A slower Redis moves the service time and not the queueing; a longer batching window
    moves the queueing and not the service time. (What is injected is a lower bound, load
    cannot shrink it; what is not is compared with it, never with a figure of the
    machine's speed.)"""
    redis_call(redis_proc.port, "FLUSHALL")
    service, queueing = await _service_and_queueing(mc_server, redis_proc.port, 0.002)
    relay = FaultRelay(redis_proc.port)
    relay.delay = 0.05
    try:
        slow_service, same_queueing = await _service_and_queueing(mc_server, relay.port, 0.002)
    finally:
        relay.close()
    assert slow_service >= 0.04  # the relay's 50 ms
    assert same_queueing < slow_service / 2  # (not in the queueing)
    same_service, slow_queueing = await _service_and_queueing(mc_server, redis_proc.port, 0.2)
    assert slow_queueing >= 0.05  # requests wait up to the 200 ms window
    assert same_service < slow_queueing / 2  # (not in the service time)
    assert service < slow_service and queueing < slow_queueing


async def test_equal_reads_alone_do_not_warm_a_key(shadow: Harness) -> None:
    # Both stores hold the key from before this shadow saw any write of it (another
    # worker's life, another epoch): equal reads say nothing of when memcached expires it.
    assert shadow.memcached(b"set k 0 0 5\r\nhello\r\n") == b"STORED\r\n"
    redis_call(shadow.redis_port, "SET", "k", pack_value(0, 1, b"hello"))
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.outcomes() == {"match": 1}
    # memcached loses it with no operation the shadow sees (its expiry, here a delete).
    assert shadow.memcached(b"delete k\r\n") == b"DELETED\r\n"
    shadow.send(b"get k\r\n")
    await shadow.idle()
    assert shadow.mismatches() == {}
    assert shadow.noise() == {"cold_key": 1}


async def test_a_memcached_restart_makes_every_key_cold(redis_proc: ServerProcess) -> None:
    # A Memcached of its own: restarted on its port, it comes back empty while Redis keeps
    # every key. Those differences are the restart's, not Redis's.
    memcached = ServerProcess(memcached_argv()).start()
    redis_call(redis_proc.port, "FLUSHALL")
    shadow = Harness(memcached, redis_proc)
    await shadow.start()
    try:
        shadow.send(b"set k 0 0 5\r\nhello\r\n")
        shadow.send(b"get k\r\n")
        await shadow.idle()
        assert shadow.outcomes() == {"match": 2}
        await shadow.reader.stats()  # (connected: it knows which process answers)
        memcached.restart()
        shadow.send(b"get k\r\n")  # memcached: miss; Redis: hello
        await shadow.idle()
        assert shadow.mismatches() == {}
        assert shadow.reader.restarts == 1
        assert shadow.stats.dropped["memcached_restart"] == 1
        # A write after the restart makes the key warm again, and compared.
        shadow.send(b"set k 0 0 3\r\nnew\r\n")
        shadow.send(b"get k\r\n")
        await shadow.idle()
        assert shadow.outcomes()["match"] == 4
    finally:
        await shadow.stop()
        memcached.stop()
