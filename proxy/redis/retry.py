"""Commands a server refused for now (LOADING, READONLY, TRYAGAIN...) sent again after a growing
wait, and given up (RedisGaveUp) past RETRY_DELAYS; a closing client fails those still waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.redis.connection import RedisConnection
from proxy.redis.errors import RedisError, RedisGaveUp, RedisUnavailable
from proxy.redis.protocol import ReplyCallback, deliver
from proxy.redis.resp import Reply


class Retries:
    """Refused commands waiting to be sent again: each a timer and its completion, so that
    closing fails every one of them exactly once instead of leaving it unanswered."""

    def __init__(self) -> None:
        self._waiting: dict[asyncio.TimerHandle, ReplyCallback] = {}
        self.closed = False

    def later(self, delay: float, callback: ReplyCallback, send: Callable[[], None]) -> None:
        """Call `send` after `delay` (the retry), unless closed first: then fail `callback`."""
        if self.closed:
            deliver(callback, None, RedisUnavailable("the Redis client is closed"))
            return

        def fire() -> None:
            del self._waiting[handle]
            send()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._waiting[handle] = callback

    def close(self) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for handle, callback in waiting.items():
            handle.cancel()
            deliver(callback, None, RedisUnavailable("the Redis client is closed"))


class Retry:
    """The completion of a command sent again after a refusal, and how many times it was."""

    __slots__ = ("attempts", "done")

    def __init__(self, done: ReplyCallback, attempts: int) -> None:
        self.done = done
        self.attempts = attempts

    def __call__(self, reply: Reply, error: RedisError | None) -> None:
        self.done(reply, error)

    @staticmethod
    def of(callback: ReplyCallback) -> Retry:
        """The next attempt of a refused command whose completion is `callback`."""
        if isinstance(callback, Retry):
            return Retry(callback.done, callback.attempts + 1)
        return Retry(callback, 1)


RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
"""Waits before each new attempt of a refused command (LOADING, READONLY, TRYAGAIN...): about
1.6 s in all, then it is given up (RedisGaveUp) and the shadow drops it, counted by reason."""


def give_up(retry: Retry, reason: str, what: str) -> None:
    """Fail a refused command for good: RedisGaveUp(reason)."""
    message = f"{what} (refused: {reason}; {retry.attempts} tries)"
    deliver(retry.done, None, RedisGaveUp(reason, message))


def send_later(
    retries: Retries,
    payload: bytes,
    reason: str,
    retry: Retry,
    route: Callable[[bytes], RedisConnection],
) -> None:
    """Send a refused command again after its attempt's delay, on the connection `route`
    finds for it then (RedisError there: wait again); past RETRY_DELAYS, give up."""
    if retry.attempts > len(RETRY_DELAYS):
        give_up(retry, reason, "still refused")
        return

    def send() -> None:
        try:
            route(payload).send_payload(payload, retry)
        except RedisError:  # reconnecting, or busy: wait again
            send_later(retries, payload, reason, Retry.of(retry), route)

    retries.later(RETRY_DELAYS[retry.attempts - 1], retry, send)
