"""The one Redis URL type (redis:// and rediss://): what the config parses and the Redis client
connects with, its query options, and the TLS settings it stands for."""

from __future__ import annotations

import math
import re
import ssl
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qs, quote, unquote, urlsplit

from proxy.address import check_host, check_port, format_host
from proxy.errors import InvalidValue


@dataclass(frozen=True, slots=True)
class RedisURL:
    """Where the shadow copy lives: ``redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB]``.

    The one Redis URL type: the config parses it, the Redis client connects with it.
    str() hides the password so the value can be logged; to_url() gives it back in full.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    timeout: float | None = None  # seconds per command (?timeout=); None: the client's own
    tls_verify: bool = True  # rediss: check the server's certificate (?ssl_cert_reqs=none)
    # rediss: the CAs that vouch for the server (?ssl_ca_certs=; None: the system's) and a
    # client certificate for servers that ask for one (?ssl_certfile=, ?ssl_keyfile=).
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @classmethod
    def parse(cls, text: str, *, options: bool = False) -> RedisURL:
        """Parse a Redis URL; raise InvalidValue (a ValueError) naming what is wrong.

        options: accept the query parameters of _URL_OPTIONS (URLs given to the Redis client
        in code); the YAML has its own keys for these and refuses them. A user name without
        a password is accepted: the config may take the password from elsewhere
        (complete_redis), and a connection refuses to start without one.
        """
        text = text.strip()
        if "://" not in text:
            raise InvalidValue(f"expected a URL like redis://HOST:PORT/DB, got {_redact(text)!r}")
        after = text.partition("://")[2]
        netloc_end = min((i for i in map(after.find, "/?#") if i >= 0), default=len(after))
        if after.rfind("@") > netloc_end:
            # A password with '/', '?' or '#' in it: parsed as is, its tail would be quoted
            # in the messages below as a path, a query or a port.
            raise InvalidValue(
                f"the URL {_redact(text)!r} has an '@' after a '/', '?' or '#': percent-encode "
                "those characters in the user name or password (%2F, %3F, %23)"
            )
        try:
            parts = urlsplit(text)
        except ValueError as exc:  # e.g. an unclosed '[' of an IPv6 host
            raise InvalidValue(f"{exc} in {_redact(text)!r}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss"):
            raise InvalidValue(
                f"scheme must be redis:// or rediss://, got {parts.scheme + '://'!r}"
            )
        query = _url_options(parts.query) if options else {}
        if parts.query and not options:
            raise InvalidValue(f"query parameters are not supported, got '?{parts.query}'")
        if parts.fragment:
            raise InvalidValue(f"fragments are not supported, got '#{parts.fragment}'")
        netloc = parts.netloc.rpartition("@")[2]
        if not parts.hostname:
            raise InvalidValue(f"missing host in {_redact(text)!r}")
        host = check_host(parts.hostname)
        port = 6379
        port_text = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
        if ":" in port_text:
            port = check_port(port_text.rpartition(":")[2], allow_zero=False)
        path = parts.path
        if path in ("", "/"):
            db = _url_db(query.get("db", "0"))
        elif re.fullmatch(r"/[0-9]{1,9}", path):
            db = int(path[1:])
        else:
            raise InvalidValue(
                f"database must be a number, as in redis://HOST:PORT/0; got {path!r}"
            )
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        timeout = _url_timeout(query["timeout"]) if "timeout" in query else None
        verify = query.get("ssl_cert_reqs", "required").lower() != "none"
        return cls(
            host,
            port,
            db,
            username,
            password or None,
            scheme == "rediss",
            timeout,
            verify,
            query.get("ssl_ca_certs") or None,
            query.get("ssl_certfile") or None,
            query.get("ssl_keyfile") or None,
        )

    def to_url(self, *, redact: bool = False) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            secret = "***" if redact else quote(self.password, safe="")
            auth = f"{quote(self.username or '', safe='')}:{secret}@"
        elif self.username is not None:
            auth = f"{quote(self.username, safe='')}@"
        url = f"{scheme}://{auth}{format_host(self.host)}:{self.port}/{self.db}"
        options = []
        if self.timeout is not None:
            options.append(f"timeout={self.timeout:g}")
        if not self.tls_verify:
            options.append("ssl_cert_reqs=none")
        for name, path in (
            ("ssl_ca_certs", self.tls_ca_file),
            ("ssl_certfile", self.tls_cert_file),
            ("ssl_keyfile", self.tls_key_file),
        ):
            if path is not None:
                options.append(f"{name}={quote(path, safe='/')}")
        return url + ("?" + "&".join(options) if options else "")

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings of a rediss:// URL (None for redis://): the server's certificate
        and host name are checked against the given CAs (the system's by default) unless
        ssl_cert_reqs=none. Raises OSError or ssl.SSLError when a file cannot be loaded."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if not self.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.tls_cert_file is not None:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file, _no_passphrase)
        return context

    def __str__(self) -> str:
        return self.to_url(redact=True)


def _no_passphrase() -> str:
    # (OpenSSL would otherwise ask for one on the terminal, and block the event loop)
    raise ssl.SSLError("the client key is encrypted: give a key file without a passphrase")


_URL_OPTIONS: Final = (
    "timeout",
    "ssl_cert_reqs",
    "db",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
)


def _url_options(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in _URL_OPTIONS:
            raise InvalidValue(
                f"unknown Redis URL option {name!r} (known: {', '.join(_URL_OPTIONS)})"
            )
        options[name] = values[-1]
    return options


def _url_db(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise InvalidValue(f"database must be a number, got {text!r}")
    return int(text)


def _url_timeout(text: str) -> float:
    try:
        timeout = float(text)
    except ValueError:
        raise InvalidValue(f"bad timeout {text!r} in Redis URL") from None
    if not timeout > 0 or math.isinf(timeout):
        raise InvalidValue("timeout in Redis URL must be a positive number of seconds")
    return timeout


def _redact(url: str) -> str:
    """The URL as an error message may quote it: whatever comes before its last '@' (the
    user and password, even one with unencoded '/', '?' or '#') hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def parse_url(url: str | RedisURL) -> RedisURL:
    """A URL given to the Redis client in code, with its query options (``timeout``,
    ``ssl_cert_reqs=none``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``); a RedisURL
    as it is. ValueError when the text is not one."""
    return RedisURL.parse(url, options=True) if isinstance(url, str) else url
