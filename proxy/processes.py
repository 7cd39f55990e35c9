"""`workers: N`: the extra proxy processes, and the first process that runs them.

The first process (cli.py) does everything it does with `workers: 1`: the admin endpoint,
the operations (rate, ramp, halts, reload), the health probes, the shadow workers, and
client traffic on its own listen sockets. It also starts N-1 more proxy processes
(`python -m proxy.processes FD`), each given listen sockets of its own bound to the same
addresses with SO_REUSEPORT, so the kernel spreads client connections over all of them.
Each one serves clients exactly as the first does, samples with the same hash and the live
rate the first sends it, and hands its sampled requests straight to the shadow workers that
own their keys (handoff.py; the workers merge every process's stream in reply order). Every
second it reports its figures, which the first one's /metrics add to its own.

An extra process that dies is started again with backoff on new sockets (its own are gone
with it, and the kernel stops sending it connections); one that loses the first process
(end of file on its control socket) drains its clients and exits.

While a Memcached is down, every process refuses new clients on its listener (listener.py):
the first process knows the Memcached's state (health.py) and tells the others every change;
an extra process whose client cannot reach a Memcached closes that listener at once and tells
the first, and opens it again only on word from the first that came after its report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast

from proxy import messages
from proxy.children import READY_TIMEOUT, ChildSlot, ParentLink, StopReading
from proxy.listener import bind_sockets
from proxy.metrics import ProxyMetrics, RequestState, add_request_states
from proxy.runtime import loop_factory
from proxy.shadow.control import ControlChange, ShadowControl
from proxy.shadow.wire import WireError, encode

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.health import ReadyListener, UpstreamHealth
    from proxy.memcache.request import Request
    from proxy.shadow.coverage import CoverageAnnouncer
    from proxy.shadow.handoff import Handoff
    from proxy.shadow.process import ShadowProcess
    from proxy.shadow.sampler import KeySampler

log = logging.getLogger("memshadow.processes")

REPORT_INTERVAL: Final = 1.0
"""How often an extra process reports its figures (the staleness of their part of
/metrics, and its heartbeat: children.HEARTBEAT_TIMEOUT)."""
FEED_RETRY: Final = 0.5  # seconds between attempts to reach a shadow worker's feed socket
FEED_WAIT: Final = 2.0  # an extra process waits this long for its feeds before serving


def listen_socket(host: str, port: int, *, first: bool = False) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT: every proxy process binds one to the same
    address, and the kernel spreads new connections over those that listen (each process
    calls listen() when it is ready to accept, so none is sent clients it cannot serve).
    `first`: make sure nothing else listens there already (another memshadow would
    otherwise silently share the port)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if first and port:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)  # EADDRINUSE when something listens there
    (sock,) = bind_sockets(host, port, reuse_port=True, every_address=False)
    return sock


# -- the first process's side -------------------------------------------------------------


class _Extra(ChildSlot):
    """One extra proxy process, as the first one sees it."""

    def __init__(self, owner: ProxyProcesses, index: int) -> None:
        super().__init__("proxy process", index, "proxy.processes", owner.stopping, log)
        self.owner = owner
        self.up = False
        # Per listener: the last report of a Memcached failure it sent us that we acted on.
        self.acked: dict[int, int] = {}
        # Figures of its earlier lives (counters never go back) and of the current one.
        self.base_requests: dict[str, RequestState] = {}
        self.last: dict[str, Any] = {}
        self.handlers = {
            "ready": self._ready,
            "figures": partial(owner._merge, self),
            "memcached_failed": partial(owner._memcached_failed, self),
        }

    def launching(self) -> list[socket.socket]:
        self.acked = {}  # a new life numbers its reports from 1
        listens: list[socket.socket] = []
        try:
            for host, port in self.owner.addresses:
                listens.append(listen_socket(host, port))
        except BaseException:
            for sock in listens:
                sock.close()
            raise
        return listens

    def launched(self) -> None:
        self.owner._launched(self)

    def gone(self) -> None:
        self.owner._gone(self)

    def _ready(self) -> None:
        self.up = True
        self.set_ready()


class ProxyProcesses:
    """Runs and supervises the N-1 extra proxy processes; merges their figures."""

    def __init__(
        self,
        config: Config,
        metrics: ProxyMetrics,
        control: ShadowControl | None,
        shadow: ShadowProcess | None,
        healths: list[UpstreamHealth] | None = None,
    ) -> None:
        """healths: each listener's Memcached, whose changes every process's listener
        follows (none: they always listen)."""
        self.config = config
        self.metrics = metrics
        self.control = control
        self.shadow = shadow
        self.healths = healths or []
        self.addresses: list[tuple[str, int]] = []  # each listener's bound address
        self._extras = [_Extra(self, index) for index in range(1, config.workers)]
        self._config_blob = pickle.dumps(config)
        self._stopping = False
        if control is not None:
            control.add_listener(self._control_changed)
        if shadow is not None:
            shadow.feeds_changed = self._feeds_changed
        for listener, health in enumerate(self.healths):
            health.add_listener(partial(self._memcached_changed, listener))

    def bind(self) -> list[socket.socket]:
        """The first process's own listen sockets, one per listener (SO_REUSEPORT); a port
        0 is resolved here, so that every process binds the same one."""
        socks: list[socket.socket] = []
        try:
            for backend in self.config.backends:
                sock = listen_socket(backend.listen.host, backend.listen.port, first=True)
                socks.append(sock)
                host, port = sock.getsockname()[:2]
                self.addresses.append((str(host), int(port)))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    async def start(self) -> None:
        """Start the extra processes; wait (up to READY_TIMEOUT) until they serve."""
        for extra in self._extras:
            extra.start()
        waiting = [asyncio.shield(e.ready) for e in self._extras if e.ready is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waiting), READY_TIMEOUT)
        late = [e.index for e in self._extras if not e.up]
        if late:
            log.warning(
                "proxy processes %s not serving after %gs; carrying on", late, READY_TIMEOUT
            )

    async def stop(self, timeout: float) -> None:
        """Ask every extra process to drain its clients within `timeout`, then end it."""
        self._stopping = True
        for extra in self._extras:
            extra.send(messages.stop(timeout))
        closing = [asyncio.shield(e.closed) for e in self._extras if e.closed is not None]
        if closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*closing), timeout + 2.0)
        for extra in self._extras:
            await extra.stop()

    def describe(self) -> list[dict[str, Any]]:
        """Each extra process for /readyz: index, pid, serving, restarts."""
        return [
            {
                "index": extra.index,
                "pid": extra.pid,
                "serving": extra.up,
                "restarts": extra.restarts,
            }
            for extra in self._extras
        ]

    @property
    def pids(self) -> list[int | None]:
        return [extra.pid for extra in self._extras]

    def stopping(self) -> bool:
        return self._stopping

    def _launched(self, extra: _Extra) -> None:
        shadow = self.shadow
        control = self.control
        extra.send(
            messages.start_extra(
                self._config_blob,
                extra.index,
                list(extra.fds),
                control.sample_rate if control is not None else 0.0,
                control.enabled if control is not None else False,
                shadow.feed_addresses if shadow is not None else [],
                shadow.feed_token if shadow is not None else "",
                self._accepting(),
            )
        )
        if self._stopping:  # stop() came while it was being started
            extra.send(messages.stop(0.0))

    def _gone(self, extra: _Extra) -> None:
        """Its figures so far stay (added to its successor's); its connections are gone."""
        extra.up = False
        requests = extra.last.get("requests", {})
        for label, state in requests.items():
            extra.base_requests[label] = add_request_states(
                extra.base_requests.get(label, {}), state
            )
        extra.last = {}
        self.metrics.remote_connections[extra.index - 1] = 0

    def _merge(self, extra: _Extra, figures: dict[str, Any]) -> None:
        """Mirror an extra process's cumulative figures: its request figures (plus its
        earlier lives'), its open connections, and its counters' increments since its last
        report."""
        if not figures:
            return  # (it stopped before it started)
        previous = extra.last
        extra.last = figures
        remote = self.metrics.remote[extra.index - 1]
        for label, state in figures["requests"].items():
            stats = remote.get(label)
            if stats is not None:
                stats.load(add_request_states(extra.base_requests.get(label, {}), state))
        self.metrics.remote_connections[extra.index - 1] = figures["connections"]
        self.metrics.add_counters(
            {
                name: _increments(values, previous.get("counters", {}).get(name, {}))
                for name, values in figures["counters"].items()
            }
        )
        if self.shadow is not None:
            self.shadow.add_remote(
                _whole(_increments(figures["shadowed"], previous.get("shadowed", {}))),
                _whole(_increments(figures["dropped"], previous.get("dropped", {}))),
            )

    def _control_changed(self, change: ControlChange) -> None:
        assert self.control is not None
        message = messages.rate(self.control.sample_rate, self.control.enabled)
        for extra in self._extras:
            extra.send(message)

    def _accepting(self) -> list[bool]:
        """Which listeners accept clients now (all of them when no Memcached is watched)."""
        if not self.healths:
            return [True] * len(self.config.backends)
        return [health.ready for health in self.healths]

    def _memcached_changed(self, listener: int, ready: bool) -> None:
        for extra in self._extras:
            extra.send(messages.accept(listener, ready, extra.acked.get(listener, 0)))

    def _memcached_failed(self, extra: _Extra, listener: int, report: int, reason: str) -> None:
        """An extra process's client could not reach this listener's Memcached: it closed
        its listener already. The Memcached is now not ready until a connect says otherwise,
        and the word that it is (or the current state, when nothing changes) acknowledges
        the report, which the extra process waits for before it opens again."""
        extra.acked[listener] = report
        if listener >= len(self.healths):  # no Memcached watched: every listener stays open
            extra.send(messages.accept(listener, True, report))
            return
        health = self.healths[listener]
        was = health.ready
        health.note_failure(f"{reason} (proxy process {extra.index})")
        if not was:  # no change to tell everyone: tell it alone that it is still down
            extra.send(messages.accept(listener, health.ready, report))

    def _feeds_changed(self, addresses: list[str | None]) -> None:
        for extra in self._extras:
            extra.send(messages.feeds(addresses))


def _increments(now: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {
        key: value - before.get(key, 0) for key, value in now.items() if value != before.get(key, 0)
    }


def _plain(counts: Mapping[str, int]) -> dict[str, int]:
    return {str(key): n for key, n in counts.items()}


def _whole(counts: dict[str, float]) -> dict[str, int]:
    return {key: int(value) for key, value in counts.items()}


# -- an extra process ---------------------------------------------------------------------


class _FeedLink(asyncio.Protocol):
    """An extra process's socket to one shadow worker's feed; the worker never answers."""

    def __init__(self, owner: ExtraProcess, shard: int) -> None:
        self.owner = owner
        self.shard = shard
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._feed_lost(self.shard, self)


class _FirstsWord:
    """A listener's Memcached as an extra process knows it (health.MemcachedState): ready
    as the first process last said, not ready at once when a client of ours cannot reach
    it (reported to the first process, whose word from before the report is then stale)."""

    def __init__(self, owner: ExtraProcess, listener: int, ready: bool) -> None:
        self._owner = owner
        self._listener = listener
        self._ready = ready
        self._listeners: list[ReadyListener] = []
        self._reports = 0  # failures reported to the first process

    @property
    def ready(self) -> bool:
        return self._ready

    def add_listener(self, listener: ReadyListener) -> None:
        self._listeners.append(listener)

    def note_success(self) -> None:
        pass  # (the first process says when Memcached is back)

    def note_failure(self, reason: str = "a proxy connection to memcached failed") -> None:
        if not self._ready:
            return  # reported already; clients accepted before our listener closed
        self._reports += 1
        self._set(False)
        self._owner.send(messages.memcached_failed(self._listener, self._reports, reason))

    def told(self, ready: bool, acknowledged: int) -> None:
        """The first process's word: `acknowledged`, the last report of ours it had seen."""
        if ready and acknowledged < self._reports:
            return  # said before it heard of our failure
        self._set(ready)

    def _set(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            for listener in list(self._listeners):
                listener(ready)


class ExtraProcess(ParentLink):
    """An extra proxy process: serves clients on the sockets it was given, feeds the shadow
    workers, obeys the first process (its control socket)."""

    name = "proxy process"
    log = log

    def __init__(self) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[int] = loop.create_future()
        self.config: Config | None = None
        self.metrics: ProxyMetrics | None = None
        self.control = ShadowControl(0.0, False)
        self.handoff: Handoff | None = None
        self.servers: list[Any] = []
        self.index = 0
        self._feeds: list[str | None] = []
        self._feed_links: list[_FeedLink | None] = []
        self._token = ""
        self._fds: list[int] = []
        self._memcached: list[_FirstsWord] = []  # per listener
        self._sampler: KeySampler | None = None
        self.coverage: CoverageAnnouncer | None = None
        self._connecting: dict[int, str] = {}  # shard -> the address being dialled
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.handlers = {
            "start": self._start,
            "rate": self._rate,
            "accept": self._accept,
            "feeds": self._set_feeds,
            "stop": self._told_stop,
        }

    # -- the control socket -------------------------------------------------------------

    def broken(self, exc: WireError) -> None:
        log.error("proxy process: %s from the first process; stopping", exc)
        self._spawn(self._stop(0.0))

    def _start(self, *fields: Any) -> None:
        # What it says applies at once: a rate or feeds message right behind it (in the
        # same read) must not be overwritten by it later.
        try:
            self._configure(*fields)
        except Exception:
            log.exception("proxy process: cannot start")
            self._spawn(self._stop(0.0, code=1))
            raise StopReading from None  # (what came behind it is not for us)
        self._spawn(self._serve_clients())

    def _rate(self, rate: float, enabled: bool) -> None:
        self.control.set_rate(rate, "first process")
        self.control.set_enabled(enabled, "first process")

    def _accept(self, listener: int, ready: bool, acknowledged: int) -> None:
        if listener < len(self._memcached):
            self._memcached[listener].told(ready, acknowledged)

    def _told_stop(self, timeout: float) -> None:
        self._spawn(self._stop(float(timeout)))

    def connection_lost(self, exc: Exception | None) -> None:
        # The first process is gone: drain our clients and end.
        self.transport = None
        timeout = self.config.shutdown_timeout if self.config is not None else 0.0
        self._spawn(self._stop(timeout))

    # -- life cycle -----------------------------------------------------------------------

    def _configure(
        self,
        config_blob: bytes,
        index: int,
        fds: list[int],
        rate: float,
        enabled: bool,
        feeds: list[str | None],
        token: str,
        accepting: list[bool],
    ) -> None:
        from proxy.runtime import configure_logging

        config: Config = pickle.loads(config_blob)
        configure_logging(config.log)
        self.config = config
        self.index = index
        self._fds = fds
        self._memcached = [
            _FirstsWord(self, listener, ready) for listener, ready in enumerate(accepting)
        ]
        self.control.set_rate(rate, "first process")
        self.control.set_enabled(enabled, "first process")
        self.metrics = ProxyMetrics(listeners=[b.label for b in config.backends])
        if config.shadow.redis is not None:
            from proxy.shadow.coverage import CoverageAnnouncer
            from proxy.shadow.handoff import Handoff
            from proxy.shadow.process import MERGE_TICK_INTERVAL
            from proxy.shadow.sampler import KeySampler
            from proxy.shadow.stats import ShadowStats

            self._sampler = KeySampler(self.control)
            self.handoff = Handoff(config.workers, ShadowStats(), self._sampler.sampled)
            self.handoff.linger = MERGE_TICK_INTERVAL  # (sparse sampling: one write per tick)
            self.coverage = CoverageAnnouncer(self.control, self.handoff.coverage)
            self.coverage.attach(self._in_flight)
            self._token = token
            self._feed_links = [None] * config.workers
            self._set_feeds(feeds)
            self._spawn(self._tick())
        self._spawn(self._report())

    async def _serve_clients(self) -> None:
        from proxy.server import ProxyServer

        config, metrics = self.config, self.metrics
        assert config is not None and metrics is not None
        hooks: dict[str, Any] = {}
        if self.handoff is not None and self._sampler is not None:
            hooks = {"capture": self._sampler.decide, "observer": self.handoff.observe}
            await self._feeds_connected(FEED_WAIT)
        try:
            for listener, fd in enumerate(self._fds):
                server = ProxyServer(
                    config,
                    metrics,
                    self._memcached[listener],
                    index=listener,
                    process=self.index,
                    **hooks,
                )
                self.servers.append(server)
                await server.start(sock=socket.socket(fileno=fd))
        except Exception:
            log.exception("proxy process %d: cannot serve", self.index)
            await self._stop(0.0, code=1)
            return
        self.send(messages.extra_ready())

    def _in_flight(self) -> list[deque[Request]]:
        """The requests this process's client sessions await replies to."""
        return [session.pending for server in self.servers for session in server.sessions]

    async def _stop(self, timeout: float, code: int = 0) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self.coverage is not None:
            self.coverage.close()
        # (ticks and reports go on while the clients drain)
        await asyncio.gather(*(server.stop(timeout) for server in self.servers))
        if self.handoff is not None:
            self.handoff.close(goodbye=True)
        self.send(messages.figures(self._figures()))
        for link in self._feed_links:
            if link is not None and link.transport is not None:
                link.transport.close()
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(code)

    async def _report(self) -> None:
        while not self.finished.done():
            await asyncio.sleep(REPORT_INTERVAL)
            self.send(messages.figures(self._figures()))

    def _figures(self) -> dict[str, Any]:
        metrics = self.metrics
        if metrics is None:
            return {}
        handoff = self.handoff
        return {
            "requests": {label: stats.state() for label, stats in metrics.listeners.items()},
            "connections": metrics.connections,
            "counters": metrics.counters(),
            # (plain str keys: marshal refuses the DropReason members the hand-off counts by)
            "shadowed": _plain(handoff.stats.shadowed) if handoff is not None else {},
            "dropped": _plain(handoff.dropped) if handoff is not None else {},
        }

    async def _tick(self) -> None:
        from proxy.shadow.process import MERGE_TICK_INTERVAL

        while self.handoff is not None and not self.handoff.stopping:
            await asyncio.sleep(MERGE_TICK_INTERVAL)
            self.handoff.tick()

    # -- the shadow workers' feeds ----------------------------------------------------------

    def _set_feeds(self, feeds: list[str | None]) -> None:
        old = self._feeds
        self._feeds = list(feeds)
        for shard, address in enumerate(self._feeds):
            if shard >= len(self._feed_links):
                break
            if address != (old[shard] if shard < len(old) else None):
                self._drop_feed(shard)
            if (
                address is not None
                and self._feed_links[shard] is None
                and self._connecting.get(shard) != address
            ):
                self._dial(shard, address)

    def _dial(self, shard: int, address: str) -> None:
        """Connect to a worker's feed, once at a time per shard."""
        self._connecting[shard] = address
        self._spawn(self._connect(shard, address))

    async def _feeds_connected(self, timeout: float) -> None:
        """Wait (bounded) until every running worker's feed is up, so that the first
        clients' sampled requests are not dropped as worker_down."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            address is not None and link is None
            for address, link in zip(self._feeds, self._feed_links, strict=False)
        ):
            await asyncio.sleep(0.01)

    def _drop_feed(self, shard: int) -> None:
        link = self._feed_links[shard]
        self._feed_links[shard] = None
        if self.handoff is not None:
            self.handoff.connect(shard, None)
            if link is not None:  # what it still carried may never arrive anywhere
                self.handoff.lost_all(shard)
        if link is not None and link.transport is not None:
            link.transport.close()

    async def _connect(self, shard: int, address: str) -> None:
        try:
            await self._connect_once(shard, address)
        finally:
            if self._connecting.get(shard) == address:
                del self._connecting[shard]

    async def _connect_once(self, shard: int, address: str) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping and self._feeds[shard] == address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                transport, link = await loop.create_unix_connection(
                    partial(_FeedLink, self, shard), sock=sock
                )
            except OSError as exc:
                sock.close()
                log.debug("proxy process %d: shadow worker %d: %s", self.index, shard, exc)
                await asyncio.sleep(FEED_RETRY)
                continue
            if self._stopping or self._feeds[shard] != address:
                transport.close()
                return
            self._feed_links[shard] = link
            # Nothing observed before this is handed to the worker (connect() is next).
            assert self.coverage is not None
            hello = messages.hello(self._token, time.perf_counter(), self.coverage.announced)
            transport.writelines(encode(hello))
            assert self.handoff is not None
            # fresh=False: the worker runs already; what we dropped meanwhile is told first.
            self.handoff.connect(shard, transport, fresh=False)
            return

    def _feed_lost(self, shard: int, link: _FeedLink) -> None:
        if shard < len(self._feed_links) and self._feed_links[shard] is link:
            self._feed_links[shard] = None
            if self.handoff is not None:
                self.handoff.connect(shard, None)
                self.handoff.lost_all(shard)
            address = self._feeds[shard]
            if address is not None and not self._stopping and shard not in self._connecting:
                self._dial(shard, address)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _serve(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    process = ExtraProcess()
    await asyncio.get_running_loop().create_unix_connection(lambda: process, sock=sock)
    return await process.finished


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m proxy.processes FD (memshadow starts it)", file=sys.stderr)
        return 2
    # Its own process group: the first process, which got the signal, drives its stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_serve(int(args[0])))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ExtraProcess", "ProxyProcesses", "listen_socket"]
