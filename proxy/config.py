"""memshadow's configuration: the YAML schema as frozen dataclasses, validation that names the
file, line and key of every mistake, and the command-line flags that override the file."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.address import HostPort
from proxy.errors import ConfigError, InvalidValue, MemshadowError
from proxy.redis.url import RedisURL
from proxy.shadow.words import GuardAction

DEFAULTS_SOURCE = "defaults"
COMMAND_LINE = "command line"

_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_NULL_TAG = "tag:yaml.org,2002:null"

_SIZE_RE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LOG_FORMATS = ("text", "json")

LogFormat = Literal["text", "json"]
_SHADOW_WORKERS = ("process", "inline")
ShadowWorker = Literal["process", "inline"]


class _Conflict(MemshadowError):
    """Two options of one section disagree. The error is reported at the first of ``fields``
    that the file sets. Never leaves this module."""

    def __init__(self, fields: tuple[str, ...], problem: str) -> None:
        super().__init__(problem)
        self.fields = fields
        self.problem = problem


# --- value parsers: one YAML node in, a Python value out, or _Invalid -------------------------

_constructor = SafeConstructor()


def _scalar(node: Node) -> Any:
    try:
        return _constructor.construct_object(node) if isinstance(node, ScalarNode) else None
    except (ValueError, yaml.YAMLError):  # e.g. an explicit `!!float abc`
        raise InvalidValue(f"{node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}") from None


def _describe(node: Node) -> str:
    """How to show a bad value in a message: the YAML text the user wrote."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    text = str(node.value)
    if len(text) > 60:
        text = text[:57] + "..."
    if node.tag == _NULL_TAG:
        return "nothing (null)"
    if node.tag == _BOOL_TAG:
        return f"{text} (a boolean)"
    if node.tag == _STR_TAG:
        return repr(text)
    return text


def _plain_text(node: Node) -> str | None:
    """The raw text of a scalar whatever YAML resolved it to: `1:30` would otherwise be the
    sexagesimal int 90, which is never what someone writing an address meant."""
    if isinstance(node, ScalarNode) and node.tag != _NULL_TAG:
        return str(node.value)
    return None


def _number(node: Node) -> float | None:
    if not isinstance(node, ScalarNode) or node.tag == _BOOL_TAG:
        return None
    if node.tag in (_INT_TAG, _FLOAT_TAG):
        value = float(_scalar(node))
    elif node.tag == _STR_TAG and node.style is None:
        # PyYAML (YAML 1.1) leaves 1e-3 as a string; an unquoted number is still a number.
        try:
            value = float(node.value)
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else None


def _host_port_parser(*, allow_port_zero: bool) -> Callable[[Node], HostPort]:
    def parse(node: Node) -> HostPort:
        text = _plain_text(node)
        if text is None:
            raise InvalidValue(f"must be HOST:PORT, e.g. 127.0.0.1:11211; got {_describe(node)}")
        return HostPort.parse(text, allow_port_zero=allow_port_zero)

    return parse


def _redis_url(node: Node) -> RedisURL | None:
    if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
        return None
    text = _plain_text(node)
    if text is None:
        raise InvalidValue(f"must be a redis:// URL or null, got {_describe(node)}")
    return RedisURL.parse(text)


MAX_SECRET_FILE: Final = 4096
"""Bytes a password file may hold (a mounted Kubernetes Secret holds one line)."""


def read_secret_file(path: str) -> str:
    """The one-line secret a file holds, without its line end; InvalidValue (never quoting
    the content) when it cannot be read or is not one line of text."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise InvalidValue(f"cannot read {path!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE:
        raise InvalidValue(f"{path!r} holds over {MAX_SECRET_FILE} bytes: not a password file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidValue(f"{path!r} is not UTF-8 text") from None
    return one_line_secret(text, repr(path))


def one_line_secret(text: str, where: str) -> str:
    """A secret as a mounted or exported Secret holds it: one line, its line end dropped
    (`kubectl create secret --from-file` keeps the file's)."""
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise InvalidValue(f"{where} is empty")
    if "\n" in text or "\r" in text:
        raise InvalidValue(f"{where} holds more than one line; a password is one line")
    return text


def _path(node: Node) -> str | None:
    if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
        return None
    text = _plain_text(node)
    if not text:
        raise InvalidValue(f"must be a file path or null, got {_describe(node)}")
    return text


def _readable_file(node: Node) -> str | None:
    path = _path(node)
    if path is not None:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise InvalidValue(f"cannot read {path!r}: {exc.strerror or exc}") from None
    return path


def _password_file(node: Node) -> str | None:
    path = _path(node)
    if path is not None:
        read_secret_file(path)
    return path


MIN_EXAMPLES_SECRET: Final = 16
"""Characters an examples secret needs at least: a short one could be guessed from hashes."""
EXAMPLES_SECRET_ENV: Final = "MEMSHADOW_EXAMPLES_SECRET"


def check_examples_secret(secret: str, where: str) -> str:
    if len(secret) < MIN_EXAMPLES_SECRET:
        raise InvalidValue(
            f"{where} holds a secret of {len(secret)} characters; it needs at least "
            f"{MIN_EXAMPLES_SECRET} (for example: openssl rand -hex 32)"
        )
    return secret


def _examples_secret_file(node: Node) -> str | None:
    path = _path(node)
    if path is not None:
        check_examples_secret(read_secret_file(path), repr(path))
    return path


def examples_secret(
    shadow: ShadowConfig, environ: Mapping[str, str], source: str = DEFAULTS_SOURCE
) -> tuple[bytes, str] | None:
    """The examples' hash secret and where it came from (the environment variable wins over
    shadow.examples_secret_file), or None when neither gives one. Raises ConfigError naming
    ``source`` (the config file) and the option, never quoting the secret."""
    from_environment = environ.get(EXAMPLES_SECRET_ENV)
    try:
        if from_environment:
            text = one_line_secret(from_environment, EXAMPLES_SECRET_ENV)
            return check_examples_secret(text, EXAMPLES_SECRET_ENV).encode(), EXAMPLES_SECRET_ENV
        if shadow.examples_secret_file is not None:
            path = shadow.examples_secret_file
            text = check_examples_secret(read_secret_file(path), repr(path))
            return text.encode(), "shadow.examples_secret_file"
    except InvalidValue as exc:
        key = EXAMPLES_SECRET_ENV if from_environment else "shadow.examples_secret_file"
        raise ConfigError(source, exc.problem, key=key) from None
    return None


def _ca_file(node: Node) -> str | None:
    path = _readable_file(node)
    if path is not None:
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            raise InvalidValue(f"{path!r} holds no usable CA certificate (PEM): {exc}") from None
    return path


def _fraction(node: Node) -> float:
    value = _number(node)
    if value is None or not 0.0 <= value <= 1.0:
        raise InvalidValue(f"must be a number between 0 and 1, got {_describe(node)}")
    return value


def _positive_int(node: Node) -> int:
    if isinstance(node, ScalarNode) and node.tag == _INT_TAG and (value := _scalar(node)) > 0:
        return int(value)
    raise InvalidValue(f"must be a whole number above zero, got {_describe(node)}")


MAX_WORKERS = 64
"""Proxy processes one memshadow runs at most (sessions carry the process's index in
PROCESS_BITS bits)."""
PROCESS_BITS = 6


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: what a container's cpuset
    allows), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _workers(node: Node) -> int:
    """A number of proxy processes from 1 to MAX_WORKERS, or auto (the usable cores)."""
    if isinstance(node, ScalarNode) and node.tag in (_STR_TAG, _INT_TAG):
        with contextlib.suppress(InvalidValue):
            return _flag_workers(node.value)
    raise InvalidValue(
        f"must be auto or a whole number from 1 to {MAX_WORKERS}, got {_describe(node)}"
    )


