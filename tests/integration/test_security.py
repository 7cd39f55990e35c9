"""Security through a real memshadow process: Redis over TLS with a CA and a client
certificate of the test's own, an ACL user whose password comes from a file, an admin token
from the environment, and none of those secrets anywhere a person or a scraper can see them
(logs, every admin page and API, /metrics, --check-config), also when Redis refuses the
password and when the config is reloaded."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import hiredis
from pymemcache.client.base import Client

from tests.support import (
    ROOT,
    ServerProcess,
    ThrowawayCA,
    free_port,
    memcached_argv,
    start_memshadow,
    tls_redis_argv,
    wait_until,
)


def _tls_redis_call(port: int, ca: Path, cert: Path, key: Path, *args: str) -> object:
    """One command as the test's own admin user, over TLS."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    raw = socket.create_connection(("127.0.0.1", port), 5)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        reader = hiredis.Reader()
        for command in (("AUTH", "admin", "admin-pw"), args):
            sock.sendall(hiredis.pack_command(command))
            reply: object = False
            while reply is False:
                reader.feed(sock.recv(1 << 16))
                reply = reader.gets()
        return reply


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str, labels: str) -> float:
    pattern = re.escape(name) + r"\{[^}]*" + re.escape(labels) + r"[^}]*\} (\S+)"
    return sum(float(m) for m in re.findall(pattern, text))


def test_tls_acl_and_secrets_never_shown(tmp_path: Path) -> None:
    password = "pw-" + secrets.token_hex(8)
    rotated = "pw-" + secrets.token_hex(8)
    token = "tok-" + secrets.token_hex(8)
    examples_secret = "ex-" + secrets.token_hex(12)
    ca = ThrowawayCA(tmp_path)
    cert, key = ca.issue("memshadow")
    redis = ServerProcess(
        tls_redis_argv(
            *ca.issue("redis", "IP:127.0.0.1"), ca.cert,
            "--user", "alice", "on", f">{password}", "~*", "&*", "+@all",
            "--user", "admin", "on", ">admin-pw", "~*", "&*", "+@all",
            "--user", "default", "off",
            client_certs=True,
        )
    ).start()  # fmt: skip
    memcached = ServerProcess(memcached_argv()).start()
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(password + "\n")
    admin = free_port()
    config = tmp_path / "memshadow.yaml"
    config.write_text(
        f"listen: 127.0.0.1:0\n"
        f"memcached: 127.0.0.1:{memcached.port}\n"
        f"admin: 127.0.0.1:{admin}\n"
        "shadow:\n"
        f"  redis: rediss://alice@127.0.0.1:{redis.port}/0\n"
        f"  redis_password_file: {secret_file}\n"
        f"  redis_tls_ca_file: {ca.cert}\n"
        f"  redis_tls_cert_file: {cert}\n"
        f"  redis_tls_key_file: {key}\n"
        "  sample_rate: 1.0\n"
    )
    environ = dict(
        os.environ,
        MEMSHADOW_ADMIN_TOKEN=token,
        MEMSHADOW_EXAMPLES_SECRET=examples_secret,
        PYTHONPATH=str(ROOT),
    )
    environ.pop("MEMSHADOW_REDIS_PASSWORD", None)
    proc, port = start_memshadow("--config", str(config), env=environ)
    log: list[str] = []
    assert proc.stderr is not None
    drain = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
    drain.start()
    base = f"http://127.0.0.1:{admin}"
    seen: list[str] = []
    try:
        client = Client(("127.0.0.1", port), connect_timeout=5, timeout=5)
        for i in range(100):
            client.set(f"k{i}", f"v{i}".encode(), noreply=False)
            assert client.get(f"k{i}") == f"v{i}".encode()

        def matches() -> float:
            text = _get(base + "/metrics")[1]
            return _metric(text, "memshadow_shadow_comparisons_total", 'outcome="match"')

        wait_until(lambda: matches() >= 200, what="comparisons over TLS as alice")
        # Redis changes alice's password and drops her connections: memshadow's reconnects
        # are refused, counted, logged, and the clients see nothing of it.
        _tls_redis_call(redis.port, ca.cert, cert, key, "ACL", "SETUSER", "alice", "resetpass",
                        f">{rotated}")  # fmt: skip
        _tls_redis_call(redis.port, ca.cert, cert, key, "CLIENT", "KILL", "USER", "alice")

        def auth_failures() -> float:
            text = _get(base + "/metrics")[1]
            return _metric(text, "memshadow_shadow_redis_connect_failures_total", 'reason="auth"')

        wait_until(lambda: auth_failures() > 0, what="the refused password counted")
        for i in range(20):
            client.set(f"after{i}", b"x", noreply=False)
            assert client.get(f"after{i}") == b"x"
        # The new password in its file and a reload: the change needs a restart, and says so.
        secret_file.write_text(rotated + "\n")
        config.write_text(config.read_text() + "# rotated\n")
        status, _ = _post(base + "/api/reload", token)
        assert status == 200
        for path in (
            "/", "/metrics", "/healthz", "/readyz?verbose", "/api/shadow", "/api/shadow/config",
            "/api/audit", "/api/report", "/api/history", "/api/readiness",
            "/api/readiness?format=html", "/api/mismatches",
        ):  # fmt: skip
            status, body = _get(base + path)
            assert status == 200, (path, status, body[:200])
            seen.append(body)
        status, body = _put(base + "/api/shadow", '{"sample_rate": 0.5}', "tok-wrong")
        assert status == 401
        seen.append(body)
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        drain.join(10)
        redis.stop()
        memcached.stop()
    checked = _check_config(config, environ)
    assert any("AUTH failed" in line for line in log), log  # the refusal was logged...
    assert any("shadow.redis (a secret in it changed)" in line for line in log), log
    everything = "\n".join([*log, *seen, checked])
    for secret in (password, rotated, token, examples_secret):
        assert secret not in everything  # ...and no secret anywhere


def _check_config(config: Path, environ: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config), "--check-config"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def _request(method: str, url: str, body: str, token: str) -> tuple[int, str]:
    request = urllib.request.Request(
        url,
        data=body.encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _post(url: str, token: str) -> tuple[int, str]:
    return _request("POST", url, "", token)


def _put(url: str, body: str, token: str) -> tuple[int, str]:
    return _request("PUT", url, body, token)
