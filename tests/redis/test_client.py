"""RedisConnection / RedisPool against real redis-server processes: pipelining, bounds,
timeouts, reconnects, function reloads, AUTH/SELECT and TLS."""

from __future__ import annotations

import asyncio
import itertools
import logging
import select
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.memcache.words import Mode, Status
from proxy.redis.connection import ConnectionOptions, RedisConnection
from proxy.redis.errors import (
    RedisBusy,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    ShadowStarved,
)
from proxy.redis.pool import RedisPool
from proxy.redis.store import (
    RedisStore,
    function_library,
)
from tests.redis.conftest import REDIS_SERVER, Server, free_port
from tests.support import ServerProcess, ThrowawayCA, tls_redis_argv, wait_until_async

StartRedis = Callable[..., Server]


def raised_at_once(call: Coroutine[Any, Any, object]) -> BaseException:
    """What `call` raises before it first waits for anything. Failing fast means failing
    without waiting: no time passes (whatever the machine's load), so none is measured."""
    try:
        call.send(None)
    except BaseException as exc:
        return exc
    call.close()
    raise AssertionError(f"{call} waited instead of failing at once")


def store_for(url: str, size: int = 1) -> RedisStore:
    options = ConnectionOptions(library=function_library(), backoff_max=0.2)
    return RedisStore(RedisPool(url, size, options))


# commands ------------------------------------------------------------------------------------


async def test_pipelined_replies_match_their_commands(redis_shared: Server) -> None:
    conn = RedisConnection(redis_shared.url(db=3), ConnectionOptions(max_inflight=5000))
    assert await conn.start()
    try:
        futures = [conn.send(b"ECHO", b"%d" % i) for i in range(2000)]
        assert await asyncio.gather(*futures) == [b"%d" % i for i in range(2000)]
        assert await conn.execute(b"SET", b"k", b"v") == b"OK"
        with pytest.raises(RedisReplyError, match="unknown command"):
            await conn.execute(b"NOSUCHCOMMAND")
        assert await conn.execute(b"GET", b"k") == b"v"
    finally:
        await conn.close()


async def test_commands_of_one_iteration_go_out_in_one_write(redis_shared: Server) -> None:
    conn = RedisConnection(redis_shared.url(db=3))
    assert await conn.start()
    try:
        protocol = conn._protocol
        assert protocol is not None
        before = protocol.batches
        futures = [conn.send(b"PING") for _ in range(100)]
        await asyncio.gather(*futures)
        assert protocol.batches == before + 1
    finally:
        await conn.close()


async def test_abandoned_command_does_not_shift_replies(redis_shared: Server) -> None:
    conn = RedisConnection(redis_shared.url(db=3))
    assert await conn.start()
    try:
        first = conn.send(b"ECHO", b"first")
        first.cancel()
        assert await conn.execute(b"ECHO", b"second") == b"second"
    finally:
        await conn.close()


async def test_pool_maps_a_key_to_one_connection(redis_shared: Server) -> None:
    pool = RedisPool(redis_shared.url(db=3), 4)
    keys = [b"key%d" % i for i in range(200)]
    assert all(pool.connection_for(k) is pool.connection_for(k) for k in keys)
    assert len({pool.index_for(k) for k in keys}) == 4
    assert await pool.start()
    assert pool.is_connected and pool.connected_count == 4
    await pool.close()
    assert not pool.is_connected


async def test_get_many_spans_connections_in_request_order(redis_shared: Server) -> None:
    store = store_for(redis_shared.url(db=4), size=3)
    assert await store.start()
    try:
        await store.flush()
        keys = [b"g%d" % i for i in range(30)]
        for i, key in enumerate(keys[::2]):
            assert (await store.store(Mode.SET, key, i, 0, key)).status is Status.STORED
        items = await store.get_many([*keys, keys[0]])
        assert [item.data if item else None for item in items] == [
            *[k if i % 2 == 0 else None for i, k in enumerate(keys)],
            keys[0],
        ]
    finally:
        await store.close()


