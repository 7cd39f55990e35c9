"""Clients that try to make a real memshadow process hoard memory: many connections that
pipeline requests for large values without reading the replies, and slowloris writers
(command lines and data blocks trickled a few bytes at a time). The proxy's RSS must stay
within a stated bound, the connections must not disturb a well-behaved client, and the
proxy must serve normally once they are gone (hardening: resource limits)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_connections_held import _rss_kb, _version
from tests.support import ServerProcess, memcached_argv, start_memshadow

VALUE = 512 * 1024
"""Each pipelined get asks for this much: 4,000 unread replies would be 2 GB."""
PIPELINERS = 20
GETS_EACH = 200
MAX_GROWTH_MB = 64
"""What the hostile connections may add to the proxy's RSS: per connection the write-buffer
high-water mark (64 KiB by default) and a reply chunk in flight, with room for the
allocator; far below the 2 GB of replies they asked for."""
SLOWLORIS = 300


Running = tuple["subprocess.Popen[str]", int]


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Running]:
    memcached = ServerProcess(memcached_argv("-m", "256", "-I", "1m"))
    memcached.start()
    config = tmp_path / "memshadow.yaml"
    config.write_text("limits:\n  max_connections: 2000\n", encoding="utf-8")
    proc, port = start_memshadow(
        "--config", str(config), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--memcached", str(memcached.address),
    )  # fmt: skip
    try:
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(30)
        memcached.stop()


def _well_behaved(port: int) -> None:
    """A normal client: a set and a get, answered in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"set polite 0 0 2\r\nok\r\nget polite\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(4096)
            assert chunk, "closed"
            data += chunk
        assert data == b"STORED\r\nVALUE polite 0 2\r\nok\r\nEND\r\n"


def test_pipelining_without_reading_keeps_the_proxy_small(proxy_process: Running) -> None:
    proc, port = proxy_process
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"set big 0 0 %d\r\n" % VALUE + b"b" * VALUE + b"\r\n")
        assert sock.recv(100) == b"STORED\r\n"
    _well_behaved(port)
    before = _rss_kb(proc.pid)
    hoarders: list[socket.socket] = []
    try:
        for _ in range(PIPELINERS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            hoarders.append(sock)
        requests = b"get big\r\n" * GETS_EACH
        deadline = time.monotonic() + 10
        sent = [0] * PIPELINERS
        while time.monotonic() < deadline and min(sent) < len(requests):
            for i, sock in enumerate(hoarders):  # send what the proxy takes; never read
                with contextlib.suppress(BlockingIOError):
                    sent[i] += sock.send(requests[sent[i] :])
            time.sleep(0.01)
        time.sleep(1.0)  # whatever the proxy was going to buffer, it has by now
        growth_mb = (_rss_kb(proc.pid) - before) / 1024
        asked_mb = sum(sent) // len(b"get big\r\n") * VALUE / 2**20
        print(
            f"\n{PIPELINERS} connections pipelined {asked_mb:.0f} MB of replies without "
            f"reading: proxy RSS grew {growth_mb:.1f} MB"
        )
        assert growth_mb < MAX_GROWTH_MB
        _well_behaved(port)  # others are served meanwhile
    finally:
        for sock in hoarders:
            sock.close()
    time.sleep(0.5)
    _well_behaved(port)
    assert proc.poll() is None


def test_slowloris_writers_hold_little_and_harm_nobody(proxy_process: Running) -> None:
    proc, port = proxy_process
    _well_behaved(port)
    before = _rss_kb(proc.pid)
    slow: list[socket.socket] = []
    try:
        for i in range(SLOWLORIS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            # half of them trickle a command line, half a data block of a large set
            head = b"get slow-key-%d" % i if i % 2 else b"set slow%d 0 0 900000\r\n" % i
            sock.sendall(head[:3])
            slow.append(sock)
        for step in range(20):  # a few bytes each, every 50 ms, for a second
            for i, sock in enumerate(slow):
                sock.sendall(b"x" * 5 if i % 2 == 0 else b"-")
            time.sleep(0.05)
            if step == 10:
                _well_behaved(port)
        growth_mb = (_rss_kb(proc.pid) - before) / 1024
        print(f"\n{SLOWLORIS} slowloris connections: proxy RSS grew {growth_mb:.1f} MB")
        # ~4 KB a connection held, plus what the partial lines and blocks pass through.
        assert growth_mb < SLOWLORIS * 16 / 1024 + 8
        _well_behaved(port)
    finally:
        for sock in slow:
            sock.close()
    time.sleep(0.5)
    _well_behaved(port)
    # The trickled partial lines never became requests: nothing was stored.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"get slow0\r\n")
        assert _version(sock) == b"END\r\n"  # (reads one line)
    assert proc.poll() is None
