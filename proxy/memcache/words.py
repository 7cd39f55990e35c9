"""Memcached's outcomes and modes, in the classic protocol's words: the one vocabulary that
Memcached's answers are normalised to (shadow.engine.translate: meta codes included) and that
the Redis side answers in (redis.store: the Lua functions return these words)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """What a request did: Memcached's reply, or Redis's answer in the same words."""

    STORED = "STORED"
    NOT_STORED = "NOT_STORED"
    EXISTS = "EXISTS"  # a cas that did not match
    NOT_FOUND = "NOT_FOUND"
    TOO_LARGE = "TOO_LARGE"  # SERVER_ERROR object too large for cache
    DELETED = "DELETED"
    TOUCHED = "TOUCHED"
    NON_NUMERIC = "NON_NUMERIC"  # CLIENT_ERROR cannot increment or decrement ...
    OK = "OK"  # an incr/decr done (Redis's word; Memcached answers with the number)
    CREATED = "CREATED"  # ma N autovivified the item (its value is J)
    HIT = "HIT"  # a read found the item
    MISS = "MISS"


class Mode(StrEnum):
    """What a write does: the storage commands (ms M flag), and incr or decr (ma's M)."""

    SET = "set"
    ADD = "add"
    REPLACE = "replace"
    APPEND = "append"
    PREPEND = "prepend"
    CAS = "cas"
    INCR = "incr"
    DECR = "decr"


STORE_MODES: frozenset[Mode] = frozenset(
    (Mode.SET, Mode.ADD, Mode.REPLACE, Mode.APPEND, Mode.PREPEND, Mode.CAS)
)
DELTA_MODES: frozenset[Mode] = frozenset((Mode.INCR, Mode.DECR))

__all__ = ["DELTA_MODES", "STORE_MODES", "Mode", "Status"]
