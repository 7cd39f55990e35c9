"""Process-wide settings shared by the proxy, its worker processes and its shadow worker: the
event loop, logging and the garbage collector. (They import this, not cli.py, so no module
imports its own caller.)"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from proxy.config import LogConfig

LOOP_ENV = "MEMSHADOW_LOOP"
"""MEMSHADOW_LOOP=asyncio runs on the stdlib event loop instead of uvloop (for debugging, or
to compare the two)."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for asyncio.Runner: uvloop's, unless MEMSHADOW_LOOP=asyncio."""
    if os.environ.get(LOOP_ENV, "uvloop").strip().lower() == "asyncio":
        return None  # asyncio.Runner's default: the stdlib loop
    import uvloop

    return uvloop.new_event_loop


GC_THRESHOLDS = (50_000, 20, 100)
"""Cyclic garbage collector thresholds for the shadow worker process (CPython's are 700,
10, 10).

The shadow keeps many medium-lived objects (queued requests, per-key chains and states);
with the default thresholds they are promoted quickly and make full collections frequent.
Measured (bench/shadow_figures.py, rate 1.0, worker process, 8 s): default thresholds, the
worker kept up with 48% of the shadowed requests (97,379 dropped); with these, 98.5%
(2,965 dropped). Nothing on the hot paths makes reference cycles, so collecting them later
costs little memory. Not for the proxy process: there the same settings cost the client
path about 20% of its throughput (bench/run.py, memshadow vs the bare relay: 0.83x with
them, 1.05x without, same run)."""


def tune_gc() -> None:
    """Apply GC_THRESHOLDS and exempt everything alive now (imports, engine) from collection."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