def _flag_workers(text: str) -> int:
    text = text.strip()
    if text.lower() == "auto":
        return min(MAX_WORKERS, usable_cores())
    if text.isdigit() and 1 <= int(text) <= MAX_WORKERS:
        return int(text)
    raise InvalidValue(f"must be auto or a whole number from 1 to {MAX_WORKERS}, got {text!r}")


def _niceness(node: Node) -> int:
    if isinstance(node, ScalarNode) and node.tag == _INT_TAG:
        value = int(_scalar(node))
        if 0 <= value <= 19:
            return value
    raise InvalidValue(f"must be a whole number from 0 to 19, got {_describe(node)}")


def _byte_size(node: Node) -> int:
    value: int | None = None
    if isinstance(node, ScalarNode) and node.tag == _INT_TAG:
        value = int(_scalar(node))
    elif isinstance(node, ScalarNode) and node.tag == _STR_TAG:
        match = _SIZE_RE.fullmatch(node.value.strip())
        if match:
            value = int(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]
    if value is None or value <= 0:
        raise InvalidValue(
            f"must be a positive number of bytes, e.g. 65536 or 64KiB; got {_describe(node)}"
        )
    return value


def _seconds_parser(*, allow_zero: bool) -> Callable[[Node], float]:
    def parse(node: Node) -> float:
        value = _number(node)
        if value is None or value < 0 or (value == 0 and not allow_zero):
            wanted = "zero or more" if allow_zero else "more than zero"
            raise InvalidValue(f"must be a number of seconds, {wanted}; got {_describe(node)}")
        return value

    return parse


def _choice_parser(choices: tuple[str, ...]) -> Callable[[Node], str]:
    def parse(node: Node) -> str:
        text = _plain_text(node) if node.tag == _STR_TAG else None
        if text is not None and text.lower() in choices:
            return text.lower()
        hint = ""
        if text is not None and (close := difflib.get_close_matches(text.lower(), choices, 1)):
            hint = f" (did you mean {close[0]!r}?)"
        raise InvalidValue(f"must be one of {', '.join(choices)}; got {_describe(node)}{hint}")

    return parse


def _cluster_mode(node: Node) -> str:
    """auto, true or false (shadow.redis_cluster)."""
    if isinstance(node, ScalarNode) and node.tag == _BOOL_TAG:
        return "true" if _scalar(node) else "false"
    if isinstance(node, ScalarNode) and node.tag == _STR_TAG and node.value.lower() == "auto":
        return "auto"
    raise InvalidValue(f"must be auto, true or false; got {_describe(node)}")


def _boolean(node: Node) -> bool:
    if isinstance(node, ScalarNode) and node.tag == _BOOL_TAG:
        return bool(_scalar(node))
    raise InvalidValue(f"must be true or false, got {_describe(node)}")


_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
GUARD_ACTIONS: Final = tuple(action.value for action in GuardAction)  # ops/guards.py's Action


def _guard_action(default: GuardAction) -> str:
    """A guard rule's action field: one of GUARD_ACTIONS."""
    return field(default=default.value, metadata=_parsed_by(_choice_parser(GUARD_ACTIONS)))


def _duration(node: Node) -> float:
    """Seconds, as a number (90) or with a unit (500ms, 90s, 15m, 2h, 1d); above zero."""
    value = _number(node)
    if value is None and isinstance(node, ScalarNode) and node.tag == _STR_TAG:
        match = _DURATION_RE.fullmatch(node.value.strip())
        if match:
            value = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if value is None or value <= 0:
        raise InvalidValue(
            "must be a duration above zero: seconds, or with a unit as in 500ms, 90s, 15m, "
            f"2h; got {_describe(node)}"
        )
    return value


