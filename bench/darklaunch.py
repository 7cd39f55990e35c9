"""Dark-launch campaign (issue 21): the operator's actions and the stores' faults of a real
dark launch, each scenario in both worker modes, with the shadow's verdicts counted per run.

    python bench/darklaunch.py                                # every scenario, both modes
    python bench/darklaunch.py pause_resume injected --modes inline
    python bench/darklaunch.py pause_resume --pause 20 --seconds 45   # the issue's timing
    python bench/darklaunch.py --list

Each (scenario, mode) run has its own memcached and redis-server (tests.support) and an
in-process memshadow (ProxyThread, shadow.worker: process or inline, rate 1.0 unless the
scenario says otherwise); the load is the verdict hammer (tests/integration/hammer.py), whose
client errors are counted and survived (the connection reconnects). Every run ends with all
the shadow's verdicts in (ProxyThread.settle) before its figures are taken. Figures per phase
(between two operator actions) are read live, so in process mode they lag the worker's stats
report by up to about a second; the row's totals do not.

Scenarios (`--list`): pause_resume, operator_hammer, memcached_evicting, redis_evicting,
memcached_restarts (two rows: with the restarts, then the same clients with no fault),
injected. A benchmark, not a test: it asserts nothing. It prints one table row per scenario
and mode, the phases of each run, and writes the raw figures as JSON and every process's log
under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hiredis  # noqa: E402
from pymemcache.client.base import Client  # noqa: E402

from proxy.redis.layout import pack_value  # noqa: E402
from tests.integration.hammer import Hammer, Mix, figures, full_mix  # noqa: E402
from tests.support import (  # noqa: E402
    ProxyThread,
    RawClient,
    ServerProcess,
    memcached_argv,
    proxy_config,
    redis_argv,
)

MODES = ("process", "inline")
SETTLE_TIMEOUT = 300.0
Figures = dict[str, Any]


# -- direct access to the stores (bypassing the proxy) ------------------------------------


def redis_call(port: int, *args: bytes | str | int) -> Any:
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(payload)
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            reader.feed(sock.recv(1 << 20))
        return reply


def redis_info(port: int, field_name: str) -> int:
    info = redis_call(port, "INFO", "stats").decode()
    for line in info.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split(":", 1)[1])
    return -1


def memcached_call(port: int, payload: bytes, until: bytes = b"\r\n") -> bytes:
    client = RawClient(port)
    try:
        client.send(payload)
        return client.read_until(until, 10)
    finally:
        client.close()


def read_replies(client: RawClient, end: bytes, count: int, timeout: float = 10.0) -> bytes:
    """What the client receives until `end` has come `count` times."""
    out = b""
    while out.count(end) < count:
        out += client.read_until(end, timeout)
    return out


def memcached_stat(port: int, name: str) -> int:
    for line in memcached_call(port, b"stats\r\n", b"END\r\n").split(b"\r\n"):
        words = line.split()
        if len(words) == 3 and words[0] == b"STAT" and words[1] == name.encode():
            return int(words[2])
    return -1


# -- one run: servers, memshadow, phases --------------------------------------------------


def _delta(after: Figures, before: Figures) -> Figures:
    out: Figures = {}
    for name, value in after.items():
        old = before.get(name)
        if isinstance(value, dict):
            old = old or {}
            out[name] = {k: v - old.get(k, 0) for k, v in value.items() if v - old.get(k, 0)}
        else:
            out[name] = value - (old or 0)
    return out


def tolerant(mix: Mix, errors: list[str]) -> Mix:
    """The mix, with a client error counted (by type) instead of ending the connection:
    pymemcache reconnects on the next operation."""

    def run(client: Client, rng: Any, key: str, keys: list[str]) -> None:
        try:
            mix(client, rng, key, keys)
        except Exception as exc:  # a restart, memcached out of memory: counted, survived
            errors.append(type(exc).__name__)
            time.sleep(0.05)

    return run


class Run:
    """One scenario in one worker mode: its own memcached, redis-server and memshadow; the
    figures of each phase between two actions."""

    def __init__(
        self,
        mode: str,
        memcached: tuple[str, ...] = (),
        redis: tuple[str, ...] = (),
        rate: float = 1.0,
        **shadow: Any,
    ) -> None:
        self.mode = mode
        self.memcached = ServerProcess(memcached_argv(*memcached))
        self.redis = ServerProcess(redis_argv(*redis))
        self._rate = rate
        self._shadow = shadow
        self.proxy: ProxyThread
        self.phases: list[Figures] = []
        self.client_errors: list[str] = []
        self.operations = 0
        self.notes: dict[str, Any] = {}
        self._label = "start"
        self._mark: Figures = {}
        self._since = time.monotonic()

    def __enter__(self) -> Run:
        try:
            self.memcached.start()
            self.redis.start()
            config = proxy_config(
                self.memcached, self.redis, self._rate, worker=self.mode, **self._shadow
            )
            self.proxy = ProxyThread(config)
            self.proxy.start()
        except BaseException:
            self.memcached.stop()
            self.redis.stop()
            raise
        self._mark = self.figures()
        self._since = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.proxy.stop()
        finally:
            self.memcached.stop()
            self.redis.stop()

    @property
    def port(self) -> int:
        return self.proxy.port

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self.proxy.run(call, 60.0)

    def figures(self) -> Figures:
        """The shadow's figures now (tests.integration.hammer.figures, plus errors)."""
        proxy = self.proxy
        return self.on_loop(lambda: {**figures(proxy), "errors": dict(proxy.shadow.stats.errors)})

    def settle(self) -> None:
        self.proxy.settle(SETTLE_TIMEOUT)

    def set_enabled(self, enabled: bool, source: str = "api") -> None:
        self.on_loop(lambda: self.proxy.shadow.control.set_enabled(enabled, source))
        self.announced()

    def set_rate(self, rate: float, source: str = "api") -> None:
        self.on_loop(lambda: self.proxy.shadow.control.set_rate(rate, source))
        self.announced()

    def announced(self) -> None:
        """Wait until the shadow knows the sample it sees every request of (a rise counts
        once the requests in flight under the old rate are answered: keys defined before
        that cannot be established, so a divergence injected on them would not be found)."""
        shadow = self.proxy.shadow
        coverage = getattr(shadow, "coverage", None)
        if coverage is None:  # (a memshadow from before the announcements)
            return
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.on_loop(lambda: coverage.announced == shadow.control.threshold):
                return
            time.sleep(0.01)

    def phase(self, label: str, action: Callable[[], object] | None = None) -> None:
        """Close the current phase (its figures: what changed since it began) and begin
        `label`, running `action` first."""
        now = self.figures()
        delta = _delta(now, self._mark)
        seconds = round(time.monotonic() - self._since, 1)
        self.phases.append({"phase": self._label, "seconds": seconds, **delta})
        self._mark, self._label, self._since = now, label, time.monotonic()
        if action is not None:
            action()

    def hammer(
        self,
        connections: int,
        seconds: float = 3600.0,
        own_keys: int = 20,
        shared: list[str] | None = None,
        prefix: str = "h",
        mix: Mix = full_mix,
    ) -> Hammer:
        """The verdict hammer through memshadow, client errors survived (stop() it)."""
        return Hammer(
            self.port, connections, seconds, own_keys, shared, prefix,
            mix=tolerant(mix, self.client_errors),
        )  # fmt: skip

    def finish(self, hammer: Hammer) -> None:
        hammer.stop()
        hammer.join()
        self.operations += hammer.result.operations
        self.client_errors += hammer.result.errors


