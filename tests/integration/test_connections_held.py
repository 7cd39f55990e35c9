"""Many idle client connections held at once by a real memshadow process: what each costs in
memory, and that the proxy still serves (hardening: resource limits)."""

from __future__ import annotations

import resource
import socket
from pathlib import Path

import pytest

from tests.support import ServerProcess, memcached_argv, start_memshadow

# Per connection the proxy holds two descriptors (the client's and its Memcached one); the
# rest is listeners, the admin port, the probe, logs.
SPARE_FDS = 200
# What an idle connection may cost the proxy in resident memory: measured 3.95 KB (2,000
# connections, each answered once), with room for another allocator or Python build.
MAX_KB_PER_CONNECTION = 5.0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raise_fd_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _version(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


def _rss_kb_all(pid: int) -> int:
    """The proxy process's RSS and its children's (the extra proxy processes)."""
    total = _rss_kb(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _rss_kb(int(child))
    return total


def _processes_for(count: int, hard: int) -> int:
    """Proxy processes needed to hold `count` connections under a per-process fd limit of
    `hard` (`workers: N`: the kernel spreads connections over them, within a few percent);
    0 when even two would not do."""
    if 2 * count + SPARE_FDS <= hard:
        return 1
    if 2 * (count // 2) * 1.1 + SPARE_FDS <= hard:
        return 2
    return 0


@pytest.mark.parametrize("count", [2_000, 10_000])
def test_idle_connections_are_held_at_a_few_kilobytes_each(tmp_path: Path, count: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    processes = _processes_for(count, hard)
    if not processes or count + SPARE_FDS > hard:  # (the test holds the client sockets)
        pytest.skip(
            f"{count} connections need {2 * count + SPARE_FDS} file descriptors in one proxy "
            f"process, or about half as many in each of two; this machine's hard limit "
            f"(RLIMIT_NOFILE) is {hard} and cannot be raised here"
        )
    _raise_fd_limit()  # for the client sockets of this test
    memcached = ServerProcess(memcached_argv("-c", str(count + SPARE_FDS), threads=2))
    memcached.start()
    config = tmp_path / "memshadow.yaml"
    config.write_text(
        f"workers: {processes}\nlimits:\n  max_connections: {count + 10}\n", encoding="utf-8"
    )
    proc, port = start_memshadow(
        "--config", str(config), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--memcached", str(memcached.address), preexec_fn=_raise_fd_limit,
    )  # fmt: skip
    held: list[socket.socket] = []
    try:

        def connect(n: int) -> None:
            batch = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
            for sock in batch:
                sock.sendall(b"version\r\n")
            for sock in batch:  # every connection is up to Memcached and has been answered
                assert _version(sock).startswith(b"VERSION ")
            held.extend(batch)

        connect(100)  # warm: code paths, allocator arenas
        before = _rss_kb_all(proc.pid)
        while len(held) < count:
            connect(min(500, count - len(held)))
        per_connection = (_rss_kb_all(proc.pid) - before) / (count - 100)
        print(
            f"\n{count} idle connections, {processes} proxy process(es): "
            f"{per_connection:.2f} KB of proxy RSS each"
        )
        assert per_connection <= MAX_KB_PER_CONNECTION
        # Still serving: one more request on the oldest connection and on the newest.
        for sock in (held[0], held[-1]):
            sock.sendall(b"version\r\n")
            assert _version(sock).startswith(b"VERSION ")
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        proc.wait(30)
        memcached.stop()
