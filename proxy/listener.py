"""Where clients connect: listen sockets that can stop accepting and start again.

While memshadow's Memcached is down its listener is closed, so a new client gets what a
dead Memcached gives it, a refused connection, instead of a connection that is accepted and
then closed (a noreply write on it would be lost without a word). The sockets stay bound
all along (the port is kept, SO_REUSEPORT groups too): closing is shutdown() of the listening
socket, which makes it refuse new connections and reset those not yet accepted; opening is
listen() again on the same socket. Connections already accepted are not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

LISTEN_BACKLOG = 1024


def bind_sockets(
    host: str, port: int, *, reuse_port: bool = False, every_address: bool = True
) -> list[socket.socket]:
    """Bound, not yet listening, non-blocking TCP sockets for HOST:PORT: one per address the
    host resolves to (the first only, unless `every_address`), as asyncio's create_server
    binds them. A port 0 is resolved once and the same port bound explicitly everywhere:
    only a port bound by number survives a shutdown() of its socket on Linux."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: list[tuple[int, object]] = []
    socks: list[socket.socket] = []
    spare: socket.socket | None = None
    try:
        for family, kind, proto, _, address in infos if every_address else infos[:1]:
            if (family, address) in seen:
                continue
            seen.append((family, address))
            if port == 0:
                # An explicit port: the one a first socket gets for port 0 (kept bound until
                # the real one is, so that nothing takes it in between).
                spare = _socket(family, kind, proto, reuse_port)
                spare.bind(address)
                port = spare.getsockname()[1]
            address = (address[0], port, *address[2:])
            sock = _socket(family, kind, proto, reuse_port)
            socks.append(sock)
            sock.bind(address)
            if spare is not None:
                spare.close()
                spare = None
    except BaseException:
        for sock in socks:
            sock.close()
        if spare is not None:
            spare.close()
        raise
    return socks


def _socket(family: int, kind: int, proto: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """Bound sockets that accept clients while open()."""

    def __init__(
        self,
        socks: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        if not socks:
            raise ValueError("a listener needs at least one socket")
        self.socks = socks
        self.protocol_factory = protocol_factory
        self.backlog = backlog
        self._servers: list[asyncio.AbstractServer] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socks[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def is_open(self) -> bool:
        return bool(self._servers)

    async def open(self) -> None:
        """Listen and accept; OSError if a socket cannot listen (say, something else took
        its port while it was closed)."""
        if self._servers:
            return
        loop = asyncio.get_running_loop()
        try:
            for sock in self.socks:
                # The event loop's server gets a duplicate, which it closes when it stops:
                # the bound socket itself lives on.
                twin = socket.socket(fileno=os.dup(sock.fileno()))
                try:
                    server = await loop.create_server(
                        self.protocol_factory, sock=twin, backlog=self.backlog
                    )
                except BaseException:
                    twin.close()
                    raise
                self._servers.append(server)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop accepting: new connections are refused, those not accepted yet are reset."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for sock in self.socks:
            with contextlib.suppress(OSError):  # ENOTCONN: it was not listening
                sock.shutdown(socket.SHUT_RD)

    def release(self) -> None:
        """Close for good: the sockets too."""
        self.close()
        for sock in self.socks:
            sock.close()