# callback sends ------------------------------------------------------------------------------


class Calls:
    """A ReplyCallback that records every call, to check each comes exactly once: a second
    call may come at any time up to the connection's close, so `never_twice` checks every
    Calls of a test once the test has closed its connections."""

    made: list[Calls] = []

    def __init__(self) -> None:
        self.calls: list[tuple[object, BaseException | None]] = []
        self.done = asyncio.Event()
        Calls.made.append(self)

    def __call__(self, reply: object, error: BaseException | None) -> None:
        self.calls.append((reply, error))
        self.done.set()

    async def wait(self, timeout: float = 30.0) -> tuple[object, BaseException | None]:
        await asyncio.wait_for(self.done.wait(), timeout)
        assert len(self.calls) == 1, self.calls
        return self.calls[0]

    @staticmethod
    async def wait_all(calls: list[Calls]) -> list[tuple[object, BaseException | None]]:
        await asyncio.wait_for(asyncio.gather(*(call.done.wait() for call in calls)), 30.0)
        assert all(len(call.calls) == 1 for call in calls)
        return [call.calls[0] for call in calls]


@pytest.fixture(autouse=True)
def never_twice() -> Iterator[None]:
    """After the test (its connections closed: nothing can call back any more), no
    callback was called twice."""
    Calls.made = []
    yield
    assert [call.calls for call in Calls.made if len(call.calls) > 1] == []


async def test_callbacks_and_futures_share_one_ordered_pipeline(redis_shared: Server) -> None:
    conn = RedisConnection(redis_shared.url(db=3), ConnectionOptions(max_inflight=5000))
    assert await conn.start()
    try:
        calls = [Calls() for _ in range(500)]
        futures = []
        for i, call in enumerate(calls):
            conn.send_callback(call, b"ECHO", b"cb%d" % i)
            assert call.calls == []  # never called from inside the send
            futures.append(conn.send(b"ECHO", b"f%d" % i))
        assert await asyncio.gather(*futures) == [b"f%d" % i for i in range(500)]
        assert await Calls.wait_all(calls) == [(b"cb%d" % i, None) for i in range(500)]
        error = Calls()
        conn.send_callback(error, b"NOSUCHCOMMAND")
        reply, exc = await error.wait()
        assert reply is None and isinstance(exc, RedisReplyError)
        assert "unknown command" in str(exc)
        assert await conn.execute(b"ECHO", b"still in step") == b"still in step"
    finally:
        await conn.close()


async def test_a_failing_callback_does_not_stop_the_other_replies(redis_shared: Server) -> None:
    conn = RedisConnection(redis_shared.url(db=3))
    assert await conn.start()
    try:

        def broken(reply: object, error: BaseException | None) -> None:
            raise RuntimeError("bug in a callback")

        after = Calls()
        conn.send_callback(broken, b"PING")
        conn.send_callback(after, b"ECHO", b"after")
        assert await after.wait() == (b"after", None)
        assert conn.is_connected
    finally:
        await conn.close()


async def test_a_callback_may_send_the_next_command(redis_shared: Server) -> None:
    conn = RedisConnection(redis_shared.url(db=3))
    assert await conn.start()
    try:
        seen: list[object] = []
        finished = asyncio.Event()

        def step(reply: object, error: BaseException | None) -> None:
            seen.append(reply)
            if len(seen) < 50:
                conn.send_callback(step, b"ECHO", b"%d" % len(seen))
            else:
                finished.set()

        conn.send_callback(step, b"ECHO", b"0")
        await asyncio.wait_for(finished.wait(), 5)
        assert seen == [b"%d" % i for i in range(50)]
    finally:
        await conn.close()