@dataclass
class Row:
    scenario: str
    mode: str
    figures: Figures
    injected: tuple[int, int] | None = None  # found with the right kind, injected
    phases: list[Figures] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def row(scenario: str, run: Run, **notes: Any) -> Row:
    """The run's totals (its verdicts all in: call after settle)."""
    notes = {**run.notes, **notes}
    notes.setdefault("client_operations", run.operations)
    notes.setdefault("client_errors", dict(Counter(run.client_errors)))
    return Row(scenario, run.mode, run.figures(), phases=list(run.phases), notes=notes)


def read_every_key(port: int, keys: list[str]) -> None:
    client = Client(("127.0.0.1", port), timeout=15)
    try:
        for i in range(0, len(keys), 20):
            client.get_many(keys[i : i + 20])
    finally:
        client.close()


def incr_every_key(port: int, keys: list[str]) -> None:
    client = Client(("127.0.0.1", port), timeout=15)
    try:
        for key in keys:
            client.incr(key, 1)
    finally:
        client.close()


HOT = [f"hot{i}" for i in range(6)]


# -- 1. pause and resume, halt and clear, rate down and up --------------------------------


def pause_resume(mode: str, args: argparse.Namespace) -> list[Row]:
    """A ramp 0.01 -> 1.0 under N clients, then the kill switch off for --pause s and on
    again, a halt (off, source halt:mismatches) and its clear, the rate lowered to 0.25 and
    0.05 for --pause/2 s each and raised back to 1.0; --seconds of load after each action."""
    seconds = args.seconds or 15.0
    with Run(mode, rate=0.01) as run:
        hammer = run.hammer(args.connections or 16, own_keys=20, shared=HOT)
        step = max(2.0, seconds / 5)
        for rate in (0.01, 0.05, 0.25, 1.0):
            run.phase(f"ramp {rate}", lambda rate=rate: run.set_rate(rate, "ramp"))
            time.sleep(step)
        time.sleep(seconds)
        run.phase("disabled", lambda: run.set_enabled(False))
        time.sleep(args.pause)
        run.phase("enabled again", lambda: run.set_enabled(True))
        time.sleep(seconds)
        run.phase("halted", lambda: run.set_enabled(False, "halt:mismatches"))
        time.sleep(args.pause)
        run.phase("halt cleared", lambda: run.set_enabled(True, "api"))
        time.sleep(seconds)
        for low in (0.25, 0.05):
            run.phase(f"rate {low}", lambda low=low: run.set_rate(low))
            time.sleep(args.pause / 2)
            run.phase(f"rate {low} -> 1.0", lambda: run.set_rate(1.0))
            time.sleep(seconds)
        run.finish(hammer)
        run.settle()
        run.phase("end")
        return [row("pause_resume", run)]


