"""The admin HTTP server over real sockets: built-in routes, added routes and every error."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.address import HostPort
from proxy.admin import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    METRICS_CONTENT_TYPE,
    AdminServer,
    HTTPError,
    Request,
    Response,
    parse_head,
)
from proxy.metrics import ProxyMetrics
from tests.support import wait_until_async


class Readiness:
    def __init__(self) -> None:
        self.ready = True
        self.reason = "cannot connect to memcached at 127.0.0.1:11211: Connection refused"


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def metrics() -> ProxyMetrics:
    return ProxyMetrics()


@pytest.fixture
async def admin(metrics: ProxyMetrics, readiness: Readiness) -> AsyncIterator[AdminServer]:
    server = AdminServer(
        HostPort("127.0.0.1", 0),
        metrics,
        ready=lambda: readiness.ready,
        not_ready_reason=lambda: readiness.reason,
        read_timeout=5.0,
    )
    await server.start()
    yield server
    await server.stop()


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        self.status = int(status)
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            self.headers[name.lower()] = value


async def exchange(server: AdminServer, raw: bytes, *, half_close: bool = True) -> Reply:
    """Send raw bytes, read until the server closes, parse the reply."""
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(raw)
    await writer.drain()
    if half_close:
        writer.write_eof()
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return Reply(data)


async def get(server: AdminServer, path: str, method: str = "GET") -> Reply:
    return await exchange(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


# --- built-in routes -----------------------------------------------------------------------


async def test_healthz(admin: AdminServer) -> None:
    reply = await get(admin, "/healthz")
    assert reply.status == 200
    assert reply.body == b"ok"
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert reply.headers["content-length"] == "2"
    assert reply.headers["connection"] == "close"


async def test_metrics(admin: AdminServer, metrics: ProxyMetrics) -> None:
    metrics.requests.observe("get", 0.0002)
    metrics.client_opened()
    reply = await get(admin, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == METRICS_CONTENT_TYPE
    assert METRICS_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    text = reply.body.decode()
    assert 'memshadow_requests_total{command="get",listener="default"} 1.0' in text
    bucket = 'command="get",le="0.00025",listener="default"'
    assert f"memshadow_request_duration_seconds_bucket{{{bucket}}} 1.0" in text
    assert "memshadow_client_connections 1.0" in text
    assert int(reply.headers["content-length"]) == len(reply.body)


async def test_readyz_follows_the_callable(admin: AdminServer, readiness: Readiness) -> None:
    reply = await get(admin, "/readyz")
    assert (reply.status, reply.body) == (200, b"ready")
    readiness.ready = False
    reply = await get(admin, "/readyz")
    assert reply.status == 503
    assert reply.body == (
        b"not ready: cannot connect to memcached at 127.0.0.1:11211: Connection refused"
    )
    readiness.ready = True
    assert (await get(admin, "/readyz")).status == 200


async def test_readyz_verbose_as_the_readme_writes_it(metrics: ProxyMetrics) -> None:
    server = AdminServer(
        HostPort("127.0.0.1", 0),
        metrics,
        ready=lambda: True,
        readiness=lambda: {"ready": True, "listeners": []},
    )
    await server.start()
    try:
        for query in ("?verbose", "?verbose=1", "?verbose=true", "?x=1&verbose"):
            reply = await get(server, "/readyz" + query)
            assert reply.headers["content-type"] == "application/json", query
            assert json.loads(reply.body) == {"ready": True, "listeners": []}
        for query in ("", "?verbose=0", "?verbose=false", "?other"):
            assert (await get(server, "/readyz" + query)).body == b"ready", query
    finally:
        await server.stop()


async def test_metrics_export_no_created_series(admin: AdminServer, metrics: ProxyMetrics) -> None:
    metrics.upstream_error("connect")
    metrics.closed_by_proxy("idle_timeout")
    text = (await get(admin, "/metrics")).body.decode()
    assert "memshadow_upstream_errors_total" in text
    assert "_created" not in text
    helps = [line for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))


async def test_head_answers_without_a_body(admin: AdminServer) -> None:
    reply = await get(admin, "/healthz", method="HEAD")
    assert reply.status == 200
    assert reply.headers["content-length"] == "2"
    assert reply.body == b""


async def test_real_http_client(admin: AdminServer) -> None:
    host, port = admin.address

    def fetch(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    assert await asyncio.to_thread(fetch, "/healthz") == (200, b"ok")
    status, body = await asyncio.to_thread(fetch, "/metrics")
    assert status == 200
    assert b"memshadow_build_info" in body
    assert await asyncio.to_thread(fetch, "/nope") == (404, b"not found\n")


# --- routing errors ------------------------------------------------------------------------


async def test_unknown_path_is_404(admin: AdminServer) -> None:
    reply = await get(admin, "/metrics/")
    assert (reply.status, reply.body) == (404, b"not found\n")


async def test_wrong_method_is_405_with_allow(admin: AdminServer) -> None:
    reply = await exchange(admin, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"


async def test_query_string_is_not_part_of_the_path(admin: AdminServer) -> None:
    assert (await get(admin, "/healthz?verbose=1")).status == 200


# --- malformed requests --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET  /healthz HTTP/1.1\r\n\r\n",
        b"GET healthz HTTP/1.1\r\n\r\n",
        b"GET http://x/healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz FTP/1.1\r\n\r\n",
        b"G(T /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nbad name: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # TLS to a plain port
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # the client gave up before the blank line
        b"PUT /healthz HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",  # body ended early
    ],
)
async def test_garbage_is_400(admin: AdminServer, raw: bytes) -> None:
    reply = await exchange(admin, raw)
    assert reply.status == 400
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"


async def test_unsupported_http_version_is_505(admin: AdminServer) -> None:
    assert (await exchange(admin, b"GET /healthz HTTP/2.0\r\n\r\n")).status == 505


async def test_oversized_head_is_431(admin: AdminServer) -> None:
    raw = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    reply = await exchange(admin, raw)
    assert reply.status == 431


async def test_head_just_under_the_limit_is_fine(admin: AdminServer) -> None:
    start = b"GET /healthz HTTP/1.1\r\nX-Big: "
    raw = start + b"a" * (MAX_HEAD_BYTES - len(start) - 4) + b"\r\n\r\n"
    assert len(raw) == MAX_HEAD_BYTES
    assert (await exchange(admin, raw)).status == 200


async def test_oversized_body_is_413(admin: AdminServer) -> None:
    raw = f"PUT /healthz HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
    reply = await exchange(admin, raw + b"x" * 1000, half_close=False)
    assert reply.status == 413


async def test_chunked_body_is_501(admin: AdminServer) -> None:
    raw = b"PUT /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert (await exchange(admin, raw)).status == 501


async def test_slow_client_gets_408(metrics: ProxyMetrics) -> None:
    server = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True, read_timeout=0.2)
    await server.start()
    try:
        reply = await exchange(server, b"GET /healthz HTTP/1.1\r\n", half_close=False)
        assert reply.status == 408
    finally:
        await server.stop()


async def test_client_that_sends_nothing_is_just_closed(admin: AdminServer) -> None:
    reader, writer = await asyncio.open_connection(*admin.address)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert (await get(admin, "/healthz")).status == 200  # and the server is still fine


# --- added routes ----------------------------------------------------------------------------


async def test_added_json_routes_with_bodies(admin: AdminServer) -> None:
    state: dict[str, object] = {"sample_rate": 0.0}

    async def show(request: Request) -> Response:
        return Response.json(state)

    async def update(request: Request) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise HTTPError(422, "expected a JSON object")
        state.update(body)
        return Response.json(state, status=200)

    admin.add_route("GET", "/api/shadow", show)
    admin.add_route("PUT", "/api/shadow", update)

    reply = await get(admin, "/api/shadow")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body) == {"sample_rate": 0.0}

    body = b'{"sample_rate": 0.5}'
    raw = b"PUT /api/shadow HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    reply = await exchange(admin, raw)
    assert reply.status == 200
    assert json.loads(reply.body) == {"sample_rate": 0.5}

    reply = await exchange(admin, b"PUT /api/shadow HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}")
    assert reply.status == 400
    assert reply.body.startswith(b"request body is not valid JSON")

    reply = await exchange(admin, b"PUT /api/shadow HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]")
    assert (reply.status, reply.body) == (422, b"expected a JSON object\n")

    reply = await exchange(admin, b"DELETE /api/shadow HTTP/1.1\r\n\r\n")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD, PUT"


async def test_handler_sees_method_path_headers_query_and_body(admin: AdminServer) -> None:
    seen: list[Request] = []

    async def record(request: Request) -> Response:
        seen.append(request)
        return Response(204)

    admin.add_route("post", "/api/echo", record)
    raw = (
        b"POST /api/echo?a=1&a=2&b=x HTTP/1.0\r\nX-Thing:  spaced \r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    reply = await exchange(admin, raw)
    assert reply.status == 204
    [request] = seen
    assert (request.method, request.path, request.body) == ("POST", "/api/echo", b"hello")
    assert request.headers["x-thing"] == "spaced"
    assert request.query == {"a": ["1", "2"], "b": ["x"]}


async def test_handler_crash_is_500(admin: AdminServer) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    admin.add_route("GET", "/api/broken", broken)
    reply = await get(admin, "/api/broken")
    assert (reply.status, reply.body) == (500, b"internal error\n")
    assert (await get(admin, "/healthz")).status == 200


def test_add_route_rejects_duplicates_and_bad_paths(metrics: ProxyMetrics) -> None:
    server = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)

    async def handler(request: Request) -> Response:
        return Response()

    with pytest.raises(ValueError, match="already defined"):
        server.add_route("GET", "/metrics", handler)
    with pytest.raises(ValueError, match="must start with '/'"):
        server.add_route("GET", "api/x", handler)
    with pytest.raises(ValueError, match="no query"):
        server.add_route("GET", "/api/x?y=1", handler)


async def test_stop_closes_idle_connections(metrics: ProxyMetrics) -> None:
    server = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
    await server.start()
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finished
    await writer.drain()
    await wait_until_async(lambda: server._connections, what="the connection accepted")
    await asyncio.wait_for(server.stop(), 10)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


# --- the sans-IO head parser, on literal bytes ---------------------------------------------


def test_parse_head() -> None:
    head = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nACCEPT:\t*/*\r\n\r\n")
    assert (head.method, head.target) == ("GET", "/metrics?x=1")
    assert head.headers == {"host": "a", "accept": "*/*"}
    assert head.content_length == 0


def test_parse_head_content_length() -> None:
    head = parse_head(b"PUT /x HTTP/1.1\r\nContent-Length: 12\r\ncontent-length: 12\r\n\r\n")
    assert head.content_length == 12


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET / HTTP/3\r\n\r\n", 505),
        (b"GET /\x7f HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n: empty name\r\n\r\n", 400),
    ],
)
def test_parse_head_errors(raw: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as info:
        parse_head(raw)
    assert info.value.status == status


def test_response_encoding() -> None:
    response = Response.text("hi\n", status=503, headers=(("Retry-After", "1"),))
    assert response.encode() == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 3\r\nConnection: close\r\nRetry-After: 1\r\n\r\nhi\n"
    )
    assert response.encode(include_body=False).endswith(b"Retry-After: 1\r\n\r\n")


# --- hostile input, at volume ---------------------------------------------------------------

_VALID = (
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /metrics HTTP/1.1\r\n\r\n",
    b"PUT /api/echo HTTP/1.1\r\nContent-Length: 13\r\nContent-Type: application/json\r\n\r\n"
    b'{"a": [1, 2]}',
    b"GET /readyz?x=1&y HTTP/1.0\r\nAccept: */*\r\nX-Long: " + b"v" * 300 + b"\r\n\r\n",
)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """A request broken the ways clients and scanners break them: bytes flipped, inserted,
    deleted or duplicated, cut short, or followed by a second (pipelined) request."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            out[at:at] = bytes(rng.choice((b" ", b"\r", b"\n", b":", b"\0", b"\xff", b"/")))
        elif kind == 2:
            del out[at : at + rng.randint(1, 8)]
        elif kind == 3:
            out[at:at] = out[at : at + rng.randint(1, 40)] * rng.randint(1, 4)
        elif kind == 4:
            del out[at:]
        else:
            out += rng.choice(_VALID)
    return bytes(out)