def _optional_duration(node: Node) -> float | None:
    """A duration (see _duration), or null for none."""
    if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
        return None
    return _duration(node)


def _ramp_steps(node: Node) -> tuple[float, ...]:
    """A rising list of sample rates, each above 0 and at most 1; empty means no ramp."""
    if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
        return ()
    if not isinstance(node, SequenceNode):
        raise InvalidValue(
            f"must be a list of sample rates, e.g. [0.01, 0.05, 0.25, 1.0]; got {_describe(node)}"
        )
    steps: list[float] = []
    for item in node.value:
        value = _number(item)
        if value is None or not 0.0 < value <= 1.0:
            raise InvalidValue(
                f"every step must be a number above 0 and at most 1, got {_describe(item)}"
            )
        if steps and value <= steps[-1]:
            raise InvalidValue(f"steps must rise: {value:g} comes after {steps[-1]:g}")
        steps.append(value)
    return tuple(steps)


def _token(node: Node) -> str | None:
    if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
        return None
    text = _plain_text(node)
    # The token travels in an HTTP header: printable ASCII without spaces.
    if not text or not all(0x21 <= ord(c) <= 0x7E for c in text):
        raise InvalidValue("must be printable ASCII without spaces (or null for no token)")
    return text


def _target_ratio(node: Node) -> float:
    value = _number(node)
    if value is None or not 0.0 < value < 1.0:
        raise InvalidValue(f"must be a number above 0 and below 1, got {_describe(node)}")
    return value


def _ratio_above_one(node: Node) -> float:
    value = _number(node)
    if value is None or value <= 1.0:
        raise InvalidValue(f"must be a ratio above 1 (2: twice as slow); got {_describe(node)}")
    return value


def _parsed_by(parse: Callable[[Node], Any]) -> dict[str, Any]:
    """Field metadata: this option's YAML node is turned into a value by ``parse``."""
    return {"parse": parse}


def _section_of(factory: Callable[[], Any]) -> dict[str, Any]:
    """Field metadata: this option is a nested mapping of further options."""
    return {"section": factory}


# --- the schema --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds on what one client connection may make the proxy buffer."""

    # Longest non-get command line; memcached closes connections that exceed its own limit.
    max_line_bytes: int = field(default=2048, metadata=_parsed_by(_byte_size))
    # Multi-get lines are buffered up to this; a longer one gets the connection relayed unframed.
    max_get_line_bytes: int = field(default=8 << 20, metadata=_parsed_by(_byte_size))
    # Values larger than this are streamed through, never buffered (memcached's 1 MiB item
    # limit plus room for the header).
    max_value_bytes: int = field(default=(1 << 20) + 512, metadata=_parsed_by(_byte_size))
    # Requests awaiting a reply on one connection before the proxy stops reading the client.
    max_pending_requests: int = field(default=4096, metadata=_parsed_by(_positive_int))
    # Transport write-buffer water marks for flow control between client and upstream.
    write_buffer_high: int = field(default=256 << 10, metadata=_parsed_by(_byte_size))
    write_buffer_low: int = field(default=64 << 10, metadata=_parsed_by(_byte_size))
    # Client connections open at once; one more is refused as memcached refuses past its -c.
    max_connections: int = field(default=10_000, metadata=_parsed_by(_positive_int))
    # Close a client connection after this many seconds with no byte either way; 0: never.
    idle_timeout: float = field(default=0.0, metadata=_parsed_by(_seconds_parser(allow_zero=True)))


def _check_limits(limits: LimitsConfig) -> None:
    if limits.write_buffer_low > limits.write_buffer_high:
        raise _Conflict(
            ("write_buffer_low", "write_buffer_high"),
            f"write_buffer_low ({limits.write_buffer_low}) must not exceed "
            f"write_buffer_high ({limits.write_buffer_high})",
        )
    if limits.max_get_line_bytes < limits.max_line_bytes:
        raise _Conflict(
            ("max_get_line_bytes", "max_line_bytes"),
            f"max_get_line_bytes ({limits.max_get_line_bytes}) must be at least "
            f"max_line_bytes ({limits.max_line_bytes})",
        )


@dataclass(frozen=True, slots=True)
class RampConfig:
    """The automatic ramp: sample rates taken in turn, each held at least ``hold`` seconds and
    left only when its comparisons show a mismatch ratio below ``mismatch_target``."""

    # Empty means no ramp: the rate stays where the config or an operator puts it.
    steps: tuple[float, ...] = field(default=(), metadata=_parsed_by(_ramp_steps))
    hold: float = field(default=900.0, metadata=_parsed_by(_duration))
    mismatch_target: float = field(default=0.001, metadata=_parsed_by(_target_ratio))
    min_comparisons: int = field(default=1000, metadata=_parsed_by(_positive_int))


@dataclass(frozen=True, slots=True)
class GuardRuleConfig:
    """A halt rule on a ratio of the live figures over a window."""

    enabled: bool = field(default=True, metadata=_parsed_by(_boolean))
    window: float = field(default=60.0, metadata=_parsed_by(_duration))
    min_count: int = field(default=200, metadata=_parsed_by(_positive_int))
    threshold: float = field(default=0.05, metadata=_parsed_by(_fraction))
    action: str = _guard_action(GuardAction.STOP)


