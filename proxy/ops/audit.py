"""The audit trail of runtime changes: every change of the live shadow settings (by the API,
the ramp, a halt rule or a reload) and every halt, kept in a bounded in-memory log served at
GET /api/audit and written to the log."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.shadow.control import ControlChange

log = logging.getLogger("memshadow.audit")

DEFAULT_CAPACITY = 1000

AuditValue = float | bool | str | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int  # rises by one per entry, so a poller can ask for what is new
    at: float  # unix time
    source: str  # "api", "ramp", "halt:<rule>", "reload", "config"...
    field: str  # "sample_rate", "enabled", "halt", "ramp"
    old: AuditValue
    new: AuditValue
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "source": self.source,
            "field": self.field,
            "old": self.old,
            "new": self.new,
            "reason": self.reason,
        }

    def describe(self) -> str:
        text = f"{self.field} {_show(self.old)} -> {_show(self.new)} by {self.source}"
        return f"{text}: {self.reason}" if self.reason else text


def _show(value: AuditValue) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return value


class AuditLog:
    """The newest ``capacity`` entries. Single-threaded: used from the event loop."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._entries: deque[AuditEntry] = deque(maxlen=capacity)
        self._seq = itertools.count(1)

    def record(
        self,
        source: str,
        field: str,
        old: AuditValue,
        new: AuditValue,
        reason: str = "",
        *,
        at: float | None = None,
    ) -> AuditEntry:
        entry = AuditEntry(
            next(self._seq), time.time() if at is None else at, source, field, old, new, reason
        )
        self._entries.append(entry)
        # Halts are what an operator must notice; the rest is routine.
        level = logging.WARNING if field == "halt" and new is True else logging.INFO
        log.log(level, "audit: %s", entry.describe())
        return entry

    def on_change(self, change: ControlChange) -> None:
        """ShadowControl listener: audit every change of the live settings."""
        self.record(
            change.source, change.field, change.old, change.new, change.reason, at=change.at
        )

    def entries(self, *, since: int = 0, limit: int | None = None) -> list[AuditEntry]:
        """Entries with seq above ``since``, oldest first; the newest ``limit`` of them."""
        found = [e for e in self._entries if e.seq > since]
        return found if limit is None else found[max(0, len(found) - limit) :]
