"""Which build of memshadow is running: the list of modules the compiled build turns into C
extensions with mypyc (setup.py reads it from here), and which of them were loaded as such."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import platform
from typing import Final

from proxy import __version__

# The one list of modules the compiled build compiles with mypyc; setup.py reads this tuple
# and nothing else, and the build's self-description (--version, the start log line,
# memshadow_build_info) checks each of them. A module joins the compiled build here, once the
# whole suite passes with it compiled (`make test` runs it on both builds). This module itself
# stays pure Python: it must answer whatever was compiled.
COMPILED_MODULES: Final[tuple[str, ...]] = (
    # The client path: framing, pairing and the sampler's per-request decision.
    "proxy.memcache.commands",
    "proxy.memcache.numbers",
    "proxy.memcache.arguments",
    "proxy.memcache.request",
    "proxy.memcache.response",
    "proxy.memcache.reply",
    "proxy.shadow.sampler",
    # The shadow engine's sans-IO pieces.
    "proxy.shadow.engine.translate",
    "proxy.shadow.stats",
    "proxy.shadow.engine.compare",
    "proxy.shadow.engine.classify",
    "proxy.shadow.engine.keystate",
    "proxy.shadow.engine.history",
    "proxy.shadow.engine.merge",
    "proxy.shadow.engine.scheduler",
    "proxy.shadow.engine.executor",
    "proxy.shadow.engine.dispatcher",
    "proxy.shadow.engine.verdict",
    "proxy.shadow.engine.repair",
    "proxy.shadow.engine.story",
    "proxy.shadow.handoff",
    "proxy.shadow.wire",
    # The Redis side of the replay: the layout, the commands, and the client a layer a
    # module (RESP, the protocol, the connection, its retries, the pool).
    "proxy.redis.layout",
    "proxy.redis.store",
    "proxy.redis.resp",
    "proxy.redis.protocol",
    "proxy.redis.connection",
    "proxy.redis.retry",
    "proxy.redis.pool",
    # Counters bumped per request.
    "proxy.metrics",
    "proxy.memcache.words",
    "proxy.shadow.words",
)

# Set to 1 (or true/yes) at install time for a pure-Python install even where a C compiler
# is present; setup.py reads it.
PURE_PYTHON_ENV: Final = "MEMSHADOW_PURE_PYTHON"


def compiled_modules() -> tuple[str, ...]:
    """The modules of COMPILED_MODULES that import as C extensions here."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for name in COMPILED_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and (spec.origin or "").endswith(suffixes):
            found.append(name)
    return tuple(found)


def is_compiled() -> bool:
    """True when every module of the compiled build runs as a C extension."""
    return len(compiled_modules()) == len(COMPILED_MODULES)


def describe() -> str:
    """The build in a few words, as --version and the start log line give it."""
    compiled = compiled_modules()
    python = f"Python {platform.python_version()}"
    if not compiled:
        return f"pure Python ({python})"
    if len(compiled) == len(COMPILED_MODULES):
        return f"compiled with mypyc ({len(compiled)} modules, {python})"
    missing = sorted(set(COMPILED_MODULES) - set(compiled))
    return (
        f"partly compiled with mypyc ({len(compiled)} of {len(COMPILED_MODULES)} modules; "
        f"pure Python: {', '.join(missing)}; {python})"
    )


def version_line() -> str:
    """What `memshadow --version` prints."""
    return f"memshadow {__version__}, {describe()}"