@dataclass(frozen=True, slots=True)
class LatencyGuardConfig:
    """The halt rule on client latency: p99 while shadowing against the shadow-off baseline."""

    enabled: bool = field(default=True, metadata=_parsed_by(_boolean))
    window: float = field(default=60.0, metadata=_parsed_by(_duration))
    min_count: int = field(default=1000, metadata=_parsed_by(_positive_int))
    threshold: float = field(default=2.0, metadata=_parsed_by(_ratio_above_one))
    min_increase: float = field(default=0.001, metadata=_parsed_by(_duration))
    action: str = _guard_action(GuardAction.STOP)
    # The p99 to compare with until one is measured with the shadow off (after a restart
    # with the shadow on, say): the operator's own figure, from their monitoring.
    baseline_p99: float | None = field(default=None, metadata=_parsed_by(_optional_duration))
    # A breach trips the rule only once it has lasted this long (host noise passes; a
    # breach shorter than the window cannot be told from a burst).
    sustain: float = field(default=120.0, metadata=_parsed_by(_duration))
    # The baseline is measured in comparable conditions: shadow-off time no older than
    # this, at a client request rate within this factor of the current one.
    baseline_max_age: float = field(default=6 * 3600.0, metadata=_parsed_by(_duration))
    load_tolerance: float = field(default=2.0, metadata=_parsed_by(_ratio_above_one))


@dataclass(frozen=True, slots=True)
class MismatchRuleConfig(GuardRuleConfig):
    """The mismatch rule's own defaults (see GuardsConfig)."""

    window: float = field(default=300.0, metadata=_parsed_by(_duration))
    min_count: int = field(default=1000, metadata=_parsed_by(_positive_int))
    threshold: float = field(default=0.01, metadata=_parsed_by(_fraction))
    action: str = _guard_action(GuardAction.HOLD)


@dataclass(frozen=True, slots=True)
class DropRuleConfig(GuardRuleConfig):
    """The drop rule's own defaults (see GuardsConfig)."""

    threshold: float = field(default=0.01, metadata=_parsed_by(_fraction))
    action: str = _guard_action(GuardAction.STEP_BACK)


@dataclass(frozen=True, slots=True)
class GuardsConfig:
    """Rules that halt the shadow (and the ramp) when the live figures look wrong."""

    # How often the guards and the ramp look at the figures.
    interval: float = field(default=5.0, metadata=_parsed_by(_duration))
    mismatch: MismatchRuleConfig = field(
        default_factory=MismatchRuleConfig, metadata=_section_of(MismatchRuleConfig)
    )
    errors: GuardRuleConfig = field(
        default_factory=GuardRuleConfig, metadata=_section_of(GuardRuleConfig)
    )
    drops: DropRuleConfig = field(
        default_factory=DropRuleConfig, metadata=_section_of(DropRuleConfig)
    )
    latency: LatencyGuardConfig = field(
        default_factory=LatencyGuardConfig, metadata=_section_of(LatencyGuardConfig)
    )


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    """Which keys are mirrored to Redis, and which Redis."""

    redis: RedisURL | None = field(default=None, metadata=_parsed_by(_redis_url))
    sample_rate: float = field(default=0.0, metadata=_parsed_by(_fraction))
    ramp: RampConfig = field(default_factory=RampConfig, metadata=_section_of(RampConfig))
    guards: GuardsConfig = field(default_factory=GuardsConfig, metadata=_section_of(GuardsConfig))
    # Copy a cold key (never written through the proxy) that Memcached has into Redis.
    backfill: bool = field(default=False, metadata=_parsed_by(_boolean))
    # Fraction of replayed writes followed by a read of both stores, compared (a verdict
    # for writes whose own reply says nothing: noreply). Each holds its key's later
    # operations for about race_window while the evidence is ordered.
    verify_writes: float = field(default=0.0, metadata=_parsed_by(_fraction))
    # Run flush_all on Redis too (FLUSHDB on its dedicated DB). Off: comparisons restart cold.
    replay_flush_all: bool = field(default=False, metadata=_parsed_by(_boolean))
    # Shadow work waiting for Redis; past it work is dropped (counted), never waited for.
    queue_size: int = field(default=10_000, metadata=_parsed_by(_positive_int))
    # Keys being replayed at once (each key's operations run in order).
    max_inflight: int = field(default=512, metadata=_parsed_by(_positive_int))
    # Whether shadow.redis is a Redis Cluster (or ElastiCache in cluster mode): "auto" asks
    # the server (INFO cluster); true or false forces it.
    redis_cluster: str = field(default="auto", metadata=_parsed_by(_cluster_mode))
    # How far back a Redis failover may lose writes: the keys written in this many seconds
    # before the old primary stopped answering (or was demoted) turn cold.
    redis_failover_window: float = field(
        default=10.0, metadata=_parsed_by(_seconds_parser(allow_zero=True))
    )
    # The Redis password from a file (a mounted Secret), so that none sits in a ConfigMap;
    # the MEMSHADOW_REDIS_PASSWORD environment variable, when set, wins over it and the URL.
    redis_password_file: str | None = field(default=None, metadata=_parsed_by(_password_file))
    # rediss:// only: the CAs that vouch for Redis's certificate (PEM; default: the system's)
    # and a client certificate and key for a server that asks for one (tls-auth-clients).
    redis_tls_ca_file: str | None = field(default=None, metadata=_parsed_by(_ca_file))
    redis_tls_cert_file: str | None = field(default=None, metadata=_parsed_by(_readable_file))
    redis_tls_key_file: str | None = field(default=None, metadata=_parsed_by(_readable_file))
    redis_connections: int = field(default=4, metadata=_parsed_by(_positive_int))
    redis_timeout: float = field(
        default=0.5, metadata=_parsed_by(_seconds_parser(allow_zero=False))
    )
    # Two connections touching a key within this window make its differences races (noise).
    race_window: float = field(default=1.0, metadata=_parsed_by(_seconds_parser(allow_zero=True)))
    # Before a difference is reported, both stores are read again after this delay.
    reread_delay: float = field(default=0.05, metadata=_parsed_by(_seconds_parser(allow_zero=True)))
    # Requests gather this long before they are replayed (unless batch_size already wait),
    # so each write to Redis carries many commands; verdicts come that much later.
    batch_window: float = field(
        default=0.002, metadata=_parsed_by(_seconds_parser(allow_zero=True))
    )
    batch_size: int = field(default=64, metadata=_parsed_by(_positive_int))
    # Keys whose in-step state is remembered (LRU); a forgotten key counts as cold.
    key_state_size: int = field(default=200_000, metadata=_parsed_by(_positive_int))
    cas_map_size: int = field(default=100_000, metadata=_parsed_by(_positive_int))
    # Mismatch examples kept per kind for GET /api/mismatches; keys and values are shown
    # only as keyed hashes and lengths unless reveal_examples is true.
    examples_per_kind: int = field(default=20, metadata=_parsed_by(_positive_int))
    reveal_examples: bool = field(default=False, metadata=_parsed_by(_boolean))
    # The secret the examples' key and value hashes are keyed with, in a file (a mounted
    # Secret), so a hash stays the same across restarts and instances and a suspect key
    # can be looked up; MEMSHADOW_EXAMPLES_SECRET, when set, wins. None of both: a random
    # secret per process.
    examples_secret_file: str | None = field(
        default=None, metadata=_parsed_by(_examples_secret_file)
    )
    # Where the replay runs: "process" (a worker process, so its CPU and pauses never stall
    # the client path) or "inline" (on the proxy's own event loop).
    worker: ShadowWorker = field(
        default="process", metadata=_parsed_by(_choice_parser(_SHADOW_WORKERS))
    )
    # Niceness added to the worker process: under CPU contention the kernel favours client
    # traffic, and the shadow drops (and counts) what it cannot keep up with. 0-19.
    worker_nice: int = field(default=10, metadata=_parsed_by(_niceness))

    @property
    def enabled(self) -> bool:
        """Shadowing happens only with both a Redis URL and a non-zero rate. A file may set
        the rate and --redis supply the server; check_complete() refuses a rate with
        neither."""
        return self.redis is not None and self.sample_rate > 0.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = field(default="info", metadata=_parsed_by(_choice_parser(_LOG_LEVELS)))
    format: LogFormat = field(default="text", metadata=_parsed_by(_choice_parser(_LOG_FORMATS)))


