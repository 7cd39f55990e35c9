"""The verdict hammer: many pymemcache connections through memshadow, the whole command mix.

Each connection works on keys of its own (disjoint) and on a few keys every connection shares
(hot), with TTLs of 0, 1 hour and 2 s, random 32-bit flags, binary values of 0-3 KB, large
incr/decr operands, gets+cas, gat, meta commands (some quiet) and noreply writes. Used by the
hammer tests and, run as `python -m tests.integration.hammer`, to print the figures of a run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from proxy.shadow.engine.worker import LATE
from proxy.shadow.metrics import DROP_REASONS

TTLS = (0, 0, 3600, 2)
COMMANDS = (
    "get",
    "get",
    "get_many",
    "set",
    "set",
    "set_noreply",
    "add",
    "replace",
    "append",
    "prepend",
    "append_noreply",
    "incr",
    "decr",
    "set_number",
    "delete",
    "delete_noreply",
    "touch",
    "gets_cas",
    "gat",
    "mg",
    "ms",
    "ms_quiet",
    "md",
    "ma",
)


def _value(rng: random.Random) -> bytes:
    size = rng.choice((0, 1, 16, 200, 1000, 3000))
    return rng.randbytes(size)


Mix = Callable[[Client, random.Random, str, list[str]], None]
"""One operation of a connection: (client, its random source, the key chosen, every key it
may use)."""


def full_mix(client: Client, rng: random.Random, key: str, keys: list[str]) -> None:
    """A command of the whole mix (COMMANDS) on `key`."""
    _one(client, rng, rng.choice(COMMANDS), key, keys)


@dataclass
class HammerResult:
    # Appended to by every connection's thread (list.append is atomic; `+=` is not).
    counts: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def operations(self) -> int:
        return sum(self.counts)


def hammer_connection(
    port: int,
    own: list[str],
    shared: list[str],
    seconds: float,
    seed: int,
    result: HammerResult,
    stop: threading.Event | None = None,
    mix: Mix = full_mix,
) -> None:
    """One client connection running `mix` for `seconds` (or until `stop` is set)."""
    rng = random.Random(seed)
    client = Client(("127.0.0.1", port), default_noreply=False, timeout=15)
    keys = own + shared
    deadline = time.monotonic() + seconds
    done = 0
    try:
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            # Three in four operations on the connection's own keys (when it has some).
            mine = own and (not shared or rng.random() < 0.75)
            key = rng.choice(own) if mine else rng.choice(shared)
            mix(client, rng, key, keys)
            done += 1
    except Exception as exc:  # any client-visible error fails the test
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        client.close()
        result.counts.append(done)


def _one(client: Client, rng: random.Random, command: str, key: str, keys: list[str]) -> None:
    ttl = rng.choice(TTLS)
    flags = rng.randrange(1 << 32)
    kb = key.encode()
    if command == "get":
        client.get(key)
    elif command == "get_many":
        client.get_many(rng.sample(keys, min(8, len(keys))))
    elif command == "set":
        client.set(key, _value(rng), expire=ttl, flags=flags)
    elif command == "set_noreply":
        client.set(key, _value(rng), expire=ttl, flags=flags, noreply=True)
    elif command == "set_number":
        client.set(key, str(rng.randrange(1 << 64)).encode(), expire=ttl, flags=flags)
    elif command == "add":
        client.add(key, _value(rng), expire=ttl, flags=flags)
    elif command == "replace":
        client.replace(key, _value(rng), expire=ttl, flags=flags)
    elif command == "append":
        client.append(key, _value(rng)[:100])
    elif command == "append_noreply":
        client.append(key, b"x", noreply=True)
    elif command == "prepend":
        client.prepend(key, _value(rng)[:100])
    elif command in ("incr", "decr"):
        delta = rng.choice((1, rng.randrange(1 << 32), rng.randrange(1 << 64)))
        with contextlib.suppress(MemcacheClientError):  # non-numeric value
            if getattr(client, command)(key, delta) is None and rng.random() < 0.5:
                client.set(key, str(rng.randrange(1 << 64)).encode(), expire=ttl)
    elif command == "delete":
        client.delete(key)
    elif command == "delete_noreply":
        client.delete(key, noreply=True)
    elif command == "touch":
        client.touch(key, ttl)
    elif command == "gets_cas":
        _, cas = client.gets(key)
        if cas is not None:
            client.cas(key, _value(rng), cas, expire=ttl, flags=flags)
    elif command == "gat":
        client.raw_command(b"gat %d %s" % (ttl, kb), b"END\r\n")
    elif command == "mg":
        _mg(client, kb)
    elif command == "ms":
        value = _value(rng)[:500]
        client.raw_command(b"ms %s %d T%d F%d\r\n%s" % (kb, len(value), ttl, flags, value), b"\r\n")
    elif command == "ms_quiet":
        value = _value(rng)[:500]
        mode = rng.choice((b"S", b"E", b"A", b"P", b"R"))
        client.raw_command(
            b"ms %s %d T%d F%d M%s q\r\n%s\r\nmn" % (kb, len(value), ttl, flags, mode, value),
            b"MN\r\n",
        )
    elif command == "md":
        client.raw_command(b"md %s q\r\nmn" % kb, b"MN\r\n")
    elif command == "ma":
        with contextlib.suppress(MemcacheClientError, MemcacheServerError):
            client.raw_command(
                b"ma %s N%d J%d D%d v\r\nmn"
                % (kb, ttl, rng.randrange(1000), rng.randrange(1 << 40)),
                b"MN\r\n",
            )
    else:
        raise ValueError(command)


def _mg(client: Client, key: bytes) -> None:
    # raw_command stops at its end token and drops what follows: end with mn, read to MN.
    client.raw_command(b"mg %s v f t\r\nmn" % key, b"MN\r\n")


class Hammer:
    """`connections` client threads, each with `own_keys` keys of its own and the `shared`
    keys in common, running `mix` for `seconds` (or until stop())."""

    def __init__(
        self,
        port: int,
        connections: int,
        seconds: float,
        own_keys: int = 20,
        shared: list[str] | None = None,
        prefix: str = "h",
        mix: Mix = full_mix,
    ) -> None:
        self.result = HammerResult()
        self._stop = threading.Event()
        shared = [] if shared is None else shared
        self.keys = list(shared)
        self.threads = []
        for i in range(connections):
            own = [f"{prefix}{i}:{j}" for j in range(own_keys)]
            self.keys += own
            self.threads.append(
                threading.Thread(
                    target=hammer_connection,
                    args=(port, own, shared, seconds, i, self.result, self._stop, mix),
                    daemon=True,
                )
            )
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120) -> None:
        for thread in self.threads:
            thread.join(timeout)


def figures(proxy: object) -> dict[str, object]:
    """The shadow's outcome figures of a ProxyThread (comparisons, mismatches, noise)."""
    stats = proxy.shadow.stats  # type: ignore[attr-defined]
    outcomes: Counter[str] = Counter()
    for (_, outcome), n in stats.comparisons.items():
        outcomes[outcome] += n
    mismatches: Counter[str] = Counter()
    for (command, kind), n in stats.mismatches.items():
        mismatches[f"{command}:{kind}"] += n
    noise: Counter[str] = Counter()
    for (_, reason), n in stats.noise.items():
        noise[reason] += n
    return {
        "comparisons": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "mismatches": dict(mismatches),
        "noise": dict(noise),
        "dropped": dict(stats.dropped),
        "repairs": stats.repairs,
    }


