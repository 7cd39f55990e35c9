"""The runtime control API on the admin port: live shadow state and changes (PUT /api/shadow),
the audit trail, the config and its reloads, the what-if report, and the console page.

Reads are open; changes need ``Authorization: Bearer <token>`` when a token is configured.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

from proxy.admin import AdminServer, HTTPError, Request, Response
from proxy.config import option_paths
from proxy.ops.audit import AuditLog
from proxy.ops.autopilot import Autopilot
from proxy.ops.reload import ConfigReloader, show_value
from proxy.ops.report import build_report, parse_commandstats, redis_own
from proxy.shadow.control import ShadowControl
from proxy.shadow.examples import MismatchExamples, mismatches_route
from proxy.shadow.stats import ShadowStats

RedisInfo = Callable[[], Awaitable[Mapping[str, str]]]
"""Fetches Redis INFO (at least the memory and keyspace sections) as field -> value."""

REDIS_INFO_TIMEOUT = 2.0
OWN_WINDOW = 30.0  # Redis's own figures cover at least this much recent time when they can
OWN_EVERY = 10.0
OWN_KEEP = 60
MAX_AUDIT_LIMIT = 1000
SHADOW_FIELDS = ("sample_rate", "enabled", "ramp", "halt", "reveal_examples", "evidence", "reason")
MAX_KEY_BYTES = 4096  # a key to look up (memcached's own limit is 250)
MAX_REASON_CHARS = 500
RAMP_COMMANDS = ("pause", "resume")
HTML_CONTENT_TYPE = "text/html; charset=utf-8"
# The console is one page with inline script and style that talks only to this server.
CONSOLE_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
)
_REALM = 'Bearer realm="memshadow"'


def load_console() -> bytes:
    return (resources.files("proxy") / "admin_static" / "console.html").read_bytes()


def _unauthorized(message: str, error: str = "") -> HTTPError:
    challenge = f'{_REALM}, error="{error}"' if error else _REALM
    return HTTPError(401, message, headers=(("WWW-Authenticate", challenge),))


def _show(value: Any) -> str:
    """A value as the JSON the client sent, for error messages."""
    return json.dumps(value)


class ControlAPI:
    """Route handlers over the live objects; install() adds them to an AdminServer."""

    def __init__(
        self,
        *,
        control: ShadowControl,
        stats: ShadowStats,
        autopilot: Autopilot,
        audit: AuditLog,
        reloader: ConfigReloader,
        token: Callable[[], str | None],
        redis_info: RedisInfo | None = None,
        clock: Callable[[], float] = time.time,
        shadow_running: bool = True,
        examples: MismatchExamples | None = None,
        restart_evidence: Callable[[str, str], None] | None = None,
        evidence: Callable[[], dict[str, Any]] | None = None,
        worker_load: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.control = control
        self.stats = stats
        self.autopilot = autopilot
        self.audit = audit
        self.reloader = reloader
        self.token = token
        self.redis_info = redis_info
        self.clock = clock
        # False when no shadow runs (no Redis configured): the settings are kept and shown,
        # but nothing is sampled.
        self.shadow_running = shadow_running
        self.examples = examples
        self.restart_evidence = restart_evidence
        self.evidence = evidence
        self.worker_load = worker_load
        # Redis's INFO commandstats as earlier reports read them, so its own figures cover
        # the last minute or so (not all since Redis started): (when, command -> (calls,
        # usec)), one every OWN_EVERY seconds at most.
        self._commandstats: deque[tuple[float, dict[str, tuple[int, float]]]] = deque(
            maxlen=OWN_KEEP
        )
        self._console = load_console()

    def install(self, admin: AdminServer) -> None:
        admin.add_route("GET", "/", self.console)
        admin.add_route("GET", "/api/shadow", self.get_shadow)
        admin.add_route("PUT", "/api/shadow", self.put_shadow)
        admin.add_route("GET", "/api/shadow/config", self.get_config)
        admin.add_route("POST", "/api/reload", self.post_reload)
        admin.add_route("GET", "/api/audit", self.get_audit)
        admin.add_route("GET", "/api/report", self.get_report)
        if self.examples is not None:
            admin.add_route(
                "GET", "/api/mismatches", mismatches_route(self.examples, self.may_see_text)
            )
            admin.add_route("POST", "/api/mismatches/lookup", self.post_lookup)

    # --- auth -----------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """Raise 401 unless the request carries the configured token (or none is set)."""
        token = self.token()
        if token is None:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise _unauthorized(
                "this change needs the admin token: send 'Authorization: Bearer <token>'"
            )
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _unauthorized(
                "the Authorization header must be 'Bearer <token>'", "invalid_request"
            )
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise _unauthorized("wrong admin token", "invalid_token")

    def may_see_text(self, request: Request) -> bool:
        """Plaintext of revealed examples goes only to who holds the token (anyone when no
        token is set)."""
        try:
            self.authorize(request)
        except HTTPError:
            return False
        return True

    # --- routes ---------------------------------------------------------------------------

    async def console(self, request: Request) -> Response:
        return Response(200, self._console, HTML_CONTENT_TYPE, CONSOLE_HEADERS)

    async def get_shadow(self, request: Request) -> Response:
        return Response.json(self.state())

    def state(self) -> dict[str, Any]:
        config = self.reloader.current
        pilot = self.autopilot.status()
        return {
            "now": self.clock(),
            "enabled": self.control.enabled,
            "sample_rate": self.control.sample_rate,
            "active": self.control.active and self.shadow_running,
            "shadow_running": self.shadow_running,
            "redis": str(config.shadow.redis) if config.shadow.redis is not None else None,
            "ramp": pilot["ramp"],
            "halt": pilot["halt"],
            "guards": pilot["guards"],
            "halts_total": pilot["halts_total"],
            "figures": self.autopilot.figures(),
            "rate_set_by": pilot["rate_set_by"],
            "enabled_set_by": pilot["enabled_set_by"],
            "redis_state": pilot["redis"] if self.shadow_running else {"state": "none"},
            "examples": self.examples.describe() if self.examples is not None else None,
            "evidence": self.evidence() if self.evidence is not None else None,
            "config_source": config.source,
            "token_required": self.token() is not None,
        }

    async def put_shadow(self, request: Request) -> Response:
        self.authorize(request)
        body = request.json()
        if not isinstance(body, dict) or not body:
            raise HTTPError(
                400,
                "the body must be a JSON object with one or more of: " + ", ".join(SHADOW_FIELDS),
            )
        unknown = [name for name in body if name not in SHADOW_FIELDS]
        if unknown:
            raise HTTPError(
                400, f"unknown field {unknown[0]!r}; expected one of: {', '.join(SHADOW_FIELDS)}"
            )
        # Everything is checked before anything changes: a request applies whole or not at all.
        rate = body.get("sample_rate")
        if "sample_rate" in body and (
            isinstance(rate, bool)
            or not isinstance(rate, int | float)
            or not math.isfinite(rate)
            or not 0.0 <= rate <= 1.0
        ):
            raise HTTPError(400, f"sample_rate must be a number from 0 to 1, got {_show(rate)}")
        enabled = body.get("enabled")
        if "enabled" in body and not isinstance(enabled, bool):
            raise HTTPError(400, f"enabled must be true or false, got {_show(enabled)}")
        ramp = body.get("ramp")
        if "ramp" in body:
            if ramp not in RAMP_COMMANDS:
                raise HTTPError(400, f'ramp must be "pause" or "resume", got {_show(ramp)}')
            if not self.autopilot.ramp.configured:
                raise HTTPError(409, "no ramp is configured (shadow.ramp.steps is empty)")
        halt = body.get("halt")
        if "halt" in body and halt != "clear":
            raise HTTPError(400, f'halt accepts only "clear", got {_show(halt)}')
        reveal = body.get("reveal_examples")
        if "reveal_examples" in body:
            if not isinstance(reveal, bool):
                raise HTTPError(400, f"reveal_examples must be true or false, got {_show(reveal)}")
            if self.examples is None:
                raise HTTPError(409, "no shadow runs here, so there are no examples to reveal")
            if reveal and self.token() is None:
                raise HTTPError(
                    409,
                    "revealing keys and values at runtime needs an admin token, so that only "
                    "its holders see them: set admin.token or MEMSHADOW_ADMIN_TOKEN first "
                    "(or shadow.reveal_examples in the config)",
                )
        evidence = body.get("evidence")
        if "evidence" in body:
            if evidence != "restart":
                raise HTTPError(400, f'evidence accepts only "restart", got {_show(evidence)}')
            if self.restart_evidence is None:
                raise HTTPError(409, "the readiness evidence cannot be restarted here")
        why = body.get("reason", "")
        if not isinstance(why, str) or len(why) > MAX_REASON_CHARS:
            raise HTTPError(400, f"reason must be text of at most {MAX_REASON_CHARS} characters")
        if "reason" in body and len(body) == 1:
            raise HTTPError(400, "reason goes with a change (evidence, enabled, sample_rate...)")

        before = self._last_seq()
        if evidence == "restart" and self.restart_evidence is not None:
            self.restart_evidence("api", why.strip())
        if isinstance(reveal, bool) and self.examples is not None:
            was = self.examples.reveal
            if self.examples.set_reveal(reveal):
                self.audit.record(
                    "api",
                    "reveal_examples",
                    was,
                    reveal,
                    why.strip()
                    or ("examples recorded from now on keep their keys and values in plain "
                        "text, shown only with the admin token" if reveal
                        else "examples recorded from now on are private again"),
                )  # fmt: skip
        if halt == "clear":
            self.autopilot.clear_halt("api")
        if isinstance(enabled, bool):
            self.control.set_enabled(enabled, "api", why.strip())
        if rate is not None:
            self.control.set_rate(float(rate), "api", why.strip())
        if ramp == "pause":
            self.autopilot.pause_ramp("api")
        elif ramp == "resume":
            self.autopilot.resume_ramp("api")
        changes = [entry.as_json() for entry in self.audit.entries(since=before)]
        return Response.json({"changes": changes, **self.state()})

    async def post_lookup(self, request: Request) -> Response:
        """POST /api/mismatches/lookup {"key": "..."} (or {"key_base64": "..."}): the key's
        hash and its examples. Needs the token when one is set: it confirms a guessed key."""
        self.authorize(request)
        assert self.examples is not None
        body = request.json()
        if not isinstance(body, dict) or len(body) != 1 or not {"key", "key_base64"} & set(body):
            raise HTTPError(400, 'the body must be {"key": "..."} or {"key_base64": "..."}')
        if "key" in body:
            text = body["key"]
            if not isinstance(text, str) or not text:
                raise HTTPError(400, "key must be a non-empty string")
            key = text.encode()
        else:
            try:
                key = base64.b64decode(str(body["key_base64"]), validate=True)
            except (binascii.Error, ValueError):
                raise HTTPError(400, "key_base64 is not valid base64") from None
            if not key:
                raise HTTPError(400, "key_base64 decodes to nothing")
        if len(key) > MAX_KEY_BYTES:
            raise HTTPError(400, f"a key has at most {MAX_KEY_BYTES} bytes")
        return Response.json(self.examples.lookup(key, show_text=True))

    async def get_config(self, request: Request) -> Response:
        reloader = self.reloader
        current = reloader.current
        last = reloader.last_result
        return Response.json(
            {
                "source": current.source,
                "watching": reloader.path,
                "last_reload": last.as_json() if last is not None else None,
                "last_reload_successful": reloader.last_success,
                "last_reload_success_at": reloader.last_success_at,
                "restart_required": [
                    {
                        "option": option,
                        "running": show_value(reloader.started, option),
                        "file": show_value(current, option),
                    }
                    for option in reloader.restart_required()
                ],
                "options": {option: show_value(current, option) for option in option_paths()},
            }
        )

    async def post_reload(self, request: Request) -> Response:
        self.authorize(request)
        result = self.reloader.reload("api")
        return Response.json(result.as_json(), status=200 if result.ok else 422)

    async def get_audit(self, request: Request) -> Response:
        limit = self._int_param(request, "limit", 100, 1, MAX_AUDIT_LIMIT)
        since = self._int_param(request, "since", 0, 0, None)
        entries = self.audit.entries(since=since, limit=limit)
        return Response.json({"entries": [entry.as_json() for entry in entries]})

    async def get_report(self, request: Request) -> Response:
        return Response.json(await self.what_if())

    async def what_if(self) -> dict[str, Any]:
        """The what-if report (also a part of the readiness report)."""
        info: Mapping[str, str] | None = None
        error: str | None = None
        if self.redis_info is None:
            error = "no Redis is configured (shadow.redis)"
        else:
            try:
                async with asyncio.timeout(REDIS_INFO_TIMEOUT):
                    info = await self.redis_info()
            except TimeoutError:
                error = f"Redis did not answer INFO within {REDIS_INFO_TIMEOUT:g}s"
            except Exception as exc:  # any failure to reach Redis is reported, not raised
                error = f"cannot read Redis INFO: {exc}"
        redis = self.reloader.current.shadow.redis
        now = self.clock()
        own = redis_own(None)
        if info is not None:
            kept = self._commandstats
            base = None
            for at, figures in kept:  # the newest at least OWN_WINDOW old
                if now - at >= OWN_WINDOW:
                    base = (at, figures)
            own = redis_own(info) if base is None else redis_own(info, base[1], now - base[0])
            if not kept or now - kept[-1][0] >= OWN_EVERY:
                kept.append((now, parse_commandstats(info)))
        report = build_report(
            self.stats,
            sample_rate=self.control.sample_rate if self.control.enabled else 0.0,
            window=self.autopilot.traffic_window(),
            redis_info=info,
            redis_error=error,
            db=redis.db if redis is not None else 0,
            now=now,
            worker=self.worker_load() if self.worker_load is not None else None,
            own=own,
        )
        return report

    # --- helpers --------------------------------------------------------------------------

    def _last_seq(self) -> int:
        entries = self.audit.entries(limit=1)
        return entries[-1].seq if entries else 0

    @staticmethod
    def _int_param(
        request: Request, name: str, default: int, low: int, high: int | None
    ) -> int:
        values = request.query.get(name)
        if not values or not values[-1]:
            return default
        raw = values[-1]
        value = int(raw) if raw.isascii() and raw.isdigit() else -1
        if value < low or (high is not None and value > high):
            wanted = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise HTTPError(400, f"{name} must be a whole number {wanted}, got {raw!r}")
        return value
