"""The shadow engine's own CPU per request, without sockets on the client side.

Feeds the dispatcher (the same one the worker runs) captured requests shaped like the bench
load (memcaslap: 32-byte keys, 100-byte values, 90/10 get/set; every get finds the value its
key's last set stored, so every verdict is a match), in reply chunks of --chunk requests, and
replays them on a real redis-server. Reports the process CPU time (time.process_time: this
process only, the Redis server's excluded) per request, best of --repeat runs. Steadier than
an end-to-end run on a shared 2-core machine, so it can tell a 3% change; the end-to-end
figure (bench/run.py) stays the one that counts.

    python bench/shadow_cpu.py [--requests 50000] [--repeat 5] [--chunk 16] [--cluster]

--cluster replays on a 3-primary Redis Cluster (harness.start_redis_cluster, no replicas)
instead of one redis-server: the cluster target's cost next to the single node's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HOST, Processes, start_redis, start_redis_cluster

from proxy.memcache.request import Captured
from proxy.redis.connection import ConnectionOptions
from proxy.redis.store import RedisStore
from proxy.runtime import tune_gc
from proxy.shadow.engine.dispatcher import DispatcherSettings, ShadowDispatcher
from proxy.shadow.engine.mcreader import MemcachedReader
from proxy.shadow.stats import ShadowStats


def traffic(n: int, keys: int, seed: int) -> list[Captured]:
    """90/10 get/set over `keys` keys; each key is set before it is read."""
    rng = random.Random(seed)
    value = b"v" * 100
    names = [b"%032d" % i for i in range(keys)]
    stored: set[bytes] = set()
    out: list[Captured] = []
    for _ in range(n):
        key = rng.choice(names)
        if key not in stored or rng.random() < 0.1:
            stored.add(key)
            words = [b"set", key, b"0", b"0", b"100"]
            out.append(Captured("set", words, 100, True, value, b"STORED\r\n", 0.0))
        else:
            reply = b"VALUE " + key + b" 0 100\r\n" + value + b"\r\nEND\r\n"
            out.append(Captured("get", [b"get", key], -1, True, None, reply, 0.0))
    return out


async def one_run(redis_port: int, requests: list[Captured], chunk: int, cluster: bool) -> float:
    tune_gc()  # as the worker does
    stats = ShadowStats()
    store = RedisStore.from_url(  # as the worker builds it (service.py)
        f"redis://{HOST}:{redis_port}/0",
        ConnectionOptions(service_time=stats.redis_service.observe),
        size=2,
        cluster="true" if cluster else "false",
    )
    assert await store.start()
    reader = MemcachedReader(HOST, 1, timeout=1.0)  # never used: every verdict is a match
    dispatcher = ShadowDispatcher(
        store=store,
        reader=reader,
        stats=stats,
        settings=DispatcherSettings(),
    )
    await dispatcher.start()
    started = time.process_time()
    for start in range(0, len(requests), chunk):
        now = time.perf_counter()
        dispatcher.observe(requests[start : start + chunk], 1, replied_at=now)
        await asyncio.sleep(0)  # one loop iteration per reply chunk, as on a live proxy
        while stats.queue_depth > 1000:  # never drop: the figure is for judged requests
            await asyncio.sleep(0.001)
    await dispatcher.idle()
    used = time.process_time() - started
    await dispatcher.stop()
    await store.close()
    await reader.close()
    matches = sum(n for (_, outcome), n in stats.comparisons.items() if outcome == "match")
    if matches != len(requests):
        raise SystemExit(f"expected {len(requests)} matches, got {dict(stats.comparisons)}")
    return used / len(requests) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--cluster", action="store_true", help="a 3-primary Redis Cluster")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        servers = Processes(Path(directory))
        try:
            nodes = start_redis_cluster(servers) if args.cluster else [start_redis(servers)]
            ports = [node.port for node in nodes]
            requests = traffic(args.requests, args.keys, seed=1)
            results = []
            for _ in range(args.repeat):
                for port in ports:
                    flush = ["redis-cli", "-p", str(port), "FLUSHALL"]
                    subprocess.run(flush, check=True, capture_output=True)
                results.append(uvloop.run(one_run(ports[0], requests, args.chunk, args.cluster)))
            target = "3-primary cluster" if args.cluster else "one redis-server"
            print(
                f"shadow engine on {target}: {min(results):.2f} us CPU per request (best of "
                f"{args.repeat}; all: {', '.join(f'{r:.2f}' for r in results)})"
            )
        finally:
            servers.close()


if __name__ == "__main__":
    main()
