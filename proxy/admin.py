"""The admin HTTP endpoint: /metrics, /healthz and /readyz, plus a route table for the JSON
APIs to come. A deliberately small HTTP/1.1 server: one request per connection, bounded head
and body sizes, a read timeout, and a sans-IO request-head parser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from proxy.address import HostPort
from proxy.errors import MemshadowError
from proxy.metrics import ProxyMetrics

log = logging.getLogger("memshadow.admin")

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1 << 20
READ_TIMEOUT = 10.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

# RFC 9110 token: what a method or header name may be made of.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")


class HTTPError(MemshadowError):
    """Ends a request with an error status. Raised by the parser, or by a handler."""

    def __init__(
        self, status: int, message: str = "", *, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.status = status
        self.message = message or HTTPStatus(status).phrase
        self.headers = headers
        super().__init__(f"{status} {self.message}")

    def response(self) -> Response:
        return Response.text(self.message + "\n", status=self.status, headers=self.headers)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    # Header names are lower-case; a repeated header keeps its last value.
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON; a 400 HTTPError if it is not."""
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = TEXT_CONTENT_TYPE
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(
        cls, text: str, *, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        return cls(status, text.encode(), TEXT_CONTENT_TYPE, headers)

    @classmethod
    def json(cls, value: Any, *, status: int = 200) -> Response:
        return cls(status, json.dumps(value).encode() + b"\n", JSON_CONTENT_TYPE)

    def encode(self, *, include_body: bool = True) -> bytes:
        """The whole HTTP/1.1 message. Content-Length is the body's even for HEAD."""
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Unknown"
        lines = [
            f"HTTP/1.1 {self.status} {phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + self.body if include_body else head


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]

    @property
    def content_length(self) -> int:
        """The declared body size, validated against MAX_BODY_BYTES."""
        if "transfer-encoding" in self.headers:
            raise HTTPError(501, "Transfer-Encoding is not supported; send Content-Length")
        raw = self.headers.get("content-length")
        if raw is None:
            return 0
        if not raw.isascii() or not raw.isdigit():
            raise HTTPError(400, f"bad Content-Length {raw!r}")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return length


def parse_head(data: bytes) -> RequestHead:
    """Parse a request line and headers ending in CRLF CRLF; a 400-series HTTPError if they
    are malformed. Pure: no I/O."""
    lines = data.split(b"\r\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HTTPError(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]):
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not version.startswith(b"HTTP/"):
        raise HTTPError(400, "malformed request line")
    if version not in _VERSIONS:
        raise HTTPError(505)
    if not target.startswith(b"/") or any(c <= 0x20 or c >= 0x7F for c in target):
        raise HTTPError(400, "request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise HTTPError(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key == "content-length" and headers.get(key, text) != text:
            raise HTTPError(400, "conflicting Content-Length headers")
        headers[key] = text
    return RequestHead(method.decode("ascii"), target.decode("ascii"), headers)


class AdminServer:
    """HTTP server for operators and Prometheus. Routes are exact paths; a GET route also
    answers HEAD."""

    def __init__(
        self,
        address: HostPort,
        metrics: ProxyMetrics,
        *,
        ready: Callable[[], bool],
        not_ready_reason: Callable[[], str] = lambda: "memcached is not reachable",
        readiness: Callable[[], dict[str, Any]] | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        """readiness: /readyz's answer as JSON (asked with Accept: application/json or
        ?verbose), each Memcached's state in it."""
        self.config_address = address
        self.metrics = metrics
        self.ready = ready
        self.not_ready_reason = not_ready_reason
        self.readiness = readiness
        self.read_timeout = read_timeout
        self._routes: dict[str, dict[str, Handler]] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.add_route("GET", "/metrics", self._metrics)
        self.add_route("GET", "/healthz", self._healthz)
        self.add_route("GET", "/readyz", self._readyz)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``method path`` with ``handler``. A route may be added only once."""
        method = method.upper()
        if not path.startswith("/") or "?" in path:
            raise ValueError(f"route path must start with '/' and have no query: {path!r}")
        methods = self._routes.setdefault(path, {})
        if method in methods:
            raise ValueError(f"route {method} {path} is already defined")
        methods[method] = handler

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful when configured with port 0)."""
        assert self._server is not None and self._server.sockets, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.config_address.host,
            self.config_address.port,
            limit=MAX_HEAD_BYTES,
            reuse_address=True,
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def handle(self, request: Request) -> Response:
        """Route one request to its handler; the whole server minus the sockets."""
        methods = self._routes.get(request.path)
        if methods is None:
            return Response.text("not found\n", status=404)
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            return Response.text(
                "method not allowed\n", status=405, headers=(("Allow", ", ".join(allowed)),)
            )
        try:
            return await handler(request)
        except HTTPError as exc:
            return exc.response()
        except Exception:
            log.exception("admin handler for %s %s failed", request.method, request.path)
            return Response.text("internal error\n", status=500)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            response, include_body = await self._respond(reader)
            if response is not None:
                writer.write(response.encode(include_body=include_body))
                await writer.drain()
                if response.status >= 400:
                    await self._discard_rest(reader, writer)
        except ConnectionError:
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _discard_rest(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # After an early error reply, unread request bytes may still be arriving; closing on
        # them makes the kernel send RST, which can destroy the reply before the client reads
        # it. So half-close, and drain what comes for a moment before closing.
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ValueError, asyncio.LimitOverrunError):
            async with asyncio.timeout(1.0):
                while await reader.read(65536):
                    pass

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[Response | None, bool]:
        """Read one request and answer it; (None, _) if the client left without asking."""
        head: RequestHead | None = None
        try:
            async with asyncio.timeout(self.read_timeout):
                head = parse_head(await reader.readuntil(b"\r\n\r\n"))
                body = await reader.readexactly(head.content_length)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and head is None:
                return None, False
            return HTTPError(400, "request ended early").response(), True
        except asyncio.LimitOverrunError:
            return HTTPError(431, f"request head over {MAX_HEAD_BYTES} bytes").response(), True
        except TimeoutError:
            return HTTPError(408).response(), True
        except HTTPError as exc:
            return exc.response(), True
        path, _, query = head.target.partition("?")
        # Blank values kept: `?verbose` is a flag with no value.
        request = Request(head.method, path, head.headers, parse_qs(query, True), body)
        return await self.handle(request), head.method != "HEAD"

    # --- built-in routes -------------------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    async def _healthz(self, request: Request) -> Response:
        return Response.text("ok")

    async def _readyz(self, request: Request) -> Response:
        ready = self.ready()
        wants_json = "application/json" in request.headers.get("accept", "")
        verbose = request.query.get("verbose", ["0"])[-1].lower() not in ("0", "false", "no")
        if self.readiness is not None and (wants_json or verbose):
            return Response.json(self.readiness(), status=200 if ready else 503)
        if ready:
            return Response.text("ready")
        return Response.text(f"not ready: {self.not_ready_reason()}", status=503)
