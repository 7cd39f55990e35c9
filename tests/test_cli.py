"""The memshadow command: --version, --check-config, exit code 2 on bad config or flags, and
a real run that starts, serves, and stops gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client

from proxy import __version__, buildinfo
from proxy.cli import main
from proxy.runtime import JsonLogFormatter
from tests.support import ServerProcess, memcached_argv, memcached_stats, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "config/memshadow.yaml"  # an example configuration of one's own
DEFAULTS = "proxy/memshadow.yaml"  # the commented defaults, shipped in the package
STARTED = re.compile(r"listening on (\S+), memcached (\S+), admin http://(\S+), ")


def env(**extra: str) -> dict[str, str]:
    result = dict(os.environ)
    result["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), result.get("PYTHONPATH")]))
    result.update(extra)
    return result


def memshadow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class Running:
    """A memshadow process whose stderr is collected line by line."""

    def __init__(self, argv: list[str], new_session: bool = False, **extra_env: str) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env(**extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stdout: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump_stderr, daemon=True),
            threading.Thread(target=self._pump_stdout, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        self._stdout.append(self.proc.stdout.read())

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern.pattern}: {self.lines}") from None
            if line is None:
                raise AssertionError(f"exited without {pattern.pattern}: {self.lines}")
            self.lines.append(line)
            if match := pattern.search(line):
                return match

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Wait for the exit; (exit code, all of stdout). Collects the rest of stderr."""
        code = self.proc.wait(timeout=timeout)
        for pump in self._pumps:
            pump.join(timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return code, "".join(self._stdout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- --version and --check-config ------------------------------------------------------------


def test_version() -> None:
    result = memshadow("--version")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"memshadow 0.1.0, {buildinfo.describe()}\n"
    assert __version__ == "0.1.0"


def test_print_config_writes_the_commented_defaults(tmp_path: Path) -> None:
    result = memshadow("--print-config")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == (ROOT / DEFAULTS).read_text(encoding="utf-8")
    assert result.stdout.startswith("# memshadow configuration: every option")
    copy = tmp_path / "memshadow.yaml"
    copy.write_text(result.stdout, encoding="utf-8")
    assert memshadow("--config", str(copy), "--check-config").returncode == 0


def test_a_config_of_one_s_own(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    result = memshadow("--init-config", str(mine))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {mine}: edit it, then run memshadow --config {mine}\n"
    text = mine.read_text(encoding="utf-8")
    assert text.startswith("# memshadow configuration of your own, written by")
    assert memshadow("--config", str(mine), "--check-config").returncode == 0
    # Never overwritten.
    again = memshadow("--init-config", str(mine))
    assert again.returncode == 2 and "exists already: not overwritten" in again.stderr
    assert mine.read_text(encoding="utf-8") == text
    # Edited, it is shown as the user's; the shipped defaults do not move.
    mine.write_text(text.replace("    steps: []", "    steps: [0.02, 1.0]"), encoding="utf-8")
    shown = memshadow("--config", str(mine), "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert f"# From: {mine}" in shown.stdout
    assert "    steps: [0.02, 1.0]  # default: []" in shown.stdout
    assert memshadow("--print-config").stdout == (ROOT / DEFAULTS).read_text(encoding="utf-8")
    flags = memshadow("--sample-rate", "0", "--print-config").stdout
    assert "# From: defaults" in flags


def test_check_config_defaults() -> None:
    result = memshadow("--check-config")
    assert (result.returncode, result.stdout, result.stderr) == (0, "config OK: defaults\n", "")


def test_check_config_example_file() -> None:
    result = memshadow("--config", EXAMPLE, "--check-config")
    assert (result.returncode, result.stdout) == (0, f"config OK: {EXAMPLE}\n")


def test_check_config_with_flags() -> None:
    result = memshadow(
        "--config",
        EXAMPLE,
        "--listen",
        "[::1]:0",
        "--memcached",
        "localhost:11211",
        "--redis",
        "redis://127.0.0.1:6379/0",
        "--sample-rate",
        "0.5",
        "--admin",
        "127.0.0.1:0",
        "--check-config",
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"config OK: {EXAMPLE}\n", "")


def test_bad_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: 127.0.0.1:1\nshadow:\n  sample_rate: abc\n")
    result = memshadow("--config", str(path), "--check-config")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"{path}:3: shadow.sample_rate: must be a number between 0 and 1, got 'abc'\n"
    )


def test_bad_config_stops_a_normal_start_too(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listn: 127.0.0.1:1\n")
    result = memshadow("--config", str(path))
    assert result.returncode == 2
    assert result.stderr == f"{path}:1: listn: unknown option 'listn' (did you mean 'listen'?)\n"


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: nowhere\nlog:\n  level: loud\n", encoding="utf-8")
    result = memshadow("--config", str(path), "--check-config")
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{path}:1", "listen"],
        [f"{path}:3", "log.level"],
    ]


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = memshadow("--config", str(path), "--check-config")
    assert result.returncode == 2
    assert result.stderr == f"{path}: cannot read config file: No such file or directory\n"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("log:\n  level: [info\n")
    result = memshadow("--config", str(path), "--check-config")
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:3: invalid YAML: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--sample-rate", "abc"],
            "command line: --sample-rate: must be a number between 0 and 1, got 'abc'",
        ),
        (
            ["--listen", ":11311"],
            "command line: --listen: missing host in ':11311'; expected HOST:PORT, "
            "e.g. 127.0.0.1:11211",
        ),
        (
            ["--memcached", "localhost"],
            "command line: --memcached: expected HOST:PORT, got 'localhost'",
        ),
        (
            ["--redis", "http://localhost"],
            "command line: --redis: scheme must be redis:// or rediss://, got 'http://'",
        ),
        (
            ["--admin", "127.0.0.1:99999"],
            "command line: --admin: port must be a number between 0 and 65535, got '99999'",
        ),
    ],
)
def test_bad_flag_values_exit_2(flags: list[str], message: str) -> None:
    result = memshadow(*flags, "--check-config")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")


