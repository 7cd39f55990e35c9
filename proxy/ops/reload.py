"""Hot reload of the config file, on SIGHUP and whenever the file's content changes (a
Kubernetes ConfigMap swaps a symlink under a running pod, so the content is hashed rather than
trusting mtimes). A new file is fully validated first; a bad one keeps the running config and
says exactly why. Options that need a restart are reported, never silently ignored."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.config import Config, option_paths
from proxy.errors import ConfigError

log = logging.getLogger("memshadow.reload")

WATCH_INTERVAL = 1.0

# Options a running memshadow takes on reload (a prefix ending in '.' covers a section).
# Everything else (addresses, the Redis URL, limits, timeouts, the shadow's queues...) is
# read once at start, so a change is reported as needing a restart.
LIVE_OPTIONS = ("shadow.sample_rate", "shadow.ramp.", "shadow.guards.", "log.", "admin.token")
# Shown as "(hidden)" instead of their values.
SECRET_OPTIONS = ("admin.token",)


def option_value(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def changed_options(old: Config, new: Config) -> list[str]:
    """Dotted names of the options whose values differ."""
    return [p for p in option_paths() if option_value(old, p) != option_value(new, p)]


def is_live(option: str) -> bool:
    return any(
        option.startswith(live) if live.endswith(".") else option == live
        for live in LIVE_OPTIONS
    )


def show_value(config: Config, option: str) -> Any:
    """An option's value as JSON, secrets hidden, URLs without passwords."""
    if option in SECRET_OPTIONS:
        return "(hidden)" if option_value(config, option) is not None else None
    value = option_value(config, option)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _restart_line(running: Config, new: Config, option: str) -> str:
    was, now = show_value(running, option), show_value(new, option)
    if was == now:  # (only what is hidden differs: a password)
        return f"{option} (a secret in it changed)"
    return f"{option} (running {was}, file {now})"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    at: float
    trigger: str  # "SIGHUP", "file change", "api"
    source: str
    error: str | None = None  # the ConfigError, one line with file:line: key: problem
    applied: tuple[str, ...] = ()  # live options that changed and now have their new value
    restart_required: tuple[str, ...] = ()  # options whose file value differs from the running

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "at": self.at,
            "trigger": self.trigger,
            "source": self.source,
            "error": self.error,
            "applied": list(self.applied),
            "restart_required": list(self.restart_required),
        }


Apply = Callable[[Config, Config, list[str]], None]
"""apply(old, new, live options that changed): make the running proxy follow ``new``."""


class ConfigReloader:
    """Holds the current config and replaces it on request, on SIGHUP and on file changes."""

    def __init__(
        self,
        config: Config,
        *,
        load: Callable[[], Config],
        apply: Apply,
        watch_interval: float = WATCH_INTERVAL,
        clock: Callable[[], float] = time.time,
        on_result: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        """on_result is told every reload's outcome, good or bad (the audit trail)."""
        self.on_result = on_result
        self.started = config  # what the listeners, the pools... were built from
        self.current = config
        self.load = load
        self.apply = apply
        self.watch_interval = watch_interval
        self.clock = clock
        self.last_result: ReloadResult | None = None
        self.last_success = True  # the config loaded at start counts as a success
        self.last_success_at = clock()
        self._path = None if config.source in ("defaults", "command line") else config.source
        self._digest = self._read_digest()
        self._task: asyncio.Task[None] | None = None
        self._sighup = False

    @property
    def path(self) -> str | None:
        """The watched file (None when running on built-in defaults)."""
        return self._path

    def restart_required(self, config: Config | None = None) -> list[str]:
        """Options whose value in ``config`` (default: the current one) differs from what
        the process started with and that only a restart applies."""
        target = config if config is not None else self.current
        return [p for p in changed_options(self.started, target) if not is_live(p)]

    def reload(self, trigger: str) -> ReloadResult:
        """Load, validate and apply the file now. Never raises for a bad file."""
        now = self.clock()
        source = self._path or self.current.source
        try:
            new = self.load()
        except ConfigError as exc:
            self.last_success = False
            result = ReloadResult(False, now, trigger, source, error=str(exc))
            self.last_result = result
            log.error("config reload (%s) failed, keeping the running config: %s", trigger, exc)
            self._tell(result)
            return result
        old = self.current
        applied = [p for p in changed_options(old, new) if is_live(p)]
        self.apply(old, new, applied)
        self.current = new
        restart = self.restart_required(new)
        result = ReloadResult(True, now, trigger, new.source, None, tuple(applied), tuple(restart))
        self.last_result = result
        self.last_success = True
        self.last_success_at = now
        log.info(
            "config reloaded from %s (%s): %s",
            new.source,
            trigger,
            ", ".join(f"{p} = {show_value(new, p)}" for p in applied) or "no live option changed",
        )
        if restart:
            log.warning(
                "config options changed that need a restart to take effect: %s",
                "; ".join(_restart_line(self.started, new, p) for p in restart),
            )
        self._tell(result)
        return result

    def _tell(self, result: ReloadResult) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def describe(self, result: ReloadResult) -> str:
        """A reload's outcome in one line (the audit trail's reason)."""
        if not result.ok:
            kept = "the file was refused, the running config kept"
            return f"{result.trigger}: {kept}: {result.error}"
        applied = ", ".join(f"{p} = {show_value(self.current, p)}" for p in result.applied)
        text = f"{result.trigger}: " + (applied or "no live option changed")
        if result.restart_required:
            text += "; needs a restart: " + ", ".join(result.restart_required)
        return text

    # --- triggers -------------------------------------------------------------------------

    async def start(self, *, handle_sighup: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if handle_sighup:
            try:
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
                self._sighup = True
            except (ValueError, RuntimeError, NotImplementedError) as exc:
                # Not the main thread (tests run the proxy in one), or no signals here.
                log.debug("SIGHUP reload not available: %s", exc)
        if self._path is not None:
            self._task = loop.create_task(self._watch(), name="config-watch")

    async def stop(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading the config")
        self._digest = self._read_digest()  # the watcher need not reload the same content
        self.reload("SIGHUP")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            digest = self._read_digest()
            if digest != self._digest:
                self._digest = digest
                try:
                    self.reload("file change")
                except Exception:  # a bug in apply must not end the watcher
                    log.exception("config reload failed")

    def _read_digest(self) -> str | None:
        if self._path is None:
            return None
        try:
            with open(self._path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            # A missing file is a state of its own: reported once, not every second.
            return f"unreadable: {exc.errno}"
