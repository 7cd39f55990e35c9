"""Differential tests: the same bytes sent straight to memcached and through memshadow must
give byte-identical replies and the same connection fate (open or closed).

Each side has its own fresh memcached, fed the same operations in the same order, so even cas
values agree. Sentinels (`mn`) change no item state.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.memcache.request import SENTINEL, RequestFramer
from tests.integration import fuzz
from tests.support import (
    ProxyThread,
    RawClient,
    ServerProcess,
    memcached_argv,
    memcached_stats,
    proxy_config,
    wait_until,
)


@dataclass
class Twin:
    direct: ServerProcess
    behind: ServerProcess
    proxy: ProxyThread

    def exchange(
        self,
        chunks: list[bytes],
        gap: float = 0.0,
        quiet: float = 0.25,
        until: bytes | None = None,
        lockstep: bool = False,
    ) -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
        return (
            _exchange(self.direct.port, chunks, gap, quiet, until, lockstep),
            _exchange(self.proxy.port, chunks, gap, quiet, until, lockstep),
        )

    def assert_same(
        self,
        chunks: list[bytes] | bytes,
        gap: float = 0.0,
        quiet: float = 0.25,
        until: bytes | None = None,
        lockstep: bool = False,
    ) -> bytes:
        if isinstance(chunks, bytes):
            chunks = [chunks]
        direct, proxied = self.exchange(chunks, gap, quiet, until, lockstep)
        if proxied != direct:
            # A silence of `quiet` seconds ends a read whose length nothing else tells, and a
            # loaded host can stall either side for longer: once more, patiently, before
            # the difference counts (both memcacheds got the same requests again).
            _retrying(direct, proxied)
            direct, proxied = self.exchange(chunks, gap, max(quiet, PATIENT_QUIET), until, lockstep)
        assert proxied[1] == direct[1], f"connection fate differs: direct closed={direct[1]}"
        assert proxied[0] == direct[0]
        return direct[0]


PATIENT_QUIET = 2.0
"""The silence that ends a read the second time, after the first read differed."""


def _retrying(direct: tuple[bytes, bool], proxied: tuple[bytes, bool]) -> None:
    print(f"differed once, trying again with {PATIENT_QUIET} s: {direct!r} / {proxied!r}")


def _exchange(
    port: int,
    chunks: list[bytes],
    gap: float,
    quiet: float,
    until: bytes | None = None,
    lockstep: bool = False,
) -> tuple[bytes, bool]:
    """The replies to `chunks`, and whether the server closed the connection. `lockstep`:
    each chunk ends with `mn`, and the next one is sent once its MN is back (one read each,
    whatever the load); else a chunk `gap` seconds after the other. The replies end with
    `until` or, when that is not known, `quiet` seconds of silence."""
    client = RawClient(port)
    out = b""
    try:
        for chunk in chunks:
            client.send(chunk)
            if lockstep:
                out += client.read_quiet(30, limit=30, until=b"MN\r\n")
            elif gap:
                time.sleep(gap)
                out += client.read_quiet(0.01, limit=gap + 1)
        if until is None or not out.endswith(until):
            out += client.read_quiet(quiet, until=until)
    except (BrokenPipeError, ConnectionResetError):
        client.closed = True
        out += client.read_quiet(quiet)
    finally:
        client.close()
    return out, client.closed


def _twin(*flags: str) -> Iterator[Twin]:
    direct = ServerProcess(memcached_argv(*flags))
    behind = ServerProcess(memcached_argv(*flags))
    direct.start()
    behind.start()
    proxy = ProxyThread(proxy_config(behind))
    proxy.start()
    yield Twin(direct, behind, proxy)
    proxy.stop()
    direct.stop()
    behind.stop()


@pytest.fixture(scope="module")
def twin() -> Iterator[Twin]:
    # The LRU maintainer makes incr/decr padding depend on background timing (a bumped item
    # is rewritten unpadded), which would make two memcacheds disagree with no proxy at all.
    yield from _twin("-o", "no_lru_maintainer,no_lru_crawler")


@pytest.fixture(scope="module")
def binary_twin() -> Iterator[Twin]:
    """Two memcacheds that speak only the binary protocol (-B binary): text closes the
    connection at its first byte, newline or not."""
    yield from _twin("-B", "binary")


LONG_KEY = b"k" * 251


CASES: dict[str, bytes | list[bytes]] = {
    "pipelined mix": (
        b"set d:a 0 0 3\r\nabc\r\nget d:a d:missing d:a\r\nadd d:a 0 0 1\r\nx\r\n"
        b"replace d:b 0 0 1\r\nx\r\nappend d:a 0 0 2\r\nde\r\nprepend d:a 0 0 1\r\nz\r\n"
        b"gets d:a\r\nincr d:n 1\r\nset d:n 7 0 2\r\n10\r\nincr d:n 5\r\ndecr d:n 100\r\n"
        b"get d:n\r\ntouch d:a 100\r\ngat 0 d:a\r\ngats 100 d:a\r\ndelete d:a\r\ndelete d:a\r\n"
        b"version\r\nverbosity 0\r\n"
    ),
    "noreply everywhere": (
        b"set n:a 0 0 1 noreply\r\na\r\nadd n:a 0 0 1 noreply\r\nb\r\nget n:a\r\n"
        b"incr n:a 1 noreply\r\ndelete n:a noreply\r\ndelete n:a 0 noreply\r\nget n:a\r\n"
        b"touch n:a 10 noreply\r\nflush_all noreply\r\nverbosity 1 noreply\r\nversion\r\n"
    ),
    "noreply with errors": (
        b"set e:a 0 0 1 noreply extra\r\nx\r\n"  # word count: ERROR, then x runs as a command
        b"set e:a abc 0 3 noreply\r\nabc\r\n"  # bad flags hidden, abc -> ERROR
        b"set e:b 0 0 3 noreply\r\nabcd\r\n"  # bad data chunk hidden, \n -> ERROR
        b"incr e:b 1 noreply\r\nset e:c 0 0 1 noreply\r\nx\r\nincr e:c abc noreply\r\n"
        b"set " + LONG_KEY + b" 0 0 1 noreply\r\nx\r\nget e:a e:b e:c\r\n"
    ),
    "bad data chunks": b"set b:a 0 0 3\r\nbarx\r\nget b:a\r\nset b:b 0 0 1\r\nxy\r\nget b:b\r\n",
    "rejected storage lines": (
        b"set r:a 0 0 bad\r\ndelete r:a\r\nset r:a -1 0 1\r\nx\r\nset r:a 0 abc 1\r\nx\r\n"
        b"cas r:a 0 0 1\r\nx\r\ncas r:a 0 0 1 -5\r\nx\r\nset r:a 0 0 -1\r\n\r\n"
        b"set r:a 0 0 4294967299\r\nabc\r\nget r:a\r\nset r:a 4294967296 0 1\r\nq\r\ngets r:a\r\n"
        b"set r:a 0 0 2147483646\r\nget r:a\r\n"
    ),
    # Sent one request per read (LOCKSTEP: each one's MN awaited before the next): see
    # test_get_with_long_key_keeps_earlier_replies for batches.
    "too long keys": [
        b"get " + LONG_KEY + b"\r\nmn\r\n",
        b"get ok " + LONG_KEY + b" ok\r\nmn\r\n",
        b"gets " + LONG_KEY + b"\r\nmn\r\n",
        b"set " + LONG_KEY + b" 0 0 1\r\nx\r\nmn\r\n",
        b"delete " + LONG_KEY + b"\r\nmn\r\n",
        b"mg " + LONG_KEY + b" v\r\nms " + LONG_KEY + b" 1\r\nx\r\nmn\r\n",
    ],
    "wrong word counts": (
        b"set w:a 0 0\r\nget\r\ngets\r\nincr w:a\r\nincr w:a 1 2 3\r\ndelete\r\n"
        b"delete w:a 0 1 2\r\ndelete w:a 5\r\ntouch w:a\r\ntouch w:a abc\r\nverbosity\r\n"
        b"flush_all abc\r\nflush_all 1 2 3\r\ncas w:a 0 0 1\r\nx\r\ngat\r\ngat abc w:a\r\n"
        b"mn\r\n"
    ),
    "unknown commands and odd bytes": (
        b"GET x\r\nfoo\r\n\r\n\n  get   sp:a  \r\nget a\tb\r\nbget x\r\nset nul 0 0 1\0junk\r\n"
        b"x\r\nget nul\r\nstats detail\r\nversion foo bar\r\nversion\n"
    ),
    "meta without q": (
        b"ms m:a 3 T0 F5 c\r\nabc\r\nmg m:a v f s k O123 c\r\nmg m:miss v k O9\r\n"
        b"ms m:a 2 MA\r\nde\r\nmg m:a v\r\nma m:n N0 J13 v\r\nma m:n v\r\nma m:n MD D100 v\r\n"
        b"md m:a k O1\r\nmd m:a\r\nms m:b 1 ME\r\nx\r\nms m:b 1 ME\r\ny\r\nmg m:b v\r\n"
        b"ms m:c 3 Zbad\r\nabc\r\nms m:c 3 T1 T2\r\nabc\r\nmg m:c v v\r\nms m:c\r\nabc\r\n"
        b"ms m:c abc\r\nabc\r\nma m:c D-1\r\nmg\r\nms\r\nxyz\r\nmn\r\n"
    ),
    "meta with q and mn interleaving": (
        b"ms q:a 1 q\r\na\r\nms q:b 1 q\r\nb\r\nmg q:a v q\r\nmg q:zz v q k\r\nmn\r\n"
        b"mg q:b v q\r\nmd q:zz q\r\nmd q:a q\r\nmn\r\nmn\r\nmg q:a v q O5\r\n"
        b"ma q:n N0 J5 q v\r\nma q:n q v\r\nma q:zz q\r\nmn\r\nmn noreply\r\nmn\r\n"
        b"ms q:c 1 q MR\r\nx\r\nms q:c 3 q Zbad\r\nabc\r\nmn\r\n"
    ),
    "base64 meta keys": (
        b"ms "
        + base64.b64encode(b"b64 key")
        + b" 2 b\r\nhi\r\nmg "
        + base64.b64encode(b"b64 key")
        + b" b v k\r\nmg !!! b v\r\nms !!! 1 b\r\nx\r\nmn\r\n"
    ),
    "quit closes after earlier replies": b"set qq 0 0 1\r\nx\r\nget qq\r\nquit\r\nget qq\r\n",
    "quit with arguments": b"version\r\nquit now please\r\n",
    "http request closes": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "stats settings shape": b"set s:a 0 0 1\r\nx\r\nmn\r\n",
    "binary protocol passes through": bytes([0x80, 0x0B]) + bytes(22),
    "split everywhere": [
        b"se",
        b"t sp:x 0 0 5",
        b"\r",
        b"\nhel",
        b"lo\r",
        b"\nge",
        b"t sp:x\r\n",
        b"mg sp:x v q",
        b"\r\nmn\r\n",
    ],
}


LOCKSTEP = {"too long keys"}
"""Cases whose chunks each end with `mn`: the next chunk goes once its MN is back."""


@pytest.mark.parametrize("name", list(CASES))
def test_same_bytes_and_fate(twin: Twin, name: str) -> None:
    case = CASES[name]
    if name in LOCKSTEP:
        twin.assert_same(case, lockstep=True)
        return
    twin.assert_same(
        case if isinstance(case, list) else [case], gap=0.05 if isinstance(case, list) else 0.0
    )


def test_get_with_long_key_keeps_earlier_replies(twin: Twin) -> None:
    """A documented difference: memcached 1.6.18 throws away the replies it has not flushed
    yet when a get names a key over 250 bytes, so in one batch the `version` reply is lost.
    The proxy flushes with an `mn` before such a get: the client gets every reply, as it would
    from memcached had the requests arrived in separate reads."""
    stream = b"version\r\nget " + LONG_KEY + b"\r\nversion\r\n"
    direct, proxied = twin.exchange([stream])
    version = direct[0].split(b"\r\n")[-2] + b"\r\n"
    bad = b"CLIENT_ERROR bad command line format\r\n"
    assert direct[0] == bad + version  # memcached lost the first reply
    assert proxied[0] == version + bad + version


def test_long_line_without_newline_closes_like_memcached(twin: Twin) -> None:
    reply = twin.assert_same([b"version\r\n", b"set " + b"k" * 3000], gap=0.2, quiet=0.5)
    assert reply.startswith(b"VERSION")


def test_long_get_line_arriving_in_pieces_is_served(twin: Twin) -> None:
    keys = b" ".join(b"lg:%05d" % i for i in range(3000))
    line = b"set lg:00007 0 0 2\r\nhi\r\nget " + keys + b"\r\n"
    chunks = [line[i : i + 4000] for i in range(0, len(line), 4000)]
    reply = twin.assert_same(chunks, gap=0.01, quiet=30, until=b"END\r\n")
    assert reply.endswith(b"VALUE lg:00007 0 2\r\nhi\r\nEND\r\n")


def test_huge_multiget(twin: Twin) -> None:
    setup = b"".join(
        b"set hm:%d 0 0 %d noreply\r\n%s\r\n" % (i, len(b"%d" % i), b"%d" % i)
        for i in range(0, 5000, 3)
    )
    keys = b" ".join(b"hm:%d" % i for i in range(5000))
    reply = twin.assert_same([setup + b"get " + keys + b"\r\n"], quiet=30, until=b"END\r\n")
    assert reply.count(b"VALUE ") == len(range(0, 5000, 3))


def test_values_near_the_one_megabyte_limit(twin: Twin) -> None:
    biggest = 1048514  # largest value memcached -I 1m stores for a 3-byte key (REFERENCE 1.4)
    stream = [
        b"set big 0 0 %d\r\n" % biggest + b"a" * biggest + b"\r\n",
        b"get big\r\n",
        b"set big 0 0 %d\r\n" % (biggest + 1) + b"b" * (biggest + 1) + b"\r\n",
        b"get big\r\n",  # the too-large set deleted the old value
        b"set big 0 0 %d noreply\r\n" % (2 * biggest) + b"c" * (2 * biggest) + b"\r\n",
        b"mn\r\n",
    ]
    reply = twin.assert_same(stream, gap=0.1, quiet=30, until=b"MN\r\n")
    assert reply.count(b"SERVER_ERROR object too large for cache") == 1
    assert reply.endswith(b"END\r\nMN\r\n")


def test_interleaved_clients_keep_their_own_pairing(proxy: ProxyThread) -> None:
    """Many connections at once through the proxy: each gets exactly its own replies."""
    import concurrent.futures

    def work(i: int) -> bool:
        stream = (
            b"".join(
                b"set ic:%d:%d 0 0 2 noreply\r\n%02d\r\nmg ic:%d:%d v q\r\nget ic:%d:%d\r\n"
                % (i, j, j, i, j, i, j)
                for j in range(50)
            )
            + b"mn\r\n"
        )
        expected = (
            b"".join(
                b"VA 2\r\n%02d\r\nVALUE ic:%d:%d 0 2\r\n%02d\r\nEND\r\n" % (j, i, j, j)
                for j in range(50)
            )
            + b"MN\r\n"
        )
        client = RawClient(proxy.port)
        client.send(stream)
        got = client.read_until(b"MN\r\n")
        client.close()
        return got == expected

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(work, range(32)))


# -- bytes go to memcached as they arrive -----------------------------------------------------

# memcached's t/issue_50.t: 62 bytes of text, no newline, to a memcached started -B binary.
ISSUE_50 = b"Here's a bunch of garbage that doesn't look like the bin prot."


def _fate(
    port: int, chunks: list[bytes], expect: bytes | None = None, patience: float = 1.0
) -> tuple[bytes, bool]:
    """What a new connection gets for `chunks` (each sent on its own): (bytes, closed).
    With `expect` (what the direct memcached gave) it reads until it has as many bytes or
    is closed, then briefly for anything more; without it, until nothing comes for 0.4 s.
    `patience` multiplies those silences."""
    client = RawClient(port)
    out = b""
    try:
        for chunk in chunks:
            client.send(chunk)
            time.sleep(0.02)  # (separate reads, most of the time; any coalescing is fine too)
        if expect is not None:
            deadline = time.monotonic() + 10
            while len(out) < len(expect) and not client.closed and time.monotonic() < deadline:
                out += client.read_quiet(0.1, limit=1.0)
        out += client.read_quiet((0.4 if expect is None else 0.3) * patience)
    except (BrokenPipeError, ConnectionResetError):
        client.closed = True
    finally:
        client.close()
    return out, client.closed


def _same_fate(twin: Twin, chunks: list[bytes], binary: bool = False) -> tuple[bytes, bool]:
    direct = _fate(twin.direct.port, chunks)
    proxied = _fate(twin.proxy.port, chunks, expect=direct[0])
    if _judge_fates(chunks, direct, proxied, binary) is not None:
        # as in Twin.assert_same: once more, patiently, before the difference counts
        _retrying(direct, proxied)
        patience = PATIENT_QUIET / 0.3
        direct = _fate(twin.direct.port, chunks, patience=patience)
        proxied = _fate(twin.proxy.port, chunks, expect=direct[0], patience=patience)
    problem = _judge_fates(chunks, direct, proxied, binary)
    assert problem is None, problem
    return direct


def _judge_fates(
    chunks: list[bytes], direct: tuple[bytes, bool], proxied: tuple[bytes, bool], binary: bool
) -> str | None:
    """None when the two fates are the same, or differ only as the README documents; else
    what is wrong."""
    if proxied == direct:
        return None
    if binary and _sentinels_complete_a_header(chunks):
        # The documented difference: memshadow's `mn` brought a binary-only memcached the
        # 24 bytes it judges, which the client alone had not sent yet; closed sooner.
        if direct == (b"", False) and proxied == (b"", True):
            return None
        return f"not the documented binary-header difference: {direct!r} / {proxied!r}"
    if _flushed_early(chunks):
        # The documented difference: replies memcached keeps while a value is under way
        # were flushed by an `mn`; the rest of the value would bring them directly too.
        if proxied[1] == direct[1] and proxied[0].startswith(direct[0]):
            return None
        return f"not the documented early flush: {direct!r} / {proxied!r}"
    return f"direct: {direct!r}, through memshadow: {proxied!r}"


BINARY_HEADER = 24
"""What a binary-only memcached reads before it judges a connection: a first byte that is
not 0x80 closes it; fewer bytes wait."""


def _sentinels_complete_a_header(chunks: list[bytes]) -> bool:
    """Does the stream stop short of a binary header, while memshadow's `mn` sentinels
    behind its requests make up the difference? (README, Differences)"""
    stream = b"".join(chunks)
    requests, _ = RequestFramer().feed(stream)
    added = len(SENTINEL) * sum(1 for r in requests if r.sentinel or r.synthetic)
    return len(stream) < BINARY_HEADER <= len(stream) + added


def _flushed_early(chunks: list[bytes]) -> bool:
    """Does the stream end inside a data block, after a request memshadow put an `mn` behind?
    memcached sends no reply while it reads a value, and an `mn` makes it send those it has
    (README, Differences): through memshadow they may arrive before the value ends."""
    framer = RequestFramer()
    requests, _ = framer.feed(b"".join(chunks))
    return framer.in_block and any(r.sentinel for r in requests[:-1])


def test_replies_kept_while_a_value_arrives_may_come_sooner_behind_a_sentinel(
    twin: Twin,
) -> None:
    """The one timing difference left: memcached keeps its replies while it reads a value;
    the `mn` behind a noreply request makes it send them. The bytes are the same once the
    value is complete."""
    start = [b"set early:a 0 0 1\r\na\r\nset early:b 0 0 1 noreply\r\nb\r\nset early:c 0 0 1\r\n"]
    assert _same_fate(twin, start) == (b"", False)  # (directly: nothing yet)
    done = twin.assert_same([*start, b"c\r\n"], gap=0.1, until=b"STORED\r\nSTORED\r\n")
    assert done == b"STORED\r\nSTORED\r\n"


def test_text_to_a_binary_only_memcached_is_closed_as_directly(binary_twin: Twin) -> None:
    """t/issue_50.t through memshadow: the bytes reach memcached without waiting for a
    newline that never comes, and memcached's close reaches the client."""
    assert _same_fate(binary_twin, [ISSUE_50]) == (b"", True)
    # It judges a whole binary header (24 bytes): fewer wait, more are closed.
    assert _same_fate(binary_twin, [b"g", b"et k\r\n"]) == (b"", False)
    assert _same_fate(binary_twin, [ISSUE_50[:23], ISSUE_50[23:24]]) == (b"", True)
    # The one difference (README): a quiet request's `mn` counts towards those 24 bytes.
    short = [b"mg f:a q v\r\nset f:a "]  # 20 bytes, and memshadow's mn behind the mg
    assert _sentinels_complete_a_header(short)
    assert _fate(binary_twin.direct.port, short) == (b"", False)
    assert _fate(binary_twin.proxy.port, short) == (b"", True)