LOAD_DROPS = frozenset((*DROP_REASONS, LATE))
"""Why a loaded host drops shadow work: the shadow could not keep up (its queue or its
hand-off full, its worker or loop starved, a proxy process's requests too late for the
merge), or Redis did not answer in time. How many depends on the machine's load, never on
what the test checks."""


def assert_drops_accounted(
    proxy: object, out: dict[str, object], explained: frozenset[str] = LOAD_DROPS
) -> None:
    """Every drop of a run (`out`: its figures()) is counted under a reason the run
    explains (`explained`: by default, a loaded host's), and exported as counted: the
    memshadow_shadow_dropped_total series, one per reason, add up to what was dropped."""
    dropped: dict[str, int] = out["dropped"]  # type: ignore[assignment]
    assert {r: n for r, n in dropped.items() if r not in explained} == {}, dropped
    text = proxy.metrics.render().decode()  # type: ignore[attr-defined]
    exported = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("memshadow_shadow_dropped_total{")
    }
    assert {r: n for r, n in exported.items() if n} == {r: float(n) for r, n in dropped.items()}
    assert sum(exported.values()) == sum(dropped.values())


def main() -> None:
    from tests.support import ProxyThread, ServerProcess, memcached_argv, proxy_config, redis_argv

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--worker", choices=("inline", "process"), default="inline")
    parser.add_argument("--shared", type=int, default=0, help="hot keys shared by all")
    parser.add_argument("--workers", type=int, default=1, help="proxy processes (workers: N)")
    parser.add_argument("--reveal", action="store_true", help="show values in examples")
    args = parser.parse_args()
    memcached = ServerProcess(memcached_argv()).start()
    redis = ServerProcess(redis_argv()).start()
    config = proxy_config(memcached, redis, 1.0, worker=args.worker, reveal_examples=args.reveal)
    proxy = ProxyThread(dataclasses.replace(config, workers=args.workers))
    proxy.start()
    try:
        shared = [f"hot{i}" for i in range(args.shared)]
        hammer = Hammer(proxy.port, args.connections, args.seconds, shared=shared)
        hammer.join()
        proxy.settle(120)
        out = figures(proxy)
        print(
            f"connections={args.connections} worker={args.worker} shared={args.shared} "
            f"workers={args.workers} "
            f"operations={hammer.result.operations} client_errors={len(hammer.result.errors)}"
        )
        for name, value in out.items():
            print(f"  {name}: {value}")
    finally:
        proxy.stop()
        memcached.stop()
        redis.stop()


if __name__ == "__main__":
    main()