MAX_LISTENERS = 64
"""Listeners one memshadow serves at most (the shadow tells them apart by a session's low
bits: LISTENER_BITS)."""
LISTENER_BITS = 6


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listen address in front of one Memcached (an entry of `listeners:`). `name`
    labels its metrics and its /readyz entry; by default the Memcached address."""

    listen: HostPort
    memcached: HostPort
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or str(self.memcached)


_LISTENER_KEYS = ("listen", "memcached", "name")


def _listeners(node: Node) -> tuple[ListenerConfig, ...]:
    """A list of {listen: HOST:PORT, memcached: HOST:PORT[, name: TEXT]}; empty: none."""
    if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
        return ()
    if not isinstance(node, SequenceNode):
        raise InvalidValue(
            "must be a list of {listen: HOST:PORT, memcached: HOST:PORT}, one per Memcached; "
            f"got {_describe(node)}"
        )
    if len(node.value) > MAX_LISTENERS:
        raise InvalidValue(f"at most {MAX_LISTENERS} listeners, got {len(node.value)}")
    listeners: list[ListenerConfig] = []
    for number, item in enumerate(node.value, 1):
        where = f"entry {number}"
        if not isinstance(item, MappingNode):
            raise InvalidValue(f"{where} must be a mapping with listen and memcached")
        fields: dict[str, Node] = {}
        for key, value in item.value:
            name = key.value if isinstance(key, ScalarNode) else None
            if name not in _LISTENER_KEYS:
                raise InvalidValue(
                    f"{where}: unknown option {name!r} (use listen, memcached, name)"
                )
            fields[name] = value
        missing = [k for k in ("listen", "memcached") if k not in fields]
        if missing:
            raise InvalidValue(f"{where}: {' and '.join(missing)} missing")
        try:
            listen = _host_port_parser(allow_port_zero=True)(fields["listen"])
            memcached = _host_port_parser(allow_port_zero=False)(fields["memcached"])
            label = _plain_text(fields["name"]) if "name" in fields else ""
        except InvalidValue as exc:
            raise InvalidValue(f"{where}: {exc.problem}") from None
        listeners.append(ListenerConfig(listen, memcached, label or ""))
    for kind, values in (
        ("listen address", [str(entry.listen) for entry in listeners if entry.listen.port]),
        ("name", [entry.label for entry in listeners]),
    ):
        twice = sorted({value for value in values if values.count(value) > 1})
        if twice:
            raise InvalidValue(f"the {kind} {twice[0]} is given twice")
    return tuple(listeners)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The HTTP admin endpoint. ``admin: HOST:PORT`` is short for ``admin: {listen: HOST:PORT}``."""

    listen: HostPort = field(
        default=HostPort("127.0.0.1", 9180),
        metadata=_parsed_by(_host_port_parser(allow_port_zero=True)),
    )
    # Bearer token that API changes must carry; None lets anyone who reaches the port change
    # things. The MEMSHADOW_ADMIN_TOKEN environment variable, when set, wins over this.
    token: str | None = field(default=None, repr=False, metadata=_parsed_by(_token))


