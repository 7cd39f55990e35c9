"""The merge of several proxies' hand-offs, sans-IO (workers: N).

With several proxy processes, every key belongs to one shadow worker (shards.py), so its
operations are judged by one engine in one order. A worker then hears from every proxy
process. Each proxy's stream is in its own reply order and carries a horizon
(wire.py: a batch's sent_at, a tick's now: nothing observed before it is still to come); on
one host all of them read the same CLOCK_MONOTONIC, so the worker can interleave the streams
in reply order exactly: `Merger` releases a group once every live stream's horizon has
passed its reply time. A stream whose horizon falls `stall` seconds behind the freshest
one (a stopped process) no longer holds the others back; what it sends later for times
already released comes too late to be ordered, and its keys are made cold rather than
replayed out of order.
"""

from __future__ import annotations

from collections import deque

from proxy.shadow.wire import Group


class _Stream:
    __slots__ = ("closed", "horizon", "pending")

    def __init__(self, horizon: float) -> None:
        self.horizon = horizon
        self.pending: deque[Group] = deque()
        self.closed = False


class Merger:
    """Interleaves several proxies' hand-off streams in reply order (see the module doc)."""

    def __init__(self, stall: float = 1.0, feeds: int = 0) -> None:
        """feeds: the other proxy processes' streams expected (workers - 1); until each has
        joined (or while one is away, being restarted) the dispatcher is never told that
        everything is in: its requests, or its drops, may still be to come."""
        self.stall = stall
        self.released = float("-inf")  # everything replied before this has been released
        self.absent = feeds
        self._streams: dict[int, _Stream] = {}
        self._feeds: set[int] = set()

    def open(self, stream: int, now: float, feed: bool = False) -> None:
        """A proxy process joins; nothing it observed before `now` will come."""
        self._streams[stream] = _Stream(now)
        if feed:
            self._feeds.add(stream)
            self.absent = max(0, self.absent - 1)

    def close(self, stream: int) -> None:
        """It is gone: what it sent is released in order, it holds nobody back any more
        (a feed's successor is expected in its place)."""
        state = self._streams.get(stream)
        if state is not None:
            state.closed = True
        if stream in self._feeds:
            self._feeds.discard(stream)
            self.absent += 1

    def add(self, stream: int, groups: list[Group], horizon: float) -> list[Group]:
        """Queue a batch; returns the groups that came too late to be ordered."""
        state = self._streams.get(stream)
        if state is None:
            return groups
        late: list[Group] = []
        released = self.released
        pending = state.pending
        for group in groups:
            if group[1] <= released:
                late.append(group)
            else:
                pending.append(group)
        if horizon > state.horizon:
            state.horizon = horizon
        return late

    def tick(self, stream: int, horizon: float) -> None:
        state = self._streams.get(stream)
        if state is not None and horizon > state.horizon:
            state.horizon = horizon

    def release(self, now: float) -> tuple[list[Group], float]:
        """The groups every stream has vouched for, in reply order, and the dispatcher's
        tick: the horizon of every open stream, a stalled one included, so that a verdict
        needing ordered evidence waits for it (and gives up as unverified) rather than
        judging without what the stalled stream may still hold. `now` is the watermark
        only when no stream is open."""
        # A stream is stalled when it lags the freshest one, not the clock: a worker that
        # was itself slow to read (it runs niced) finds every stream equally behind.
        live = [state.horizon for state in self._streams.values() if not state.closed]
        if live:
            freshest = max(live)
            watermark = min(h for h in live if freshest - h <= self.stall)
            everyone = min(live)
        else:
            watermark = everyone = now
        if self.absent:
            everyone = float("-inf")
        out: list[Group] = []
        for stream, state in list(self._streams.items()):
            pending = state.pending
            while pending and pending[0][1] <= watermark:
                out.append(pending.popleft())
            if state.closed and not pending:
                del self._streams[stream]
        if len(out) > 1:
            out.sort(key=_replied_at)  # stable: one stream's groups keep their order
        if watermark > self.released:
            self.released = watermark
        return out, everyone

    @property
    def pending(self) -> int:
        """Requests waiting for the other streams' horizons."""
        return sum(
            len(group[2]) if group[0] > 0 else 0
            for state in self._streams.values()
            for group in state.pending
        )

    @property
    def streams(self) -> int:
        return len(self._streams)


def _replied_at(group: Group) -> float:
    return group[1]


__all__ = ["Merger"]
