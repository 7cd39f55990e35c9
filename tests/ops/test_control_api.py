"""The control API over real sockets: state, changes, the token, the audit trail, the report
route, the console page, metrics, and every error message a client can trigger."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from proxy.address import HostPort
from proxy.admin import AdminServer
from proxy.config import (
    AdminConfig,
    Config,
    GuardsConfig,
    LatencyGuardConfig,
    RampConfig,
    ShadowConfig,
)
from proxy.metrics import ProxyMetrics
from proxy.ops.operations import ADMIN_TOKEN_ENV, Operations
from proxy.shadow.control import ShadowControl
from proxy.shadow.examples import MismatchExamples
from proxy.shadow.stats import ShadowStats
from tests.ops.http import Reply, call
from tests.ops.support import Clock, feed

RAMP = RampConfig(steps=(0.01, 0.05, 0.25, 1.0), hold=60.0, mismatch_target=0.01)
GUARDS = GuardsConfig(latency=LatencyGuardConfig(enabled=False))


class Env:
    """An admin server with the operator pieces over a ShadowControl nothing else uses."""

    def __init__(
        self,
        config: Config,
        environ: dict[str, str] | None = None,
        rate: float = 0.1,
        examples: MismatchExamples | None = None,
    ) -> None:
        self.clock = Clock()
        self.metrics = ProxyMetrics()
        self.control = ShadowControl(rate)
        self.stats = ShadowStats()
        self.admin = AdminServer(HostPort("127.0.0.1", 0), self.metrics, ready=lambda: True)
        self.examples = examples
        self.ops = Operations(
            config,
            admin=self.admin,
            control=self.control,
            stats=self.stats,
            metrics=self.metrics,
            environ=environ or {},
            clock=self.clock,
            handle_sighup=False,
            examples=examples,
        )

    async def __aenter__(self) -> Env:
        await self.admin.start()
        await self.ops.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ops.stop()
        await self.admin.stop()

    async def get(self, path: str) -> Reply:
        return await call(self.admin.address[1], "GET", path)

    async def put(self, body: object, token: str | None = None) -> Reply:
        return await call(self.admin.address[1], "PUT", "/api/shadow", body, token=token)

    def tick(self, seconds: float = 5.0) -> None:
        self.clock.advance(seconds)
        self.ops.autopilot.tick()


def config(**changes: object) -> Config:
    shadow = ShadowConfig(sample_rate=0.1, guards=GUARDS)
    return dataclasses.replace(Config(shadow=shadow), **changes)  # type: ignore[arg-type]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with Env(config()) as e:
        yield e


@pytest.fixture
async def ramp_env() -> AsyncIterator[Env]:
    async with Env(config(shadow=ShadowConfig(ramp=RAMP, guards=GUARDS)), rate=0.0) as e:
        yield e


async def test_get_shadow_shows_the_live_state(env: Env) -> None:
    reply = await env.get("/api/shadow")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    state = reply.json()
    assert state["enabled"] is True and state["sample_rate"] == 0.1 and state["active"]
    assert state["config_source"] == "defaults"
    assert state["halt"] == {
        "halted": False,
        "rule": None,
        "action": None,
        "reason": None,
        "since": None,
        "stopped_shadow": False,
    }
    assert state["ramp"]["configured"] is False
    assert state["token_required"] is False
    assert {g["rule"] for g in state["guards"]} == {"mismatch", "errors", "drops", "latency"}


async def test_ramp_state_in_the_api(ramp_env: Env) -> None:
    ramp = (await ramp_env.get("/api/shadow")).json()["ramp"]
    assert ramp["phase"] == "ramping" and ramp["step"] == 0
    assert ramp["steps"] == [0.01, 0.05, 0.25, 1.0]
    assert ramp["hold_seconds"] == 60.0
    assert ramp["next_change_at"] == ramp["step_started"] + 60
    assert ramp["reason"] == "hold: too few comparisons (0/1000)"
    assert ramp_env.control.sample_rate == 0.01


async def test_put_sample_rate_changes_the_control_and_is_audited(env: Env) -> None:
    reply = await env.put({"sample_rate": 0.05})
    assert reply.status == 200
    assert env.control.sample_rate == 0.05
    body = reply.json()
    assert body["sample_rate"] == 0.05
    assert [(c["source"], c["field"], c["old"], c["new"]) for c in body["changes"]] == [
        ("api", "sample_rate", 0.1, 0.05)
    ]
    audit = (await env.get("/api/audit")).json()["entries"]
    assert audit[-1]["source"] == "api" and audit[-1]["new"] == 0.05
    assert audit[-1]["time"].endswith("Z")


async def test_kill_switch(env: Env) -> None:
    assert (await env.put({"enabled": False})).status == 200
    assert not env.control.enabled and not env.control.active
    assert env.control.sample_rate == 0.1  # the rate is kept for when it comes back
    assert (await env.put({"enabled": True})).status == 200
    assert env.control.active


async def test_pause_and_resume_the_ramp(ramp_env: Env) -> None:
    reply = await ramp_env.put({"ramp": "pause"})
    assert reply.json()["ramp"]["paused"] is True
    assert reply.json()["ramp"]["reason"] == "paused: paused by an operator"
    reply = await ramp_env.put({"ramp": "resume"})
    assert reply.json()["ramp"]["paused"] is False
    fields = [(e["field"], e["new"]) for e in (await ramp_env.get("/api/audit")).json()["entries"]]
    assert fields[-2:] == [("ramp", "paused"), ("ramp", "running")]


async def test_clear_a_halt_through_the_api(env: Env) -> None:
    env.tick()
    feed(env.stats, match=100, errors=200)
    env.tick()
    state = (await env.get("/api/shadow")).json()
    assert state["halt"]["halted"] is True and state["halt"]["rule"] == "errors"
    assert state["halt"]["action"] == "stop" and state["enabled"] is False
    assert state["halt"]["reason"].startswith("Redis errors ratio 66.67%")
    assert state["halt"]["stopped_shadow"] is True
    assert state["enabled_set_by"]["source"] == "halt:errors"
    metrics = (await env.get("/metrics")).text
    assert "memshadow_shadow_halted 1.0" in metrics
    assert 'memshadow_shadow_halts_total{reason="errors"} 1.0' in metrics
    reply = await env.put({"halt": "clear"})
    assert reply.status == 200
    assert reply.json()["halt"]["halted"] is False and env.control.enabled
    assert "memshadow_shadow_halted 0.0" in (await env.get("/metrics")).text


async def test_ramp_step_metric(ramp_env: Env) -> None:
    assert "memshadow_shadow_ramp_step 1.0" in (await ramp_env.get("/metrics")).text


async def test_several_fields_at_once(ramp_env: Env) -> None:
    reply = await ramp_env.put({"sample_rate": 0.3, "ramp": "resume"})
    assert reply.status == 200
    # Setting the rate paused the ramp; resume goes on from the step below it.
    assert ramp_env.control.sample_rate == 0.25


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "request body is not valid JSON: "),
        ([1], 400, "the body must be a JSON object with one or more of: sample_rate, enabled"),
        ({}, 400, "the body must be a JSON object with one or more of: sample_rate, enabled"),
        ({"rate": 1}, 400, "unknown field 'rate'; expected one of: sample_rate, enabled, ramp"),
        ({"sample_rate": "0.5"}, 400, 'sample_rate must be a number from 0 to 1, got "0.5"'),
        ({"sample_rate": 1.5}, 400, "sample_rate must be a number from 0 to 1, got 1.5"),
        ({"sample_rate": -0.1}, 400, "sample_rate must be a number from 0 to 1, got -0.1"),
        ({"sample_rate": True}, 400, "sample_rate must be a number from 0 to 1, got true"),
        (b'{"sample_rate": NaN}', 400, "sample_rate must be a number from 0 to 1, got NaN"),
        ({"enabled": "no"}, 400, 'enabled must be true or false, got "no"'),
        ({"enabled": 0}, 400, "enabled must be true or false, got 0"),
        ({"ramp": "go"}, 400, 'ramp must be "pause" or "resume", got "go"'),
        ({"ramp": "pause"}, 409, "no ramp is configured (shadow.ramp.steps is empty)"),
        ({"halt": "lift"}, 400, 'halt accepts only "clear", got "lift"'),
    ],
)
async def test_invalid_changes_are_refused_with_a_message(
    env: Env, body: object, status: int, message: str
) -> None:
    reply = await env.put(body)
    assert reply.status == status
    assert reply.text.startswith(message), reply.text
    assert env.control.sample_rate == 0.1 and env.control.enabled


async def test_a_request_applies_whole_or_not_at_all(env: Env) -> None:
    reply = await env.put({"sample_rate": 0.5, "enabled": "off"})
    assert reply.status == 400
    assert env.control.sample_rate == 0.1
    assert (await env.get("/api/audit")).json()["entries"] == []


async def test_wrong_method() -> None:
    async with Env(config()) as env:
        reply = await call(env.admin.address[1], "DELETE", "/api/shadow")
        assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD, PUT"


# --- the token ---------------------------------------------------------------------------------

TOKEN = "s3cret-t0ken"


@pytest.fixture
async def token_env() -> AsyncIterator[Env]:
    admin = AdminConfig(listen=HostPort("127.0.0.1", 0), token=TOKEN)
    async with Env(config(admin=admin)) as e:
        yield e


async def test_token_required_for_changes(token_env: Env) -> None:
    reply = await token_env.put({"sample_rate": 0.5})
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="memshadow"'
    assert reply.text == (
        "this change needs the admin token: send 'Authorization: Bearer <token>'\n"
    )
    assert token_env.control.sample_rate == 0.1
    reply = await token_env.put({"sample_rate": 0.5}, token=TOKEN)
    assert reply.status == 200 and token_env.control.sample_rate == 0.5


async def test_wrong_token(token_env: Env) -> None:
    reply = await token_env.put({"sample_rate": 0.5}, token="guess")
    assert reply.status == 401 and reply.text == "wrong admin token\n"
    assert reply.headers["www-authenticate"] == 'Bearer realm="memshadow", error="invalid_token"'


async def test_token_in_the_wrong_scheme(token_env: Env) -> None:
    reply = await call(
        token_env.admin.address[1],
        "PUT",
        "/api/shadow",
        {"enabled": False},
        headers={"Authorization": f"Basic {TOKEN}"},
    )
    assert reply.status == 401
    assert reply.text == "the Authorization header must be 'Bearer <token>'\n"
    assert 'error="invalid_request"' in reply.headers["www-authenticate"]
    assert token_env.control.enabled


async def test_reads_need_no_token(token_env: Env) -> None:
    for path in ("/api/shadow", "/api/audit", "/api/report", "/api/shadow/config", "/"):
        assert (await token_env.get(path)).status == 200, path
    state = (await token_env.get("/api/shadow")).json()
    assert state["token_required"] is True
    options = (await token_env.get("/api/shadow/config")).json()["options"]
    assert options["admin.token"] == "(hidden)"
    assert TOKEN not in (await token_env.get("/api/shadow/config")).text


async def test_reload_needs_the_token(token_env: Env) -> None:
    reply = await call(token_env.admin.address[1], "POST", "/api/reload")
    assert reply.status == 401


async def test_environment_token_wins_over_the_config() -> None:
    admin = AdminConfig(listen=HostPort("127.0.0.1", 0), token=TOKEN)
    async with Env(config(admin=admin), environ={ADMIN_TOKEN_ENV: "from-env"}) as env:
        assert (await env.put({"enabled": False}, token=TOKEN)).status == 401
        assert (await env.put({"enabled": False}, token="from-env")).status == 200


async def test_environment_token_alone() -> None:
    async with Env(config(), environ={ADMIN_TOKEN_ENV: "from-env"}) as env:
        assert (await env.put({"enabled": False})).status == 401
        assert (await env.put({"enabled": False}, token="from-env")).status == 200


def test_open_admin_port_without_token_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    admin = AdminConfig(listen=HostPort("0.0.0.0", 0))
    metrics = ProxyMetrics()
    server = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
    Operations(
        config(admin=admin),
        admin=server,
        control=ShadowControl(0.0),
        stats=ShadowStats(),
        metrics=metrics,
        environ={},
    )
    assert "the admin port 0.0.0.0:0 is not loopback and no admin token is set" in caplog.text


# --- audit, config, console --------------------------------------------------------------------


async def test_audit_limit_and_since(env: Env) -> None:
    for rate in (0.2, 0.3, 0.4):
        await env.put({"sample_rate": rate})
    entries = (await env.get("/api/audit?limit=2")).json()["entries"]
    assert [e["new"] for e in entries] == [0.3, 0.4]
    first = entries[0]["seq"]
    assert [e["new"] for e in (await env.get(f"/api/audit?since={first}")).json()["entries"]] == [
        0.4
    ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=abc", "limit must be a whole number from 1 to 1000, got 'abc'"),
        ("limit=0", "limit must be a whole number from 1 to 1000, got '0'"),
        ("limit=5000", "limit must be a whole number from 1 to 1000, got '5000'"),
        ("since=-1", "since must be a whole number of at least 0, got '-1'"),
    ],
)
async def test_bad_audit_query(env: Env, query: str, message: str) -> None:
    reply = await env.get(f"/api/audit?{query}")
    assert reply.status == 400 and reply.text == message + "\n"


async def test_config_view(env: Env) -> None:
    view = (await env.get("/api/shadow/config")).json()
    assert view["source"] == "defaults" and view["watching"] is None
    assert view["last_reload"] is None and view["last_reload_successful"] is True
    assert view["restart_required"] == []
    assert view["options"]["shadow.ramp.steps"] == []
    assert view["options"]["shadow.guards.mismatch.action"] == "hold"
    assert view["options"]["admin.listen"] == "127.0.0.1:9180"


async def test_console_is_one_self_contained_page(env: Env) -> None:
    reply = await env.get("/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in reply.headers["content-security-policy"]
    page = reply.text
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page
    for external in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert external not in page
    head = await call(env.admin.address[1], "HEAD", "/")
    assert head.status == 200 and head.body == b""


async def test_report_without_redis(env: Env) -> None:
    report = (await env.get("/api/report")).json()
    assert report["latency"] == []
    assert report["capacity"]["memory"] == {"error": "no Redis is configured (shadow.redis)"}


# --- mismatch examples: lookup and a token-protected reveal ------------------------------------

TOKEN = "s3cret-token"


def _record(examples: MismatchExamples, key: bytes) -> None:
    examples.record(
        "value", "get", key, {"present": True, "value": b"plain"}, {"present": False}, ""
    )


async def test_a_runtime_reveal_needs_a_token_and_is_audited() -> None:
    examples = MismatchExamples(secret=b"0123456789abcdef")
    async with Env(config(), examples=examples) as env:
        refused = await env.put({"reveal_examples": True})
        assert refused.status == 409 and "needs an admin token" in refused.text
        assert examples.reveal is False
    examples = MismatchExamples(secret=b"0123456789abcdef")
    async with Env(config(admin=AdminConfig(token=TOKEN)), examples=examples) as env:
        _record(examples, b"user:before")
        assert (await env.put({"reveal_examples": True})).status == 401
        reply = await env.put({"reveal_examples": True, "reason": "INC-42"}, token=TOKEN)
        assert reply.status == 200 and reply.json()["examples"]["reveal"] is True
        (entry,) = reply.json()["changes"]
        assert (entry["field"], entry["old"], entry["new"], entry["reason"]) == (
            "reveal_examples", False, True, "INC-42"
        )
        _record(examples, b"user:after")
        port = env.admin.address[1]
        anyone = (await env.get("/api/mismatches")).json()
        assert "user:after" not in json.dumps(anyone) and "plain" not in json.dumps(anyone)
        holder = (await call(port, "GET", "/api/mismatches", token=TOKEN)).json()
        keys = [e["key"] for e in holder["kinds"]["value"]]
        assert keys == ["user:after", examples.hash(b"user:before")]
        assert holder["examples"]["reveal"] is True
        reply = await env.put({"reveal_examples": False}, token=TOKEN)
        assert reply.json()["changes"][0]["new"] is False


async def test_a_suspect_key_is_looked_up_with_the_token() -> None:
    examples = MismatchExamples(secret=b"0123456789abcdef")
    async with Env(config(admin=AdminConfig(token=TOKEN)), examples=examples) as env:
        _record(examples, b"user:42")
        _record(examples, b"user:43")
        port = env.admin.address[1]
        path = "/api/mismatches/lookup"
        assert (await call(port, "POST", path, {"key": "user:42"})).status == 401
        found = (await call(port, "POST", path, {"key": "user:42"}, token=TOKEN)).json()
        assert found["key_hash"] == examples.hash(b"user:42")
        assert [e["key_hash"] for e in found["examples"]] == [examples.hash(b"user:42")]
        by_base64 = await call(port, "POST", path, {"key_base64": "dXNlcjo0Mg=="}, token=TOKEN)
        assert by_base64.json()["key_hash"] == found["key_hash"]
        for body, problem in (
            ({"key": ""}, "key must be a non-empty string"),
            ({"nope": 1}, 'the body must be {"key": "..."}'),
            ({"key_base64": "%%"}, "key_base64 is not valid base64"),
        ):
            reply = await call(port, "POST", path, body, token=TOKEN)
            assert reply.status == 400 and problem in reply.text, reply.text


async def test_coverage_in_traffic_in_the_api_and_a_metric(env: Env) -> None:
    requests_seen = [0]
    env.stats.client_requests_fn = lambda: requests_seen[0]
    env.tick()
    feed(env.stats, match=120)
    requests_seen[0] = 1_000_000  # 10% of the keys carried 0.012% of the requests
    env.stats.dropped["queue_full"] += 3
    env.tick()
    state = (await env.get("/api/shadow")).json()
    window = state["figures"]["window"]
    assert window["shadowed"] == 120 and window["client_requests"] == 1_000_000
    assert window["traffic_share"] == pytest.approx(0.00012)
    assert window["key_share"] == 0.1
    assert window["dropped"] == [
        {"name": "queue_full", "count": 3, "cause": "capacity",
         "words": "the shadow's queue was full"}
    ]  # fmt: skip
    assert state["figures"]["totals"]["shadowed"] == 120
    assert state["redis_state"] == {"state": "reachable", "since": None}
    metrics = (await env.get("/metrics")).text
    assert "memshadow_shadow_traffic_share 0.00012" in metrics
    assert "memshadow_shadow_redis_reachable 1.0" in metrics
