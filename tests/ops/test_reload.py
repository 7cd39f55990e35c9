"""Hot reload: good, bad and partial files, options that need a restart, the content
watcher (with a ConfigMap-style symlink swap), and SIGHUP to a real memshadow process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.address import HostPort
from proxy.admin import AdminServer
from proxy.config import LogConfig, load_config
from proxy.metrics import ProxyMetrics
from proxy.ops.operations import Operations
from proxy.shadow.control import ShadowControl
from proxy.shadow.stats import ShadowStats
from tests.ops.http import call, call_sync
from tests.ops.support import feed
from tests.support import free_port, wait_until_async

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
admin: 127.0.0.1:0
shadow:
  sample_rate: {rate}
  guards:
    latency:
      enabled: false
log:
  level: {level}
"""


def write(path: Path, rate: float = 0.1, level: str = "info", extra: str = "") -> None:
    path.write_text(BASE.format(rate=rate, level=level) + extra, encoding="utf-8")


class Env:
    def __init__(self, path: Path, watch_interval: float = 3600.0) -> None:
        self.path = path
        self.logging: list[LogConfig] = []
        config = load_config(str(path))
        self.metrics = ProxyMetrics()
        self.control = ShadowControl(config.shadow.sample_rate)
        self.stats = ShadowStats()
        self.admin = AdminServer(HostPort("127.0.0.1", 0), self.metrics, ready=lambda: True)
        self.ops = Operations(
            config,
            admin=self.admin,
            control=self.control,
            stats=self.stats,
            metrics=self.metrics,
            load=lambda: load_config(str(path)),
            configure_logging=self.logging.append,
            environ={},
            watch_interval=watch_interval,
            handle_sighup=False,
        )

    def metric(self, name: str) -> float:
        for line in self.metrics.render().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exported")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    path = tmp_path / "memshadow.yaml"
    write(path)
    e = Env(path)
    await e.admin.start()
    await e.ops.start()
    yield e
    await e.ops.stop()
    await e.admin.stop()


def test_good_file_applies_live_options(env: Env) -> None:
    write(env.path, rate=0.25, level="debug")
    result = env.ops.reloader.reload("test")
    assert result.ok and result.error is None
    assert result.applied == ("shadow.sample_rate", "log.level")
    assert result.restart_required == ()
    assert env.control.sample_rate == 0.25
    assert env.logging == [LogConfig(level="debug")]
    rate, reload = env.ops.audit.entries()[-2:]
    assert (rate.source, rate.field, rate.new) == ("reload", "sample_rate", 0.25)
    assert rate.reason == f"shadow.sample_rate in {env.path}"
    # Every reload is in the audit trail (and so in the history's events), with what it did.
    assert (reload.source, reload.field, reload.old, reload.new) == (
        "reload", "config", "running", "reloaded"
    )
    assert reload.reason == "test: shadow.sample_rate = 0.25, log.level = debug"
    assert env.metric("memshadow_config_last_reload_successful") == 1.0


def test_every_reload_is_audited_and_in_the_history(env: Env) -> None:
    # A reload that changes only the ramp (no rate change to audit) is still there.
    env.path.write_text(
        env.path.read_text(encoding="utf-8").replace(
            "  guards:", "  ramp:\n    steps: [0.5, 1.0]\n    hold: 1h\n  guards:"
        ),
        encoding="utf-8",
    )
    assert env.ops.reloader.reload("SIGHUP").ok
    env.path.write_text("shadow: [", encoding="utf-8")
    assert not env.ops.reloader.reload("file change").ok
    trail = [(e.source, e.field, e.new, e.reason) for e in env.ops.audit.entries()]
    reloads = [entry for entry in trail if entry[1] == "config"]
    assert reloads[0][2] == "reloaded"
    assert reloads[0][3].startswith("SIGHUP: shadow.ramp.steps = [0.5, 1.0], shadow.ramp.hold")
    assert reloads[1][2] == "kept"
    assert reloads[1][3].startswith(
        "file change: the file was refused, the running config kept: " + str(env.path)
    )
    env.ops.record_history()
    events = [e["what"] for e in env.ops.timeline.to_json()["events"] if e["field"] == "config"]
    assert len(events) == 2 and events[0].startswith("config running -> reloaded by reload")


def test_unchanged_file_changes_nothing(env: Env) -> None:
    env.control.set_rate(0.5, "api")
    result = env.ops.reloader.reload("test")
    assert result.ok and result.applied == ()
    assert env.control.sample_rate == 0.5  # the operator's rate stands


