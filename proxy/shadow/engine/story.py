"""A mismatch example's text: the two stores' answers and the story behind them (the re-read,
the action taken, the key's last operations), and Redis's answer in a word for the history."""

from __future__ import annotations

import time
from typing import Any

from proxy.redis.layout import Item
from proxy.redis.store import DeltaResult, StoreResult
from proxy.shadow.engine.history import StepTuple, describe_steps
from proxy.shadow.engine.repair import Snapshot, mc_value
from proxy.shadow.engine.translate import HIT, MISS, READ, McValue, ShadowOp


def answer_words(answer: object) -> str:
    """Redis's answer in a word or two, for the key's history."""
    if answer is None:
        return MISS
    if isinstance(answer, Item):
        return HIT
    if isinstance(answer, DeltaResult):
        return str(answer.status) if answer.value is None else f"{answer.status} {answer.value}"
    if isinstance(answer, StoreResult):
        return str(answer.status)
    return str(answer)


def story(
    op: ShadowOp,
    steps: list[StepTuple],
    snapshot: Snapshot | None,
    action: str,
    expires_at: float | None,
) -> dict[str, Any]:
    """What led to a mismatch: the connection, the lag, the action taken, the key's last
    operations (`steps`), the expected expiry and the re-read of both stores."""
    told: dict[str, Any] = {
        "connection": op.session,
        "lag_ms": round((time.perf_counter() - op.replied_at) * 1000.0, 1),
        "action": action,
        "history": describe_steps(steps, op.replied_at),
    }
    if expires_at is not None:
        # When the shadow expected Memcached to expire the key, from its answer's time.
        told["expires_in_s"] = round(expires_at - op.replied_wall, 3)
    if snapshot is not None:
        told["reread"] = {
            "memcached": describe_mc(mc_value(snapshot.mc)),
            "redis": describe_redis(snapshot.redis),
            "ordered": snapshot.ordered,
        }
    return told


def describe_mc_answer(op: ShadowOp) -> dict[str, Any]:
    """What Memcached answered the operation (values and numbers as bytes: hashed unless
    revealed)."""
    if op.action == READ:
        return describe_mc(op.mc_value if op.mc_status == HIT else None)
    shown: dict[str, Any] = {"status": str(op.mc_status) if op.mc_status else "no reply"}
    if op.mc_number is not None:
        shown["number"] = str(op.mc_number).encode()
    return shown


def describe_redis_answer(op: ShadowOp, answer: object) -> dict[str, Any]:
    if op.action == READ:
        return describe_redis(answer if isinstance(answer, Item) else None)
    if isinstance(answer, DeltaResult):
        shown: dict[str, Any] = {"status": str(answer.status)}
        if answer.value is not None:
            shown["number"] = str(answer.value).encode()
        return shown
    if isinstance(answer, StoreResult):
        return {"status": str(answer.status)}
    return {"status": str(answer)}


def describe_mc(mc: McValue | None) -> dict[str, Any]:
    """An item Memcached returned; a meta get without f or v leaves that field out."""
    if mc is None:
        return {"present": False}
    shown: dict[str, Any] = {"present": True}
    if mc.flags is not None:
        shown["flags"] = mc.flags
    if mc.data is not None:
        shown["value"] = mc.data
    return shown


def describe_redis(item: Item | None) -> dict[str, Any]:
    if item is None:
        return {"present": False}
    return {"present": True, "flags": item.flags, "value": item.data}


__all__ = [
    "answer_words",
    "describe_mc",
    "describe_mc_answer",
    "describe_redis",
    "describe_redis_answer",
    "story",
]
