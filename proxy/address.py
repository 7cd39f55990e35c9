"""Network addresses: HOST:PORT (HostPort) and the checks of a host and a port that it and the
Redis URL (proxy/redis/url.py) share."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from proxy.errors import InvalidValue

# A DNS name or IPv4 literal: letters, digits, '-', '_' and '.', not starting or ending with '.'.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def check_host(host: str) -> str:
    """`host` if it is a DNS name, an IPv4 or an IPv6 address (without brackets); else
    InvalidValue."""
    if not host:
        raise InvalidValue("missing host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidValue(f"invalid IPv6 address {host!r}") from None
        return host
    if not _HOSTNAME_RE.fullmatch(host):
        raise InvalidValue(f"invalid host name {host!r}")
    return host


def check_port(text: str, *, allow_zero: bool) -> int:
    """The port number `text` spells (1 to 65535, or 0 with allow_zero); else InvalidValue."""
    low = 0 if allow_zero else 1
    port = int(text) if _PORT_RE.fullmatch(text) else -1
    if not low <= port <= 65535:
        raise InvalidValue(f"port must be a number between {low} and 65535, got {text!r}")
    return port


def format_host(host: str) -> str:
    """The host as an address shows it: an IPv6 one in brackets."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class HostPort:
    """A TCP address. IPv6 hosts are kept without brackets and printed with them."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, allow_port_zero: bool = False) -> HostPort:
        """Parse ``HOST:PORT`` or ``[IPV6]:PORT``; raise InvalidValue (a ValueError) naming
        what is wrong. Port 0 (pick any free port) is only accepted with allow_port_zero."""
        text = text.strip()
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise InvalidValue(f"missing ']' in {text!r}; expected [IPV6]:PORT")
            host, rest = text[1:close], text[close + 1 :]
            if not rest.startswith(":"):
                raise InvalidValue(f"expected [IPV6]:PORT, got {text!r}")
            port_text = rest[1:]
            if not host or ":" not in host:
                raise InvalidValue(f"brackets are only for IPv6 addresses, got {text!r}")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise InvalidValue(f"expected HOST:PORT, got {text!r}")
            if not host:
                raise InvalidValue(
                    f"missing host in {text!r}; expected HOST:PORT, e.g. 127.0.0.1:11211"
                )
            if ":" in host:
                raise InvalidValue(
                    f"IPv6 addresses must be in brackets, e.g. [::1]:11211; got {text!r}"
                )
        return cls(check_host(host), check_port(port_text, allow_zero=allow_port_zero))

    def __str__(self) -> str:
        return f"{format_host(self.host)}:{self.port}"
