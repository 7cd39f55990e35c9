"""The ramp, a halt and the report driven by real traffic: pymemcache through memshadow with
real memcached and redis-server, the shadow comparing, and the autopilot ticked by hand with a
test clock (so nothing depends on timing).

Needs the whole shadow (proxy.shadow.service and what it imports); skipped until it is all in
the tree.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client

from proxy.address import HostPort
from proxy.admin import AdminServer
from proxy.config import (
    GuardsConfig,
    LatencyGuardConfig,
    MismatchRuleConfig,
    RampConfig,
)
from proxy.ops.operations import Operations, redis_info_from
from tests.ops.http import call_sync
from tests.ops.support import Clock
from tests.support import ProxyThread, RawClient, ServerProcess, proxy_config


def shadow_available() -> bool:
    try:
        importlib.import_module("proxy.shadow.service")
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not shadow_available(), reason="the shadow (proxy.shadow.service) is not complete yet"
)

RAMP = RampConfig(steps=(0.25, 1.0), hold=60.0, mismatch_target=0.05, min_comparisons=20)
GUARDS = GuardsConfig(
    interval=3600.0,  # ticked by hand
    mismatch=MismatchRuleConfig(window=3600.0, min_count=50, threshold=0.05, action="stop"),
    latency=LatencyGuardConfig(enabled=False),  # wall-clock latency has no place in a test
)
KEYS = [f"user:{i}" for i in range(400)]


class Stack:
    """memshadow with its shadow, plus the operator pieces on the admin port."""

    def __init__(self, memcached: ServerProcess, redis: ServerProcess) -> None:
        config = proxy_config(memcached, redis, 0.25)
        config = dataclasses.replace(
            config, shadow=dataclasses.replace(config.shadow, ramp=RAMP, guards=GUARDS)
        )
        self.config = config
        self.clock = Clock()
        self.proxy = ProxyThread(config)
        self.proxy.start()

        async def install() -> tuple[AdminServer, Operations]:
            shadow = self.proxy.shadow
            admin = AdminServer(HostPort("127.0.0.1", 0), self.proxy.metrics, ready=lambda: True)
            ops = Operations(
                config,
                admin=admin,
                control=shadow.control,
                stats=shadow.stats,
                metrics=self.proxy.metrics,
                redis_info=redis_info_from(shadow.redis_primaries),
                environ={},
                clock=self.clock,
                handle_sighup=False,
            )
            await admin.start()
            return admin, ops

        self.admin, self.ops = self.proxy.run(install)
        self.port = self.admin.address[1]

    def tick(self, seconds: float) -> None:
        self.proxy.settle()
        self.clock.advance(seconds)
        self.proxy.call(self.ops.autopilot.tick)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        reply = call_sync(self.port, method, path, body)
        assert reply.status == 200, reply.text
        return reply.json()

    def stop(self) -> None:
        self.proxy.run(self.admin.stop)
        self.proxy.stop()


@pytest.fixture
def stack(memcached: ServerProcess, redis_server: ServerProcess) -> Iterator[Stack]:
    s = Stack(memcached, redis_server)
    yield s
    s.stop()


def test_ramp_promotes_then_a_divergence_halts_and_an_operator_clears_it(
    stack: Stack, memcached: ServerProcess
) -> None:
    assert stack.api("GET", "/api/shadow")["sample_rate"] == 0.25
    client = Client(("127.0.0.1", stack.proxy.port), default_noreply=False, timeout=30)
    stack.tick(0)

    # Step 1 (25% of keys): clean traffic, but the minimum hold is not over yet.
    for key in KEYS:
        client.set(key, f"profile-{key}".encode(), flags=1)
        client.get(key)
    stack.tick(30)
    ramp = stack.api("GET", "/api/shadow")["ramp"]
    assert ramp["reason"].startswith("hold: evidence is good; minimum hold time"), ramp
    assert ramp["evidence"]["mismatches"] == 0
    assert ramp["evidence"]["compared"] >= ramp["evidence"]["comparisons_needed"]
    stack.tick(30)
    state = stack.api("GET", "/api/shadow")
    assert state["sample_rate"] == 1.0 and state["ramp"]["phase"] == "done"
    assert state["ramp"]["reason"].startswith("done: promoted after 60s: 0 mismatches")

    # Step 2 (every key): Memcached is changed behind memshadow's back for a quarter of them.
    for key in KEYS:
        client.set(key, f"profile-{key}".encode(), flags=1)
    stack.proxy.settle()
    for key in KEYS[::4]:
        raw = RawClient(memcached.port)
        raw.send(b"set %s 1 0 7\r\nchanged\r\n" % key.encode())
        raw.read_until(b"\r\n")
        raw.close()
    for key in KEYS:
        client.get(key)
    stack.tick(5)
    state = stack.api("GET", "/api/shadow")
    assert state["halt"]["halted"] is True and state["halt"]["rule"] == "mismatch"
    assert state["halt"]["action"] == "stop" and state["enabled"] is False
    metrics = call_sync(stack.port, "GET", "/metrics").text
    assert "memshadow_shadow_halted 1.0" in metrics
    assert 'memshadow_shadow_halts_total{reason="mismatch"} 1.0' in metrics

    # Clients never noticed; nothing is shadowed while halted.
    before = stack.proxy.call(lambda: stack.proxy.shadow.stats.snapshot().shadowed)
    assert client.get(KEYS[0]) == b"changed"
    stack.proxy.settle()
    assert stack.proxy.call(lambda: stack.proxy.shadow.stats.snapshot().shadowed) == before

    # The operator clears the halt: shadowing resumes at once.
    state = stack.api("PUT", "/api/shadow", {"halt": "clear"})
    assert state["halt"]["halted"] is False and state["enabled"] is True
    trail = [(e["source"], e["field"], e["new"]) for e in stack.api("GET", "/api/audit")["entries"]]
    assert trail == [
        ("ramp", "sample_rate", 1.0),
        ("halt:mismatch", "enabled", False),
        ("halt:mismatch", "halt", True),
        ("api", "halt", False),
        ("api", "enabled", True),
    ]
    client.close()


def test_report_from_real_traffic(stack: Stack, redis_server: ServerProcess) -> None:
    client = Client(("127.0.0.1", stack.proxy.port), default_noreply=False, timeout=30)
    stack.tick(0)
    for key in KEYS:
        client.set(key, b"x" * 200)
        client.get(key)
    stack.tick(10)
    report = stack.api("GET", "/api/report")
    rows = {row["command"]: row for row in report["latency"]}
    assert rows["get"]["memcached"]["samples"] > 0 and rows["get"]["redis"]["samples"] > 0
    assert rows["get"]["memcached"]["p99"] > 0 and rows["get"]["redis"]["p99"] > 0
    memory = report["capacity"]["memory"]
    sampled = stack.proxy.call(lambda: sum(stack.proxy.shadow.stats.shadowed.values()))
    assert 0 < memory["keys"] < len(KEYS)  # a quarter of the keys, give or take
    assert memory["projected_keys"] == memory["keys"] / 0.25
    assert memory["projected_keys_low"] <= len(KEYS) <= memory["projected_keys_high"]
    ops = report["capacity"]["ops"]
    assert ops["window_seconds"] == 10 and ops["shadowed_requests"] == sampled
    assert ops["estimate_per_second"] == sampled / 10 / 0.25
    client.close()
