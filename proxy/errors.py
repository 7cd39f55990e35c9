"""The project's exception hierarchy: every error memshadow raises on purpose derives from
MemshadowError, so callers can tell our failures from bugs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class MemshadowError(Exception):
    """Base class of every error memshadow raises deliberately."""


class ConfigError(MemshadowError):
    """A configuration value (from a file, the command line or the defaults) is unusable.

    str() is one line a user can act on::

        config/memshadow.yaml:12: shadow.sample_rate: must be a number between 0 and 1, got 'abc'
    """

    def __init__(
        self,
        file: str,
        problem: str,
        *,
        line: int | None = None,
        key: str = "",
        more: Sequence[ConfigError] = (),
    ) -> None:
        self.file = file
        # 1-based, as editors count; None when the error is not tied to a line.
        self.line = line
        # Dotted path of the offending option ("shadow.sample_rate") or a flag ("--listen");
        # empty when the error concerns the whole file (unreadable, bad syntax).
        self.key = key
        self.problem = problem
        # The other errors found in the same file, after this one: str() gives one line each.
        self.more = tuple(more)
        super().__init__(str(self))

    def _render(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.problem}"
        return f"{where}: {self.problem}"

    def __str__(self) -> str:
        return "\n".join([self._render(), *(other._render() for other in self.more)])

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments defeat Exception's default pickling (used by multiprocessing
        # and some test runners), so spell the constructor call out.
        return (
            _rebuild_config_error,
            (self.file, self.problem, self.line, self.key, self.more),
        )


def _rebuild_config_error(
    file: str,
    problem: str,
    line: int | None,
    key: str,
    more: Sequence[ConfigError] = (),
) -> ConfigError:
    return ConfigError(file, problem, line=line, key=key, more=more)


class InvalidValue(MemshadowError, ValueError):
    """A single value (an address, a URL, a number) cannot be used. It says only what is wrong
    with the value; the config loader wraps it in a ConfigError that says where it came from."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
