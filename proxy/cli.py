"""Command-line entry point: read flags and config, then run the proxy, the admin endpoint and
the upstream health probe on uvloop until SIGTERM or SIGINT, and stop gracefully."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from proxy import __version__, buildinfo
from proxy.address import HostPort
from proxy.admin import AdminServer
from proxy.config import (
    Config,
    ListenerConfig,
    apply_overrides,
    check_complete,
    load_config,
    render_config,
)
from proxy.errors import ConfigError
from proxy.health import UpstreamHealth
from proxy.metrics import ProxyMetrics
from proxy.runtime import configure_logging, loop_factory

if TYPE_CHECKING:
    from proxy.processes import ProxyProcesses
    from proxy.server import ProxyServer
    from proxy.shadow.process import ShadowProcess

log = logging.getLogger("memshadow")

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1  # could not bind, or a forced (second-signal) shutdown
EXIT_CONFIG_ERROR = 2  # same code argparse uses for bad usage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memshadow",
        description="Transparent Memcached proxy that shadows a sampled fraction of keys to "
        "Redis. Flags override the config file.",
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: built-ins)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="where clients connect")
    parser.add_argument("--memcached", metavar="HOST:PORT", help="the real Memcached")
    parser.add_argument("--redis", metavar="URL", help="shadow Redis, redis://HOST:PORT/DB")
    parser.add_argument("--sample-rate", metavar="F", help="fraction of keys to shadow, 0..1")
    parser.add_argument("--admin", metavar="HOST:PORT", help="HTTP admin/metrics endpoint")
    parser.add_argument(
        "--workers", metavar="N", help="proxy processes: a number, or auto (usable cores)"
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the configuration and exit: the commented defaults, or with --config "
        "(and flags) the configuration in effect, yours marked",
    )
    parser.add_argument(
        "--init-config",
        metavar="PATH",
        help="write a configuration of your own to PATH (every option commented, at its "
        "default) and exit; an existing file is never overwritten",
    )
    parser.add_argument("--version", action="version", version=buildinfo.version_line())
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG_ERROR
    if args.init_config:
        return init_config(args.init_config)
    if args.print_config and not _given(args):
        sys.stdout.write(config_template())
        return EXIT_OK
    load = config_loader(args)
    try:
        config = load()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.print_config:
        sys.stdout.write(render_config(config))
        return EXIT_OK
    if args.check_config:
        print(f"config OK: {config.source}")
        return EXIT_OK
    configure_logging(config.log)
    return run(config, load)


FLAG_OPTIONS = ("config", "listen", "memcached", "redis", "sample_rate", "admin", "workers")

INIT_HEADER = """\
# memshadow configuration of your own, written by `memshadow --init-config` (memshadow
# {version}). Every option is here with its default and what it does: change what you need.
# This file is yours: the defaults stay in the package (`memshadow --print-config` prints
# them), and `memshadow --config {path} --print-config` shows what this file puts in effect.
# Check it without starting anything: memshadow --config {path} --check-config
"""


def _given(args: argparse.Namespace) -> bool:
    """Was a config file or a flag that changes it given?"""
    return any(getattr(args, name) is not None for name in FLAG_OPTIONS)


def config_template() -> str:
    """The commented default configuration shipped in the package: every option, each at
    its default (the reference; a user's own file starts from it with --init-config)."""
    return (resources.files("proxy") / "memshadow.yaml").read_text(encoding="utf-8")


def init_config(path: str) -> int:
    """Write the commented defaults to ``path`` as the user's own file; never overwrite."""
    template = config_template()
    # The reference's own header (up to the first blank line) gives way to the user's.
    body = template.split("\n\n", 1)[1]
    text = INIT_HEADER.format(version=__version__, path=path) + "\n" + body
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        print(f"{path} exists already: not overwritten (remove it first)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as exc:
        print(f"cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"wrote {path}: edit it, then run memshadow --config {path}")
    return EXIT_OK


def config_loader(args: argparse.Namespace) -> Callable[[], Config]:
    """Reads the config file with the command line's flags over it, at start and on every
    reload (so a flag keeps winning over the file)."""

    def load() -> Config:
        config = apply_overrides(
            load_config(args.config),
            listen=args.listen,
            memcached=args.memcached,
            redis=args.redis,
            sample_rate=args.sample_rate,
            admin=args.admin,
            workers=args.workers,
        )
        return check_complete(config)

    return load


def run(config: Config, load: Callable[[], Config] | None = None) -> int:
    """Serve until a signal; the return value is the process exit code. ``load`` re-reads
    the configuration for hot reloads."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(config, load))


async def serve(config: Config, load: Callable[[], Config] | None = None) -> int:
    # Imported here so that config checking and --version work without the data path.
    from proxy.ops.operations import install_ops
    from proxy.server import ProxyServer

    loop = asyncio.get_running_loop()
    # First, so that even a start that fails says which build it was.
    log.info("memshadow %s, %s", __version__, buildinfo.describe())
    backends = config.backends
    metrics = ProxyMetrics(
        listeners=[backend.label for backend in backends], processes=config.workers
    )
    metrics.loop = loop
    # Each listener follows its Memcached: open while it is reachable, refusing clients while
    # it is not (every proxy process of `workers: N` alike).
    healths = [
        UpstreamHealth(backend.memcached, timeout=config.upstream_connect_timeout)
        for backend in backends
    ]
    processes: ProxyProcesses | None = None
    admin = AdminServer(
        config.admin.listen,
        metrics,
        ready=lambda: all(health.ready for health in healths),
        not_ready_reason=lambda: _not_ready(backends, healths),
        readiness=lambda: _readiness(backends, healths, processes),
    )
    shadow = None
    hooks: dict[str, Any] = {}
    if config.shadow.redis is not None:
        # Built whenever Redis is configured, even at rate 0, so the rate can be raised live.
        from proxy.shadow.service import build_shadow

        shadow = build_shadow(config, metrics)
        hooks = {"capture": shadow.capture, "observer": shadow.observe}
    servers = [
        ProxyServer(config, metrics, health, index=index, **hooks)
        for index, health in enumerate(healths)
    ]
    if shadow is not None:  # (a rise of the sample waits for their requests in flight)
        shadow.attach(lambda: [s.pending for server in servers for s in server.sessions])
    if config.workers > 1:
        from proxy.processes import ProxyProcesses

        processes = ProxyProcesses(
            config,
            metrics,
            control=shadow.control if shadow is not None else None,
            shadow=cast("ShadowProcess", shadow) if shadow is not None else None,
            healths=healths,
        )
    # Runtime control API, console, audit, ramp and halt rules, hot reload.
    ops = install_ops(
        config,
        admin,
        metrics,
        control=shadow.control if shadow is not None else None,
        stats=shadow.stats if shadow is not None else None,
        redis_primaries=shadow.redis_primaries if shadow is not None else None,
        load=load,
        configure_logging=configure_logging,
        examples=shadow.examples if shadow is not None else None,
        worker_pids=_worker_pids(shadow) if shadow is not None else None,
    )

    stop_requested = asyncio.Event()
    force = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop_requested.is_set():
            log.warning("%s again: closing all connections now", name)
            force.set()
            return
        log.info(
            "%s: no longer accepting; in-flight requests have %gs to finish",
            name,
            config.shutdown_timeout,
        )
        stop_requested.set()

    async with contextlib.AsyncExitStack() as cleanup:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
            cleanup.callback(loop.remove_signal_handler, signum)
        if shadow is not None:
            await shadow.start()
            cleanup.push_async_callback(shadow.stop)
        # Memcached's state first: a listener opens only once its Memcached has accepted a
        # connection (before that, clients are refused as Memcached itself would refuse them).
        for health in healths:
            await health.start()
            cleanup.push_async_callback(health.stop)
        socks: list[socket.socket | None] = [None] * len(servers)
        if processes is not None:
            try:
                socks = list(processes.bind())
            except OSError as exc:
                log.error("cannot listen for clients: %s", exc)
                return EXIT_RUNTIME_ERROR
        for server, sock in zip(servers, socks, strict=True):
            try:
                await server.start(sock=sock)
            except OSError as exc:
                log.error("cannot listen for clients on %s: %s", server.listener.listen, exc)
                await _stop_all(servers, 0.0)
                return EXIT_RUNTIME_ERROR
        if processes is not None:
            await processes.start()
            cleanup.push_async_callback(processes.stop, 0.0)  # whatever the way out
        try:
            await admin.start()
        except OSError as exc:
            log.error("cannot listen for admin requests on %s: %s", config.admin.listen, exc)
            await _stop_all(servers, 0.0)
            return EXIT_RUNTIME_ERROR
        cleanup.push_async_callback(admin.stop)
        await ops.start()
        cleanup.push_async_callback(ops.stop)
        log.info(
            "memshadow %s listening on %s, admin http://%s, %s%s (config: %s)",
            __version__,
            "; ".join(
                f"{HostPort(*server.listen_address)}, memcached {server.listener.memcached}"
                for server in servers
            ),
            HostPort(*admin.address),
            _describe_shadow(config),
            f", {config.workers} proxy processes" if config.workers > 1 else "",
            config.source,
        )
        await stop_requested.wait()
        started = time.monotonic()
        stopping = _stop_all(servers, config.shutdown_timeout, processes)
        if not await _stop_unless_forced(stopping, force):
            # a zero grace period aborts whatever is still open
            await _stop_all(servers, 0.0, processes)
            return EXIT_RUNTIME_ERROR
        log.info("stopped after %.2fs", time.monotonic() - started)
    return EXIT_OK


async def _stop_unless_forced(graceful_stop: Awaitable[None], force: asyncio.Event) -> bool:
    """Run the graceful stop; False if `force` was set first (the stop is then cancelled)."""
    graceful = asyncio.ensure_future(graceful_stop)
    forced = asyncio.ensure_future(force.wait())
    await asyncio.wait({graceful, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if graceful.done():
        graceful.result()
        return True
    graceful.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await graceful
    return False


async def _stop_all(
    servers: list[ProxyServer], timeout: float, processes: ProxyProcesses | None = None
) -> None:
    """Drain every listener of this process, and the other proxy processes, at once."""
    stops = [server.stop(timeout) for server in servers]
    if processes is not None:
        stops.append(processes.stop(timeout))
    await asyncio.gather(*stops)


def _worker_pids(shadow: object) -> Callable[[], list[int]]:
    """The shadow workers' process ids, as they are now: the service's own `worker_pids()`
    when it has one; else read from a worker-process shadow's supervisors; else (inline)
    this process, which then does the shadow's work."""
    own = getattr(shadow, "worker_pids", None)
    if callable(own):
        return cast("Callable[[], list[int]]", own)

    def pids() -> list[int]:
        workers = getattr(shadow, "_workers", None)
        if workers is None:
            return [os.getpid()]
        found = []
        for worker in workers:
            process = getattr(worker, "process", None)
            pid = getattr(process, "pid", None)
            if isinstance(pid, int) and process is not None and process.poll() is None:
                found.append(pid)
        return found

    return pids


def _not_ready(backends: tuple[ListenerConfig, ...], healths: list[UpstreamHealth]) -> str:
    if len(healths) == 1:
        return healths[0].reason
    return "; ".join(
        f"{backend.label}: {health.reason}"
        for backend, health in zip(backends, healths, strict=True)
        if not health.ready
    )


def _readiness(
    backends: tuple[ListenerConfig, ...],
    healths: list[UpstreamHealth],
    processes: ProxyProcesses | None = None,
) -> dict[str, Any]:
    """/readyz as JSON: the whole answer, each listener's Memcached, and (workers: N) the
    other proxy processes (one that restarts leaves the others serving: not a reason to be
    unready)."""
    extra = {"processes": processes.describe()} if processes is not None else {}
    return {
        "ready": all(health.ready for health in healths),
        "listeners": [
            {
                "name": backend.label,
                "listen": str(backend.listen),
                "memcached": str(backend.memcached),
                "ready": health.ready,
                "reason": health.reason,
            }
            for backend, health in zip(backends, healths, strict=True)
        ],
        **extra,
    }


def _describe_shadow(config: Config) -> str:
    shadow = config.shadow
    if shadow.enabled:
        return f"shadowing {shadow.sample_rate:g} of keys to {shadow.redis}"
    if shadow.redis is not None:
        return f"shadow to {shadow.redis} ready at rate 0 (raise it through the admin API)"
    return "shadow off"
