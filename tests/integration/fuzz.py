"""Differential fuzzer of the client path: mutated request streams sent straight to one
memcached and through memshadow to another (a twin: both fresh, same settings, same operations
in the same order, so even cas values agree), requiring the same bytes and the same connection
fate. `make fuzz` runs it for as long as asked; the suite runs a short campaign.

    python -m tests.integration.fuzz --seconds 600 [--twins 2] [--seed N]

Each input is a stream of classic and meta commands and data blocks, mutated (bytes flipped,
inserted, deleted, duplicated; lines cut; binary garbage), sent in one or two chunks split at
a random byte, followed by a marker request whose reply ends the exchange. Every difference
is written to a file with its input; the proxy's log is watched for errors.

After each input the two memcacheds' states are compared (the fuzzed keys, and the cas
counter through a probe store): the first input after which they differ is reported as the
root of the divergence, unless an item seconds from its expiry explains it (each memcached's
clock ticks in its own phase), and both are restarted empty, so one divergence cannot show
up again in every later reply (a cas counter one apart differs in every cas that follows).
Both are also restarted after a delayed flush_all. (The probe reads every fuzzed key between
inputs, so an item is never new to `mg ... h` in a later input.)

With `--shadow inline|process` the proxy also shadows every request (rate 1.0) to a Redis of
its own, so the same hostile streams go through sampling, translation, replay and comparison:
the run then also requires no error logged and no shadow error, and reports the verdicts
(every mismatch's example is written out). The twins' restarts are Memcached restarts for
the shadow (its keys turn cold).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import (
    ProxyThread,
    ServerProcess,
    memcached_argv,
    noise_reasons,
    proxy_config,
    redis_argv,
    totals,
    wait_until,
)

MARKER = b"mg fuzz:end v O424242\r\n"
MARKER_REPLY = b"EN O424242\r\n"
PATIENCE_S = 30.0
"""How long a server that should answer may take (a loaded host stalls processes)."""
# memcached's LRU maintainer rewrites bumped items in the background (incr/decr padding then
# depends on timing): two memcacheds would disagree with no proxy at all.
DETERMINISTIC = ("-o", "no_lru_maintainer,no_lru_crawler")

_SEEDS = (
    b"set k%d 5 0 3\r\nabc\r\n",
    b"get k%d k%d\r\n",
    b"gets k%d\r\n",
    b"add k%d 0 0 1 noreply\r\nx\r\n",
    b"append k%d 0 0 2\r\nde\r\n",
    b"cas k%d 0 0 1 1\r\nz\r\n",
    b"incr n%d 7\r\n",
    b"set n%d 0 0 2\r\n10\r\n",
    b"decr n%d 3 noreply\r\n",
    b"touch k%d 0\r\n",
    b"gat 0 k%d\r\n",
    b"delete k%d\r\n",
    b"mg k%d v f c s k O1\r\n",
    b"mg k%d t v\r\n",
    b"ms k%d 3 T0 F7 c\r\nxyz\r\n",
    b"ms k%d 2 MA q\r\nab\r\n",
    b"md k%d q\r\n",
    b"ma n%d N0 J13 D2 v\r\n",
    b"mg Zm9v%d b v\r\n",
    b"mn\r\n",
    b"version\r\n",
    b"verbosity 0\r\n",
    b"flush_all 0\r\n",
)


def generate(rng: random.Random, keys: int = 8) -> bytes:
    """A stream of a few seed requests on a few keys, then mutated."""
    parts = []
    for _ in range(rng.randint(1, 6)):
        seed = rng.choice(_SEEDS)
        parts.append(seed.replace(b"%d", str(rng.randrange(keys)).encode()))
    data = bytearray(b"".join(parts))
    for _ in range(rng.choice((0, 0, 1, 1, 2, 4))):
        kind = rng.randrange(7)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            data[at:at] = rng.choice((b" ", b"\r", b"\n", b"\r\n", b"\0", b"noreply", b"b", b"q"))
        elif kind == 2:
            del data[at : at + rng.randint(1, 6)]
        elif kind == 3:
            data[at:at] = data[at : at + rng.randint(1, 30)]
        elif kind == 4:
            data[at:at] = rng.randbytes(rng.randint(1, 12))
        elif kind == 5:
            data[at:at] = str(rng.choice((-1, 0, 2**31, 2**32, 2**64, 250, 1 << 20))).encode()
        else:
            data[at:at] = b" " + b"k" * rng.choice((249, 250, 251))
    return bytes(data)


def exchange(
    port: int, chunks: list[bytes], quiet: float, marked: bool = False
) -> tuple[bytes, bool]:
    """Send the chunks and the marker; read until the marker's reply, a close, or `quiet`
    seconds of silence. (reply bytes, whether the server closed the connection).

    marked: the other server answered the marker, so this one should too: wait for it (or a
    close) up to PATIENCE_S instead of `quiet` (a stalled process is not a difference)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
    out = b""
    closed = False
    try:
        for chunk in chunks:
            sock.sendall(chunk)
        sock.sendall(MARKER)
        sock.settimeout(PATIENCE_S if marked else quiet)
        while not out.endswith(MARKER_REPLY):
            data = sock.recv(65536)
            if not data:
                closed = True
                break
            out += data
    except TimeoutError:
        pass
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    finally:
        sock.close()
    return out, closed