async def test_callback_send_fails_at_once_when_down_or_busy(redis_factory: StartRedis) -> None:
    never = Calls()
    down = RedisConnection(
        f"redis://127.0.0.1:{free_port()}", ConnectionOptions(connect_timeout=0.3)
    )
    with pytest.raises(RedisUnavailable):
        down.send_callback(never, b"PING")
    server = redis_factory()
    conn = RedisConnection(server.url(), ConnectionOptions(max_inflight=3, timeout=5.0))
    assert await conn.start()
    try:
        server.pause()
        waiting = [Calls() for _ in range(3)]
        for call in waiting:
            conn.send_callback(call, b"PING")
        with pytest.raises(RedisBusy):
            conn.send_callback(never, b"PING")
        server.resume()
        assert await Calls.wait_all(waiting) == [(b"PONG", None)] * 3
        assert never.calls == []
    finally:
        server.resume()
        await conn.close()


async def test_callback_timeout_is_reported_once_and_resets_the_connection(
    redis_factory: StartRedis,
) -> None:
    server = redis_factory()
    conn = RedisConnection(
        server.url(), ConnectionOptions(timeout=1.0, connect_timeout=0.3, backoff_max=0.2)
    )
    assert await conn.start()
    try:
        server.pause()
        slow, later = Calls(), Calls()
        conn.send_callback(slow, b"ECHO", b"slow")
        await asyncio.sleep(0)  # (written)
        # A timeout of an hour: if it took anything but its own, `slow` would hang here.
        conn.send_callback(later, b"ECHO", b"later", timeout=3600.0)
        reply, exc = await slow.wait()
        assert reply is None and type(exc) is RedisTimeout
        reply, exc = await later.wait()  # its reply would come on a reset connection
        assert reply is None and isinstance(exc, RedisUnavailable)
        assert conn.timeouts == 1 and not conn.is_connected
        server.resume()
        assert await conn.wait_connected(30)
        again = Calls()
        conn.send_callback(again, b"ECHO", b"again")
        assert await again.wait() == (b"again", None)
        # (the reset connection's replies were read before this one's: none called them again)
        assert len(slow.calls) == 1 and len(later.calls) == 1
    finally:
        server.resume()
        await conn.close()


def _wait_readable(conn: RedisConnection) -> None:
    """Block (the loop held up) until the connection's socket has a reply to read."""
    protocol = conn._protocol
    assert protocol is not None and protocol._transport is not None
    sock = protocol._transport.get_extra_info("socket")
    readable, _, _ = select.select([sock], [], [], 30)
    assert readable, "no reply from Redis in 30 s"


async def test_a_starved_loop_reads_its_replies_before_calling_anything_timed_out(
    redis_factory: StartRedis,
) -> None:
    """A shadow worker starved of CPU (its loop held up past the timeout) used to read its
    own lag as Redis timeouts, and the errors guard switched the shadow off. The replies
    that came meanwhile are read first: no timeout; a command still unanswered after a
    hold-up longer than its timeout fails as ShadowStarved (a drop), not as Redis's fault."""
    server = redis_factory()
    conn = RedisConnection(
        server.url(), ConnectionOptions(timeout=0.2, connect_timeout=1.0, backoff_max=0.2)
    )
    assert await conn.start()
    try:
        answered = Calls()
        conn.send_callback(answered, b"ECHO", b"quick")
        await asyncio.sleep(0)  # written
        _wait_readable(conn)  # Redis answered (whatever the host's load)...
        time.sleep(0.5)  # ...and the loop is held up past the timeout (CPU starvation)
        assert await answered.wait() == (b"quick", None)
        assert conn.timeouts == 0 and conn.is_connected
        server.pause()
        unanswered = Calls()
        conn.send_callback(unanswered, b"ECHO", b"never")
        await asyncio.sleep(0)
        time.sleep(0.5)
        reply, exc = await unanswered.wait()
        assert reply is None and isinstance(exc, ShadowStarved)
        # Not Redis's fault: the connection stays, and the late reply finds its place.
        assert conn.is_connected and conn.timeouts == 0
        server.resume()
        after = Calls()
        conn.send_callback(after, b"ECHO", b"after")
        assert await after.wait() == (b"after", None)
    finally:
        server.resume()
        await conn.close()


