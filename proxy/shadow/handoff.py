"""The proxy side of the hand-off to shadow workers: batches, routed by key, never waited for.

The client path calls `observe` with the sampled requests of one reply chunk; they are
packed (wire.py) into the batch of the worker that owns their key (merge.shard_of) and
written once per event-loop iteration, or as soon as a batch reaches FRAME_BYTES. Past
PIPE_BUFFER_LIMIT bytes a worker has not taken yet, requests are dropped (queue_full); to a
worker that is down or restarting, with reason worker_down. The keys of requests dropped on
the way are sent to their worker before its next batch, so it stops trusting them.

One Handoff serves one proxy process: the one that also supervises the workers
(process.py) and each extra proxy process of `workers: N` (processes.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from proxy.memcache.request import Request
from proxy.shadow.merge import shard_of, shards_for
from proxy.shadow.stats import ShadowStats
from proxy.shadow.wire import RequestTuple, encode, pack_request

PIPE_BUFFER_LIMIT: Final = 8 * 1024 * 1024
"""Bytes handed to a worker but not taken by it yet (on top of the kernel's socket buffer),
plus the batch being built, past which new requests are dropped (queue_full) instead: about
40,000 small requests. A single request bigger than this is never handed over."""
FRAME_BYTES: Final = 1024 * 1024
"""A batch is written as soon as it holds this much, without waiting for the loop iteration
to end, so no frame is much bigger (the worker refuses frames over wire.MAX_FRAME)."""
LOST_KEYS_LIMIT: Final = 10_000
"""Keys of dropped requests remembered until the worker can be told; past it every key is
made cold instead (one message, whatever was dropped)."""
ITEM_OVERHEAD: Final = 64  # bytes a request tuple takes in a frame beyond its line, data, reply

Group = tuple[int, float, list[RequestTuple]]


class Lane:
    """What one worker is owed: the batch being built, and the keys lost meanwhile."""

    __slots__ = ("batch", "items", "lost", "lost_overflow", "sent", "size", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.batch: list[Group] = []
        self.items = 0
        self.size = 0
        self.lost: set[bytes] = set()
        self.lost_overflow = False
        self.sent = 0  # requests handed to the current worker

    def writer(self) -> asyncio.Transport | None:
        transport = self.transport
        return None if transport is None or transport.is_closing() else transport


class Handoff:
    """Routes the sampled requests to the shard workers' sockets (see the module doc)."""

    def __init__(self, shards: int, stats: ShadowStats, sampled: Callable[[bytes], bool]) -> None:
        self.lanes = [Lane() for _ in range(shards)]
        self.stats = stats
        self.sampled = sampled
        self.dropped: Counter[str] = Counter()  # this process's own drops
        self.worker_queue = 0  # requests queued in the workers (their last reports)
        self.stopping = False
        self._flush_handle: asyncio.Handle | None = None

    def connect(self, shard: int, transport: asyncio.Transport | None) -> None:
        """A new socket to `shard`'s worker (None: it is down). A new worker starts with
        every key cold, so what was lost before it need not be told."""
        lane = self.lanes[shard]
        lane.transport = transport
        lane.lost.clear()
        lane.lost_overflow = False
        lane.sent = 0

    @property
    def pending(self) -> int:
        """Requests in batches not yet written."""
        return sum(lane.items for lane in self.lanes)

    # -- the client path's hook (never waits) ---------------------------------------------

    def observe(self, requests: list[Request], session: int) -> None:
        lanes = self.lanes
        if len(lanes) == 1:
            self._observe_one(lanes[0], requests, session)
            return
        shadowed = self.stats.shadowed
        shards = len(lanes)
        routed: dict[int, list[RequestTuple]] = {}
        rooms: dict[int, int] = {}
        for request in requests:
            if not request.capture:
                continue
            shadowed[request.command] += 1
            size = _size(request)
            packed: RequestTuple | None = None
            refused = ""
            for shard in shards_for(request.keys, shards, self.sampled):
                lane = lanes[shard]
                room = rooms.get(shard)
                if room is None:
                    room = rooms[shard] = self._room(lane)
                if room < 0 or self.stopping:
                    refused = "worker_down"
                    self._lose(lane, request.keys)
                    continue
                if size > room:
                    refused = refused or "queue_full"
                    self._lose(lane, request.keys)
                    continue
                rooms[shard] = room - size
                lane.size += size
                if packed is None:
                    packed = pack_request(request)
                routed.setdefault(shard, []).append(packed)
            if refused:
                self._count_drop(refused)
        if routed:
            now = time.perf_counter()
            for shard, items in routed.items():
                lane = lanes[shard]
                lane.batch.append((session, now, items))
                lane.items += len(items)
            self._after_add()

    def _observe_one(self, lane: Lane, requests: list[Request], session: int) -> None:
        """observe() with one worker: no routing (the common case, kept as cheap as before)."""
        shadowed = self.stats.shadowed
        room = self._room(lane)
        if room < 0 or self.stopping:
            for request in requests:
                if request.capture:
                    shadowed[request.command] += 1
                    self._count_drop("worker_down")
            return
        items: list[RequestTuple] = []
        for request in requests:
            if not request.capture:
                continue
            shadowed[request.command] += 1
            size = _size(request)
            if size > room:
                self._count_drop("queue_full")
                self._lose(lane, request.keys)
                continue
            room -= size
            lane.size += size
            items.append(pack_request(request))
        if not items:
            return
        lane.batch.append((session, time.perf_counter(), items))
        lane.items += len(items)
        self._after_add()

    def _room(self, lane: Lane) -> int:
        """Bytes the lane may still take; -1 when its worker is down."""
        transport = lane.writer()
        if transport is None:
            return -1
        return PIPE_BUFFER_LIMIT - transport.get_write_buffer_size() - lane.size

    def _after_add(self) -> None:
        self.stats.queue_depth = self.worker_queue + self.pending
        if any(lane.size >= FRAME_BYTES for lane in self.lanes):
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def _count_drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.stats.dropped[reason] += 1

    def _lose(self, lane: Lane, keys: list[bytes]) -> None:
        if lane.lost_overflow or lane.writer() is None:
            return  # (a new worker starts with every key cold anyway)
        lane.lost.update(keys)
        if len(lane.lost) > LOST_KEYS_LIMIT:
            lane.lost.clear()
            lane.lost_overflow = True

    def lose(self, keys: list[bytes]) -> None:
        """Changes of these keys were dropped on the way: tell their workers."""
        shards = len(self.lanes)
        for key in keys:
            self._lose(self.lanes[shard_of(key, shards) if shards > 1 else 0], [key])

    # -- writes -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Once per loop iteration (or per FRAME_BYTES): hand each batch to its worker."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        now = 0.0
        for lane in self.lanes:
            batch = lane.batch
            if not batch:
                continue
            lane.batch = []
            lane.size = 0
            items = lane.items
            lane.items = 0
            transport = lane.writer()
            if transport is None:
                self.dropped["worker_down"] += items
                self.stats.dropped["worker_down"] += items
                continue
            self._write_lost(lane, transport)
            now = now or time.perf_counter()
            transport.writelines(encode(("batch", batch, now)))
            lane.sent += items

    def tick(self) -> None:
        """Tell every worker that it has everything observed until now: a verdict that needs
        ordered evidence waits for that (Scheduler.caught_up), and so does the merge of
        several proxies' streams (merge.Merger)."""
        self.flush()
        if self.stopping:
            return
        message = encode(("tick", time.perf_counter()))
        for lane in self.lanes:
            transport = lane.writer()
            if transport is not None:
                self._write_lost(lane, transport)
                transport.writelines(message)

    def send(self, shard: int, message: tuple[Any, ...]) -> bool:
        """Write a control message to one worker, after the batch it must follow."""
        lane = self.lanes[shard]
        transport = lane.writer()
        if transport is None:
            return False
        self.flush()
        transport.writelines(encode(message))
        return True

    def close(self) -> None:
        self.stopping = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    @staticmethod
    def _write_lost(lane: Lane, transport: asyncio.Transport) -> None:
        if lane.lost_overflow:
            transport.writelines(encode(("epoch",)))
        elif lane.lost:
            transport.writelines(encode(("lost", list(lane.lost))))
        lane.lost.clear()
        lane.lost_overflow = False


def _size(request: Request) -> int:
    size = ITEM_OVERHEAD + len(request.line) + len(request.response or b"")
    if request.data is not None:
        size += len(request.data)
    return size


__all__ = ["FRAME_BYTES", "ITEM_OVERHEAD", "LOST_KEYS_LIMIT", "PIPE_BUFFER_LIMIT", "Handoff"]