_RETRIEVAL = (b"get", b"gets", b"gat", b"gats", b"bget")
_TTL = re.compile(rb" t-?\d+")
# A retrieval command right after a data block whose 2-byte terminator was not "\r\n"
# ("xyz\r\x07get k..."): memcached answers the bad chunk and reads the command that follows.
_AFTER_BAD_CHUNK = re.compile(rb"\r[\s\S](?:" + b"|".join(_RETRIEVAL) + rb")\Z")


def _retrieval(word: bytes) -> bool:
    return word in _RETRIEVAL or _AFTER_BAD_CHUNK.search(word) is not None


def explain(stream: bytes, direct: tuple[bytes, bool], proxied: tuple[bytes, bool]) -> str | None:
    """Why the two differ, when it is a known and documented difference (README, "The data
    path"); None when it is not (a bug)."""
    if direct[1] != proxied[1]:
        return None
    # (the marker follows the stream: an unterminated last line ends with it)
    for line in (stream + MARKER).split(b"\n"):
        words = [word for word in line.rstrip(b"\r").split(b" ") if word]  # (" gets k")
        if words and _retrieval(words[0]) and any(len(word) > 250 for word in words[1:]):
            # memcached 1.6.18 drops the replies it has not flushed yet when a get names a
            # key over 250 bytes; memshadow flushes them first (an `mn`), so they arrive.
            return "long_key_get"
    if _TTL.sub(b" t*", direct[0]) == _TTL.sub(b" t*", proxied[0]):
        # Only a remaining TTL differs: each twin's clock ticks in its own second (a TTL only
        # comes from a mutation: the seeds set none).
        return "ttl_clock_tick"
    silent = not direct[0].endswith(MARKER_REPLY) and not proxied[0].endswith(MARKER_REPLY)
    if silent and (proxied[0].startswith(direct[0]) or direct[0].startswith(proxied[0])):
        # The stream ended inside a data block. memcached sends the replies it holds (after
        # quiet commands, or of requests read in the same read as the block's start) only
        # when it is not in a data block, so what comes out depends on how the same bytes
        # were split into reads, straight or through memshadow (whose sentinel after a quiet
        # command also flushes). Reproduced: the same bytes in one read give memcached's
        # answer memshadow's.
        return "unflushed_at_data_block"
    return None


# The keys the seeds and the mutations name (a mutation adds a key of 249 or 250 bytes).
_STATE_KEYS = tuple(
    [b"k%d" % i for i in range(8)] + [b"n%d" % i for i in range(8)] + [b"k" * 249, b"k" * 250]
)
_STATE_PROBE = (
    b"".join(b"mg %s k v f c t s\r\n" % key for key in _STATE_KEYS)
    + b"ms fuzz:probe 1 c\r\nx\r\n"  # its cas is the counter's next value
    + b"mn\r\n"
)
_DELAYED_FLUSH = re.compile(rb"flush_all +0*[1-9]")
SHORT_TTL = 2  # seconds left under which an item may expire at a different moment in each twin

Item = tuple[bytes, int, int, int]  # (value, flags, cas, seconds left: -1 for none)


