"""How saturated the shadow worker is, from /proc: the CPU it used and the time it waited,
runnable, for a CPU (the scheduler's run-queue wait in /proc/PID/schedstat). A worker that
waits for a core reads Redis's replies late, so the service time it measures includes that
wait: the what-if report says so in words (report.trust).

Parsing is pure (literal /proc texts in the tests); WorkerLoad samples on a timer.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class ProcessTimes:
    """One process's cumulative times, in seconds."""

    cpu: float  # on a CPU (user + system)
    waited: float | None  # runnable, waiting for a CPU; None when schedstat is not readable


def parse_stat(text: str, ticks: int = CLOCK_TICKS) -> float:
    """utime + stime of /proc/PID/stat, in seconds. The command name (field 2) is in
    parentheses and may hold spaces and parentheses itself: fields are counted after the
    last ')'."""
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / ticks


def parse_schedstat(text: str) -> tuple[float, float]:
    """(time on a CPU, time waiting on a run queue) of /proc/PID/schedstat, in seconds."""
    run, wait, *_ = text.split()
    return int(run) / 1e9, int(wait) / 1e9


def read_times(pid: int, read: Callable[[str], str]) -> ProcessTimes | None:
    """A process's times, or None when it is gone (or /proc is not there)."""
    try:
        cpu = parse_stat(read(f"/proc/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return None
    try:
        on_cpu, waited = parse_schedstat(read(f"/proc/{pid}/schedstat"))
    except (OSError, ValueError):
        return ProcessTimes(cpu, None)
    return ProcessTimes(on_cpu or cpu, waited)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    times: dict[int, ProcessTimes]


class WorkerLoad:
    """The shadow worker processes' CPU use and CPU wait over the last ``window`` seconds.
    ``pids`` gives the workers' process ids as they are now (the proxy's own in inline
    mode); a worker restarted in between is left out of that window."""

    def __init__(
        self,
        pids: Callable[[], list[int]],
        *,
        read: Callable[[str], str] = _read,
        clock: Callable[[], float] = time.monotonic,
        window: float = WINDOW,
    ) -> None:
        self.pids = pids
        self.read = read
        self.clock = clock
        self.window = window
        self._samples: deque[_Sample] = deque()

    def sample(self) -> None:
        now = self.clock()
        times = {}
        for pid in self.pids():
            found = read_times(pid, self.read)
            if found is not None:
                times[pid] = found
        self._samples.append(_Sample(now, times))
        while len(self._samples) > 2 and self._samples[1].at <= now - self.window:
            self._samples.popleft()

    def figures(self) -> dict[str, Any] | None:
        """{"seconds", "cpu_share" (of one core, the busiest worker), "wait_share" (of the
        wall time spent waiting for a CPU, the busiest worker's; None when unreadable),
        "workers"}, or None before two samples."""
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0], self._samples[-1]
        seconds = last.at - first.at
        if seconds <= 0:
            return None
        cpu_share = 0.0
        wait_share: float | None = None
        workers = 0
        for pid, now in last.times.items():
            then = first.times.get(pid)
            if then is None:
                continue
            workers += 1
            cpu_share = max(cpu_share, (now.cpu - then.cpu) / seconds)
            if now.waited is not None and then.waited is not None:
                wait = (now.waited - then.waited) / seconds
                wait_share = wait if wait_share is None else max(wait_share, wait)
        if not workers:
            return None
        return {
            "seconds": seconds,
            "cpu_share": cpu_share,
            "wait_share": wait_share,
            "workers": workers,
        }
