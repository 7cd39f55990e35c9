"""The proxy side of the hand-off to shadow workers: batches, routed by key, never waited for.

The client path calls `observe` with the sampled requests of one reply chunk; they are
packed (wire.py) into the batch of the worker that owns their key (shards.shard_of) and
written once per event-loop iteration, or as soon as a batch reaches FRAME_BYTES. With a
`linger` (the workers' processes set one), a batch shorter than COALESCE_ITEMS waits up to
that long, or until the next tick, so that sparse sampling costs one write and one wake-up
of the worker per linger, not one per request; a longer one goes at the end of the
iteration. The requests' reply times are taken when they are observed, so waiting changes
no verdict, only when it is given. Past
PIPE_BUFFER_LIMIT bytes not yet taken by the workers, requests are dropped (queue_full); to
a worker that is down or restarting, with reason worker_down. A drop is recorded in the
batch where it happened, as a marker naming its keys (merge.MARKER): the worker makes them
cold exactly between the requests that came before the drop and those after it; too many
to name make one marker for every key. A worker that was unreachable hears first, on the
next socket, that every key is cold (unless it is a new worker, cold anyway).

One Handoff serves one proxy process: the one that also supervises the workers
(process.py) and each extra proxy process of `workers: N` (processes.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Final

from proxy.memcache.request import Request
from proxy.shadow.shards import shards_for
from proxy.shadow.stats import ShadowStats
from proxy.shadow.wire import COVERAGE, MARKER, RequestTuple, encode, pack_request
from proxy.shadow.words import DropReason

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
FLUSHES_KEPT: Final = 4
COALESCE_ITEMS: Final = 64
"""Requests waiting in batches past which they are written at the end of the loop iteration
even with a linger (a busy proxy's batches fill in one iteration: they never wait)."""

Group = tuple[int, float, Any]  # (session, replied_at, requests), or a drop marker


class Lane:
    """What one worker is owed: the batch being built (requests and drop markers)."""

    __slots__ = (
        "batch",
        "cold",
        "items",
        "lost",
        "lost_overflow",
        "sent",
        "size",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.batch: list[Group] = []
        self.items = 0
        self.size = 0
        self.lost = 0  # keys named by the markers in the batch
        self.lost_overflow = False  # past LOST_KEYS_LIMIT: one marker for every key, last
        self.cold = False  # unreachable meanwhile: the next socket starts with every key cold
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
        # Bytes of hand-off (in batches and the sockets' buffers) the process may hold.
        self.budget = PIPE_BUFFER_LIMIT
        self.dropped: Counter[str] = Counter()  # this process's own drops
        self.worker_queue = 0  # requests queued in the workers (their last reports)
        self.stopping = False
        self.linger = 0.0  # seconds a short batch may wait to be joined by more (see above)
        self._flush_handle: asyncio.Handle | None = None
        self._flush_soon = False  # _flush_handle runs at the end of this iteration
        # The last flush_alls handed over: (sent, replied, words), told to every new socket.
        self.flushes: deque[tuple[float, float, list[bytes]]] = deque(maxlen=FLUSHES_KEPT)

    def connect(
        self, shard: int, transport: asyncio.Transport | None, *, fresh: bool = True
    ) -> None:
        """A new socket to `shard`'s worker (None: it is down). `fresh`: a new worker, which
        starts with every key cold, so what was lost before it need not be told. Otherwise
        (another proxy process's feed to a running worker) it hears, before anything else,
        that what this process dropped meanwhile makes every key cold."""
        lane = self.lanes[shard]
        lane.transport = transport
        lane.sent = 0
        if transport is None:
            return
        if lane.cold and not fresh:
            # Every drop came before now (and after `hello`, nothing is dropped for it).
            transport.writelines(encode(("epoch", time.perf_counter())))
        lane.cold = False
        for sent, replied, words in self.flushes:  # (one whose delay is still running)
            transport.writelines(encode(("flush", sent, replied, words)))

    def lost_all(self, shard: int) -> None:
        """What was written to `shard`'s worker on a socket that broke may not have reached
        it: the next socket starts by making every key cold."""
        self.lanes[shard].cold = True

    @property
    def pending(self) -> int:
        """Requests in batches not yet written."""
        return sum(lane.items for lane in self.lanes)

    # -- the client path's hook (never waits) ---------------------------------------------

    def observe(self, requests: list[Request], session: int) -> None:
        try:
            self._observe(requests, session)
        except Exception:
            # A bug: which of these requests reached a batch is unknown, so every worker
            # makes every key cold after its next batch. The client path counts it.
            self.lose_everything()
            raise

    def _observe(self, requests: list[Request], session: int) -> None:
        lanes = self.lanes
        if len(lanes) == 1:
            self._observe_one(lanes[0], requests, session)
            return
        shadowed = self.stats.shadowed
        shards = len(lanes)
        now = time.perf_counter()  # (the replies of this chunk all came before it)
        routed: dict[int, list[RequestTuple]] = {}
        room = self._room()
        for request in requests:
            if not request.capture:
                continue
            shadowed[request.command] += 1
            size = _size(request)
            if request.command == "flush_all":
                self._flushed(request, now)
                size = 0  # (never dropped for room: one lost makes every key cold for long)
            packed: RequestTuple | None = None
            refused = ""
            for shard in shards_for(request.keys, shards, self.sampled):
                lane = lanes[shard]
                if lane.writer() is None or self.stopping:
                    refused = DropReason.WORKER_DOWN
                    lane.cold = True
                    continue
                if size > room:
                    refused = refused or DropReason.QUEUE_FULL
                    waiting = routed.pop(shard, None)
                    if waiting:  # (the requests before the drop keep their place)
                        lane.batch.append((session, now, waiting))
                        lane.items += len(waiting)
                    self._lose(lane, request.keys, now)
                    continue
                room -= size
                lane.size += size
                if packed is None:
                    packed = pack_request(request)
                routed.setdefault(shard, []).append(packed)
            if refused:
                self._count_drop(refused)
        for shard, items in routed.items():
            lane = lanes[shard]
            lane.batch.append((session, now, items))
            lane.items += len(items)
        self._after_add()

    def _observe_one(self, lane: Lane, requests: list[Request], session: int) -> None:
        """observe() with one worker: no routing (the common case, kept as cheap as before)."""
        shadowed = self.stats.shadowed
        if lane.writer() is None or self.stopping:
            for request in requests:
                if request.capture:
                    shadowed[request.command] += 1
                    self._count_drop(DropReason.WORKER_DOWN)
                    lane.cold = True
            return
        room = self._room()
        now = time.perf_counter()
        items: list[RequestTuple] = []
        for request in requests:
            if not request.capture:
                continue
            shadowed[request.command] += 1
            size = _size(request)
            if request.command == "flush_all":
                self._flushed(request, now)
                size = 0  # (never dropped for room: one lost makes every key cold for long)
            if size > room:
                self._count_drop(DropReason.QUEUE_FULL)
                if items:  # (the requests before the drop keep their place)
                    lane.batch.append((session, now, items))
                    lane.items += len(items)
                    items = []
                self._lose(lane, request.keys, now)
                continue
            room -= size
            lane.size += size
            items.append(pack_request(request))
        if items:
            lane.batch.append((session, now, items))
            lane.items += len(items)
        if lane.batch:
            self._after_add()

    def _flushed(self, request: Request, replied_at: float) -> None:
        """Remember a flush_all handed over: a worker that starts later (a restart) must
        still know of one whose delay has not run out (flush_seen)."""
        self.flushes.append((request.started or replied_at, replied_at, request.words))

    def _room(self) -> int:
        """Bytes the workers' sockets may still take: one budget (PIPE_BUFFER_LIMIT) for the
        whole process, whatever the number of workers, so memory does not grow with them."""
        used = 0
        for lane in self.lanes:
            transport = lane.writer()
            if transport is not None:
                used += transport.get_write_buffer_size()
            used += lane.size
        return self.budget - used

    def _after_add(self) -> None:
        if not any(lane.batch for lane in self.lanes):
            return
        self.stats.queue_depth = self.worker_queue + self.pending
        if any(lane.size >= FRAME_BYTES for lane in self.lanes):
            self.flush()
            return
        soon = self.linger <= 0.0 or self.pending >= COALESCE_ITEMS
        handle = self._flush_handle
        if handle is not None:
            if self._flush_soon or not soon:
                return
            handle.cancel()
        loop = asyncio.get_running_loop()
        if soon:
            self._flush_handle = loop.call_soon(self.flush)
        else:
            self._flush_handle = loop.call_later(self.linger, self.flush)
        self._flush_soon = soon

    def _count_drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.stats.dropped[reason] += 1

    def lose_everything(self) -> None:
        """Which requests of a chunk reached a batch is unknown (a bug raised in observe):
        each worker makes every key cold after what it is handed next (flush does it)."""
        for lane in self.lanes:
            lane.lost_overflow = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)
        self._flush_soon = True

    def _lose(self, lane: Lane, keys: list[bytes], now: float) -> None:
        """A change of these keys was dropped here: a marker in the batch, in its place."""
        if lane.lost_overflow:
            return  # every key is made cold at the end of the batch anyway
        lane.lost += len(keys)
        if lane.lost > LOST_KEYS_LIMIT:
            lane.lost_overflow = True
            return
        lane.batch.append((MARKER, now, list(keys) or None))

    # -- writes -----------------------------------------------------------------------------

    def flush(self, tick: bool = False) -> None:
        """Once per loop iteration, per linger or per FRAME_BYTES: hand each batch to its
        worker. `tick`: and a tick to every worker after its batch (in the same write)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        now = time.perf_counter()  # (every batch's horizon, and the tick's)
        trailer = encode(("tick", now)) if tick else None
        for lane in self.lanes:
            batch = lane.batch
            if not batch and not lane.lost_overflow:
                if trailer is not None:
                    transport = lane.writer()
                    if transport is not None:
                        transport.writelines(trailer)
                continue
            if lane.lost_overflow:  # after everything: conservative for all of them
                batch.append((MARKER, now, None))
            lane.batch = []
            lane.size = 0
            lane.lost = 0
            lane.lost_overflow = False
            items = lane.items
            lane.items = 0
            transport = lane.writer()
            if transport is None:
                self.dropped[DropReason.WORKER_DOWN] += items
                self.stats.dropped[DropReason.WORKER_DOWN] += items
                lane.cold = True
                continue
            message = encode(("batch", batch, now))
            transport.writelines(message if trailer is None else [*message, *trailer])
            lane.sent += items

    def coverage(self, threshold: int, since: float) -> None:
        """This process now hands over every request of the keys hashed below `threshold`
        (for a rise, of those sent from `since` on): in every worker's stream, in place."""
        now = time.perf_counter()
        for lane in self.lanes:
            lane.batch.append((COVERAGE, now, (threshold, since)))
        self.flush()

    def tick(self) -> None:
        """Tell every worker that it has everything observed until now: a verdict that needs
        ordered evidence waits for that (Scheduler.caught_up), and so does the merge of
        several proxies' streams (merge.Merger)."""
        if self.stopping:
            self.flush()
            return
        self.flush(tick=True)

    def send(self, shard: int, message: tuple[Any, ...]) -> bool:
        """Write a control message to one worker, after the batch it must follow."""
        lane = self.lanes[shard]
        transport = lane.writer()
        if transport is None:
            return False
        self.flush()
        transport.writelines(encode(message))
        return True

    def close(self, goodbye: bool = False) -> None:
        """Stop handing over; `goodbye`: tell each worker this stream ended cleanly (a feed
        that closes without it may have lost messages: the worker makes its keys cold)."""
        self.flush()
        self.stopping = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if goodbye:
            for lane in self.lanes:
                transport = lane.writer()
                if transport is not None:
                    transport.writelines(encode(("bye",)))


def _size(request: Request) -> int:
    size = ITEM_OVERHEAD + len(request.line) + len(request.response or b"")
    if request.data is not None:
        size += len(request.data)
    return size


__all__ = [
    "COALESCE_ITEMS",
    "FRAME_BYTES",
    "ITEM_OVERHEAD",
    "LOST_KEYS_LIMIT",
    "PIPE_BUFFER_LIMIT",
    "Handoff",
]