def _admin_shorthand(node: Node) -> AdminConfig:
    return AdminConfig(listen=_host_port_parser(allow_port_zero=True)(node))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``source`` says where it came from (a path or "defaults")
    and is not part of equality."""

    listen: HostPort = field(
        default=HostPort("127.0.0.1", 11311),
        metadata=_parsed_by(_host_port_parser(allow_port_zero=True)),
    )
    memcached: HostPort = field(
        default=HostPort("127.0.0.1", 11211),
        metadata=_parsed_by(_host_port_parser(allow_port_zero=False)),
    )
    # Several Memcached servers (the apps hash keys over them): one listen address in front
    # of each, instead of listen and memcached; one shadow and one admin port for all.
    listeners: tuple[ListenerConfig, ...] = field(default=(), metadata=_parsed_by(_listeners))
    admin: AdminConfig = field(
        default_factory=AdminConfig,
        metadata={**_section_of(AdminConfig), "shorthand": _admin_shorthand},
    )
    shadow: ShadowConfig = field(default_factory=ShadowConfig, metadata=_section_of(ShadowConfig))
    # Proxy processes sharing the listen addresses (SO_REUSEPORT), each on one core, and as
    # many shadow workers, each judging the keys of its shard. auto: the usable cores.
    workers: int = field(default=1, metadata=_parsed_by(_workers))
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata=_section_of(LimitsConfig))
    upstream_connect_timeout: float = field(
        default=2.0, metadata=_parsed_by(_seconds_parser(allow_zero=False))
    )
    shutdown_timeout: float = field(
        default=10.0, metadata=_parsed_by(_seconds_parser(allow_zero=True))
    )
    log: LogConfig = field(default_factory=LogConfig, metadata=_section_of(LogConfig))
    source: str = field(default=DEFAULTS_SOURCE, compare=False)

    @property
    def backends(self) -> tuple[ListenerConfig, ...]:
        """Every listen address with its Memcached: `listeners`, or listen and memcached."""
        return self.listeners or (ListenerConfig(self.listen, self.memcached),)


def _check_config(config: Config) -> None:
    _check_listeners(config)
    if config.workers > 1 and config.shadow.worker == "inline":
        raise _Conflict(
            ("workers", "shadow.worker"),
            "shadow.worker: inline replays on each proxy process's own loop, but with several "
            "processes a key's operations must reach one shadow engine: use "
            "shadow.worker: process (the default) or workers: 1",
        )
    if config.workers > 1 and config.shadow.replay_flush_all:
        raise _Conflict(
            ("workers", "shadow.replay_flush_all"),
            "shadow.replay_flush_all needs workers: 1 (with several shadow workers a flush "
            "replayed by one would land between the others' writes); a flush_all then makes "
            "every key cold instead",
        )


def _check_listeners(config: Config) -> None:
    defaults = Config()
    if config.listeners and (
        config.listen != defaults.listen or config.memcached != defaults.memcached
    ):
        raise _Conflict(
            ("listeners", "listen", "memcached"),
            "give either listeners (one entry per Memcached) or listen and memcached, not both",
        )


def _complete_shadow(shadow: ShadowConfig) -> ShadowConfig | None:
    return None if shadow.redis is None else complete_redis(shadow, shadow.redis, os.environ)


# Checks that involve several options of one section, run after the section is built; one
# that returns a section puts it in the built one's place (the Redis URL completed).
_SECTION_CHECKS: dict[type[Any], Callable[[Any], Any]] = {
    LimitsConfig: _check_limits,
    ShadowConfig: _complete_shadow,
    Config: _check_config,
}


_T = TypeVar("_T")


def option_paths(cls: type[Any] = Config, prefix: str = "") -> Iterator[str]:
    """Every dotted option name of the schema, e.g. ``shadow.sample_rate``."""
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            yield from option_paths(f.metadata["section"], f"{prefix}{f.name}.")
        elif "parse" in f.metadata:
            yield f"{prefix}{f.name}"


# --- loading -----------------------------------------------------------------------------------


class _Loader:
    """Walks the composed YAML tree against the dataclass schema, keeping marks for errors.

    Every error of the file is collected (an option in error takes its default meanwhile)
    and raised together by done(), so one --check-config lists them all."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []

    def error(self, node: Node | None, key: str, problem: str) -> None:
        line = node.start_mark.line + 1 if node is not None and node.start_mark else None
        self.errors.append(ConfigError(self.file, problem, line=line, key=key))

    def done(self, config: _T) -> _T:
        if self.errors:
            first, *rest = self.errors
            raise ConfigError(first.file, first.problem, line=first.line, key=first.key, more=rest)
        return config

    def section(self, cls: type[_T], node: Node | None, path: str) -> _T:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL_TAG):
            return cls()  # "shadow:" with every option commented out means defaults
        if not isinstance(node, MappingNode):
            where = path or "top level"
            self.error(node, where, f"must be a mapping of options, got {_describe(node)}")
            return cls()
        fields = {
            f.name: f
            for f in dataclasses.fields(cast(Any, cls))
            if "parse" in f.metadata or "section" in f.metadata
        }
        values: dict[str, Any] = {}
        nodes: dict[str, Node] = {}
        errors_before = len(self.errors)
        for key_node, value_node in node.value:
            if not (isinstance(key_node, ScalarNode) and key_node.tag == _STR_TAG):
                self.error(key_node, path or "top level", "option names must be plain words")
                continue
            name = key_node.value
            dotted = f"{path}.{name}" if path else name
            if name in nodes:
                first = nodes[name].start_mark.line + 1
                self.error(key_node, dotted, f"given twice (first on line {first})")
                continue
            nodes[name] = key_node
            spec = fields.get(name)
            if spec is None:
                self.error(key_node, dotted, _unknown_key_problem(name, path, list(fields)))
                continue
            # A section with a shorthand (admin: HOST:PORT) may be given as one scalar.
            shorthand = spec.metadata.get("shorthand")
            if "section" in spec.metadata and not (
                shorthand is not None
                and isinstance(value_node, ScalarNode)
                and value_node.tag != _NULL_TAG
            ):
                values[name] = self.section(spec.metadata["section"], value_node, dotted)
                continue
            parse = shorthand or spec.metadata["parse"]
            try:
                values[name] = parse(value_node)
            except InvalidValue as exc:
                self.error(value_node, dotted, exc.problem)
        result = cls(**values)
        if len(self.errors) > errors_before:
            return result  # a check across options would only see defaults in their place
        try:
            check: Callable[[Any], Any] = _SECTION_CHECKS.get(cls, _no_check)
            completed = check(result)
            if completed is not None:
                result = completed
        except _Conflict as exc:
            name = next((n for n in exc.fields if n in nodes), exc.fields[0])
            key = f"{path}.{name}" if path else name
            self.error(nodes.get(name, node), key, exc.problem)
        return result