# -- 2. the operator's own actions on a small queue, then the causes' reproductions ---------

OTHER = [b"get other%d\r\n" % i for i in range(500)]
OTHER_GETS = b"".join(OTHER)
"""500 gets of other keys, sent with a request in one write: a small queue overflows."""


def repro_dropped_fresh_write(run: Run, keys: int = 5) -> None:
    """Cause 1: `set K`, 60 gets, `incr K 5`, 440 gets in one write: the incr is dropped
    while K's set is still queued (K has no state yet); 3 s later `incr K 1`. (The incr
    comes early in the write: its replies may reach the shadow in more than one chunk, and
    the queue drains in between.)"""
    raw = RawClient(run.port)
    try:
        names = [b"fresh%d" % i for i in range(keys)]
        for key in names:
            head, tail = b"".join(OTHER[:60]), b"".join(OTHER[60:])
            raw.send(b"set %s 0 0 1\r\n5\r\n%sincr %s 5\r\n%s" % (key, head, key, tail))
            raw.read_until(b"END\r\n" * 440, 30)
            run.settle()
        time.sleep(3.0)
        for key in names:
            raw.send(b"incr %s 1\r\n" % key)
            raw.read_until(b"\r\n", 10)
    finally:
        raw.close()
    run.settle()


def _in_step(run: Run, keys: list[str], expire: int = 0, value: bytes = b"v") -> Client:
    """Keys set and read through the proxy (each with a verdict: known in step), a few at
    a time so that the small queue never overflows."""
    client = Client(("127.0.0.1", run.port), timeout=15)
    for i, key in enumerate(keys):
        client.set(key, value, expire=expire)
        client.get(key)
        if i % 4 == 3:
            run.settle()
    run.settle()
    return client


