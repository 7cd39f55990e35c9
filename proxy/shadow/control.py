"""Live shadow settings (enabled, sample rate) that operators change at runtime.

One ShadowControl is shared by every connection: the client path reads `threshold` on each
request (a plain int compare), so a change applies to all connections at once. Writers (the
admin API, the ramp, the halt rules, a config reload) go through set_rate/set_enabled, which
notify listeners such as the audit log.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import MemshadowError

HASH_SPACE = 1 << 32  # the sampler compares a 32-bit key hash with rate * 2^32


class ControlError(MemshadowError, ValueError):
    """A rejected change (bad rate...): the message is meant for the operator."""


@dataclass(frozen=True, slots=True)
class ControlChange:
    """One change of the live settings, for the audit trail."""

    at: float  # unix time
    source: str  # "config", "api", "ramp", "halt:<rule>", "reload"...
    field: str  # "sample_rate" or "enabled"
    old: float | bool
    new: float | bool
    reason: str = ""


Listener = Callable[[ControlChange], None]


class ShadowControl:
    """The shadow's live switches. Single-threaded: used from the event loop only."""

    def __init__(self, sample_rate: float = 0.0, enabled: bool = True) -> None:
        self._rate = _check_rate(sample_rate)
        self._enabled = enabled
        self._listeners: list[Listener] = []
        # Keys whose 32-bit hash is below this are shadowed; 0 means nothing is.
        self.threshold = 0
        self._update_threshold()

    @property
    def sample_rate(self) -> float:
        return self._rate

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def active(self) -> bool:
        """True when some keys are being shadowed right now."""
        return self.threshold > 0

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def set_rate(self, rate: float, source: str, reason: str = "") -> ControlChange | None:
        """Change the sample rate (0..1). Returns the change, or None when nothing changed."""
        rate = _check_rate(rate)
        if rate == self._rate:
            return None
        change = ControlChange(time.time(), source, "sample_rate", self._rate, rate, reason)
        self._rate = rate
        self._update_threshold()
        self._notify(change)
        return change

    def set_enabled(self, enabled: bool, source: str, reason: str = "") -> ControlChange | None:
        """Turn shadowing on or off without losing the configured rate (the kill switch)."""
        if enabled == self._enabled:
            return None
        change = ControlChange(time.time(), source, "enabled", self._enabled, enabled, reason)
        self._enabled = enabled
        self._update_threshold()
        self._notify(change)
        return change

    def _update_threshold(self) -> None:
        self.threshold = int(self._rate * HASH_SPACE) if self._enabled else 0

    def _notify(self, change: ControlChange) -> None:
        for listener in self._listeners:
            listener(change)


def _check_rate(rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ControlError(f"sample_rate must be a number between 0 and 1, got {rate!r}")
    value = float(rate)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ControlError(f"sample_rate must be between 0 and 1, got {rate!r}")
    return value