def test_the_start_of_a_line_reaches_memcached_as_it_arrives(twin: Twin) -> None:
    """memcached reads (and counts in bytes_read) the start of a line before its end
    arrives, directly and through memshadow alike."""
    _start_of_a_line(twin.direct, twin.direct.port)
    _start_of_a_line(twin.behind, twin.proxy.port)


def _start_of_a_line(server: ServerProcess, port: int) -> None:
    client = RawClient(port)
    try:
        client.send(b"version\r\n")
        client.read_until(b"\r\n")
        before = int(memcached_stats(server.port)["bytes_read"])
        calls = 0

        def read() -> int:  # since `before`, less the stats calls' own "stats\r\n"
            nonlocal calls
            calls += 1
            return int(memcached_stats(server.port)["bytes_read"]) - before - 7 * calls

        client.send(b"delete edge:ke")  # no newline yet
        wait_until(lambda: read() >= 14, what=f"memcached {server.port} read the start of a line")
        assert read() == 14
        client.send(b"y\r\n")
        assert client.read_until(b"\r\n") == b"NOT_FOUND\r\n"
    finally:
        client.close()


@st.composite
def _cut_stream(draw: st.DrawFn) -> list[bytes]:
    """Requests cut at random points, the last one left unfinished for good (at a random
    point of it, possibly mid-line; or dropped whole)."""
    requests = draw(st.lists(_request, min_size=1, max_size=8))
    last = requests.pop()
    stream = b"".join(requests) + last[: draw(st.integers(0, len(last) - 1))]
    points = sorted({p % (len(stream) + 1) for p in draw(st.lists(st.integers(0, 10_000)))})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    return [chunk for chunk in chunks if chunk]