def repro_dropped_flush_all(run: Run) -> None:
    """Cause 2: 20 keys in step, then 500 gets and a flush_all in one write (the flush_all
    is dropped), then (the queue drained) a read of the 20 keys."""
    keys = [f"flushed{i}" for i in range(20)]
    client = _in_step(run, keys)
    raw = RawClient(run.port)
    try:
        raw.send(OTHER_GETS + b"flush_all\r\n")
        raw.read_until(b"OK\r\n", 30)
    finally:
        raw.close()
    run.settle()
    for i, key in enumerate(keys):
        client.get(key)
        if i % 4 == 3:
            run.settle()
    client.close()
    run.settle()


def repro_delayed_flush_all(run: Run) -> None:
    """Cause 3: 10 keys in step, `flush_all 2`, key i read once at 0.15 * (i + 1) s (the
    memcached 1.6 here applies it 0-1 s after the command, at its clock tick), then every
    key at 3 s. One read per key in the window: a key's chain held by a verdict's re-read
    (about race_window) would otherwise overflow the small queue."""
    keys = [f"delayed{i}" for i in range(10)]
    client = _in_step(run, keys)
    client.flush_all(delay=2)
    started = time.monotonic()
    for i, key in enumerate(keys):
        time.sleep(max(0.0, started + 0.15 * (i + 1) - time.monotonic()))
        client.get(key)
    time.sleep(max(0.0, started + 3.0 - time.monotonic()))
    for key in keys:
        client.get(key)
    client.close()
    run.settle()


def repro_same_value_reset(run: Run) -> None:
    """Cause 4: 8 keys set with a 2 s TTL and read; as soon as memcached has expired them
    while Redis still holds them, a get and a set of the same value with no TTL of each (one
    write: 16 requests, within the small queue); 3 s later a get.

    Redis expires them at a whole second of the wall clock (the set's second + 2), memcached
    at its second clock tick after the set, whose phase within the second is its process's:
    set just after a wall-clock second, memcached expires them (1 - phase) s before Redis.
    A memcached whose phase leaves less than 0.15 s is restarted (a new phase) and the
    attempt made again."""
    raw = RawClient(run.port)
    restarts = 0
    try:
        for attempt in range(6):
            time.sleep(1.02 - time.time() % 1.0)  # just after a wall-clock second
            keys = [b"reset%d-%d" % (attempt, i) for i in range(8)]
            raw.send(b"".join(b"set %s 0 2 4\r\nsame\r\n" % k for k in keys))
            read_replies(raw, b"STORED\r\n", len(keys))
            raw.send(b"".join(b"get %s\r\n" % k for k in keys))
            read_replies(raw, b"END\r\n", len(keys))
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if memcached_call(run.memcached.port, b"mg %s\r\n" % keys[0]) == b"EN\r\n":
                    break
                time.sleep(0.005)
            if redis_call(run.redis.port, "PTTL", keys[-1]) > 150:
                break  # memcached expired them first: the window is open
            raw.close()
            seen = run.figures()["dropped"].get("memcached_restart", 0)
            run.memcached.restart()
            restarts += 1
            deadline = time.monotonic() + 30.0  # until the shadow has seen the restart
            while time.monotonic() < deadline:
                if run.figures()["dropped"].get("memcached_restart", 0) > seen:
                    break
                time.sleep(0.1)
            time.sleep(1.5)  # (dispatcher.RESTART_SETTLE: every key turns cold again)
            run.settle()
            raw = RawClient(run.port)
        run.notes["cause 4 memcached restarts"] = restarts
        raw.send(b"".join(b"get %s\r\nset %s 0 0 4\r\nsame\r\n" % (k, k) for k in keys))
        read_replies(raw, b"STORED\r\n", len(keys))
        time.sleep(3.0)
        for key in keys:
            raw.send(b"get %s\r\n" % key)
            raw.read_until(b"END\r\n", 10)
    finally:
        raw.close()
    run.settle()


