"""The shadow worker's CPU and CPU wait from /proc, parsed from literal texts, sampled from a
fake /proc, and read from this very process."""

from __future__ import annotations

import os

import pytest

from proxy.ops.saturation import WorkerLoad, parse_schedstat, parse_stat, read_times

# A command name with a space and a parenthesis: fields are counted after the last ')'.
STAT = (
    "4242 (python -m (w)) S 1 4242 4242 0 -1 4194560 9000 0 0 0 "
    "350 150 0 0 30 10 1 0 123456 200000000 9000 18446744073709551615 1 1 0 0 0 0 0 "
    "16781312 2 0 0 0 17 1 0 0 0 0 0"
)


def test_parse_stat_counts_fields_after_the_command_name() -> None:
    assert parse_stat(STAT, ticks=100) == pytest.approx(5.0)  # (350 + 150) / 100


def test_parse_schedstat() -> None:
    assert parse_schedstat("5000000000 2000000000 1234\n") == (5.0, 2.0)


class FakeProc:
    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.now = 100.0

    def read(self, path: str) -> str:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None

    def set(self, pid: int, run: float, wait: float) -> None:
        self.files[f"/proc/{pid}/stat"] = STAT
        self.files[f"/proc/{pid}/schedstat"] = f"{int(run * 1e9)} {int(wait * 1e9)} 10\n"


def test_the_busiest_worker_over_the_window() -> None:
    proc = FakeProc()
    pids = [7, 8]
    load = WorkerLoad(lambda: pids, read=proc.read, clock=lambda: proc.now, window=60.0)
    proc.set(7, 10.0, 1.0)
    proc.set(8, 20.0, 2.0)
    load.sample()
    assert load.figures() is None  # one sample: no interval yet
    proc.now += 10
    proc.set(7, 15.0, 1.5)  # half a core, waited 5% of the time
    proc.set(8, 29.0, 5.8)  # 90% of a core, waited 38%
    load.sample()
    figures = load.figures()
    assert figures is not None
    assert figures["cpu_share"] == pytest.approx(0.9)
    assert figures["wait_share"] == pytest.approx(0.38)
    assert figures["workers"] == 2
    # A worker restarted (a new pid) is left out until it has two samples.
    pids[:] = [9]
    proc.set(9, 0.1, 0.0)
    proc.now += 10
    load.sample()
    assert load.figures() is None


def test_without_schedstat_the_cpu_still_counts() -> None:
    proc = FakeProc()
    proc.files["/proc/5/stat"] = STAT
    times = read_times(5, proc.read)
    assert times is not None and times.waited is None and times.cpu == pytest.approx(
        500 / os.sysconf("SC_CLK_TCK")
    )
    assert read_times(6, proc.read) is None  # gone


def test_this_process_can_be_read() -> None:
    load = WorkerLoad(lambda: [os.getpid()])
    load.sample()
    sum(i * i for i in range(200_000))  # some CPU
    load.sample()
    figures = load.figures()
    if figures is None:  # both samples in the same clock reading: nothing to say
        return
    assert figures["cpu_share"] >= 0 and figures["workers"] == 1