def test_a_sample_rate_with_no_redis_is_refused(tmp_path: Path) -> None:
    result = memshadow("--config", DEFAULTS, "--sample-rate", "0.5", "--check-config")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"{DEFAULTS}: shadow.sample_rate: is 0.5, but no Redis is set (shadow.redis, or "
        "--redis), so nothing would be shadowed: set one, or set the rate to 0\n"
    )
    # The rate may come from the file and the Redis from a flag, or the other way round.
    config = tmp_path / "rate.yaml"
    config.write_text("shadow:\n  sample_rate: 0.5\n")
    result = memshadow("--config", str(config), "--redis", "redis://r:6379/0", "--check-config")
    assert result.returncode == 0, result.stderr
    assert memshadow("--config", str(config), "--check-config").returncode == 2


def test_flags_are_checked_even_when_the_file_is_fine() -> None:
    result = memshadow("--config", EXAMPLE, "--sample-rate", "2")
    assert result.returncode == 2
    assert (
        result.stderr == "command line: --sample-rate: must be a number between 0 and 1, got '2'\n"
    )


def test_unknown_flag_is_a_usage_error() -> None:
    result = memshadow("--frobnicate")
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr


def test_main_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"memshadow 0.1.0, {buildinfo.describe()}\n"
    assert main(["--check-config"]) == 0
    assert capsys.readouterr().out == "config OK: defaults\n"
    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    assert main(["--nope"]) == 2


def test_json_log_formatter() -> None:
    import logging

    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord(
            "memshadow.x", logging.WARNING, __file__, 1, "hello %s", ("you",), sys.exc_info()
        )
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["level"] == "warning"
    assert entry["logger"] == "memshadow.x"
    assert entry["msg"] == "hello you"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    assert "ValueError: bad" in entry["exc"]