def operator_hammer(mode: str, args: argparse.Namespace) -> list[Row]:
    """8 clients over 300 shared keys, shadow.queue_size --queue-size: --seconds at 1.0,
    paused, resumed, rate 0.25, rate 1.0; then the reproductions of causes 1-4."""
    seconds = args.seconds or 5.0
    with Run(mode, queue_size=args.queue_size) as run:
        keys = [f"op{i}" for i in range(300)]
        hammer = run.hammer(args.connections or 8, own_keys=0, shared=keys)
        time.sleep(seconds)
        run.phase("paused", lambda: run.set_enabled(False))
        time.sleep(seconds)
        run.phase("resumed", lambda: run.set_enabled(True))
        time.sleep(seconds)
        run.phase("rate 0.25", lambda: run.set_rate(0.25))
        time.sleep(seconds)
        run.phase("rate 1.0", lambda: run.set_rate(1.0))
        time.sleep(seconds)
        run.finish(hammer)
        run.settle()
        run.phase(
            "cause 1: dropped fresh-key write (5 keys)", lambda: repro_dropped_fresh_write(run)
        )
        run.phase("cause 2: dropped flush_all (20 keys)", lambda: repro_dropped_flush_all(run))
        run.phase("cause 3: flush_all 2 (10 keys)", lambda: repro_delayed_flush_all(run))
        run.phase(
            "cause 4: same-value re-set after expiry (8 keys)", lambda: repro_same_value_reset(run)
        )
        run.phase("end")
        return [row("operator_hammer", run)]


# -- 3, 4. evictions -----------------------------------------------------------------------


def writers_mix(counters: bool) -> Mix:
    """Values of 10-100 KB: replied and noreply sets, add, touch, get; with counters, also
    `ma N` (autovivify) and incr on the key's counter (KEY:n)."""

    def mix(client: Client, rng: Any, key: str, keys: list[str]) -> None:
        if counters and rng.random() < 0.2:
            counter = (key + ":n").encode()
            if rng.random() < 0.6:
                delta = rng.randrange(1, 100)
                line = b"ma %s N0 J%d D%d v\r\nmn" % (counter, rng.randrange(1000), delta)
                client.raw_command(line, b"MN\r\n")
            else:
                client.incr(counter.decode(), rng.randrange(1, 100))
            return
        value = rng.randbytes(rng.randrange(10_000, 100_001))
        r = rng.random()
        if r < 0.45:
            client.set(key, value, flags=rng.randrange(1 << 16))
        elif r < 0.70:
            client.set(key, value, noreply=True)
        elif r < 0.80:
            client.add(key, value)
        elif r < 0.90:
            client.touch(key, rng.choice((0, 3600)))
        else:
            client.get(key)

    return mix