def test_bad_file_keeps_the_running_config_and_says_why(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    before = env.metric("memshadow_config_last_reload_success_timestamp_seconds")
    write(env.path, rate=2)  # type: ignore[arg-type]
    result = env.ops.reloader.reload("test")
    expected = f"{env.path}:3: shadow.sample_rate: must be a number between 0 and 1, got 2"
    assert not result.ok and result.error == expected
    assert env.control.sample_rate == 0.1
    assert env.ops.reloader.current.shadow.sample_rate == 0.1
    assert env.metric("memshadow_config_last_reload_successful") == 0.0
    assert env.metric("memshadow_config_last_reload_success_timestamp_seconds") == before
    assert f"config reload (test) failed, keeping the running config: {expected}" in caplog.text
    write(env.path, rate=0.2)
    assert env.ops.reloader.reload("test").ok
    assert env.metric("memshadow_config_last_reload_successful") == 1.0


def test_half_written_file_is_refused(env: Env) -> None:
    env.path.write_text("shadow:\n  ramp:\n    steps: [0.01, 0.05\n", encoding="utf-8")
    result = env.ops.reloader.reload("test")
    assert not result.ok
    assert result.error is not None and result.error.startswith(f"{env.path}:4: invalid YAML")


def test_missing_file_is_refused(env: Env) -> None:
    env.path.unlink()
    result = env.ops.reloader.reload("test")
    assert result.error == f"{env.path}: cannot read config file: No such file or directory"


def test_options_that_need_a_restart_are_reported(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    write(env.path, rate=0.3, extra="listen: 127.0.0.1:22122\nmemcached: 10.0.0.1:11211\n")
    result = env.ops.reloader.reload("test")
    assert result.ok
    assert result.applied == ("shadow.sample_rate",)
    assert result.restart_required == ("listen", "memcached")
    assert env.control.sample_rate == 0.3
    assert (
        "need a restart to take effect: listen (running 127.0.0.1:11311, file 127.0.0.1:22122)"
        in caplog.text
    )
    # Still pending at the next reload, until memshadow restarts.
    write(env.path, rate=0.4, extra="listen: 127.0.0.1:22122\nmemcached: 10.0.0.1:11211\n")
    assert env.ops.reloader.reload("test").restart_required == ("listen", "memcached")


async def test_config_view_shows_the_last_reload(env: Env) -> None:
    write(env.path, rate=0.3, extra="listen: 127.0.0.1:22122\n")
    env.ops.reloader.reload("test")
    view = (await call(env.admin.address[1], "GET", "/api/shadow/config")).json()
    assert view["watching"] == str(env.path)
    assert view["last_reload"]["applied"] == ["shadow.sample_rate"]
    assert view["restart_required"] == [
        {"option": "listen", "running": "127.0.0.1:11311", "file": "127.0.0.1:22122"}
    ]


async def test_reload_through_the_api(env: Env) -> None:
    write(env.path, rate=0.6)
    reply = await call(env.admin.address[1], "POST", "/api/reload")
    assert reply.status == 200 and reply.json()["applied"] == ["shadow.sample_rate"]
    write(env.path, rate=7)  # type: ignore[arg-type]
    reply = await call(env.admin.address[1], "POST", "/api/reload")
    assert reply.status == 422
    error = reply.json()["error"]
    assert error.endswith("shadow.sample_rate: must be a number between 0 and 1, got 7")


def test_reload_lifts_a_halt(env: Env) -> None:
    pilot = env.ops.autopilot
    pilot.tick()
    feed(env.stats, errors=500)
    pilot.clock = lambda: time.time() + 10
    pilot.tick()
    assert pilot.halt is not None and not env.control.enabled
    assert env.ops.reloader.reload("test").ok
    assert pilot.halt is None and env.control.enabled
    assert env.ops.audit.entries()[-2].source == "reload"


def test_new_token_applies_at_once(env: Env) -> None:
    assert env.ops.token() is None
    write(env.path, extra="")
    env.path.write_text(
        env.path.read_text().replace("admin: 127.0.0.1:0\n", "admin:\n  token: abc\n")
    )
    result = env.ops.reloader.reload("test")
    assert result.applied == ("admin.token",)
    assert result.restart_required == ("admin.listen",)  # 127.0.0.1:0 -> the default
    assert env.ops.token() == "abc"


def test_new_ramp_applies_at_once(env: Env) -> None:
    write(env.path, extra="")
    text = env.path.read_text().replace("  guards:", "  ramp:\n    steps: [0.05, 0.5]\n  guards:")
    env.path.write_text(text)
    result = env.ops.reloader.reload("test")
    assert result.applied == ("shadow.ramp.steps",)
    assert env.control.sample_rate == 0.05
    assert env.ops.autopilot.ramp.configured


# --- the watcher -------------------------------------------------------------------------------


async def test_watcher_reloads_on_a_content_change(tmp_path: Path) -> None:
    path = tmp_path / "memshadow.yaml"
    write(path)
    env = Env(path, watch_interval=0.02)
    await env.ops.start()
    try:
        write(path, rate=0.7)
        await wait_until_async(lambda: env.control.sample_rate == 0.7, what="the new rate")
        result = env.ops.reloader.last_result
        assert result is not None and result.trigger == "file change"
        path.write_text("shadow: [\n", encoding="utf-8")
        await wait_until_async(lambda: not env.ops.reloader.last_success, what="the failed reload")
        assert env.control.sample_rate == 0.7
    finally:
        await env.ops.stop()


async def test_watcher_follows_a_configmap_symlink_swap(tmp_path: Path) -> None:
    # Kubernetes mounts a ConfigMap as ..data -> ..<timestamp>/ and file -> ..data/file, and
    # updates it by pointing ..data at a new directory: the file's own path never changes.
    def version(name: str, rate: float) -> None:
        directory = tmp_path / name
        directory.mkdir()
        write(directory / "memshadow.yaml", rate=rate)

    version("..v1", 0.1)
    (tmp_path / "..data").symlink_to("..v1")
    path = tmp_path / "memshadow.yaml"
    path.symlink_to("..data/memshadow.yaml")
    env = Env(path, watch_interval=0.02)
    await env.ops.start()
    try:
        version("..v2", 0.9)
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await wait_until_async(lambda: env.control.sample_rate == 0.9, what="the swapped file")
    finally:
        await env.ops.stop()


# --- SIGHUP to the real process ----------------------------------------------------------------

STARTED = re.compile(r"admin http://(\S+), ")


def test_sighup_reloads_a_running_memshadow(tmp_path: Path) -> None:
    path = tmp_path / "memshadow.yaml"
    write(path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMSHADOW_LOOP="asyncio")
    env.pop("MEMSHADOW_ADMIN_TOKEN", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:0",
            "--memcached",
            "127.0.0.1:1",
            # A rate needs a Redis (check_complete); this one is never reached, which the
            # reload does not care about.
            "--redis",
            f"redis://127.0.0.1:{free_port()}/0",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            log.append(line)
            if match := STARTED.search(line):
                port = int(match[1].rsplit(":", 1)[1])
                break
        assert port, "".join(log)
        assert call_sync(port, "GET", "/api/shadow").json()["sample_rate"] == 0.1

        # A bad file first: the process keeps running on its config and says why.
        path.write_text(BASE.format(rate="high", level="info"), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        error = f"{path}:3: shadow.sample_rate: must be a number between 0 and 1, got 'high'"
        for line in proc.stderr:
            log.append(line)
            if "reload" in line and "failed" in line:
                assert error in line
                break
        assert call_sync(port, "GET", "/api/shadow").json()["sample_rate"] == 0.1
        metrics = call_sync(port, "GET", "/metrics").text
        assert "memshadow_config_last_reload_successful 0.0" in metrics

        write(path, rate=0.35)
        proc.send_signal(signal.SIGHUP)
        for line in proc.stderr:
            log.append(line)
            if "config reloaded from" in line and "(SIGHUP)" in line:
                break
        state = call_sync(port, "GET", "/api/shadow").json()
        assert state["sample_rate"] == 0.35
        trail = call_sync(port, "GET", "/api/audit").json()["entries"]
        assert [(e["source"], e["field"], e["new"]) for e in trail] == [
            ("reload", "config", "kept"),
            ("reload", "sample_rate", 0.35),
            ("reload", "config", "reloaded"),
        ]
        view = call_sync(port, "GET", "/api/shadow/config").json()
        assert view["last_reload"]["ok"] is True
        assert "SIGHUP: reloading the config" in "".join(log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_without_a_loader_the_same_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "memshadow.yaml"
    write(path)
    metrics = ProxyMetrics()
    admin = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
    control = ShadowControl(0.1)
    ops = Operations(
        load_config(str(path)),
        admin=admin,
        control=control,
        stats=ShadowStats(),
        metrics=metrics,
        environ={},
    )
    write(path, rate=0.8)
    assert ops.reloader.reload("test").ok and control.sample_rate == 0.8


def test_defaults_reload_as_defaults() -> None:
    from proxy.config import Config

    metrics = ProxyMetrics()
    admin = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
    ops = Operations(
        Config(),
        admin=admin,
        control=ShadowControl(0.0),
        stats=ShadowStats(),
        metrics=metrics,
        environ={},
    )
    result = ops.reloader.reload("SIGHUP")
    assert result.ok and result.applied == () and ops.reloader.path is None
