"""The proxy side's word to the shadow on which keys it hands over every request of.

The sampler decides for each request, as its line completes, whether the shadow captures it,
with the live threshold of ShadowControl. The shadow may judge a key only while it sees all of
its requests, so it must hear, in order with the requests themselves, when that set changes:

- a fall (rate lowered, shadow paused, halted or switched off) at once: from then on the
  keys above the new threshold are not captured, and the shadow turns them cold;
- a rise only once every request that was in flight under the old threshold has been
  answered: until then an uncaptured request of a new key may still be running in
  Memcached, and the shadow must not let a captured one establish that key. The rise is
  announced with that moment (`since`): operations sent before it cannot warm a new key.

One announcer serves one proxy process (its sessions, its hand-off).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

from proxy.memcache.request import Request
from proxy.shadow.control import ControlChange, ShadowControl

log = logging.getLogger("memshadow.shadow")

POLL_INTERVAL: Final = 0.01
"""How often a rise looks whether the requests in flight before it have been answered."""
RISE_GIVE_UP: Final = 30.0
"""A request still unanswered this long after a rise (Memcached stalled) no longer holds it
back: the rise is announced from then on, with a warning."""

Announce = Callable[[int, float], None]
"""Told (threshold, since): every request of the keys hashed below `threshold` is handed
over; for a rise, of those sent from `since` on (perf_counter)."""
InFlight = Callable[[], Iterable[deque[Request]]]
"""The requests each client session of this process awaits a reply to (oldest first)."""


class CoverageAnnouncer:
    """Announces the sample this process hands over (see the module doc)."""

    def __init__(self, control: ShadowControl, announce: Announce) -> None:
        self.control = control
        self.announce = announce
        self.announced = control.threshold
        self._in_flight: InFlight = tuple
        self._target = self.announced  # a rise waiting for its requests to be answered
        self._waiting: list[tuple[deque[Request], Request]] = []
        self._rise_started = 0.0
        self._poll: asyncio.TimerHandle | None = None
        control.add_listener(self._changed)

    def attach(self, in_flight: InFlight) -> None:
        """Where the sessions' requests in flight are (the client path's servers)."""
        self._in_flight = in_flight

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def _changed(self, change: ControlChange) -> None:
        threshold = self.control.threshold
        if threshold <= self.announced:
            self.close()  # (a rise under way is moot)
            self._target = threshold
            if threshold < self.announced:
                self.announced = threshold
                self.announce(threshold, time.perf_counter())
            return
        # A rise: wait for what is in flight now. Requests framed from now on are decided
        # with the new threshold.
        self._target = threshold
        self._rise_started = time.perf_counter()
        self._waiting = [(fifo, fifo[-1]) for fifo in self._in_flight() if fifo]
        if self._poll is None:
            self._check()

    def _check(self) -> None:
        self._poll = None
        # A session's requests are answered in order (its FIFO); a closed one empties it.
        self._waiting = [(fifo, last) for fifo, last in self._waiting if _still_in(fifo, last)]
        now = time.perf_counter()
        if self._waiting and now - self._rise_started < RISE_GIVE_UP:
            self._poll = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._check)
            return
        if self._waiting:
            log.warning(
                "shadow: %d requests sent before the sample rate rose are still unanswered "
                "after %.0f s; the new keys are judged from now on",
                len(self._waiting),
                RISE_GIVE_UP,
            )
            self._waiting = []
        self.announced = self._target
        self.announce(self._target, now)


def _still_in(fifo: deque[Request], request: Request) -> bool:
    if not fifo:
        return False
    if fifo[0] is request or fifo[-1] is request:
        return True
    return any(queued is request for queued in fifo)


__all__ = ["Announce", "CoverageAnnouncer", "InFlight"]