def _evicting(name: str, mode: str, args: argparse.Namespace, redis_side: bool) -> list[Row]:
    seconds = args.seconds or 20.0
    memcached = ("-m", "1024") if redis_side else ("-m", "8")
    redis = ("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru") if redis_side else ()
    with Run(mode, memcached=memcached, redis=redis) as run:
        hammer = run.hammer(
            args.connections or 16, own_keys=100, prefix="w", mix=writers_mix(redis_side)
        )
        time.sleep(seconds)
        run.finish(hammer)
        run.phase(f"wait {args.wait:g} s")
        time.sleep(args.wait)
        keys = list(hammer.keys)
        if redis_side:
            keys += [key + ":n" for key in hammer.keys]
        run.phase("read every key", lambda: read_every_key(run.port, keys))
        run.settle()
        if redis_side:  # a counter Redis evicted, then `ma N` made anew, differs here
            counters = [key + ":n" for key in hammer.keys]
            run.phase("incr every counter", lambda: incr_every_key(run.port, counters))
            run.settle()
        run.phase("end")
        return [
            row(
                name,
                run,
                memcached_evictions=memcached_stat(run.memcached.port, "evictions"),
                redis_evicted_keys=redis_info(run.redis.port, "evicted_keys"),
            )
        ]


def memcached_evicting(mode: str, args: argparse.Namespace) -> list[Row]:
    """memcached -m 8, 16 writers of 10-100 KB values for --seconds, a read of every key
    --wait s after they stop."""
    return _evicting("memcached_evicting", mode, args, redis_side=False)


def redis_evicting(mode: str, args: argparse.Namespace) -> list[Row]:
    """redis-server --maxmemory 2mb allkeys-lru (memcached -m 1024: it evicts nothing), the
    same writers plus `ma N` and incr on counters, a read of every key --wait s later, then
    an incr of every counter."""
    return _evicting("redis_evicting", mode, args, redis_side=True)


# -- 5. memcached restarts -------------------------------------------------------------------


def memcached_restarts(mode: str, args: argparse.Namespace) -> list[Row]:
    """64 clients for --seconds with memcached killed and restarted 3 times, --seconds/4
    apart; then the same 64 clients for --seconds with no fault (a row of its own)."""
    seconds = args.seconds or 16.0
    connections = args.connections or 64
    with Run(mode) as run:
        hammer = run.hammer(connections, own_keys=10, shared=HOT)
        for i in range(3):
            time.sleep(seconds / 4)
            run.phase(f"restart {i + 1}", run.memcached.restart)
        time.sleep(seconds / 4)
        run.finish(hammer)
        run.settle()
        run.phase("no fault")
        faults = row("memcached_restarts", run)
        before, operations, errors = faults.figures, run.operations, len(run.client_errors)
        hammer = run.hammer(connections, own_keys=10, shared=HOT)
        time.sleep(seconds)
        run.finish(hammer)
        run.settle()
        run.phase("end")
        clean = Row(
            "memcached_restarts/no_fault",
            mode,
            _delta(run.figures(), before),
            phases=run.phases[-1:],
            notes={
                "client_operations": run.operations - operations,
                "client_errors": dict(Counter(run.client_errors[errors:])),
            },
        )
        return [faults, clean]


# -- 6. divergences injected right after each operator action ------------------------------


