"""Wiring of the operator-facing pieces for cli.serve: the audit trail, the autopilot (ramp
and halt rules), config hot reload, the control API and console, and their metrics."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.admin import AdminServer, HTTPError, Request, Response
from proxy.config import DEFAULTS_SOURCE, Config, LogConfig, load_config
from proxy.metrics import ProxyMetrics
from proxy.ops.audit import AuditLog
from proxy.ops.autopilot import Autopilot
from proxy.ops.control_api import ControlAPI, RedisInfo
from proxy.ops.readiness import (
    DEFAULT_MIN_TRAFFIC,
    DEFAULT_TARGET,
    Counts,
    build_readiness,
    to_html,
)
from proxy.ops.reload import WATCH_INTERVAL, ConfigReloader, ReloadResult
from proxy.ops.report import merge_info
from proxy.ops.saturation import WorkerLoad
from proxy.ops.timeline import EMPTY_BUCKETS, Reading, Timeline, cumulative_to_buckets
from proxy.redis.resp import parse_info
from proxy.shadow.control import ShadowControl
from proxy.shadow.examples import MismatchExamples
from proxy.shadow.stats import ShadowStats

log = logging.getLogger("memshadow.ops")

ADMIN_TOKEN_ENV = "MEMSHADOW_ADMIN_TOKEN"


class OpsCollector(Collector):
    """Exports the halt, ramp and reload state at scrape time."""

    def __init__(self, autopilot: Autopilot, reloader: ConfigReloader) -> None:
        self._autopilot = autopilot
        self._reloader = reloader

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "memshadow_shadow_halted",
                "1 while a guard rule has halted the shadow (until an operator or a config "
                "reload clears it), else 0.",
            ),
            CounterMetricFamily(
                "memshadow_shadow_halts",
                "Halts by the rule that caused them (mismatch, errors, drops, latency).",
                labels=["reason"],
            ),
            GaugeMetricFamily(
                "memshadow_shadow_ramp_step",
                "The ramp step the shadow is on, 1-based; 0 without a ramp or before its "
                "first step.",
            ),
            GaugeMetricFamily(
                "memshadow_config_last_reload_successful",
                "1 if the last config load (at start or a reload) succeeded, else 0.",
            ),
            GaugeMetricFamily(
                "memshadow_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful config load.",
            ),
            GaugeMetricFamily(
                "memshadow_shadow_traffic_share",
                "Share of the client requests handed to the shadow over the last minute (the "
                "sample rate is the share of keys; with a skewed key mix the two differ).",
            ),
            GaugeMetricFamily(
                "memshadow_shadow_redis_reachable",
                "1 while Redis answers the shadow, 0 while it is unreachable (the shadow drops "
                "what it cannot send and resumes by itself), absent when nothing was sent lately.",
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        halted, halts, step, successful, success_at, share, reachable = self._families()
        pilot = self._autopilot
        assert isinstance(halted, GaugeMetricFamily)
        assert isinstance(halts, CounterMetricFamily)
        assert isinstance(step, GaugeMetricFamily)
        assert isinstance(successful, GaugeMetricFamily)
        assert isinstance(success_at, GaugeMetricFamily)
        halted.add_metric([], 1 if pilot.halt is not None else 0)
        for rule, count in sorted(pilot.halts_total.items()):
            halts.add_metric([rule], count)
        step.add_metric([], pilot.ramp_step)
        successful.add_metric([], 1 if self._reloader.last_success else 0)
        success_at.add_metric([], self._reloader.last_success_at)
        assert isinstance(share, GaugeMetricFamily)
        assert isinstance(reachable, GaugeMetricFamily)
        window = pilot.figures()["window"]
        if window is not None and window["traffic_share"] is not None:
            share.add_metric([], window["traffic_share"])
        redis = pilot.redis_state()["state"]
        if redis in ("reachable", "unreachable"):
            reachable.add_metric([], 1 if redis == "reachable" else 0)
        return [halted, halts, step, successful, success_at, share, reachable]


RedisPrimaries = Callable[[], list[Callable[..., Awaitable[Any]]]]
"""The `execute(*args)` of one connection to each primary of the shadow's Redis (one for a
single Redis, one per primary of a cluster), as they are now."""


def redis_info_from(primaries: RedisPrimaries) -> RedisInfo:
    """A RedisInfo over every primary: INFO memory and keyspace, summed over a cluster."""

    async def info() -> Mapping[str, str]:
        executes = primaries()
        if not executes:
            raise RuntimeError("no Redis primary reached yet")
        parts = []
        for execute in executes:
            fields: dict[str, str] = {}
            for section in ("memory", "keyspace", "commandstats", "latencystats"):
                fields.update(parse_info(await execute("INFO", section)))
            parts.append(fields)
        return merge_info(parts)

    return info


def _ratio_param(request: Request, name: str, default: float, what: str) -> float:
    raw = request.query.get(name, [""])[-1] or str(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise HTTPError(400, f"{name} must be {what} above 0 and below 1, got {raw!r}")
    return value


def _reread(config: Config) -> Config:
    """The file ``config`` came from, read again (the built-in defaults stay the defaults)."""
    return load_config(None if config.source == DEFAULTS_SOURCE else config.source)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Operations:
    """Everything an operator drives at runtime, wired to one ShadowControl and ShadowStats.

    Construct it before the admin server starts (it adds routes), then start() it.
    """

    def __init__(
        self,
        config: Config,
        *,
        admin: AdminServer,
        control: ShadowControl,
        stats: ShadowStats,
        metrics: ProxyMetrics,
        load: Callable[[], Config] | None = None,
        redis_info: RedisInfo | None = None,
        configure_logging: Callable[[LogConfig], None] | None = None,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.time,
        watch_interval: float = WATCH_INTERVAL,
        handle_sighup: bool = True,
        shadow_running: bool = True,
        examples: MismatchExamples | None = None,
        worker_pids: Callable[[], list[int]] | None = None,
    ) -> None:
        self.control = control
        self.configure_logging = configure_logging
        self.handle_sighup = handle_sighup
        self._env_token = environ.get(ADMIN_TOKEN_ENV) or None
        self.audit = AuditLog()
        # First listener, so that even the ramp's first move below is audited.
        control.add_listener(self.audit.on_change)
        self.autopilot = Autopilot(
            control, stats, metrics.requests, config.shadow, self.audit, clock=clock
        )
        self.reloader = ConfigReloader(
            config,
            load=load if load is not None else lambda: _reread(config),
            apply=self._apply,
            watch_interval=watch_interval,
            clock=clock,
            on_result=self._reloaded,
        )
        # The shadow worker's CPU and CPU wait (the what-if's trust in Redis's figure),
        # sampled with the history.
        self.worker_load = WorkerLoad(worker_pids) if worker_pids is not None else None
        self.api = ControlAPI(
            control=control,
            stats=stats,
            autopilot=self.autopilot,
            audit=self.audit,
            reloader=self.reloader,
            token=self.token,
            redis_info=redis_info,
            clock=clock,
            shadow_running=shadow_running,
            examples=examples,
            restart_evidence=self.restart_evidence,
            evidence=self.evidence_state,
            worker_load=self.worker_load.figures if self.worker_load is not None else None,
        )
        self.api.install(admin)
        metrics.registry.register(OpsCollector(self.autopilot, self.reloader))
        # The console's charts: a point every 10 s for 24 h (GET /api/history).
        self.timeline = Timeline()
        self._stats = stats
        self._requests = metrics.requests
        self._clock = clock
        self._history_task: asyncio.Task[None] | None = None
        admin.add_route("GET", "/api/history", self.get_history)
        admin.add_route("GET", "/api/readiness", self.get_readiness)
        self.started_at = clock()
        # The readiness evidence runs from here (or from an operator's restart of it): the
        # counts then, subtracted from the counts now.
        self.evidence_since = self.started_at
        self._evidence_base: Counts | None = None
        self.evidence_restarted: dict[str, Any] | None = None
        listen = config.admin.listen
        if self.token() is None and not _is_loopback(listen.host):
            log.warning(
                "the admin port %s is not loopback and no admin token is set: anyone who "
                "reaches it can change the shadow (set admin.token or %s)",
                listen,
                ADMIN_TOKEN_ENV,
            )

    def token(self) -> str | None:
        """The bearer token API changes need: the environment's, else the config's."""
        return self._env_token or self.reloader.current.admin.token

    async def start(self) -> None:
        await self.autopilot.start()
        await self.reloader.start(handle_sighup=self.handle_sighup)
        self.record_history()  # the base of the first interval
        self._history_task = asyncio.get_running_loop().create_task(
            self._keep_history(), name="history"
        )

    async def stop(self) -> None:
        if self._history_task is not None:
            self._history_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._history_task
        await self.reloader.stop()
        await self.autopilot.stop()

    async def _keep_history(self) -> None:
        while True:
            await asyncio.sleep(self.timeline.resolution)
            try:
                self.record_history()
            except Exception:  # the history must never stop the proxy
                log.exception("history: cannot record a point")

    def restart_evidence(self, source: str, reason: str = "") -> None:
        """Start the readiness evidence afresh, on purpose (after a Redis configuration fix,
        say): the report, its ramp periods, the ramp step's evidence and the guards' windows
        count from now. Audited; nothing restarts it silently."""
        now = self._clock()
        self._evidence_base = Counts.of(self._stats, self._requests.total())
        self.evidence_restarted = {"source": source, "at": now, "reason": reason}
        self.evidence_since = now
        self.timeline.cut()
        self.autopilot.restart_evidence()
        self.audit.record(
            source, "evidence", "running", "restarted", reason or "restarted by an operator"
        )

    def evidence_state(self) -> dict[str, Any]:
        return {"since": self.evidence_since, "restarted": self.evidence_restarted}

    def _reloaded(self, result: ReloadResult) -> None:
        """Every reload, good or refused, in the audit trail (and so in the history)."""
        self.audit.record(
            "reload",
            "config",
            "running",
            "reloaded" if result.ok else "kept",
            self.reloader.describe(result),
            at=result.at,
        )

    def record_history(self) -> None:
        """Add the history point of the interval ending now, and the audit's new events."""
        if self.worker_load is not None:
            self.worker_load.sample()
        self.timeline.note(self.audit.entries(since=self.timeline.audit_seq))
        stats = self._stats
        outcomes = {"match": 0, "mismatch": 0, "noise": 0}
        for (_, outcome), count in stats.comparisons.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
        client = list(EMPTY_BUCKETS)
        for _, cumulative, _ in self._requests.snapshot():
            for index, count in enumerate(cumulative_to_buckets(cumulative)):
                client[index] += count
        control = self.control
        reading = Reading(
            sample_rate=control.sample_rate if control.enabled else 0.0,
            ramp_step=self.autopilot.ramp_step,
            match=outcomes["match"],
            mismatch=outcomes["mismatch"],
            noise=outcomes["noise"],
            dropped=sum(stats.dropped.values()),
            errors=sum(stats.errors.values()),
            lag_buckets=list(stats.lag.buckets),
            client_buckets=client,
            shadowed=sum(stats.shadowed.values()),
        )
        self.timeline.sample(self._clock(), reading)

    async def get_readiness(self, request: Request) -> Response:
        """GET /api/readiness[?target=RATE][&min_traffic=SHARE][&format=html]: can the team
        switch to Redis?"""
        target = _ratio_param(request, "target", DEFAULT_TARGET, "a mismatch rate")
        min_traffic = _ratio_param(
            request, "min_traffic", DEFAULT_MIN_TRAFFIC, "a share of the client requests"
        )
        history = self.timeline.to_json()
        control = self.control
        counts = Counts.of(self._stats, self._requests.total())
        if self._evidence_base is not None:
            counts = counts.minus(self._evidence_base)
        since = self.evidence_since
        report = build_readiness(
            counts,
            started_at=since,
            now=self._clock(),
            sample_rate=control.sample_rate if control.enabled else 0.0,
            client_requests=counts.client_requests,
            history=history,
            halts=[e for e in history["events"] if e["field"] == "halt" and e["t"] >= since],
            halted=self.autopilot.halt.as_json() if self.autopilot.halt is not None else None,
            what_if=await self.api.what_if(),
            target=target,
            min_traffic=min_traffic,
            restarted=self.evidence_restarted,
        )
        if request.query.get("format", [""])[-1] == "html":
            return Response(200, to_html(report).encode(), "text/html; charset=utf-8")
        return Response.json(report)

    async def get_history(self, request: Request) -> Response:
        """GET /api/history[?since=UNIX_TIME]: the console's series and events."""
        since = request.query.get("since", ["0"])[-1] or "0"
        try:
            after = float(since)
        except ValueError:
            raise HTTPError(400, f"since must be a unix time, got {since!r}") from None
        return Response.json(self.timeline.to_json(after))

    def _apply(self, old: Config, new: Config, applied: list[str]) -> None:
        """Make the running proxy follow a reloaded config. A reload also lifts a halt: it
        is an operator's deliberate act, like clearing the halt through the API."""
        if "shadow.sample_rate" in applied:
            self.control.set_rate(
                new.shadow.sample_rate, "reload", f"shadow.sample_rate in {new.source}"
            )
        self.autopilot.reconfigure(new.shadow)
        if self.configure_logging is not None and any(p.startswith("log.") for p in applied):
            self.configure_logging(new.log)
        self.autopilot.clear_halt("reload", "config reloaded")


def install_ops(
    config: Config,
    admin: AdminServer,
    metrics: ProxyMetrics,
    *,
    control: ShadowControl | None = None,
    stats: ShadowStats | None = None,
    redis_primaries: RedisPrimaries | None = None,
    load: Callable[[], Config] | None = None,
    configure_logging: Callable[[LogConfig], None] | None = None,
    examples: MismatchExamples | None = None,
    worker_pids: Callable[[], list[int]] | None = None,
) -> Operations:
    """cli.serve's one call: the operator pieces over the shadow's control and stats (or
    inert ones when no shadow runs, so the API and console still answer)."""
    return Operations(
        config,
        admin=admin,
        control=control if control is not None else ShadowControl(config.shadow.sample_rate),
        stats=stats if stats is not None else ShadowStats(),
        metrics=metrics,
        load=load,
        redis_info=redis_info_from(redis_primaries) if redis_primaries is not None else None,
        configure_logging=configure_logging,
        shadow_running=control is not None,
        examples=examples,
        worker_pids=worker_pids,
    )