# --- running, with a stand-in for the data path ------------------------------------------------

# Replaces proxy.server so the wiring in cli.serve() can be checked on its own: prints each
# stop(timeout) call; with HANG set, a graceful stop never finishes.
FAKE_SERVER = """
import asyncio, os, sys, types

class ProxyServer:
    def __init__(self, config, metrics, health, index=0):
        self.config = config
        self.listener = config.backends[index]
        print(f"health={type(health).__name__}", flush=True)

    async def start(self, sock=None):
        listen = self.listener.listen
        self._server = await asyncio.start_server(
            lambda r, w: w.close(), listen.host, listen.port
        )

    @property
    def listen_address(self):
        return self._server.sockets[0].getsockname()[:2]

    async def stop(self, timeout):
        print(f"stop({timeout})", flush=True)
        if os.environ.get("HANG") and timeout:
            await asyncio.Event().wait()
        self._server.close()

module = types.ModuleType("proxy.server")
module.ProxyServer = ProxyServer
sys.modules["proxy.server"] = module
from proxy.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def run_fake(*args: str, **extra_env: str) -> Running:
    return Running([sys.executable, "-c", FAKE_SERVER, *args], **extra_env)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_the_configured_timeout(
    tmp_path: Path, signum: signal.Signals
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_timeout: 7.5\n")
    proc = run_fake("--config", str(config), "--memcached", "127.0.0.1:1")
    try:
        match = proc.wait_for(STARTED)
        assert match[2] == "127.0.0.1:1"
        assert port_of(match[1]) > 0 and port_of(match[3]) > 0
        started = proc.lines[-1]
        assert f"memshadow {__version__} listening on 127.0.0.1:" in started
        assert f"shadow off (config: {config})" in started
        proc.proc.send_signal(signum)
        code, stdout = proc.finish()
    finally:
        proc.kill()
    assert code == 0
    assert stdout.splitlines() == ["health=UpstreamHealth", "stop(7.5)"]
    assert any(f"{signum.name}: no longer accepting" in line for line in proc.lines)
    assert any("stopped after" in line for line in proc.lines)


def test_second_signal_forces_the_stop() -> None:
    proc = run_fake(
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--memcached", "127.0.0.1:1", HANG="1"
    )
    try:
        proc.wait_for(STARTED)
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_for(re.compile("SIGTERM: no longer accepting"))
        proc.proc.send_signal(signal.SIGTERM)
        code, stdout = proc.finish()
    finally:
        proc.kill()
    assert code == 1
    assert stdout.splitlines() == ["health=UpstreamHealth", "stop(10.0)", "stop(0.0)"]
    assert any("SIGTERM again: closing all connections now" in line for line in proc.lines)


def test_json_logs(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nlog:\n  format: json\n")
    proc = run_fake("--config", str(config), "--memcached", "127.0.0.1:1")
    try:
        proc.wait_for(STARTED)
        proc.proc.send_signal(signal.SIGTERM)
        code, _ = proc.finish()
    finally:
        proc.kill()
    assert code == 0
    entries = [json.loads(line) for line in proc.lines]
    assert {"ts", "level", "logger", "msg"} <= set(entries[0])
    assert any(e["logger"] == "memshadow" and "listening on" in e["msg"] for e in entries)
    # memcached at 127.0.0.1:1 is down: the health probe says so
    assert any(e["logger"] == "memshadow.health" and e["level"] == "warning" for e in entries)


def test_port_in_use_is_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_fake("--listen", f"127.0.0.1:{port}", "--memcached", "127.0.0.1:1")
        try:
            code, _ = proc.finish()
        finally:
            proc.kill()
    assert code == 1
    assert any(f"cannot listen for clients on 127.0.0.1:{port}" in line for line in proc.lines)


# --- running for real, in front of a real memcached -------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_serves_clients_and_stops_on_sigterm(memcached: ServerProcess, loop: str) -> None:
    proc = Running(
        [
            sys.executable,
            "-m",
            "proxy",
            "--config",
            DEFAULTS,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--memcached",
            str(memcached.address),
        ],
        MEMSHADOW_LOOP=loop,
    )
    try:
        match = proc.wait_for(STARTED)
        listen, admin = port_of(match[1]), port_of(match[3])
        client = Client(("127.0.0.1", listen), connect_timeout=5, timeout=5)
        assert client.set("greeting", b"hello", noreply=False)
        assert client.get("greeting") == b"hello"
        client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=10) as reply:
            assert (reply.status, reply.read()) == (200, b"ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        label = f'listener="{memcached.address}"'
        assert f'memshadow_requests_total{{command="get",{label}}} 1.0' in text
        assert f'memshadow_requests_total{{command="set",{label}}} 1.0' in text
        proc.proc.send_signal(signal.SIGTERM)
        code, _ = proc.finish()
    finally:
        proc.kill()
    assert code == 0, proc.lines


def test_the_health_probe_leaves_no_connection_events_in_memcached(
    memcached: ServerProcess,
) -> None:
    """memcached's own suite runs through memshadow: its t/watcher.t and t/stats.t must not
    see a connection opened and closed every second by the readiness probe."""
    proc = Running(
        [sys.executable, "-m", "proxy", "--config", DEFAULTS, "--listen", "127.0.0.1:0",
         "--admin", "127.0.0.1:0", "--memcached", str(memcached.address)]
    )  # fmt: skip
    try:
        match = proc.wait_for(STARTED)
        stats = Client(("127.0.0.1", port_of(match[1])), connect_timeout=5, timeout=5)
        before = int(stats.stats()[b"total_connections"])  # (its own connection is counted)
        watcher = socket.create_connection(("127.0.0.1", port_of(match[1])), timeout=5)
        watcher.sendall(b"watch connevents\r\n")
        assert watcher.recv(100) == b"OK\r\n"
        before += 1  # the watcher's
        watcher.settimeout(2.5)  # over two probe intervals, with no client traffic
        events = b""
        with contextlib.suppress(TimeoutError):
            events = watcher.recv(4096)
        after = int(stats.stats()[b"total_connections"])
        watcher.close()
        stats.close()
        assert b"conn_new" not in events
        assert after == before
    finally:
        proc.kill()


def test_an_idle_memshadow_leaves_no_byte_in_memcacheds_stats() -> None:
    """memcached's t/stats.t ("initial bytes_written is zero") through memshadow: a fresh
    memcached behind a fresh, idle memshadow counts what one alone counts, but for the one
    connection memshadow keeps open (curr_connections and total_connections, +1 each)."""
    alone = ServerProcess(memcached_argv()).start()
    behind = ServerProcess(memcached_argv()).start()
    proc = Running(
        [sys.executable, "-m", "proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--memcached", str(behind.address)]
    )  # fmt: skip
    try:
        proc.wait_for(STARTED)
        time.sleep(2.5)  # idle: the version probe had written 16 bytes at once, 64 in 3 s
        expected = memcached_stats(alone.port)
        seen = memcached_stats(behind.port)
        assert (seen["bytes_read"], seen["bytes_written"]) == ("7", "0")  # "stats" alone
        for counter in ("bytes_read", "bytes_written", "cmd_get", "cmd_set", "cmd_touch"):
            assert seen[counter] == expected[counter], counter
        for counter in ("curr_connections", "total_connections"):
            assert int(seen[counter]) == int(expected[counter]) + 1, counter
    finally:
        proc.kill()
        alone.stop()
        behind.stop()


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.extend(int(c) for c in (task / "children").read_text().split())
    return children


def _shadowing(memcached: ServerProcess, redis_server: ServerProcess) -> Running:
    return Running(
        [
            sys.executable,
            "-m",
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--memcached",
            str(memcached.address),
            "--redis",
            f"redis://127.0.0.1:{redis_server.port}/0",
            "--sample-rate",
            "1",
        ],
        new_session=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_group_signal_stops_the_proxy_and_its_shadow_worker_cleanly(
    memcached: ServerProcess, redis_server: ServerProcess, signum: signal.Signals
) -> None:
    # Ctrl-C, and systemd's stop, signal the whole process group: the worker must not die
    # first (the proxy would report it and restart it) but be stopped by the proxy.
    proc = _shadowing(memcached, redis_server)
    try:
        match = proc.wait_for(STARTED)
        (worker,) = _children(proc.proc.pid)
        client = Client(("127.0.0.1", port_of(match[1])), connect_timeout=5, timeout=5)
        assert client.set("k", b"v", noreply=False)
        assert client.get("k") == b"v"
        client.close()
        os.killpg(proc.proc.pid, signum)
        code, _ = proc.finish()
    finally:
        proc.kill()
    assert code == 0, proc.lines
    assert not any("worker exited" in line for line in proc.lines), proc.lines
    assert not Path(f"/proc/{worker}").exists()


def test_a_killed_proxy_takes_its_shadow_worker_with_it(
    memcached: ServerProcess, redis_server: ServerProcess
) -> None:
    proc = _shadowing(memcached, redis_server)
    try:
        proc.wait_for(STARTED)
        (worker,) = _children(proc.proc.pid)
        proc.proc.kill()  # SIGKILL: no clean-up at all; the worker sees its socket close
        proc.proc.wait()
        status = Path(f"/proc/{worker}/stat")

        def gone() -> bool:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker, os.WNOHANG)  # not our child: init reaps it
            try:
                return status.read_text().split(") ", 1)[1][0] == "Z"
            except OSError:
                return True

        wait_until(gone, what=f"worker {worker} gone")
    finally:
        proc.kill()


def test_listeners_each_front_their_memcached_and_readyz_tells_them_apart(
    tmp_path: Path, memcached: ServerProcess
) -> None:
    dead = ServerProcess(lambda port: ["true"])  # a Memcached address nothing listens on
    config = tmp_path / "memshadow.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{listen: 127.0.0.1:0, memcached: {memcached.address}, name: live}}\n"
        f"  - {{listen: 127.0.0.1:0, memcached: 127.0.0.1:{dead.port}, name: gone}}\n"
        "admin: 127.0.0.1:0\n",
        encoding="utf-8",
    )
    proc = Running([sys.executable, "-m", "proxy", "--config", str(config)])
    try:
        started = proc.wait_for(
            re.compile(
                r"listening on (\S+), memcached (\S+); (\S+), memcached (\S+), admin http://(\S+), "
            )
        )
        live, admin = port_of(started[1]), port_of(started[5])
        assert started[2] == str(memcached.address) and started[4] == f"127.0.0.1:{dead.port}"
        client = Client(("127.0.0.1", live), connect_timeout=5, timeout=5)
        assert client.set("k", b"v", noreply=False) and client.get("k") == b"v"
        client.close()
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin}/readyz", headers={"Accept": "application/json"}
        )
        answers: list[dict[str, Any]] = []

        def probed() -> bool:
            try:
                urllib.request.urlopen(request, timeout=10)
            except urllib.error.HTTPError as exc:  # 503: one Memcached is not reachable
                answers.append(json.loads(exc.read()))
                return not answers[-1]["listeners"][1]["reason"].startswith("not probed")
            return False

        wait_until(probed, what="the dead backend probed")
        body = answers[-1]
        assert body["ready"] is False
        states = {entry["name"]: entry["ready"] for entry in body["listeners"]}
        assert states == {"live": True, "gone": False}
        assert body["listeners"][1]["memcached"] == f"127.0.0.1:{dead.port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'memshadow_requests_total{command="get",listener="live"} 1.0' in text
        proc.proc.send_signal(signal.SIGTERM)
        code, _ = proc.finish()
        assert code == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