@dataclass
class Injector:
    """Divergences made on keys defined after an action; each is looked for among the
    mismatch examples (by its key's hash), with the kind it should have."""

    run: Run
    client: Client
    outcomes: list[dict[str, Any]] = field(default_factory=list)

    def define(self, key: str, value: bytes, expire: int = 0) -> None:
        self.client.set(key, value, flags=3, expire=expire)
        self.client.get(key)  # a verdict: the key is known to be in step
        time.sleep(0.3)

    def kinds_of(self, key: str) -> list[str]:
        examples = self.run.proxy.shadow.examples
        digest = examples.hash(key.encode())

        def look() -> list[str]:
            stats = self.run.proxy.shadow.stats
            return [
                example.kind
                for kind in {kind for _, kind in stats.mismatches}
                for example in examples.examples(kind)
                if example.key == digest
            ]

        return self.run.on_loop(look)

    def await_verdict(self, point: str, name: str, key: str, kind: str) -> None:
        started = time.monotonic()
        kinds: list[str] = []
        while time.monotonic() - started < 15.0 and not kinds:
            time.sleep(0.1)
            kinds = self.kinds_of(key)
        found = "right kind" if kind in kinds else (f"as {kinds}" if kinds else "not found")
        self.outcomes.append(
            {"point": point, "divergence": name, "kind": kind, "found": found,
             "seconds": round(time.monotonic() - started, 2)}
        )  # fmt: skip

    def inject(self, point: str) -> None:
        """The five divergences of test_verdicts.py's injected-under-load test."""
        mc, rd = self.run.memcached.port, self.run.redis.port
        tag = point.replace(" ", "_")
        ttl_key = f"inj-{tag}-ttl"
        self.define(ttl_key, b"profile", expire=2)
        redis_call(rd, "PERSIST", ttl_key)
        ttl_defined = time.monotonic()
        cases: list[tuple[str, str, bytes, Callable[[str], object], Callable[[str], object]]] = [
            (
                "value changed in memcached", "value", b"profile",
                lambda k: memcached_call(mc, b"set %s 3 0 5\r\nother\r\n" % k.encode()),
                self.client.get,
            ),
            (
                "key deleted in redis", "missing_in_redis", b"profile",
                lambda k: redis_call(rd, "DEL", k), self.client.get,
            ),
            (
                "flags changed in redis", "flags", b"profile",
                lambda k: redis_call(rd, "SET", k, pack_value(99, 1, b"profile")),
                self.client.get,
            ),
            (
                "counter changed in redis", "value", b"100",
                lambda k: redis_call(rd, "SET", k, pack_value(3, 1, b"500")),
                lambda k: self.client.incr(k, 1),
            ),
        ]  # fmt: skip
        for i, (name, kind, value, make, trigger) in enumerate(cases):
            key = f"inj-{tag}-{i}"
            self.define(key, value)
            make(key)
            trigger(key)
            self.await_verdict(point, name, key, kind)
        # A TTL removed in Redis: once memcached has expired the key (and the expiry
        # tolerance has passed), Redis still serving it is a divergence.
        time.sleep(max(0.0, ttl_defined + 5.0 - time.monotonic()))
        self.client.get(ttl_key)
        self.await_verdict(point, "TTL removed in redis", ttl_key, "unexpected_in_redis")


def injected(mode: str, args: argparse.Namespace) -> list[Row]:
    """The hammer (N clients) at 1.0 with five divergences injected at each point: under
    clean load, right after the kill switch is turned back on, after a halt is cleared,
    after the rate is raised back from 0.25 and from 0.05 (off/low for --pause s)."""
    with Run(mode, examples_per_kind=100_000) as run:
        hammer = run.hammer(args.connections or 16, own_keys=10, shared=HOT)
        client = Client(("127.0.0.1", run.port), default_noreply=False, timeout=15)
        injector = Injector(run, client)
        time.sleep(2.0)
        run.phase("clean load: injected", lambda: injector.inject("clean"))
        run.phase("disabled", lambda: run.set_enabled(False))
        time.sleep(args.pause)
        run.phase("enabled again: injected", lambda: run.set_enabled(True))
        injector.inject("after resume")
        run.phase("halted", lambda: run.set_enabled(False, "halt:mismatches"))
        time.sleep(args.pause)
        run.phase("halt cleared: injected", lambda: run.set_enabled(True, "api"))
        injector.inject("after halt clear")
        for low in (0.25, 0.05):
            run.phase(f"rate {low}", lambda low=low: run.set_rate(low))
            time.sleep(args.pause / 2)
            run.phase(f"rate {low} -> 1.0: injected", lambda: run.set_rate(1.0))
            injector.inject(f"after {low} -> 1.0")
        run.finish(hammer)
        client.close()
        run.settle()
        run.phase("end")
        result = row("injected", run, injections=injector.outcomes)
        found = sum(1 for o in injector.outcomes if o["found"] == "right kind")
        result.injected = (found, len(injector.outcomes))
        return [result]