@given(st.binary(max_size=600))
@settings(max_examples=2000, deadline=None)
def test_parse_head_answers_any_bytes_with_a_head_or_a_clear_4xx(data: bytes) -> None:
    try:
        head = parse_head(data)
    except HTTPError as exc:
        assert exc.status in (400, 505)
    else:
        assert head.target.startswith("/") and head.method


async def test_mutated_requests_get_a_clear_answer_and_harm_nothing(
    admin: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    """1,500 broken requests: each gets a well-formed HTTP reply (or, when nothing was asked,
    just a close), never a 5xx; no error is logged; the server keeps serving."""

    async def echo(request: Request) -> Response:
        return Response.json({"length": len(request.body)})

    admin.add_route("PUT", "/api/echo", echo)
    rng = random.Random(20261202)
    statuses: Counter[int] = Counter()
    for _ in range(1500):
        reader, writer = await asyncio.open_connection(*admin.address)
        writer.write(_mutate(rng, rng.choice(_VALID)))
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        if not data:
            statuses[0] += 1  # the client sent nothing that looked like a request
            continue
        status = Reply(data).status
        assert 200 <= status < 500 or status == 505, data[:200]
        statuses[status] += 1
    assert statuses[400] > 100 and statuses[200] > 10  # both kinds were exercised
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await get(admin, "/healthz")).status == 200