async def test_callbacks_fail_once_when_the_connection_is_lost(redis_factory: StartRedis) -> None:
    server = redis_factory()
    conn = RedisConnection(server.url(), ConnectionOptions(timeout=5.0, backoff_max=0.2))
    assert await conn.start()
    try:
        server.pause()
        calls = [Calls() for _ in range(10)]
        for call in calls:
            conn.send_callback(call, b"PING")
        server.stop()  # kills the paused process: the connection is reset
        for reply, exc in await Calls.wait_all(calls):
            assert reply is None and isinstance(exc, RedisUnavailable)
        # closing the client fails what is still queued, once too
        server.start()
        assert await conn.wait_connected(30)
        server.pause()
        pending = Calls()
        conn.send_callback(pending, b"PING")
        await conn.close()
        reply, exc = await pending.wait()
        assert reply is None and isinstance(exc, RedisUnavailable)
    finally:
        server.resume()
        await conn.close()


async def test_fcall_callback_reloads_a_missing_library_once(redis_shared: Server) -> None:
    conn = RedisConnection(redis_shared.url(db=5), ConnectionOptions(library=function_library()))
    assert await conn.start()
    try:
        await conn.execute(b"FUNCTION", b"DELETE", b"memshadow")
        calls = [Calls() for _ in range(10)]
        for i, call in enumerate(calls):
            conn.fcall_callback(call, "mc_touch", b"k%d" % i, b"0", b"0")
        assert await Calls.wait_all(calls) == [([b"NOT_FOUND"], None)] * 10
        assert conn.function_reloads == 1
        error = Calls()
        conn.fcall_callback(error, "no_such_function", b"k")
        await conn.execute(b"FUNCTION", b"DELETE", b"memshadow")  # after the first send
        reply, exc = await error.wait()  # reloaded, sent again, still missing: reported
        assert reply is None and isinstance(exc, RedisReplyError)
        assert conn.function_reloads == 2
    finally:
        await conn.close()


# failure handling ----------------------------------------------------------------------------


async def test_redis_down_fails_fast() -> None:
    conn = RedisConnection(
        f"redis://127.0.0.1:{free_port()}", ConnectionOptions(connect_timeout=0.5)
    )
    assert not await conn.start()
    assert conn.connect_failures >= 1 and not conn.is_connected
    assert isinstance(raised_at_once(conn.execute(b"PING")), RedisUnavailable)
    await conn.close()


def test_a_connection_retrying_leaves_no_exception_behind() -> None:
    """While a connection (and a store telling a cluster from a single Redis) retries a
    refused connect, nothing else in the thread sees that failure: no stale sys.exc_info(),
    no stale context on an unrelated exception (on the compiled build, a coroutine suspended
    in an except block left both; see tests/test_build.py)."""

    async def unrelated() -> BaseException:
        try:
            raise ValueError("unrelated")
        except ValueError as exc:
            return exc

    loop = uvloop.new_event_loop()
    url = f"redis://127.0.0.1:{free_port()}"
    options = ConnectionOptions(connect_timeout=0.5, backoff_initial=0.01, backoff_max=0.02)
    conn = RedisConnection(url, options)
    store = RedisStore.from_url(url, cluster="auto", options=options)
    try:
        loop.run_until_complete(conn.start())
        loop.create_task(store.start())
        for _ in range(5):
            loop.run_until_complete(asyncio.sleep(0.05))
        assert conn.connect_failures >= 2
        assert sys.exc_info() == (None, None, None)
        assert loop.run_until_complete(unrelated()).__context__ is None
        assert raised_at_once(conn.execute(b"PING")).__context__ is None
    finally:
        loop.run_until_complete(conn.close())
        loop.run_until_complete(store.close())
        loop.close()


