"""A model-based dark launch: hypothesis interleaves the whole command mix, from several
connections at once, with everything an operator and production do to the shadow: pauses,
rate changes, a queue that drops, immediate and delayed flush_all, restarts of either store,
Memcached and Redis evicting. The invariant: no false mismatch, ever, and every divergence
injected on a key in the sample is found with its kind. Both worker modes.

The suite runs a few examples; `MEMSHADOW_MODEL_EXAMPLES=N` runs more (bench/darklaunch.py
has the long campaign).
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pymemcache.client.base import Client

from proxy.redis.layout import pack_value
from tests.integration.hammer import COMMANDS, _one
from tests.integration.test_shadow import mc_call, redis_call
from tests.support import (
    ProxyThread,
    ServerProcess,
    find_divergence,
    memcached_argv,
    mismatch_kinds,
    proxy_config,
    redis_argv,
    totals,
    wait_until,
)

EXAMPLES = int(os.environ.get("MEMSHADOW_MODEL_EXAMPLES", "3"))
STEPS = int(os.environ.get("MEMSHADOW_MODEL_STEPS", "14"))
KEYS = [f"m{i}" for i in range(40)]
CLIENTS = 4


def _burst(port: int, seconds: float, seed: int) -> list[str]:
    """CLIENTS connections running the whole command mix on KEYS (shared and hot) at once."""
    errors: list[str] = []

    def run(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        client = Client(("127.0.0.1", port), default_noreply=False, timeout=10)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                key = rng.choice(KEYS[:8] if rng.random() < 0.3 else KEYS)
                _one(client, rng, rng.choice(COMMANDS), key, KEYS)
        except Exception as exc:  # any client-visible error fails the example
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return errors


def _big(port: int, keys: int, size: int) -> None:
    client = Client(("127.0.0.1", port), default_noreply=False, timeout=10)
    value = os.urandom(size)
    for i in range(keys):
        client.set(f"fill{i}", value, noreply=i % 2 == 0)
    client.get("fill0")  # (the noreply writes are answered before this)
    client.close()


class DarkLaunch(RuleBasedStateMachine):
    """One memshadow in front of a small memcached (-m 8) and a Redis with maxmemory 4mb."""

    mode = "inline"
    memcached: ServerProcess
    redis: ServerProcess

    def __init__(self) -> None:
        super().__init__()
        self.proxy: ProxyThread | None = None
        self.injected: dict[str, int] = {}
        self.rate = 1.0
        self.enabled = True
        self.memcached_full = False
        self.redis_full = False
        self.seed = 0

    @initialize()
    def start(self) -> None:
        mc_call(self.memcached.port, b"flush_all\r\n")
        redis_call(self.redis.port, "FLUSHALL")
        config = proxy_config(self.memcached, self.redis, 1.0, worker=self.mode, queue_size=60)
        self.proxy = ProxyThread(config)
        self.proxy.start()

    def teardown(self) -> None:
        if self.proxy is not None:
            try:
                self.check()
            finally:
                self.proxy.stop()

    # -- what clients do -----------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.2, 0.5, 1.0]))
    def traffic(self, seconds: float) -> None:
        assert self.proxy is not None
        self.seed += 1
        assert _burst(self.proxy.port, seconds, self.seed) == []

    @rule(delay=st.sampled_from([0, 1, 2]), noreply=st.booleans())
    def flush_all(self, delay: int, noreply: bool) -> None:
        assert self.proxy is not None
        line = b"flush_all %d%s\r\nmn\r\n" % (delay, b" noreply" if noreply else b"")
        mc_call(self.proxy.port, line, until=b"MN\r\n")
        self.memcached_full = False
        self.traffic(1.0 + delay)

    @rule()
    def reset_after_expiry(self) -> None:
        """A same-value set again right after the item expired (the issue's hammer)."""
        assert self.proxy is not None
        client = Client(("127.0.0.1", self.proxy.port), default_noreply=False, timeout=10)
        client.set("expiring", b"same", expire=1)
        client.get("expiring")
        time.sleep(1.3)
        client.set("expiring", b"same", expire=2)
        client.get("expiring")
        client.close()

    # -- what the operator does ----------------------------------------------------------

    @rule()
    def pause_and_resume(self) -> None:
        assert self.proxy is not None
        self._control(lambda c: c.set_enabled(False, "model"))
        self.traffic(0.5)
        self._control(lambda c: c.set_enabled(True, "model"))

    @rule(rate=st.sampled_from([0.05, 0.25, 0.5, 1.0]))
    def set_rate(self, rate: float) -> None:
        self._control(lambda c: c.set_rate(rate, "model"))
        self.rate = rate

    # -- what production does ----------------------------------------------------------------

    @rule()
    def restart_memcached(self) -> None:
        self.memcached.restart()
        self.memcached_full = False
        self.traffic(0.5)
        self._healthy()

    @rule()
    def restart_redis(self) -> None:
        self.redis.restart()
        self.redis_full = False
        self.traffic(0.5)
        self._healthy()

    @rule()
    def memcached_evicts(self) -> None:
        assert self.proxy is not None
        _big(self.proxy.port, 150, 80_000)  # 12 MB into 8 MB
        self.memcached_full = True
        self.traffic(0.5)

    @rule()
    def redis_evicts(self) -> None:
        assert self.proxy is not None
        _big(self.proxy.port, 80, 80_000)  # 6.4 MB into 4 MB
        self.redis_full = True
        self.traffic(0.5)

    # -- a real divergence must still be found ---------------------------------------------

    @precondition(lambda self: not self.redis_full and not self.memcached_full)
    @rule(kind=st.sampled_from(["missing_in_redis", "value", "flags"]))
    def inject(self, kind: str) -> None:
        """On a key in the sample, defined now: Redis diverges; the next read finds it."""
        assert self.proxy is not None
        if self.rate < 1.0:
            self.set_rate(1.0)
        client = Client(("127.0.0.1", self.proxy.port), default_noreply=False, timeout=10)

        def establish(key: str) -> None:
            client.set(key, b"profile", flags=3)
            assert client.get(key) == b"profile"

        def diverge(key: str) -> None:
            if kind == "missing_in_redis":
                redis_call(self.redis.port, "DEL", key)
            elif kind == "value":
                redis_call(self.redis.port, "SET", key, pack_value(3, 1, b"other"))
            else:
                redis_call(self.redis.port, "SET", key, pack_value(99, 1, b"profile"))

        name = f"injected{len(self.injected)}-{self.seed}"
        find_divergence(self.proxy, name, kind, establish, diverge, client.get)
        client.close()
        self.injected[kind] = self.injected.get(kind, 0) + 1
        self.check()

    # -- helpers -----------------------------------------------------------------------------

    def _control(self, action: Any) -> None:
        proxy = self.proxy
        assert proxy is not None
        shadow = proxy.shadow
        proxy.call(lambda: action(shadow.control))
        wait_until(
            lambda: proxy.call(lambda: shadow.coverage.announced == shadow.control.threshold),
            what="the sample announced",
        )

    def _healthy(self) -> None:
        """Wait until the shadow judges again (after a restart: once it has seen it)."""
        proxy = self.proxy
        assert proxy is not None
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=10)

        def matches() -> int:
            return int(proxy.call(lambda: totals(proxy).get("match", 0)))

        sampled = proxy.shadow.sampler.sampled
        probe = next(f"probe{i}" for i in range(10_000) if sampled(f"probe{i}".encode()))

        def judged() -> bool:
            before = matches()
            client.set(probe, b"p")
            client.get(probe)
            proxy.settle(60)
            return matches() >= before + 2

        wait_until(judged, 60, "the shadow judging again")
        client.close()

    def _mismatches(self) -> dict[str, int]:
        proxy = self.proxy
        assert proxy is not None
        kinds: dict[str, int] = {}
        for name, n in proxy.call(lambda: mismatch_kinds(proxy)).items():
            kinds[name] = kinds.get(name, 0) + n
        return kinds

    def check(self) -> None:
        """No mismatch but the injected ones."""
        assert self.proxy is not None
        self.proxy.settle(120)
        assert self._mismatches() == self.injected


@pytest.fixture(params=["process", "inline"])
def worker_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_no_false_mismatch_through_a_dark_launch(worker_mode: str) -> None:
    memcached = ServerProcess(memcached_argv("-m", "8")).start()
    redis = ServerProcess(
        redis_argv("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    ).start()
    try:

        class Machine(DarkLaunch):
            pass

        Machine.mode = worker_mode
        Machine.memcached = memcached
        Machine.redis = redis
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=os.environ.get("MEMSHADOW_MODEL_RANDOM") is None,
                database=None,
            ),
        )
    finally:
        memcached.stop()
        redis.stop()