@settings(
    max_examples=int(os.environ.get("MEMSHADOW_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(chunks=_cut_stream(), binary=st.booleans())
def test_streams_cut_anywhere_and_left_unfinished_fare_as_directly(
    twin: Twin, binary_twin: Twin, chunks: list[bytes], binary: bool
) -> None:
    """Any stream split at random points, its last request left unfinished forever: the
    same bytes back, the same fate (open, or closed by memcached), from a text memcached
    and from one that speaks only binary."""
    if binary:
        _same_fate(binary_twin, chunks, binary=True)
        return
    for server in (twin.direct, twin.behind):
        _exchange(server.port, [b"flush_all\r\n"], 0.0, 1.0, until=b"OK\r\n")
    _same_fate(twin, chunks)


# -- random streams, malformed ones included -------------------------------------------------

_keys = st.sampled_from([b"f:a", b"f:b", b"f:c", b"f:\tt", "f:é".encode(), LONG_KEY])
_short_keys = st.sampled_from([b"f:a", b"f:b", b"f:c", b"f:\tt", "f:é".encode()])
_numbers = st.sampled_from([b"0", b"5", b"100", b"-1", b"abc", b"+3", b"4294967296", b"010"])
_data = st.sampled_from([b"", b"abc", b"12", b"99 ", b" 7", b"18446744073709551615", b"x" * 100])
_tail = st.sampled_from([b"", b" noreply", b" NOREPLY", b" garbage", b" noreply extra"])


@st.composite
def _storage(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from([b"set", b"add", b"replace", b"append", b"prepend", b"cas"]))
    data = draw(_data)
    length = draw(st.sampled_from([b"%d" % len(data), b"%d" % (len(data) + 1), b"x"]))
    cas = b" " + draw(st.sampled_from([b"1", b"3", b"99", b"abc"])) if cmd == b"cas" else b""
    line = b"%s %s %s %s %s%s%s\r\n" % (
        cmd,
        draw(_keys),
        draw(_numbers),
        draw(_numbers),
        length,
        cas,
        draw(_tail),
    )
    return line + data + b"\r\n"


@st.composite
def _retrieval(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from([b"get", b"gets", b"gat", b"gats", b"bget"]))
    # Never "gat N" alone (crashes memcached 1.6.18 when pipelined), and no over-long key:
    # the documented difference of test_get_with_long_key_keeps_earlier_replies.
    keys = b" ".join(draw(st.lists(_short_keys, min_size=1, max_size=3)))
    if cmd in (b"gat", b"gats"):
        return b"%s %s %s\r\n" % (cmd, draw(_numbers), keys)
    return b"%s %s\r\n" % (cmd, keys)


@st.composite
def _other(draw: st.DrawFn) -> bytes:
    key = draw(_keys)
    return draw(
        st.sampled_from(
            [
                b"delete %s%s\r\n" % (key, draw(_tail)),
                b"delete %s 0\r\n" % key,
                b"incr %s %s%s\r\n" % (key, draw(_numbers), draw(_tail)),
                b"decr %s %s%s\r\n" % (key, draw(_numbers), draw(_tail)),
                b"incr %s 18446744073709551615\r\n" % key,
                b"touch %s %s%s\r\n" % (key, draw(_numbers), draw(_tail)),
                b"mg %s %s\r\n"
                % (
                    key,
                    b" ".join(
                        draw(
                            st.lists(
                                st.sampled_from([b"v", b"f", b"s", b"k", b"c", b"q", b"O7", b"h"]),
                                max_size=4,
                                unique=True,
                            )
                        )
                    ),
                ),
                b"md %s %s\r\n"
                % (
                    key,
                    b" ".join(
                        draw(
                            st.lists(
                                st.sampled_from([b"q", b"k", b"O1", b"C5"]), max_size=3, unique=True
                            )
                        )
                    ),
                ),
                b"ma %s %s\r\n"
                % (
                    key,
                    b" ".join(
                        draw(
                            st.lists(
                                st.sampled_from([b"N0", b"J13", b"D5", b"MD", b"q", b"v"]),
                                max_size=4,
                                unique=True,
                            )
                        )
                    ),
                ),
                b"mn\r\n",
                b"version\r\n",
                b"verbosity 0\r\n",
                b"bogus %s\r\n" % key,
                b"\r\n",
            ]
        )
    )


@st.composite
def _meta_set(draw: st.DrawFn) -> bytes:
    data = draw(_data)
    flags = draw(
        st.lists(
            st.sampled_from(
                [
                    b"T0",
                    b"T100",
                    b"F5",
                    b"q",
                    b"c",
                    b"k",
                    b"MA",
                    b"ME",
                    b"MP",
                    b"MR",
                    b"MS",
                    b"I",
                    b"Zx",
                ]
            ),
            max_size=4,
            unique=True,
        )
    )
    length = draw(st.sampled_from([b"%d" % len(data), b"%d" % (len(data) + 2), b"bad"]))
    return b"ms %s %s %s\r\n%s\r\n" % (draw(_keys), length, b" ".join(flags), data)


_request = st.one_of(_storage(), _retrieval(), _other(), _meta_set())


@settings(
    max_examples=int(os.environ.get("MEMSHADOW_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(requests=st.lists(_request, min_size=1, max_size=12), cut=st.integers(0, 10_000))
def test_random_streams(twin: Twin, requests: list[bytes], cut: int) -> None:
    stream = b"".join(requests) + b"mg fuzz:end v O424242\r\n"
    point = cut % len(stream)
    chunks = [c for c in (stream[:point], stream[point:]) if c]
    # Every example starts from two empty caches: an earlier example's item with a TTL of a
    # second or two expires at a different moment in each memcached (each one's clock ticks
    # once a second, in a phase set by when it started), which no proxy could hide.
    for server in (twin.direct, twin.behind):
        _exchange(server.port, [b"flush_all\r\n"], 0.0, 1.0, until=b"OK\r\n")
    # Most streams end at a command boundary, so their last reply is the final marker's; the
    # others (a data block left open) end when nothing more comes.
    twin.assert_same(chunks, quiet=0.6, until=b"EN O424242\r\n")


def test_the_fuzzer_names_the_input_after_which_the_twins_parted_and_starts_them_again() -> None:
    pair = fuzz.Twin()
    try:
        findings, lock = fuzz.Findings(), threading.Lock()
        empty, _ = pair.states()
        before = fuzz.settle(pair, b"set k1 0 0 1\r\nx\r\n", 0, empty, findings, lock)
        assert findings.divergences == [] and before.items == {}
        # One store that only the direct memcached saw: its key and its cas counter part.
        client = RawClient(pair.direct.port)
        client.send(b"set k3 0 0 1\r\ny\r\n")
        assert client.read_until(b"\r\n") == b"STORED\r\n"
        client.close()
        after = fuzz.settle(pair, b"gets k3\r\n", 4, before, findings, lock)
        [divergence] = findings.divergences
        assert (divergence.stream, divergence.cut, divergence.before) == (
            b"gets k3\r\n",
            4,
            before.raw,
        )
        assert b"VA 1 kk3" in divergence.direct and b"VA 1 kk3" not in divergence.behind
        # Both restarted empty: the same state again, the cas counters from the start.
        assert after.items == {} and after.counter == 1
        direct, behind = pair.states()
        assert direct.raw == behind.raw
        # A delayed flush_all (it empties each at a tick of its own clock): both restarted.
        before = fuzz.settle(
            pair, b"set k1 0 0 1\r\nx\r\nflush_all 2\r\n", 0, after, findings, lock
        )
        assert findings.diverged_explained == {"reset_after_delayed_flush": 1}
        assert before.items == {} and before.counter == 1
    finally:
        pair.close()


def _state(*items: tuple[bytes, int], counter: int = 9) -> fuzz.State:
    """A probe's state: (key, seconds left) items, their value b"v"."""
    parsed = {key: (b"v", 0, 1, ttl) for key, ttl in items}
    return fuzz.State(repr((parsed, counter)).encode(), parsed, counter)


@pytest.mark.parametrize(
    ("before", "direct", "behind", "why"),
    [
        # A remaining TTL one second apart: only the clocks' phases.
        (_state(), _state((b"k1", 5)), _state((b"k1", 4)), "ttl_clock_tick"),
        # Seconds from expiry before the input: gone in one, not yet in the other.
        (_state((b"k1", 1)), _state(), _state((b"k1", 0)), "expiry_clock_tick"),
        # ... or after it (the cas counters part too: an add found room in one only).
        (_state(), _state((b"k1", -1), counter=10), _state((b"k1", 2)), "expiry_clock_tick"),
        # A TTL far apart is not a tick: the wrong exptime went through.
        (_state(), _state((b"k1", 100)), _state((b"k1", 5)), None),
        # A long TTL explains nothing.
        (_state((b"k2", 600)), _state(), _state((b"k1", -1)), None),
        # No TTL at all: a key or a cas counter that parted is not known.
        (_state(), _state(), _state((b"k1", -1)), None),
        (_state(), _state(counter=9), _state(counter=10), None),
    ],
)
def test_a_divergence_is_explained_only_by_a_clock(
    before: fuzz.State, direct: fuzz.State, behind: fuzz.State, why: str | None
) -> None:
    assert fuzz.explain_divergence(before, direct, behind) == why


def test_the_state_probe_reply_is_parsed_not_searched() -> None:
    keys = fuzz._STATE_KEYS
    reply = b"VA 4 kk0 f3 c7 t-1 s4\r\n t5 \r\n" + b"".join(b"EN k%s\r\n" % key for key in keys[1:])
    parsed = fuzz.parse_state(reply + b"HD c8\r\nMN\r\n")
    assert parsed is not None
    assert parsed.items == {b"k0": (b" t5 ", 3, 7, -1)} and parsed.counter == 8
    # Incomplete: a value that ends in "MN" at a read's end, or a half line.
    assert fuzz.parse_state(b"VA 4 kk0 f3 c7 t-1 s4\r\nxxMN\r\n") is None
    assert fuzz.parse_state(reply + b"HD c8\r\n") is None


@pytest.mark.parametrize(
    ("stream", "direct", "proxied"),
    [
        (  # the 1M-input run's two differences
            b"ms k0 3 T0 F7 c\r\nxyz\r\x07get " + b"k" * 251 + b" k5\r\nflush_all 0\r\n",
            b"CLIENT_ERROR bad command line format\r\nOK\r\nEN O424242\r\n",
            b"CLIENT_ERROR bad data chunk\r\nCLIENT_ERROR bad command line format\r\nOK\r\n"
            b"EN O424242\r\n",
        ),
        (
            b"append k2 0 0 2\r\nde\r\xbeget  " + b"k" * 300 + b" k3\r\n",
            b"CLIENT_ERROR bad command line format\r\nEN O424242\r\n",
            b"CLIENT_ERROR bad data chunk\r\nCLIENT_ERROR bad command line format\r\n"
            b"EN O424242\r\n",
        ),
    ],
)
def test_a_long_key_get_right_after_a_bad_data_chunk_is_the_known_difference(
    stream: bytes, direct: bytes, proxied: bytes
) -> None:
    """memcached loses its unflushed replies (here the bad chunk's) at a get of a key over 250
    bytes, also when the get follows a data block's wrong terminator on the same line."""
    assert fuzz.explain(stream, (direct, False), (proxied, False)) == "long_key_get"
    assert fuzz.explain(b"set k 0 0 1\r\nxyz\r\n", (direct, False), (proxied, False)) is None


def test_a_short_fuzz_campaign_finds_no_unexplained_difference() -> None:
    """`make fuzz` runs the same fuzzer for as long as asked (see tests/integration/fuzz.py).
    (Here the number of inputs ends the run: its time limit only bounds a hang.)"""
    findings = fuzz.run(seconds=600, inputs=400, twins=1, seed=20261202)
    assert findings.inputs == 400
    assert findings.differences == [], findings.differences[:2]
    assert findings.divergences == [], findings.divergences[:2]
    assert findings.errors_logged == []


def test_a_short_shadowed_fuzz_campaign_finds_no_difference_and_no_mismatch() -> None:
    """The same hostile streams with the shadow on (rate 1.0, inline, so its log is watched
    too): translation, replay and comparison never fail, never report a mismatch, and the
    client path stays byte for byte the same."""
    findings = fuzz.run(seconds=600, inputs=300, twins=1, seed=20261203, shadow="inline")
    assert findings.inputs == 300
    assert findings.differences == [], findings.differences[:2]
    assert findings.divergences == [], findings.divergences[:2]
    assert findings.errors_logged == []
    assert findings.verdicts["match"] > 0, findings.verdicts
    assert findings.mismatches == Counter(), findings.mismatch_examples
    assert findings.shadow_errors == Counter()


def test_a_divergence_by_incr_padding_alone_is_explained() -> None:
    """Seen 3 times in 502k shadowed inputs: `decr n3 3 noreply` turned "10" into "7" on one
    twin and "7 " on the other (memcached pads in place only when no other connection holds
    the item); same cas, flags and TTL. Any other difference stays unexplained."""

    def state(**values: bytes) -> fuzz.State:
        items = {k.encode(): (v, 0, 4035, -1) for k, v in values.items()}
        return fuzz.State(b"%r" % items, items, 4040)

    before = state(n3=b"10", k1=b"x")
    explain = fuzz.explain_divergence
    assert explain(before, state(n3=b"7", k1=b"x"), state(n3=b"7 ", k1=b"x")) == "incr_padding"
    assert explain(before, state(n3=b"7", k1=b"x"), state(n3=b"8 ", k1=b"x")) is None
    assert explain(before, state(n3=b"x", k1=b"x"), state(n3=b"x ", k1=b"x")) is None