@dataclass(frozen=True)
class State:
    raw: bytes
    items: dict[bytes, Item]
    counter: int  # the cas the probe store was given: the counter's value


def parse_state(raw: bytes) -> State | None:
    """The probe's reply, parsed; None while it is incomplete."""
    items: dict[bytes, Item] = {}
    at = 0
    for key in _STATE_KEYS:
        end = raw.find(b"\r\n", at)
        if end < 0:
            return None
        words = raw[at:end].split(b" ")
        at = end + 2
        if words[0] == b"EN":
            continue
        if words[0] != b"VA":
            raise ValueError(f"state probe of {key!r}: {raw[at - 2 - 200 : at]!r}")
        size = int(words[1])
        if len(raw) < at + size + 2:
            return None
        flags = {word[:1]: word[1:] for word in words[2:]}
        items[key] = (raw[at : at + size], int(flags[b"f"]), int(flags[b"c"]), int(flags[b"t"]))
        at += size + 2
    tail = raw[at:]
    if not tail.endswith(b"MN\r\n"):
        return None
    if not (tail.startswith(b"HD c") and tail.count(b"\r\n") == 2):
        raise ValueError(f"state probe: {tail[:200]!r}")
    return State(raw, items, int(tail[4 : tail.index(b"\r\n")]))