async def test_redis_killed_then_back(redis_factory: StartRedis) -> None:
    server = redis_factory()
    store = store_for(server.url())
    assert await store.start()
    try:
        await store.store(Mode.SET, b"k", 1, 0, b"before")
        server.stop()
        conn = store.pool.connections[0]
        await wait_until_async(lambda: not conn.is_connected)
        assert isinstance(raised_at_once(store.get(b"k")), RedisUnavailable)
        server.start()  # same port, empty, and without the function library
        assert await store.pool.wait_connected(30)
        assert conn.reconnects == 1
        result = await store.store(Mode.ADD, b"k", 1, 0, b"after")
        assert result.status is Status.STORED
        item = await store.get(b"k")
        assert item is not None and item.data == b"after"
    finally:
        await store.close()


async def test_a_redis_that_stays_down_is_logged_once_then_summarised(
    redis_factory: StartRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Four connections retrying make dozens of attempts: one warning when the outage
    starts, a summary per interval (never more often), one line when a connection succeeds
    again."""
    server = redis_factory()
    server.stop()
    options = ConnectionOptions(
        connect_timeout=0.3, backoff_initial=0.01, backoff_max=0.02, outage_summary=0.5
    )
    pool = RedisPool(server.url(), 4, options)
    caplog.set_level("INFO", logger="proxy.redis.connection")

    def records(text: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "proxy.redis.connection" and text in r.getMessage()
        ]

    assert not await pool.start()
    try:
        await wait_until_async(
            lambda: (
                sum(conn.connect_failures for conn in pool.connections) >= 20
                and len(records("unreachable for")) >= 2
            ),
            what="20 attempts and two summaries",
        )
        assert len(records("connect failed")) == 1
        # One summary per interval at most, however many attempts there were between them.
        times = [r.created for r in records("connect failed") + records("unreachable for")]
        assert all(b - a >= 0.5 - 0.01 for a, b in itertools.pairwise(times)), times
        server.start()
        assert await pool.wait_connected(30)
        await wait_until_async(
            lambda: any("connected again" in r.getMessage() for r in caplog.records)
        )
    finally:
        await pool.close()


async def test_a_redis_host_that_does_not_resolve_is_named() -> None:
    conn = RedisConnection(
        "redis://no-such-host.invalid:6379", ConnectionOptions(connect_timeout=2.0)
    )
    assert not await conn.start()
    assert conn.last_error is not None
    assert conn.last_error.startswith("cannot resolve the host 'no-such-host.invalid': ")
    await conn.close()


async def test_missing_function_is_reloaded_once(redis_shared: Server) -> None:
    store = store_for(redis_shared.url(db=5))
    assert await store.start()
    conn = store.pool.connections[0]
    try:
        await conn.execute(b"FUNCTION", b"DELETE", b"memshadow")
        result = await store.store(Mode.SET, b"k", 0, 0, b"v")
        assert result.status is Status.STORED
        assert conn.function_reloads == 1
        await conn.execute(b"FUNCTION", b"DELETE", b"memshadow")
        results = await asyncio.gather(
            *(store.store(Mode.SET, b"k%d" % i, 0, 0, b"v") for i in range(20))
        )
        assert {r.status for r in results} == {Status.STORED}
        assert conn.function_reloads == 2  # concurrent callers shared one reload
    finally:
        await store.close()


async def test_timeout_fails_the_command_and_resets_the_connection(
    redis_factory: StartRedis,
) -> None:
    server = redis_factory()
    conn = RedisConnection(
        server.url(), ConnectionOptions(timeout=1.0, connect_timeout=0.3, backoff_max=0.2)
    )
    assert await conn.start()
    try:
        server.pause()
        slow = conn.send(b"ECHO", b"slow")
        await asyncio.sleep(0)  # (written)
        # A timeout of an hour: if `slow` took anything but its own, it would hang here.
        later = conn.send(b"ECHO", b"later", timeout=3600.0)
        with pytest.raises(RedisTimeout) as failed:
            await asyncio.wait_for(slow, 30)
        assert type(failed.value) is RedisTimeout  # (not ShadowStarved)
        with pytest.raises(RedisUnavailable):  # its reply would come on a reset connection
            await later
        assert conn.timeouts == 1
        assert not conn.is_connected
        with pytest.raises(RedisUnavailable):
            await conn.execute(b"PING")
        server.resume()
        assert await conn.wait_connected(30)
        assert conn.reconnects == 1
        assert await conn.execute(b"ECHO", b"again") == b"again"
    finally:
        server.resume()
        await conn.close()


async def test_in_flight_bound_fails_fast_with_busy(redis_factory: StartRedis) -> None:
    server = redis_factory()
    conn = RedisConnection(server.url(), ConnectionOptions(max_inflight=5, timeout=5.0))
    assert await conn.start()
    try:
        server.pause()
        futures = [conn.send(b"ECHO", b"%d" % i) for i in range(5)]
        with pytest.raises(RedisBusy):
            conn.send(b"PING")
        server.resume()
        assert await asyncio.gather(*futures) == [b"%d" % i for i in range(5)]
        assert await conn.execute(b"PING") == b"PONG"
    finally:
        server.resume()
        await conn.close()


# AUTH, SELECT, TLS ---------------------------------------------------------------------------


async def test_password_and_database_from_the_url(redis_factory: StartRedis) -> None:
    server = redis_factory("--requirepass", "s3cret")
    store = store_for(server.url(db=7, auth=":s3cret@"))
    assert await store.start()
    try:
        await store.store(Mode.SET, b"k", 3, 0, b"in db 7")
        db7 = RedisConnection(server.url(db=7, auth=":s3cret@"))
        db0 = RedisConnection(server.url(db=0, auth=":s3cret@"))
        assert await db7.start() and await db0.start()
        assert await db7.execute(b"EXISTS", b"k") == 1
        assert await db0.execute(b"EXISTS", b"k") == 0
        await db7.close()
        await db0.close()
    finally:
        await store.close()


async def test_wrong_password_never_connects(redis_factory: StartRedis) -> None:
    server = redis_factory("--requirepass", "s3cret")
    failures: Counter[str] = Counter()
    conn = RedisConnection(
        server.url(auth=":wrong@"), ConnectionOptions(backoff_max=0.1, failures=failures)
    )
    assert not await conn.start()
    assert conn.last_error is not None and "AUTH failed" in conn.last_error
    assert "wrong" not in conn.last_error
    assert set(failures) == {"auth"}
    with pytest.raises(RedisUnavailable):
        await conn.execute(b"PING")
    await conn.close()


async def test_acl_user_and_password(redis_factory: StartRedis) -> None:
    server = redis_factory(
        "--user", "alice", "on", ">alicepw", "~*", "&*", "+@all", "--user", "default", "off"
    )  # fmt: skip
    conn = RedisConnection(
        server.url(auth="alice:alicepw@"), ConnectionOptions(library=function_library())
    )
    assert await conn.start()
    assert await conn.execute(b"ACL", b"WHOAMI") == b"alice"
    await conn.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server = Server(
        lambda port: [
            REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no",
        ]
    ).start()  # fmt: skip
    try:
        context = ssl.create_default_context(cafile=str(cert))
        url = f"rediss://127.0.0.1:{server.port}/1"
        store = RedisStore(
            RedisPool(url, 1, ConnectionOptions(library=function_library(), ssl_context=context))
        )
        assert await store.start()
        assert (await store.store(Mode.SET, b"k", 0, 0, b"tls")).status is Status.STORED
        await store.close()
        insecure = RedisConnection(url + "?ssl_cert_reqs=none")
        assert await insecure.start()
        assert await insecure.execute(b"PING") == b"PONG"
        await insecure.close()
        verified = RedisConnection(
            url, ConnectionOptions(backoff_max=0.1)
        )  # the default CAs do not know it
        assert not await verified.start()
        assert verified.last_error is not None and "CERTIFICATE" in verified.last_error.upper()
        await verified.close()
    finally:
        server.stop()


async def attempt(url: str) -> tuple[bool, str, Counter[str]]:
    """Connect once (and PING): (whether it worked, the last error, failures by reason)."""
    failures: Counter[str] = Counter()
    conn = RedisConnection(
        url, ConnectionOptions(backoff_max=0.1, connect_timeout=2.0, failures=failures)
    )
    try:
        up = await conn.start() and await conn.execute(b"PING") == b"PONG"
        return up, conn.last_error or "", failures
    except RedisUnavailable:
        return False, conn.last_error or "", failures
    finally:
        await conn.close()


async def test_tls_checks_the_ca_the_host_name_and_sends_a_client_certificate(
    tmp_path: Path,
) -> None:
    ca, stranger = ThrowawayCA(tmp_path, "ca"), ThrowawayCA(tmp_path, "stranger")
    cert, key = ca.issue("memshadow")
    strict = ServerProcess(
        tls_redis_argv(*ca.issue("redis", "IP:127.0.0.1"), ca.cert, client_certs=True)
    ).start()
    misnamed = ServerProcess(
        tls_redis_argv(*ca.issue("cache.example", "DNS:cache.example"), ca.cert)
    ).start()
    mine = f"&ssl_certfile={cert}&ssl_keyfile={key}"
    try:
        up, error, failures = await attempt(
            f"rediss://127.0.0.1:{strict.port}/0?ssl_ca_certs={ca.cert}{mine}"
        )
        assert (up, error, failures) == (True, "", Counter())
        # Another CA, or the system's (the default), does not vouch for the server.
        for cas in (f"ssl_ca_certs={stranger.cert}", "timeout=1"):
            up, error, failures = await attempt(f"rediss://127.0.0.1:{strict.port}/0?{cas}{mine}")
            assert not up and "CERTIFICATE_VERIFY_FAILED" in error, error
            assert set(failures) == {"tls"}
        # The right CA, for another name than the one dialled.
        up, error, failures = await attempt(
            f"rediss://127.0.0.1:{misnamed.port}/0?ssl_ca_certs={ca.cert}"
        )
        assert not up and "IP address mismatch" in error, error
        assert set(failures) == {"tls"}
        # Only an explicit ssl_cert_reqs=none takes it.
        up, _, _ = await attempt(f"rediss://127.0.0.1:{misnamed.port}/0?ssl_cert_reqs=none")
        assert up
        # The server that asks for a client certificate refuses a client without one.
        up, _, failures = await attempt(
            f"rediss://127.0.0.1:{strict.port}/0?ssl_ca_certs={ca.cert}"
        )
        assert not up and set(failures) == {"tls"}
    finally:
        strict.stop()
        misnamed.stop()


async def test_an_acl_user_without_the_rights_memshadow_needs(redis_factory: StartRedis) -> None:
    server = redis_factory(
        "--user", "bob", "on", ">bobpw", "~*", "&*", "+@all", "-function",
    )  # fmt: skip
    failures: Counter[str] = Counter()
    options = ConnectionOptions(library=function_library(), backoff_max=0.1, failures=failures)
    conn = RedisConnection(server.url(auth="bob:bobpw@"), options)
    assert not await conn.start()
    await conn.close()
    assert set(failures) == {"permission"}


async def test_an_acl_user_without_a_password_does_not_connect(redis_factory: StartRedis) -> None:
    server = redis_factory()
    up, error, _ = await attempt(server.url(auth="alice@"))
    assert not up and "names the user 'alice' but no password" in error
