"""End to end through memshadow with a real client, plus the proxy's life cycle: memcached
dying and coming back, slow clients, graceful shutdown, metrics of the client path."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from proxy.address import HostPort
from tests.support import (
    FaultRelay,
    ProxyThread,
    RawClient,
    ServerProcess,
    memcached_argv,
    proxy_config,
    wait_until,
)


def _client(port: int, noreply: bool) -> Client:
    return Client(("127.0.0.1", port), default_noreply=noreply, connect_timeout=30, timeout=30)


@pytest.mark.parametrize("noreply", [False, True])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_pymemcache_full_command_set(memcached: ServerProcess, noreply: bool, loop: str) -> None:
    proxy = ProxyThread(proxy_config(memcached), use_uvloop=loop == "uvloop")
    proxy.start()
    try:
        client = _client(proxy.port, noreply)
        assert client.set("a", b"1", expire=100) is True
        assert client.get("a") == b"1"
        assert client.add("a", b"x") is noreply
        assert client.add("b", b"2") is True
        assert client.replace("b", b"22") is True
        assert client.replace("zz", b"x") is noreply
        assert client.append("b", b"3") is True
        assert client.prepend("b", b"0") is True
        assert client.get("b") == b"0223"
        assert client.get_many(["a", "b", "missing"]) == {"a": b"1", "b": b"0223"}
        value, cas = client.gets("b")
        assert value == b"0223" and cas is not None
        assert client.cas("b", b"new", cas, noreply=False) is True
        assert client.cas("b", b"newer", cas, noreply=False) is False
        assert client.cas("missing", b"x", b"1", noreply=False) is None
        client.set("n", b"10")
        assert client.incr("n", 5, noreply=False) == 15
        assert client.decr("n", 100, noreply=False) == 0
        assert client.incr("missing", 1, noreply=False) is None
        assert client.touch("a", 100) is True
        assert client.delete("a", noreply=False) is True
        assert client.delete("a", noreply=False) is False
        assert client.delete_many(["b", "n"]) is True
        assert client.get_many(["b", "n"]) == {}
        assert client.version().startswith(b"1.6")
        assert b"pid" in client.stats()
        client.set_many({"m1": b"a", "m2": b"b"})
        assert client.get_many(["m1", "m2"]) == {"m1": b"a", "m2": b"b"}
        assert client.flush_all(noreply=False) is True
        assert client.get("m1") is None
        assert client.raw_command(b"mg m9 v", b"\r\n") == b"EN"
        client.quit()
    finally:
        proxy.stop()


def test_counts_requests_by_command(proxy: ProxyThread) -> None:
    label = proxy.config.backends[0].label
    client = _client(proxy.port, False)
    client.set("a", b"1")
    client.get("a")
    client.get("a")
    client.close()
    stats = proxy.metrics.requests
    wait_until(lambda: stats.count("get") >= 2, what="both gets counted")
    assert stats.count("get") == 2 and stats.count("set") == 1
    text = proxy.metrics.render().decode()
    assert f'memshadow_requests_total{{command="get",listener="{label}"}} 2.0' in text
    assert "memshadow_request_duration_seconds_bucket" in text


def test_connections_gauge_and_no_leak(proxy: ProxyThread) -> None:
    clients = [RawClient(proxy.port) for _ in range(20)]
    for c in clients:
        c.send(b"version\r\n")
        c.read_until(b"\r\n")
    assert proxy.call(lambda: len(proxy.server.sessions)) == 20
    for c in clients:
        c.close()
    wait_until(lambda: proxy.call(lambda: len(proxy.server.sessions)) == 0, what="no session")
    assert "memshadow_client_connections 0.0" in proxy.metrics.render().decode()


def test_memcached_dies_mid_traffic_and_comes_back(memcached: ServerProcess) -> None:
    proxy = ProxyThread(proxy_config(memcached))
    proxy.start()
    try:
        stop = threading.Event()
        errors: list[str] = []
        served = [0]

        def hammer() -> None:
            while not stop.is_set():
                try:
                    client = _client(proxy.port, False)
                    for _ in range(50):
                        client.set("k", b"v")
                        assert client.get("k") in (b"v", None)
                        served[0] += 1
                    client.close()
                except (OSError, Exception) as exc:  # a dead server: the connection is closed
                    errors.append(type(exc).__name__)
                    time.sleep(0.01)

        workers = [threading.Thread(target=hammer) for _ in range(4)]
        for w in workers:
            w.start()
        wait_until(lambda: served[0] > 0, what="traffic")
        # one client with a request in flight when memcached dies (it waits for the rest of
        # the value): whatever the hammer's timing, the proxy loses that one with it
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        held.sendall(b"set held 0 0 10\r\nabc")
        wait_until(
            lambda: proxy.call(lambda: any(s.pending for s in proxy.server.sessions)),
            what="a request in flight",
        )
        memcached.stop()
        assert held.recv(100) == b""  # closed, as memcached's death closes it directly
        held.close()
        wait_until(lambda: errors, what="clients see the dead server")
        before_restart = served[0]
        memcached.start()
        # new connections work again once memcached is back
        wait_until(lambda: served[0] > before_restart, what="served again")
        stop.set()
        for w in workers:
            w.join(10)
        # every session the outage broke is gone: nothing leaks
        wait_until(lambda: proxy.call(lambda: len(proxy.server.sessions)) == 0, what="no session")
        # and the proxy counted why: the sessions cut with requests in flight (the held one at
        # least) and, by the hammer's timing, refused connects of clients that came back
        # before memcached did and before the proxy stopped listening. (A session cut while
        # idle lost nothing and is not an error; a client refused by the closed listener
        # never reached the proxy.)
        text = proxy.metrics.render().decode()
        counted = dict(re.findall(r'memshadow_upstream_errors_total\{kind="(\w+)"\} (\S+)', text))
        assert set(counted) <= {"connect", "disconnect"}, counted
        assert float(counted.get("disconnect", 0)) >= 1, counted
        # and the proxy itself still answers
        client = _client(proxy.port, False)
        assert client.version().startswith(b"1.6")
    finally:
        proxy.stop()


def test_unreachable_memcached_closes_the_client(memcached: ServerProcess) -> None:
    memcached.stop()
    proxy = ProxyThread(proxy_config(memcached))
    proxy.start()
    try:
        client = RawClient(proxy.port)
        client.send(b"version\r\n")
        assert client.read_to_close() == b"" and client.closed
    finally:
        proxy.stop()


def test_slow_client_does_not_grow_proxy_memory(memcached: ServerProcess) -> None:
    """A client that never reads: the proxy stops reading memcached, so its buffers stay
    bounded by the write-buffer limits instead of the reply volume."""
    proxy = ProxyThread(proxy_config(memcached))
    proxy.start()
    try:
        value = b"x" * 500_000
        setter = _client(proxy.port, False)
        setter.set("big", value)
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        request = b"get big\r\n" * 60  # 30 MB of replies if nothing pushed back
        sock.settimeout(0.5)
        sent = 0
        try:
            while sent < len(request):
                sent += sock.send(request[sent:])
        except TimeoutError:
            pass

        def buffered() -> int:
            total = 0
            for session in proxy.server.sessions:
                if session.transport is not None:
                    total += session.transport.get_write_buffer_size()
            return total

        high = proxy.config.limits.write_buffer_high
        # The replies fill the proxy's buffer up to its high-water mark, where it stops
        # reading memcached: at most one reply chunk beyond it is in flight then.
        wait_until(lambda: proxy.call(buffered) >= high, what="the buffer at its mark")
        for _ in range(10):  # (and it stays there, however long one looks)
            assert proxy.call(buffered) < high + 2 * len(value)
            time.sleep(0.05)
        # and the connection still works once the client reads
        sock.settimeout(5)
        got = 0
        expected = 60 * (len(value) + len(b"VALUE big 0 500000\r\n\r\nEND\r\n"))
        while got < expected and sent == len(request):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        sock.close()
        assert sent < len(request) or got == expected
    finally:
        proxy.stop()


def test_graceful_stop_finishes_in_flight_requests(memcached: ServerProcess) -> None:
    proxy = ProxyThread(proxy_config(memcached))
    proxy.start()
    client = RawClient(proxy.port)
    idle = RawClient(proxy.port)
    big = b"y" * 800_000
    client.send(b"set g 0 0 %d\r\n" % len(big) + big[:1000])
    wait_until(
        lambda: proxy.call(lambda: sum(len(s.pending) for s in proxy.server.sessions)),
        what="the set under way",
    )
    stopper = threading.Thread(target=proxy.stop)
    stopper.start()  # drains: the request under way still completes
    # An idle connection closes at once: while the other one's request is still under way.
    assert idle.read_to_close() == b"" and idle.closed
    client.send(big[1000:] + b"\r\nget g\r\n")
    reply = client.read_to_close()
    stopper.join(15)
    assert reply.startswith(b"STORED\r\nVALUE g 0 800000\r\n") and reply.endswith(b"END\r\n")
    assert client.closed
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)


def test_binary_protocol_is_relayed_and_counted(proxy: ProxyThread) -> None:
    client = RawClient(proxy.port)
    client.send(bytes([0x80, 0x0B]) + bytes(22))  # binary "version"
    reply = b""
    while len(reply) < 24 or len(reply) < 24 + int.from_bytes(reply[8:12], "big"):
        client.sock.settimeout(30)
        chunk = client.sock.recv(1 << 16)  # (a header, then its body's length)
        assert chunk, reply
        reply += chunk
    assert reply[:2] == bytes([0x81, 0x0B]) and b"1.6" in reply
    assert 'memshadow_unframed_connections_total{reason="binary_protocol"} 1.0' in (
        proxy.metrics.render().decode()
    )


def test_memcached_restart_fixture_reuses_port() -> None:
    server = ServerProcess(memcached_argv())
    server.start()
    port = server.port
    server.stop()
    server.start()
    assert server.port == port
    server.stop()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_memcached_at_its_connection_limit_refuses_as_it_would_directly(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past -c, memcached answers a new connection with an ERROR line and closes it: a client
    of the proxy gets exactly that, and the proxy logs no unretrieved task exception."""
    memcached = ServerProcess(memcached_argv("-c", "30", threads=1))
    memcached.start()
    proxy = ProxyThread(proxy_config(memcached), use_uvloop=loop == "uvloop")
    proxy.start()
    held: list[socket.socket] = []
    refused = b"ERROR Too many open connections\r\n"

    def version(port: int) -> tuple[bytes, bool]:
        """The reply to `version` on a new connection, and whether it ended after (closed,
        or reset: memcached resets a connection whose request it never read)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.append(sock)
        sock.sendall(b"version\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(100)
            if not chunk:
                return data, True
            data += chunk
        # (after the refusal the close follows: wait for it; after a version, 0.1 s shows
        # the connection is not closed)
        sock.settimeout(30 if data == refused else 0.1)
        try:
            return data, sock.recv(100) == b""
        except ConnectionResetError:
            return data, True
        except TimeoutError:
            return data, False

    try:
        answers = [version(proxy.port) for _ in range(34)]
        assert version(memcached.port) == (refused, True)  # what a client gets directly
        assert answers.count((refused, True)) >= 4
        assert set(answers) == {(refused, True), (b"VERSION 1.6.18\r\n", False)}
        for sock in held:
            sock.close()
        held.clear()
        wait_until(lambda: proxy.call(lambda: len(proxy.server.sessions)) == 0, what="all closed")

        def room() -> bool:
            answer = version(proxy.port)
            for sock in held:
                sock.close()
            held.clear()
            return answer == (b"VERSION 1.6.18\r\n", False)

        wait_until(room, what="room again")  # (memcached sees the proxy's closes in time)
        # An unretrieved task exception is logged when its task is freed.
        proxy.call(gc.collect)
        gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        for sock in held:
            sock.close()
        proxy.stop()
        memcached.stop()


def _limited(memcached: ServerProcess, **limits: Any) -> ProxyThread:
    config = proxy_config(memcached)
    proxy = ProxyThread(replace(config, limits=replace(config.limits, **limits)))
    proxy.start()
    return proxy


def _closed_by_proxy(proxy: ProxyThread, reason: str) -> float:
    name = "memshadow_client_connections_closed_by_proxy_total"
    return _metric(proxy, f'{name}{{reason="{reason}"}} ')


def _metric(proxy: ProxyThread, line: str) -> float:
    text = proxy.metrics.render().decode()
    return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])


def test_a_failing_shadow_hand_off_costs_the_client_nothing(
    memcached: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the shadow's hand-off (the observer raises) must not reach the client: every
    reply arrives, the connection stays open, others are served; the failures are counted
    and logged with their traceback once, not once per request."""

    def broken(requests: list[Any], session: int) -> None:
        raise RuntimeError("shadow bug")

    proxy = ProxyThread(proxy_config(memcached), capture=lambda request: True, observer=broken)
    proxy.start()
    try:
        clients = [Client(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
        for round_ in range(20):
            for n, client in enumerate(clients):
                assert client.set(f"k{n}", b"v%d" % round_, noreply=False)
                assert client.get(f"k{n}") == b"v%d" % round_
        for client in clients:
            client.close()
        failures = _metric(proxy, 'memshadow_shadow_handoff_failures_total{stage="observe"} ')
        assert failures == 3 * 20 * 2
        logged = [r for r in caplog.records if "shadow hand-off failed" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None
        assert proxy.metrics.requests.total() == 3 * 20 * 2
    finally:
        proxy.stop()


def test_past_max_connections_a_client_is_refused_as_memcached_would(
    memcached: ServerProcess,
) -> None:
    proxy = _limited(memcached, max_connections=3)
    try:
        held = [RawClient(proxy.port) for _ in range(3)]
        for client in held:
            client.send(b"version\r\n")
            assert client.read_until(b"\r\n").startswith(b"VERSION ")
        extra = RawClient(proxy.port)
        extra.send(b"version\r\n")
        assert extra.read_to_close() == b"ERROR Too many open connections\r\n"
        assert extra.closed
        assert _closed_by_proxy(proxy, "max_connections") == 1.0
        held.pop().close()  # room again once one leaves
        wait_until(lambda: proxy.call(lambda: len(proxy.server.sessions)) <= 2, what="room")
        again = RawClient(proxy.port)
        again.send(b"version\r\n")
        assert again.read_until(b"\r\n").startswith(b"VERSION ")
        for client in (*held, again):
            client.close()
    finally:
        proxy.stop()


def test_idle_timeout_closes_only_idle_connections(memcached: ServerProcess) -> None:
    proxy = _limited(memcached, idle_timeout=1.0)
    try:
        idle, busy = RawClient(proxy.port), RawClient(proxy.port)
        for client in (idle, busy):
            client.send(b"version\r\n")
            assert client.read_until(b"\r\n").startswith(b"VERSION ")

        def idle_closed() -> bool:  # busy keeps talking, idle says nothing
            busy.send(b"version\r\n")
            assert busy.read_until(b"\r\n").startswith(b"VERSION ")
            return idle.read_quiet(0.02) == b"" and idle.closed

        wait_until(idle_closed, what="the idle connection closed")
        assert not busy.closed
        assert _closed_by_proxy(proxy, "idle_timeout") == 1.0
        busy.close()
    finally:
        proxy.stop()


def test_memcached_faults_leak_nothing(memcached: ServerProcess) -> None:
    """Memcached stops answering (a black hole), stalls part-way through a reply, shuts its
    sending side (a half-close) and has every connection reset, while clients keep trying:
    clients see what a silent or vanished Memcached gives them (timeouts, closed
    connections), never a wrong answer, the proxy carries on by itself after each fault, and
    when the clients are gone no descriptor, task or session is left behind."""
    relay = FaultRelay(memcached.port)
    config = replace(proxy_config(memcached), memcached=HostPort("127.0.0.1", relay.port))
    proxy = ProxyThread(config)
    proxy.start()

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def tasks() -> int:
        return int(proxy.call(lambda: len(asyncio.all_tasks())))

    try:
        probe = Client(("127.0.0.1", proxy.port), connect_timeout=5, timeout=5)
        assert probe.set("warm", b"1", noreply=False)
        probe.close()
        wait_until(lambda: proxy.call(lambda: len(proxy.server.sessions)) == 0, what="closed")
        fds_before, tasks_before = fds(), tasks()
        stop = threading.Event()
        outcomes: list[str] = []

        def client_loop() -> None:
            client = Client(("127.0.0.1", proxy.port), connect_timeout=1, timeout=0.3)
            while not stop.is_set():
                try:
                    client.set("k", b"v", noreply=False)
                    outcomes.append("ok" if client.get("k") == b"v" else "wrong")
                except (OSError, MemcacheUnexpectedCloseError) as exc:
                    outcomes.append(type(exc).__name__)
                    client.close()
            client.close()

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: "ok" in outcomes, what="traffic")

        def fault(name: str, start: Callable[[], None], end: Callable[[], None]) -> None:
            before = len(outcomes)
            start()
            # clients feel it
            wait_until(lambda: any(o != "ok" for o in outcomes[before:]), what=f"{name} felt")
            end()
            ended = len(outcomes)
            # and the proxy serves again (once what the fault held up has timed out)
            wait_until(lambda: "ok" in outcomes[ended:], what=f"served after {name}")

        def set_mode(mode: str) -> Callable[[], None]:
            return lambda: setattr(relay, "mode", mode)

        fault("blackhole", set_mode("blackhole"), set_mode("pass"))
        fault("stall", set_mode("stall"), set_mode("pass"))
        fault("half_close", relay.half_close, lambda: None)
        fault("reset", relay.reset, lambda: None)
        count_at_end = len(outcomes)
        # and the proxy serves again by itself
        wait_until(lambda: "ok" in outcomes[count_at_end:], what="served at the end")
        stop.set()
        for thread in threads:
            thread.join(10)
        assert "wrong" not in outcomes
        wait_until(lambda: proxy.call(lambda: len(proxy.server.sessions)) == 0, what="no session")
        # (the relay's own loop may hold a spare descriptor)
        wait_until(lambda: fds() <= fds_before + 2, what=f"{fds()} fds, {fds_before} before")
        wait_until(lambda: tasks() <= tasks_before, what=f"{tasks()} tasks, {tasks_before} before")
    finally:
        proxy.stop()
        relay.close()