def state(port: int) -> State:
    """The fuzzed keys (value, flags, cas, TTL) and the cas counter of one memcached."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
    out = b""
    try:
        sock.sendall(_STATE_PROBE)
        while (parsed := parse_state(out)) is None:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"memcached on {port} closed during the state probe")
            out += data
    finally:
        sock.close()
    return parsed


def _short_ttl(*states: State) -> bool:
    return any(0 <= item[3] <= SHORT_TTL for st in states for item in st.items.values())


def explain_divergence(before: State, direct: State, behind: State) -> str | None:
    """Why the two memcacheds' states parted, when no proxy could be the cause; None when it
    is not known (the root input of a bug, or of memcached's own nondeterminism: look)."""
    if direct.counter == behind.counter and direct.items.keys() == behind.items.keys():
        ticks = [
            abs(direct.items[key][3] - behind.items[key][3])
            for key in direct.items
            if direct.items[key] != behind.items[key]
        ]
        same_but_ttl = all(direct.items[key][:3] == behind.items[key][:3] for key in direct.items)
        if same_but_ttl and max(ticks, default=0) <= 1:
            return "ttl_clock_tick"  # a remaining TTL one second apart: each clock's phase
        if all(
            a[1:] == b[1:] and _padding_apart(a[0], b[0])
            for a, b in ((direct.items[k], behind.items[k]) for k in direct.items)
        ):
            # memcached pads a shorter incr/decr result with spaces in place only when no
            # other connection holds the item at that moment; the previous state probe's
            # connection, closing on another memcached thread, sometimes still does.
            return "incr_padding"
    if _short_ttl(before, direct, behind):
        # An item seconds from its expiry, before or after: it expires at a tick of each
        # memcached's own clock, whose phase is set by when it started.
        return "expiry_clock_tick"
    return None


def _padding_apart(a: bytes, b: bytes) -> bool:
    """The same value, or the same number with and without incr's padding spaces."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return short.isdigit() and long.rstrip(b" ") == short


@dataclass
class Divergence:
    """The input after which the twins' memcacheds no longer held the same state."""

    stream: bytes
    cut: int
    before: bytes
    direct: bytes
    behind: bytes


@dataclass
class Findings:
    inputs: int = 0
    slow: int = 0  # inputs whose marker was swallowed (a data block left open): quiet wait
    differences: list[tuple[bytes, int, tuple[bytes, bool], tuple[bytes, bool]]] = field(
        default_factory=list
    )
    errors_logged: list[str] = field(default_factory=list)
    fates: Counter[str] = field(default_factory=Counter)
    explained: Counter[str] = field(default_factory=Counter)
    divergences: list[Divergence] = field(default_factory=list)
    diverged_explained: Counter[str] = field(default_factory=Counter)
    # --shadow: verdicts by outcome, mismatches by (command, kind), noise by reason,
    # dropped and shadow errors by reason, and the mismatches' examples
    verdicts: Counter[str] = field(default_factory=Counter)
    mismatches: Counter[str] = field(default_factory=Counter)
    noise: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    shadow_errors: Counter[str] = field(default_factory=Counter)
    mismatch_examples: list[object] = field(default_factory=list)


class _ErrorCatcher(logging.Handler):
    def __init__(self, findings: Findings) -> None:
        super().__init__(logging.ERROR)
        self.findings = findings

    def emit(self, record: logging.LogRecord) -> None:
        self.findings.errors_logged.append(self.format(record))


class Twin:
    """A fresh memcached straight, another behind memshadow (shadowing every request to a
    Redis of its own, with the worker `shadow` names, if given)."""

    def __init__(self, shadow: str | None = None) -> None:
        self.direct = ServerProcess(memcached_argv(*DETERMINISTIC))
        self.behind = ServerProcess(memcached_argv(*DETERMINISTIC))
        self.direct.start()
        self.behind.start()
        self.redis: ServerProcess | None = None
        if shadow is None:
            config = proxy_config(self.behind)
        else:
            self.redis = ServerProcess(redis_argv())
            self.redis.start()
            config = proxy_config(self.behind, self.redis, 1.0, worker=shadow)
        self.proxy = ProxyThread(config)
        self.proxy.start()

    def shadow_figures(self, findings: Findings) -> None:
        """Add the shadow's verdicts, drops, errors and mismatch examples, once it judged
        everything it was handed."""
        shadow = self.proxy.shadow
        if shadow is None:
            return
        self.proxy.settle(60)
        stats = shadow.stats
        findings.verdicts.update(totals(self.proxy))
        for (command, kind), n in stats.mismatches.items():
            findings.mismatches[f"{command}:{kind}"] += n
        findings.noise.update(noise_reasons(self.proxy))
        findings.dropped.update(stats.dropped)
        findings.shadow_errors.update(stats.errors)
        if stats.mismatches:
            findings.mismatch_examples.append(self.proxy.call(lambda: shadow.examples.to_json()))

    def states(self) -> tuple[State, State]:
        return state(self.direct.port), state(self.behind.port)

    def reset(self) -> None:
        """Both memcacheds restarted empty, their cas counters from the start again, their
        clocks started within a few milliseconds of each other."""
        self.direct.restart()
        self.behind.restart()

    def close(self) -> None:
        self.proxy.stop()
        self.direct.stop()
        self.behind.stop()
        if self.redis is not None:
            self.redis.stop()


def settle(
    twin: Twin, stream: bytes, cut: int, before: State, findings: Findings, lock: threading.Lock
) -> State:
    """Compare the twins' states after `stream`; when they differ (still, a moment later:
    the memcached behind the proxy may be finishing what it was sent), record why (or the
    input, when nothing explains it) and restart both empty. Both are also restarted after
    a delayed flush_all, which would empty them at different ticks of their clocks. The
    state both now hold."""
    direct, behind = twin.states()
    if direct.raw != behind.raw:

        def alike() -> bool:
            nonlocal direct, behind
            direct, behind = twin.states()
            return direct.raw == behind.raw

        with contextlib.suppress(AssertionError):  # (they stay different: recorded below)
            wait_until(alike, 5.0, "the twins alike")
    if direct.raw != behind.raw:
        why = explain_divergence(before, direct, behind)
        with lock:
            if why is None:
                findings.divergences.append(
                    Divergence(stream, cut, before.raw, direct.raw, behind.raw)
                )
            else:
                findings.diverged_explained[why] += 1
    elif not _DELAYED_FLUSH.search(stream):
        return direct
    else:
        with lock:
            findings.diverged_explained["reset_after_delayed_flush"] += 1
    twin.reset()
    direct, behind = twin.states()
    assert direct.raw == behind.raw, (direct.raw, behind.raw)
    return direct


def campaign(
    twin: Twin,
    rng: random.Random,
    findings: Findings,
    until: float,
    limit: int,
    lock: threading.Lock,
    quiet: float,
) -> None:
    try:
        before, _ = twin.states()
        while time.monotonic() < until:
            with lock:
                if findings.inputs >= limit:
                    return
                findings.inputs += 1
            stream = generate(rng)
            cut = rng.randrange(len(stream) + 1)
            chunks = [c for c in (stream[:cut], stream[cut:]) if c]
            direct = exchange(twin.direct.port, chunks, quiet)
            proxied = exchange(
                twin.proxy.port, chunks, quiet, marked=direct[0].endswith(MARKER_REPLY)
            )
            before = settle(twin, stream, cut, before, findings, lock)
            with lock:
                if not direct[0].endswith(MARKER_REPLY):
                    findings.slow += 1
                findings.fates["closed" if direct[1] else "open"] += 1
                if direct != proxied:
                    reason = explain(stream, direct, proxied)
                    if reason is None:
                        findings.differences.append((stream, cut, direct, proxied))
                    else:
                        findings.explained[reason] += 1
    except Exception as exc:  # (a twin that cannot go on must not look like a clean run)
        with lock:
            findings.errors_logged.append(f"campaign on twin {twin.direct.port}: {exc!r}")


def run(
    seconds: float,
    inputs: int,
    twins: int,
    seed: int,
    quiet: float = 0.15,
    shadow: str | None = None,
) -> Findings:
    findings = Findings()
    catcher = _ErrorCatcher(findings)
    logging.getLogger().addHandler(catcher)
    pairs = [Twin(shadow) for _ in range(twins)]
    lock = threading.Lock()
    try:
        until = time.monotonic() + seconds
        threads = [
            threading.Thread(
                target=campaign,
                args=(pair, random.Random(seed + i), findings, until, inputs, lock, quiet),
            )
            for i, pair in enumerate(pairs)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for pair in pairs:
            pair.shadow_figures(findings)
    finally:
        for pair in pairs:
            pair.close()
        logging.getLogger().removeHandler(catcher)
    return findings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--inputs", type=int, default=10**9, help="stop after this many inputs")
    ap.add_argument("--twins", type=int, default=2, help="twin pairs fuzzed in parallel")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("fuzz-differences.txt"))
    ap.add_argument(
        "--quiet",
        type=float,
        default=0.15,
        help="seconds of silence that end an exchange whose marker a data block swallowed",
    )
    ap.add_argument(
        "--shadow",
        choices=("inline", "process"),
        default=None,
        help="also shadow every request to a Redis per twin, with this worker (inline: the "
        "shadow's log is watched for errors too; process: only the proxy's)",
    )
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    started = time.monotonic()
    findings = run(args.seconds, args.inputs, args.twins, seed, args.quiet, args.shadow)
    elapsed = time.monotonic() - started
    print(
        f"seed {seed}: {findings.inputs:,} inputs in {elapsed:.0f} s "
        f"({findings.inputs / elapsed:,.0f}/s over {args.twins} twins), "
        f"{findings.slow:,} ended by silence, fates {dict(findings.fates)}, "
        f"explained differences {dict(findings.explained)}, "
        f"{len(findings.differences)} unexplained, "
        f"state divergences explained {dict(findings.diverged_explained)}, "
        f"{len(findings.divergences)} unexplained, {len(findings.errors_logged)} errors logged"
    )
    if args.shadow:
        print(
            f"shadow ({args.shadow}): verdicts {dict(findings.verdicts)}, "
            f"mismatches {dict(findings.mismatches)}, noise {dict(findings.noise)}, "
            f"dropped {dict(findings.dropped)}, shadow errors {dict(findings.shadow_errors)}"
        )
    failed = findings.mismatches or findings.shadow_errors
    if findings.differences or findings.divergences or findings.errors_logged or failed:
        with args.out.open("w") as out:
            for stream, cut, direct, proxied in findings.differences:
                out.write(f"input {stream!r} cut {cut}\n")
                out.write(f"  direct  {direct!r}\n  proxied {proxied!r}\n")
            for d in findings.divergences:
                out.write(f"diverged after {d.stream!r} cut {d.cut}\n  before  {d.before!r}\n")
                out.write(f"  direct  {d.direct!r}\n  behind  {d.behind!r}\n")
            for error in findings.errors_logged:
                out.write(f"logged: {error}\n")
            for examples in findings.mismatch_examples:
                out.write(f"shadow mismatch examples: {examples!r}\n")
        print(f"written to {args.out}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
