"""Test support: real memcached and redis-server processes on free loopback ports, and an
in-process memshadow running on its own event loop thread so that tests can use blocking
clients (raw sockets, pymemcache) against it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.address import HostPort
from proxy.config import Config

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"listening on (\S+), memcached (\S+), admin http://(\S+), ")


def start_memshadow(*args: str, **popen: Any) -> tuple[subprocess.Popen[str], int]:
    """A memshadow process (`python -m proxy ARGS`) and the port it listens on, once its
    start line is logged. Its stderr is a pipe: read it, or drain it, so it never fills."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if match := STARTED.search(line):
            return proc, int(match[1].rsplit(":", 1)[1])
    proc.kill()
    proc.wait(10)
    raise AssertionError("memshadow did not start")


def memcached_stats(port: int) -> dict[str, str]:
    """A memcached's `stats`, on a connection of its own (which the figures then count)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            assert chunk, f"memcached at {port} closed during stats"
            data += chunk
    stats = {}
    for line in data.decode().splitlines():
        if line.startswith("STAT "):
            _, name, value = line.split(" ", 2)
            stats[name] = value
    return stats


def free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535, with the cluster bus port (10000
    higher) free too."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Until something listens on 127.0.0.1:port (fails at once if `proc` exits first)."""

    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1.0).close()
        except OSError:
            return False
        return True

    wait_until(listening, timeout, f"something listening on 127.0.0.1:{port}")


