"""Bare uvloop TCP byte relay: the ceiling for any Python (asyncio/uvloop) proxy.

One upstream connection per client; bytes are forwarded verbatim both ways with
pause/resume flow control. Usage: python bench/relay.py --listen H:P --upstream H:P
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class Side(asyncio.Protocol):
    transport: asyncio.Transport
    peer: Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:  # our write buffer is full: stop reading the peer
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


class Client(Side):
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.pending: list[bytes] = []  # bytes that arrive before the upstream is connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()  # until the upstream connection exists
        asyncio.get_running_loop().create_task(self.connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(Side, *self.upstream)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            up.transport.close()
            return
        up.peer, self.peer = self, up
        if self.pending:
            up.transport.write(b"".join(self.pending))
            self.pending.clear()
        self.transport.resume_reading()


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", type=hostport, required=True)
    ap.add_argument("--upstream", type=hostport, required=True)
    a = ap.parse_args()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(a.upstream), *a.listen, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