def _no_check(section: Any) -> None:
    pass


def _unknown_key_problem(name: str, path: str, valid: list[str]) -> str:
    problem = f"unknown option {name!r}"
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        here = f"{path}.{close[0]}" if path else close[0]
        return f"{problem} (did you mean {here!r}?)"
    elsewhere = [p for p in option_paths() if p.rsplit(".", 1)[-1] == name or p == name]
    if elsewhere:
        return f"{problem} here (did you mean {elsewhere[0]!r}?)"
    return f"{problem}; valid options here: {', '.join(valid)}"


def load_config(path: str | None) -> Config:
    """Read and validate a YAML config file; None gives the defaults. Raises ConfigError."""
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"config file is not UTF-8 text ({exc.reason})") from None
    return parse_config(text, source=path)


def parse_config(text: str, *, source: str) -> Config:
    """Validate YAML text; ``source`` names it in errors and becomes Config.source."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        detail = exc.problem or "syntax error"
        if exc.context:
            started = ""
            if exc.context_mark is not None and exc.context_mark.line + 1 != line:
                started = f" started on line {exc.context_mark.line + 1}"
            detail = f"{detail} ({exc.context}{started})"
        raise ConfigError(source, f"invalid YAML: {detail}", line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"invalid YAML: {exc}") from None
    loader = _Loader(source)
    config = loader.done(loader.section(Config, root, ""))
    return dataclasses.replace(config, source=source)


REDIS_PASSWORD_ENV: Final = "MEMSHADOW_REDIS_PASSWORD"


def complete_redis(shadow: ShadowConfig, url: RedisURL, environ: Mapping[str, str]) -> ShadowConfig:
    """shadow with `url` as its Redis, completed with what the other options say: the
    password (MEMSHADOW_REDIS_PASSWORD, else shadow.redis_password_file, else the URL's)
    and the TLS files. Raises _Conflict naming the option at fault."""
    password = url.password
    from_environment = environ.get(REDIS_PASSWORD_ENV)
    if from_environment:
        try:
            password = one_line_secret(from_environment, REDIS_PASSWORD_ENV)
        except InvalidValue as exc:
            raise _Conflict(("redis",), exc.problem) from None
    elif shadow.redis_password_file is not None:
        if url.password is not None:
            raise _Conflict(
                ("redis_password_file", "redis"),
                "the Redis URL and shadow.redis_password_file both give a password: give it "
                f"in one place (the file, the URL, or {REDIS_PASSWORD_ENV})",
            )
        try:
            password = read_secret_file(shadow.redis_password_file)
        except InvalidValue as exc:
            raise _Conflict(("redis_password_file",), exc.problem) from None
    if url.username is not None and password is None:
        raise _Conflict(
            ("redis",),
            f"the Redis URL names the user {url.username!r} but no password is given: put "
            f"it in the URL, in shadow.redis_password_file or in {REDIS_PASSWORD_ENV}",
        )
    files = {
        "tls_ca_file": shadow.redis_tls_ca_file,
        "tls_cert_file": shadow.redis_tls_cert_file,
        "tls_key_file": shadow.redis_tls_key_file,
    }
    given = [name for name, path in files.items() if path is not None]
    if given and not url.tls:
        raise _Conflict(
            (f"redis_{given[0]}", "redis"),
            f"shadow.redis_{given[0]} applies to TLS only, and the Redis URL is "
            "redis://: use rediss:// (or remove the TLS options)",
        )
    if shadow.redis_tls_key_file is not None and shadow.redis_tls_cert_file is None:
        raise _Conflict(
            ("redis_tls_key_file",),
            "shadow.redis_tls_key_file is set without shadow.redis_tls_cert_file (the "
            "certificate it is the key of)",
        )
    completed = dataclasses.replace(
        url,
        password=password,
        tls_ca_file=shadow.redis_tls_ca_file or url.tls_ca_file,
        tls_cert_file=shadow.redis_tls_cert_file or url.tls_cert_file,
        tls_key_file=shadow.redis_tls_key_file or url.tls_key_file,
    )
    if shadow.redis_tls_cert_file is not None:
        try:
            completed.tls_context()
        except (OSError, ssl.SSLError) as exc:
            raise _Conflict(
                ("redis_tls_cert_file",),
                "shadow.redis_tls_cert_file cannot be loaded (with its key, "
                f"shadow.redis_tls_key_file, if given) as a client certificate: {exc}",
            ) from None
    return dataclasses.replace(shadow, redis=completed)


def check_complete(config: Config) -> Config:
    """The checks that need the file and the flags together (a rate from the file and the
    Redis URL from --redis is fine): returns config, or raises ConfigError."""
    shadow = config.shadow
    if shadow.redis_cluster == "true" and shadow.redis is not None and shadow.redis.db:
        raise ConfigError(
            config.source,
            f"asks for database {shadow.redis.db}, but shadow.redis_cluster is true and a "
            "Redis Cluster has database 0 only: use .../0",
            key="shadow.redis",
        )
    examples_secret(shadow, os.environ, config.source)  # a bad secret stops the start
    if shadow.sample_rate > 0.0 and shadow.redis is None:
        raise ConfigError(
            config.source,
            f"is {shadow.sample_rate:g}, but no Redis is set (shadow.redis, or --redis), so "
            "nothing would be shadowed: set one, or set the rate to 0",
            key="shadow.sample_rate",
        )
    return config


def apply_overrides(
    config: Config,
    *,
    listen: str | None = None,
    memcached: str | None = None,
    redis: str | None = None,
    sample_rate: str | float | None = None,
    admin: str | None = None,
    workers: str | None = None,
) -> Config:
    """Return config with command-line values in place of the file's. Values are the raw flag
    text; a bad one raises ConfigError whose key is the flag (``--sample-rate``). An empty
    ``redis`` turns shadowing off."""

    def flag(name: str, parse: Callable[[str], _T], raw: str) -> _T:
        try:
            return parse(raw)
        except InvalidValue as exc:
            raise ConfigError(COMMAND_LINE, exc.problem, key=name) from None

    changes: dict[str, Any] = {}
    if listen is not None:
        changes["listen"] = flag("--listen", _flag_host_port(allow_port_zero=True), listen)
    if memcached is not None:
        changes["memcached"] = flag(
            "--memcached", _flag_host_port(allow_port_zero=False), memcached
        )
    if admin is not None:
        changes["admin"] = dataclasses.replace(
            config.admin, listen=flag("--admin", _flag_host_port(allow_port_zero=True), admin)
        )
    if workers is not None:
        changes["workers"] = flag("--workers", _flag_workers, workers)
    shadow = config.shadow
    if redis is not None:
        parsed = flag("--redis", RedisURL.parse, redis) if redis.strip() else None
        shadow = dataclasses.replace(shadow, redis=parsed)
        if parsed is not None:
            try:
                shadow = complete_redis(shadow, parsed, os.environ)
            except _Conflict as exc:
                raise ConfigError(COMMAND_LINE, exc.problem, key="--redis") from None
    if sample_rate is not None:
        shadow = dataclasses.replace(
            shadow, sample_rate=flag("--sample-rate", _flag_fraction, str(sample_rate))
        )
    if shadow is not config.shadow:
        changes["shadow"] = shadow
    return dataclasses.replace(config, **changes)


def _flag_host_port(*, allow_port_zero: bool) -> Callable[[str], HostPort]:
    return lambda text: HostPort.parse(text, allow_port_zero=allow_port_zero)


def _flag_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise InvalidValue(f"must be a number between 0 and 1, got {text!r}")
    return value


# --- printing a configuration ------------------------------------------------------------------

SECRET_OPTIONS: Final = ("admin.token",)
"""Options whose value is never printed (or shown by the admin API)."""


def _yaml_value(value: Any) -> str:
    """One option's value as YAML that this module reads back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, RedisURL):
        return json.dumps(dataclasses.replace(value, password=None).to_url())
    if isinstance(value, ListenerConfig):
        fields = {"listen": str(value.listen), "memcached": str(value.memcached)}
        if value.name:
            fields["name"] = value.name
        return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    return json.dumps(str(value))


def render_config(config: Config) -> str:
    """The configuration in effect (its file with the command line's flags over it) as
    YAML: every option, those that differ from the defaults marked with the default. Secrets
    (admin.token, a password in the Redis URL) are not printed."""
    lines = [
        "# memshadow: the configuration in effect, every option (memshadow --print-config).",
        f"# From: {config.source}, with the command line's flags over it. Options marked",
        "# 'default: ...' are yours; the others have their default. Secrets are not printed.",
        "# The commented reference of every option: memshadow --print-config without --config.",
        "",
    ]
    _render(Config, config, Config(), "", 0, lines)
    return "\n".join(lines) + "\n"


def _render(cls: type[Any], value: Any, default: Any, path: str, depth: int,
            lines: list[str]) -> None:  # fmt: skip
    pad = "  " * depth
    for f in dataclasses.fields(cls):
        dotted = f"{path}{f.name}"
        mine, theirs = getattr(value, f.name), getattr(default, f.name)
        if "section" in f.metadata:
            lines.append(f"{pad}{f.name}:")
            _render(f.metadata["section"], mine, theirs, f"{dotted}.", depth + 1, lines)
            if depth == 0:
                lines.append("")
            continue
        if "parse" not in f.metadata:
            continue
        if dotted in SECRET_OPTIONS and mine is not None:
            lines.append(f"{pad}# {f.name}: (set, not printed)")
            continue
        text = f"{pad}{f.name}: {_yaml_value(mine)}"
        if mine != theirs:
            text += f"  # default: {_yaml_value(theirs)}"
        if isinstance(mine, RedisURL) and mine.password is not None:
            text += "  # its password is not printed"
        lines.append(text)