class ServerProcess:
    """A server started on a fixed loopback port that can be stopped, paused and restarted."""

    def __init__(self, argv: Callable[[int], list[str]], port: int | None = None) -> None:
        self._argv = argv
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> HostPort:
        return HostPort(self.host, self.port)

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self._argv(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a paused process cannot die of SIGKILL...
                self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def url(self, db: int = 0, auth: str = "") -> str:
        """redis:// URL of this server (for redis-server processes)."""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"


def memcached_argv(*extra: str, threads: int = 2) -> Callable[[int], list[str]]:
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    return lambda port: [
        MEMCACHED,
        *user,
        "-p",
        str(port),
        "-l",
        "127.0.0.1",
        "-U",
        "0",
        "-t",
        str(threads),
        *extra,
    ]


def redis_argv(*extra: str) -> Callable[[int], list[str]]:
    """A redis-server without persistence, in a directory of its own (a replica writes the
    RDB it syncs from: in the working directory, every later redis-server would load it)."""
    return lambda port: [
        REDIS_SERVER,
        "--dir",
        tempfile.mkdtemp(prefix="memshadow-redis-"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        *extra,
    ]


@contextlib.contextmanager
def auth_file(line: str = "user:pass") -> Iterator[str]:
    """A memcached -Y file (ascii authentication), readable by the user memcached runs as."""
    fd, path = tempfile.mkstemp(prefix="memshadow-auth-", dir="/tmp")
    try:
        os.write(fd, f"{line}\n".encode())
        os.close(fd)
        os.chmod(path, 0o644)
        yield path
    finally:
        os.unlink(path)


class ProxyThread:
    """memshadow's ProxyServer on a private event loop in a background thread. Started, its
    shadow workers (shadow.worker: process) answer, unless `workers_ready` is False."""

    def __init__(
        self,
        config: Config,
        use_uvloop: bool = True,
        *,
        follow_memcached: bool = False,
        workers_ready: bool = True,
        **server_kwargs: Any,
    ) -> None:
        """follow_memcached: as memshadow itself runs, each listener is open only while its
        Memcached is reachable (UpstreamHealth); without it, they always listen."""
        from proxy.metrics import ProxyMetrics

        self.config = config
        self.follow_memcached = follow_memcached
        self.healths: list[Any] = []
        self.metrics = ProxyMetrics(
            listeners=[backend.label for backend in config.backends], processes=config.workers
        )
        self.processes: Any = None  # workers: N: the extra proxy processes
        self._server_kwargs = server_kwargs
        self._use_uvloop = use_uvloop
        self._workers_ready = workers_ready
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.servers: list[Any] = []
        self.shadow: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memshadow-test", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):  # (a bound on a hang: a loaded host starts slowly)
            raise RuntimeError("proxy did not start")
        if self._error is not None:
            raise self._error
        if self._workers_ready and hasattr(self.shadow, "worker_pids"):
            wait_until(self._workers_answer, 120, "the shadow workers answering")

    def _workers_answer(self) -> bool:
        """Every shadow worker process connected, and answering (an idle round trip that
        no worker's exit cut short). A loaded host may start the proxy before them."""
        shadow = self.shadow

        def connected() -> list[int | None] | None:
            pids = list(shadow.worker_pids)
            lanes = shadow.handoff.lanes
            up = None not in pids and all(lane.writer() is not None for lane in lanes)
            return pids if up else None

        pids = self.call(connected)
        if pids is None:
            return False
        self._idle(60)
        return bool(self.call(connected) == pids)

    def _run(self) -> None:
        if self._use_uvloop:
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        from proxy.server import ProxyServer

        self._stop = asyncio.Event()
        try:
            kwargs = dict(self._server_kwargs)
            if self.config.shadow.redis is not None:
                from proxy.shadow.service import build_shadow

                self.shadow = build_shadow(self.config, self.metrics)
                await self.shadow.start()
                kwargs.update(capture=self.shadow.capture, observer=self.shadow.observe)
            if self.follow_memcached:
                from proxy.health import UpstreamHealth

                timeout = self.config.upstream_connect_timeout
                self.healths = [
                    UpstreamHealth(backend.memcached, timeout=timeout)
                    for backend in self.config.backends
                ]
                for health in self.healths:
                    await health.start()
            self.servers = [
                ProxyServer(
                    self.config,
                    self.metrics,
                    self.healths[index] if self.healths else None,
                    index=index,
                    **kwargs,
                )
                for index in range(len(self.config.backends))
            ]
            self.server = self.servers[0]
            if self.shadow is not None:
                servers = self.servers
                self.shadow.attach(lambda: [s.pending for v in servers for s in v.sessions])
            socks: list[Any] = [None] * len(self.servers)
            if self.config.workers > 1:
                from proxy.processes import ProxyProcesses

                self.processes = ProxyProcesses(
                    self.config,
                    self.metrics,
                    self.shadow.control if self.shadow is not None else None,
                    self.shadow,
                    healths=self.healths,
                )
                socks = self.processes.bind()
            for server, sock in zip(self.servers, socks, strict=True):
                await server.start(sock=sock)
            if self.processes is not None:
                await self.processes.start()
        except BaseException as exc:  # surfaced in start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        for server in self.servers:
            await server.stop(self.config.shutdown_timeout)
        if self.processes is not None:
            await self.processes.stop(self.config.shutdown_timeout)
        for health in self.healths:
            await health.stop()
        if self.shadow is not None:
            await self.shadow.stop()

    @property
    def port(self) -> int:
        return int(self.server.listen_address[1])

    @property
    def ports(self) -> list[int]:
        """Every listener's port, in config.backends order."""
        return [int(server.listen_address[1]) for server in self.servers]

    def run(self, coro_fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run a coroutine function on the proxy's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the shadow has judged everything handed to it (workers: N: also what
        the other proxy processes handed over, and their figures reported)."""
        if self.shadow is None:
            return
        if self.processes is None:
            self._idle(timeout)
            return
        # The other processes hand over and report on clocks of their own: settled once a
        # round (a report from each of them, sent after the round began, then the shadow
        # idle) leaves every figure as the round before left it.
        figures: object = None
        deadline = time.monotonic() + timeout
        while True:
            self._fresh_reports(max(1.0, deadline - time.monotonic()))
            self._idle(max(1.0, deadline - time.monotonic()))
            previous, figures = figures, self.call(self._figures)
            if figures == previous:
                return
            assert time.monotonic() < deadline, f"figures still moving after {timeout:g} s"

    def _fresh_reports(self, timeout: float) -> None:
        """Until every extra proxy process (workers: N) has reported again."""
        heard = self.call(self._reports_heard)

        def reported() -> bool:
            now = self.call(self._reports_heard)
            return all(a > b for a, b in zip(now, heard, strict=True))

        wait_until(reported, timeout, "a report from every proxy process")

    def _idle(self, timeout: float) -> None:
        self.run(lambda: asyncio.wait_for(self.shadow.idle(), timeout), timeout + 1)

    def _reports_heard(self) -> list[float]:
        """When each extra proxy process (workers: N) was last heard from."""
        return [extra.last_heard for extra in self.processes._extras]

    def _figures(self) -> tuple[object, ...]:
        stats = self.shadow.stats
        return (
            self.metrics.requests.total(),
            dict(stats.shadowed),
            dict(stats.comparisons),
            dict(stats.dropped),
            dict(stats.errors),
        )

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the proxy's loop and return its result."""
        assert self.loop is not None
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def runner() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(runner)
        return future.result(30)  # (a bound on a hang: a loop stuck for 30 s)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(60)


def proxy_config(
    memcached: ServerProcess,
    redis: ServerProcess | None = None,
    sample_rate: float = 1.0,
    **shadow: Any,
) -> Config:
    """A config for memcached (and, given a redis-server, a shadow at `sample_rate`)."""
    config = Config()
    config = replace(config, listen=HostPort("127.0.0.1", 0), memcached=memcached.address)
    if redis is not None:
        from proxy.redis.url import RedisURL

        url = RedisURL.parse(f"redis://127.0.0.1:{redis.port}/0")
        config = replace(
            config, shadow=replace(config.shadow, redis=url, sample_rate=sample_rate, **shadow)
        )
    return config


class RawClient:
    """A blocking socket client that reads whatever comes back within a quiet period."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, suffix: bytes, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        out = b""
        while not out.endswith(suffix):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {suffix!r} after {out[-200:]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                self.closed = True
                raise ConnectionError(f"closed before {suffix!r}; got {out[-200:]!r}")
            out += chunk
        return out

    def read_quiet(
        self, quiet: float = 0.15, limit: float = 10.0, until: bytes | None = None
    ) -> bytes:
        """Read until nothing arrives for `quiet` seconds, the peer closes, or (when given) the
        data read so far ends with `until`."""
        out = b""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not (until and out.endswith(until)):
            self.sock.settimeout(quiet)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except ConnectionResetError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            out += chunk
        return out

    def read_to_close(self, timeout: float = 30.0) -> bytes:
        """Everything the peer sends until it closes the connection (`closed` tells whether
        it did within `timeout`: a bound on a hang)."""
        return self.read_quiet(quiet=timeout, limit=timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class FaultRelay:
    """A TCP relay to 127.0.0.1:target on a loop of its own, whose faults a test switches at
    run time: "pass", "stall" (replies stop part-way through a chunk, until set back),
    "blackhole" (nothing is forwarded either way), reset() (every connection through it is
    aborted with an RST), half_close() (every connection gets a FIN towards the relay's
    client, as if the server had shut its sending side, but stays open: requests still reach
    the server, its replies are thrown away), and `delay` (seconds every reply chunk is held,
    in any mode)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.mode = "pass"
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()  # the relay's side towards its client
        self._half_closed: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-relay", daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)  # the relayed connections still open
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while data := await reader.read(65536):
                while self.mode == "blackhole" or (replies and self.mode == "stall"):
                    if self.mode == "stall" and len(data) > 1 and writer not in self._half_closed:
                        writer.write(data[: len(data) // 2])  # part of a reply, then nothing
                        data = data[len(data) // 2 :]
                    await asyncio.sleep(0.01)
                if replies and self.delay:
                    await asyncio.sleep(self.delay)
                if writer in self._half_closed:
                    continue  # its FIN was sent: what the server says now goes nowhere
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        self._clients.add(writer)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)
            )
        finally:
            self._writers -= {writer, up_writer}
            self._clients.discard(writer)
            self._half_closed.discard(writer)

    def reset(self) -> None:
        def abort_all() -> None:
            for writer in list(self._writers):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                writer.transport.abort()

        self._loop.call_soon_threadsafe(abort_all)

    def half_close(self) -> None:
        done = threading.Event()

        def shut_all() -> None:
            for writer in list(self._clients - self._half_closed):
                if writer.can_write_eof() and not writer.is_closing():
                    self._half_closed.add(writer)
                    writer.write_eof()
            done.set()

        self._loop.call_soon_threadsafe(shut_all)
        assert done.wait(5)  # every FIN is sent when this returns

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class RedisCluster:
    """A Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each, made
    with `redis-cli --cluster create`, a short cluster-node-timeout so failovers are quick."""

    CREATE_ATTEMPTS = 3
    """`redis-cli --cluster create` on a loaded host has been seen to fail once (exit status
    1): a failed creation starts again on new nodes (new ports), at most this many times."""

    def __init__(self, directory: str, primaries: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        self.count = primaries * (1 + replicas)
        self.replicas = replicas
        self.servers = self._nodes()

    def _nodes(self) -> list[ServerProcess]:
        """New nodes on ports whose pairs (port, bus port) are free and apart from each other."""
        directory = self.directory
        taken: set[int] = set()
        servers = []
        while len(servers) < self.count:
            port = free_cluster_port()
            if {port, port + 10000} & taken:
                continue
            taken |= {port, port + 10000}
            servers.append(
                ServerProcess(
                    lambda port: redis_argv(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--repl-diskless-sync-delay",  # replicas in sync at once: can fail over
                        "0",
                        "--dir",
                        directory,
                    )(port),
                    port,
                )
            )
        return servers

    def start(self) -> RedisCluster:
        failures = []
        for _ in range(self.CREATE_ATTEMPTS):
            for server in self.servers:
                server.start()
            addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
            created = subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if created.returncode == 0:
                self.wait_ok()
                return self
            said = (created.stdout + created.stderr)[-800:]
            failures.append(f"exit {created.returncode}: {said}")
            self.stop()
            self.servers = self._nodes()
        raise AssertionError(f"redis-cli --cluster create failed: {failures}")

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(
            [REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=30
        )
        return done.stdout

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and agrees on the slots' owners, and
        every replica is in sync with its primary."""
        wait_until(self.is_ok, timeout, "the Redis Cluster settled")

    def is_ok(self) -> bool:
        live = [s for s in self.servers if s.proc is not None]
        states = [self.cli(s.port, "cluster", "info") for s in live]
        slots = {self.cli(s.port, "cluster", "slots") for s in live}
        replication = [self.cli(s.port, "info", "replication") for s in live]
        synced = all(
            "role:master" in info or "master_link_status:up" in info for info in replication
        )
        return all("cluster_state:ok" in state for state in states) and len(slots) == 1 and synced

    def epoch(self) -> int:
        """The cluster's current epoch, as a live node sees it: it grows with every failover
        and every slot handed to another primary."""
        info = self.cli(self.live().port, "cluster", "info")
        return int(re.search(r"cluster_current_epoch:(\d+)", info)[1])  # type: ignore[index]

    def primaries(self) -> list[ServerProcess]:
        """The live primaries that own slots, by CLUSTER NODES."""
        nodes = self.cli(self.live().port, "cluster", "nodes").splitlines()
        ports = set()
        for line in nodes:
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                ports.add(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return [s for s in self.servers if s.port in ports]

    def node_id(self, server: ServerProcess) -> str:
        return self.cli(server.port, "cluster", "myid").strip()

    def live(self) -> ServerProcess:
        return next(s for s in self.servers if s.proc is not None)

    def url(self) -> str:
        return self.servers[0].url()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class ThrowawayCA:
    """A certificate authority made for one test (openssl, EC keys, valid one day): it
    issues server certificates for a host name or IP and client certificates."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = directory
        self.name = name
        self.cert = directory / f"{name}.pem"
        self.key = directory / f"{name}.key"
        self._openssl(
            "req", "-x509", *self._new_key(self.key), "-days", "1", "-out", str(self.cert),
            "-subj", f"/CN=memshadow test {name}",
        )  # fmt: skip

    def issue(self, name: str, subject_alt_name: str = "") -> tuple[Path, Path]:
        """(certificate, key) for `name`, e.g. issue("server", "IP:127.0.0.1")."""
        cert = self.directory / f"{self.name}-{name}.pem"
        key = self.directory / f"{self.name}-{name}.key"
        request = self.directory / f"{self.name}-{name}.csr"
        self._openssl(
            "req", "-new", *self._new_key(key), "-out", str(request), "-subj", f"/CN={name}"
        )
        extensions = self.directory / f"{self.name}-{name}.ext"
        extensions.write_text(f"subjectAltName={subject_alt_name}\n" if subject_alt_name else "")
        self._openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", str(random.getrandbits(62)), "-days", "1", "-out", str(cert),
            "-extfile", str(extensions),
        )  # fmt: skip
        return cert, key

    @staticmethod
    def _new_key(path: Path) -> list[str]:
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(path)]  # fmt: skip

    @staticmethod
    def _openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)


def tls_redis_argv(
    cert: Path, key: Path, ca: Path, *extra: str, client_certs: bool = False
) -> Callable[[int], list[str]]:
    """A redis-server that speaks TLS only, on the port it is given; client_certs: it
    refuses clients without a certificate its CA issued (tls-auth-clients yes)."""
    plain = redis_argv(*extra)
    return lambda port: [
        *plain(port),
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "yes" if client_certs else "no",
    ]  # fmt: skip


def _by_second(counts: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """Counts keyed (command, x) summed over the commands."""
    summed: Counter[str] = Counter()
    for (_, second), n in counts.items():
        summed[second] += n
    return dict(summed)


def totals(proxy: ProxyThread) -> dict[str, int]:
    """The shadow's comparisons by outcome (match, noise, mismatch)."""
    return _by_second(proxy.shadow.stats.comparisons)


def mismatch_kinds(proxy: ProxyThread) -> dict[str, int]:
    return _by_second(proxy.shadow.stats.mismatches)


def noise_reasons(proxy: ProxyThread) -> dict[str, int]:
    return _by_second(proxy.shadow.stats.noise)


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll `condition` until it holds. The one way a test waits for an outcome: `timeout`
    bounds a hang (it fails the test then, naming `what`), it never measures anything; a
    test asserts what happened, never how fast."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or condition}")
        time.sleep(0.02)


async def wait_until_async(
    condition: Callable[[], object], timeout: float = 30.0, what: str = ""
) -> None:
    """wait_until for a test running on an event loop: the loop runs while it polls, and
    `condition` may be a coroutine function (awaited each time)."""
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or condition}")
        await asyncio.sleep(0.01)


def shadow_drops(proxy: ProxyThread) -> int:
    """Shadow work dropped so far, every reason together."""
    return int(proxy.call(lambda: sum(proxy.shadow.stats.dropped.values())))


def find_divergence(
    proxy: ProxyThread,
    name: str,
    kind: str,
    establish: Callable[[str], object],
    inject: Callable[[str], object],
    trigger: Callable[[str], object],
    prepare: Callable[[], object] = lambda: None,
    keys: Callable[[int], str] | None = None,
    attempts: int = 5,
) -> str:
    """A real divergence of `kind`, found: on a fresh key, `establish(key)` (a write and a
    read through the proxy: the key in step), `inject(key)` (a store changed behind the
    proxy's back), `trigger(key)` (a request through the proxy that meets the difference).
    Returns the key: keys(attempt), by default NAME:ATTEMPT.

    The key's own operations run while nothing else goes through the shadow (`prepare()`,
    a load for instance, runs before, and is judged first), so a drop counted meanwhile is
    theirs: on a loaded host one may be dropped, which turns the key cold (correctly: the
    trigger is then noise), and the divergence is made again on a fresh key. A divergence
    not found while none of its key's operations was dropped fails the test."""

    def found() -> int:
        return int(proxy.call(lambda: mismatch_kinds(proxy).get(kind, 0)))

    for attempt in range(attempts):
        prepare()
        proxy.settle(120)
        key = keys(attempt) if keys is not None else f"{name}:{attempt}"
        dropped = shadow_drops(proxy)
        establish(key)
        proxy.settle(120)
        if shadow_drops(proxy) > dropped:
            continue  # (cold: a fresh key)
        inject(key)
        before = found()
        trigger(key)
        proxy.settle(120)
        if found() > before:
            return key
        assert shadow_drops(proxy) > dropped, f"{name}: not found, none of its operations dropped"
    raise AssertionError(f"{name}: an operation of its key dropped {attempts} times in a row")
