"""The bench's process harness: free loopback ports, children in process groups of their own
(killed on close), readiness by asking the port, and the CPU a process tree burned (/proc);
the servers (memcached, redis-server, a Redis Cluster), memshadow started from its start
line, and its /metrics read. bench/run.py and the other bench scripts share it; bench/
imports nothing from tests/ for it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # every process and every request stays on loopback
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def parse_cpus(spec: str | None) -> set[int] | None:
    """'1' / '0,1' / '0-3' -> set of CPU ids; None/'' -> no pinning."""
    if not spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def affinity_preexec(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


class Processes:
    """Starts every child in its own process group and kills all groups on close()."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: Sequence[str], *, cpus: set[int] | None = None, **kw: Any
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logdir / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=affinity_preexec(cpus),
                **kw,
            )
        self.procs.append(proc)
        return proc, log

    @staticmethod
    def kill_group(proc: subprocess.Popen[Any], timeout: float = 3.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group may outlive its leader (children of the leader): sweep it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.kill_group(proc)
        self.procs.clear()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU time of the process, the same summed over its live descendants), from /proc: the
    CPU a target itself burns, whatever else runs on the machine. Nanoseconds on the CPU per
    thread (/proc/PID/task/TID/schedstat) where the kernel keeps them: a tick (utime + stime,
    10 ms) is too coarse for a few seconds of a light target; ticks otherwise."""
    try:
        own = on_cpu_seconds(pid)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0, 0.0
    below = 0.0
    for child in children:
        child_own, child_below = cpu_seconds(int(child))
        below += child_own + child_below
    return own, below


def on_cpu_seconds(pid: int) -> float:
    """The process's CPU time: its live threads' schedstat, or utime + stime in ticks."""
    try:
        return sum(
            int((task / "schedstat").read_text().split()[0])
            for task in Path(f"/proc/{pid}/task").iterdir()
        ) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def wait_ready(
    proc: subprocess.Popen[bytes], port: int, request: bytes, expect: bytes, timeout: float
) -> str | None:
    """Poll until the port answers `request` with a reply starting with `expect`.

    Returns None when ready, else a human-readable reason.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as s:
                s.sendall(request)
                reply = s.recv(256)
            if reply.startswith(expect):
                return None
            last = f"unexpected reply {reply[:60]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    return f"not ready after {timeout:.0f}s ({last})"


# -- the servers, memshadow, and what its /metrics say ------------------------------------


def memcached_argv(port: int, *extra: str, threads: int = 1) -> list[str]:
    """memcached on HOST:port, no UDP (as root: running as nobody, as memcached insists)."""
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    return [binary, *user, "-p", str(port), "-l", HOST, "-U", "0", "-t", str(threads), *extra]


def redis_argv(port: int, directory: Path, *extra: str) -> list[str]:
    """redis-server on HOST:port without persistence, its files in `directory`."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    return [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(directory), *extra]  # fmt: skip


class Server:
    """A server on a fixed port, started by `procs` (its log in their directory), ready once
    it answers `request` with `expect`; stopped and started again at will (faults)."""

    def __init__(
        self, procs: Processes, name: str, argv: Sequence[str], port: int,
        request: bytes, expect: bytes,
    ) -> None:  # fmt: skip
        self.procs, self.name, self.argv, self.port = procs, name, list(argv), port
        self._probe = (request, expect)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Server:
        self.proc, log = self.procs.start(self.name, self.argv)
        if why := wait_ready(self.proc, self.port, *self._probe, timeout):
            raise RuntimeError(f"{self.name}: {why}; {log_tail(log)}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            Processes.kill_group(self.proc)
            self.procs.procs.remove(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_memcached(procs: Processes, *extra: str, threads: int = 1) -> Server:
    port = free_port()
    argv = memcached_argv(port, *extra, threads=threads)
    return Server(procs, "memcached", argv, port, b"version\r\n", b"VERSION ").start()


def start_redis(
    procs: Processes, *extra: str, name: str = "redis", port: int | None = None
) -> Server:
    port = port or free_port()
    argv = redis_argv(port, procs.logdir, *extra)
    return Server(procs, name, argv, port, b"PING\r\n", b"+PONG").start()


def start_redis_cluster(procs: Processes, primaries: int = 3) -> list[Server]:
    """A Redis Cluster of `primaries` primaries, no replicas (redis-cli --cluster create),
    serving every slot."""
    nodes = []
    for i in range(primaries):
        directory = procs.logdir / f"cluster-{i}"
        directory.mkdir()
        nodes.append(start_redis(procs, "--cluster-enabled", "yes", "--dir", str(directory),
                                 name=f"redis-cluster-{i}", port=_cluster_port()))  # fmt: skip
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    addresses = [f"{HOST}:{node.port}" for node in nodes]
    subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-yes"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all("cluster_state:ok" in _cli(cli, node.port, "cluster", "info") for node in nodes):
            return nodes
        time.sleep(0.1)
    raise RuntimeError("the Redis Cluster did not come up")


def _cluster_port() -> int:
    """A free port a cluster node can take: at most 55535, its bus port (10000 above) free."""
    while True:
        port = free_port()
        if port <= 55535:
            with contextlib.suppress(OSError), socket.socket() as bus:
                bus.bind((HOST, port + 10000))
                return port


def _cli(cli: str, port: int, *args: str) -> str:
    return subprocess.run(
        [cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10
    ).stdout


STARTED = re.compile(r"listening on (\S+), memcached (\S+), admin http://(\S+), ")
"""memshadow's start line: its listen address, Memcached's and the admin endpoint's."""


def start_memshadow(
    procs: Processes, *args: str, name: str = "memshadow", timeout: float = 30.0, **popen: Any
) -> tuple[subprocess.Popen[bytes], int, int]:
    """memshadow (`python -m proxy ARGS`, from this checkout unless `cwd` says otherwise),
    once its start line is logged: (process, listen port, admin port)."""
    popen.setdefault("cwd", REPO_ROOT)
    proc, log = procs.start(name, [sys.executable, "-m", "proxy", *args], **popen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := STARTED.search(log.read_text(errors="replace")):
            return proc, _port(match[1]), _port(match[3].rstrip("/"))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start: {log_tail(log)}")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


REPO_ROOT = Path(__file__).resolve().parent.parent

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
Samples = list[tuple[str, str, float]]


def scrape(port: int) -> Samples:
    """memshadow's /metrics as (name, labels, value) samples."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples.append((match[1], match[2] or "", float(match[3])))
    return samples


def metric_total(samples: Samples, name: str, label: str = "") -> float:
    return sum(v for n, labels, v in samples if n == name and label in labels)


def histogram_buckets(samples: Samples, name: str) -> dict[float, float]:
    """le bound -> cumulative count."""
    out: dict[float, float] = {}
    for n, labels, v in samples:
        if n == f"{name}_bucket":
            bound = re.search(r'le="([^"]+)"', labels)
            if bound:
                out[float(bound[1])] = out.get(float(bound[1]), 0.0) + v
    return out


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile (None when empty)."""
    ordered = sorted(buckets.items())
    count = ordered[-1][1] if ordered else 0
    for bound, cumulative in ordered:
        if count and cumulative >= q * count:
            return bound
    return None