SCENARIOS: dict[str, Callable[[str, argparse.Namespace], list[Row]]] = {
    "pause_resume": pause_resume,
    "operator_hammer": operator_hammer,
    "memcached_evicting": memcached_evicting,
    "redis_evicting": redis_evicting,
    "memcached_restarts": memcached_restarts,
    "injected": injected,
}


# -- report ------------------------------------------------------------------------------


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


HEADER = (
    "| scenario | mode | comparisons | matches | mismatches | mismatches by command:kind "
    "| noise by reason | drops by reason | errors by kind | injected found/injected |\n"
    "|---|---|---:|---:|---:|---|---|---|---|---:|"
)


def table_row(r: Row) -> str:
    f = r.figures
    outcomes = f.get("outcomes", {})
    injected = f"{r.injected[0]}/{r.injected[1]}" if r.injected else "-"
    return (
        f"| {r.scenario} | {r.mode} | {f.get('comparisons', 0)} | {outcomes.get('match', 0)} "
        f"| {outcomes.get('mismatch', 0)} | {_counts(f.get('mismatches', {}))} "
        f"| {_counts(f.get('noise', {}))} | {_counts(f.get('dropped', {}))} "
        f"| {_counts(f.get('errors', {}))} | {injected} |"
    )


def details(r: Row) -> str:
    lines = [f"{r.scenario} ({r.mode})"]
    for p in r.phases:
        mismatches = p.get("outcomes", {}).get("mismatch", 0)
        lines.append(
            f"  {p['phase']} [{p['seconds']} s]: comparisons {p.get('comparisons', 0)}, "
            f"mismatches {mismatches} ({_counts(p.get('mismatches', {}))}), "
            f"noise {_counts(p.get('noise', {}))}, drops {_counts(p.get('dropped', {}))}"
        )
    for name, value in r.notes.items():
        if name == "injections":
            for o in value:
                lines.append(
                    f"  injected {o['point']}: {o['divergence']} ({o['kind']}): {o['found']}"
                )
        else:
            lines.append(f"  {name}: {value}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--modes", default=",".join(MODES), help="process,inline")
    parser.add_argument("--seconds", type=float, help="load per phase (scenario's default)")
    parser.add_argument("--connections", type=int, help="clients (scenario's default)")
    parser.add_argument("--pause", type=float, default=10.0, help="shadow off (s)")
    parser.add_argument("--wait", type=float, default=12.0, help="evictions: wait to read")
    parser.add_argument("--queue-size", type=int, default=20, help="operator_hammer's queue")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.list:
        for name, fn in SCENARIOS.items():
            print(f"{name}: {' '.join((fn.__doc__ or '').split())}")
        return 0
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    modes = args.modes.split(",")
    if unknown or not set(modes) <= set(MODES):
        parser.error(f"unknown scenario or mode: {unknown or modes}; see --list")
    names = args.scenarios or list(SCENARIOS)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = args.out / f"darklaunch-{stamp}.log"
    # Every process's log (the proxy's, the shadow workers') goes to the log file.
    log_file = open(log_path, "a")  # noqa: SIM115  (open for the whole run)
    os.dup2(log_file.fileno(), 2)
    sys.stderr = log_file
    started = time.monotonic()
    print(f"memshadow dark-launch campaign: {', '.join(names)}; modes {', '.join(modes)}")
    print(f"log: {log_path}", flush=True)
    rows: list[Row] = []
    for name in names:
        for mode in modes:
            began = time.monotonic()
            try:
                new = SCENARIOS[name](mode, args)
            except Exception:
                print(f"{name} ({mode}) failed:\n{traceback.format_exc()}", flush=True)
                continue
            for r in new:
                r.notes["run_seconds"] = round(time.monotonic() - began, 1)
                print(details(r), flush=True)
            rows += new
    print(f"\n{HEADER}")
    for r in rows:
        print(table_row(r))
    path = args.out / f"darklaunch-{stamp}.json"
    path.write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s; figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
