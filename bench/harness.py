"""The bench's process harness: free loopback ports, children in process groups of their own
(killed on close), readiness by asking the port, and the CPU a process tree burned (/proc).
bench/run.py and the other bench scripts share it; bench/ imports nothing from tests/."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
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
