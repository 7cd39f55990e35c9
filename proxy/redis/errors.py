"""Exceptions of the Redis side of the shadow; every one derives from RedisError."""

from __future__ import annotations


class RedisError(Exception):
    """Base class of every failure talking to the shadow Redis."""


class RedisUnavailable(RedisError):
    """The connection is down (not yet connected, reconnecting, or closed)."""


class RedisBusy(RedisError):
    """Too many commands are already in flight on the connection; the call was not sent."""


class RedisTimeout(RedisError):
    """No reply came in time; the connection is reset because later replies would be misaligned."""


class ShadowStarved(RedisTimeout):
    """No reply was read in time, but this process's own event loop was held up longer than
    the timeout itself: the wait says nothing of Redis (a starved shadow worker)."""


class RedisReplyError(RedisError):
    """Redis answered with an error reply (the message is the exception's text)."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class RedisProtocolError(RedisError):
    """A reply could not be parsed, or had a shape the caller did not expect."""


class CorruptValue(RedisError):
    """A stored value does not follow the flags|cas|data layout (shorter than its header)."""


class NotPrimary(RedisUnavailable):
    """The server is a replica (ROLE): the shadow writes, so it waits for a primary."""


class RedisGaveUp(RedisError):
    """A command the cluster kept refusing (MOVED/ASK loops, READONLY, LOADING, TRYAGAIN,
    CLUSTERDOWN, MASTERDOWN) past the retry bound; `reason` names the last refusal."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
