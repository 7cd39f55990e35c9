"""The operator options of the config file: admin (shorthand and section), shadow.ramp and
shadow.guards, and the message of every mistake a user can make in them."""

from __future__ import annotations

import pytest

from proxy.address import HostPort
from proxy.config import (
    AdminConfig,
    Config,
    ConfigError,
    apply_overrides,
    parse_config,
)


def parse(text: str) -> Config:
    return parse_config(text, source="f.yaml")


def test_admin_shorthand_and_section_mean_the_same() -> None:
    short = parse("admin: 127.0.0.1:9999\n")
    long = parse("admin:\n  listen: 127.0.0.1:9999\n")
    assert short == long
    assert short.admin == AdminConfig(listen=HostPort("127.0.0.1", 9999), token=None)


def test_admin_token_is_kept_out_of_repr() -> None:
    config = parse("admin:\n  token: hunter2\n")
    assert config.admin.token == "hunter2"
    assert "hunter2" not in repr(config)


def test_admin_flag_keeps_the_token() -> None:
    config = apply_overrides(parse("admin:\n  token: abc\n"), admin="127.0.0.1:0")
    assert config.admin == AdminConfig(listen=HostPort("127.0.0.1", 0), token="abc")


def test_ramp_and_guards() -> None:
    config = parse(
        """
shadow:
  ramp:
    steps: [0.01, 0.05, 0.25, 1.0]
    hold: 15m
    mismatch_target: 1e-3
    min_comparisons: 500
  guards:
    interval: 500ms
    mismatch: {window: 2h, min_count: 10, threshold: 0.5, action: step_back}
    errors: {enabled: false}
    latency: {threshold: 1.5, min_increase: 0.002, action: hold}
"""
    )
    ramp, guards = config.shadow.ramp, config.shadow.guards
    assert ramp.steps == (0.01, 0.05, 0.25, 1.0) and ramp.hold == 900.0
    assert ramp.mismatch_target == 0.001 and ramp.min_comparisons == 500
    assert guards.interval == 0.5
    assert (guards.mismatch.window, guards.mismatch.action) == (7200.0, "step_back")
    assert guards.mismatch.min_count == 10 and guards.mismatch.threshold == 0.5
    assert not guards.errors.enabled and guards.errors.action == "stop"
    assert guards.drops.action == "step_back"  # untouched: its own default
    assert guards.latency.threshold == 1.5 and guards.latency.action == "hold"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("admin: [1]\n", "f.yaml:1: admin: must be a mapping of options, got a list"),
        (
            "admin:\n  listen: nowhere\n",
            "f.yaml:2: admin.listen: expected HOST:PORT, got 'nowhere'",
        ),
        (
            'admin:\n  token: "two words"\n',
            "f.yaml:2: admin.token: must be printable ASCII without spaces (or null for no token)",
        ),
        (
            "admin:\n  tokn: x\n",
            "f.yaml:2: admin.tokn: unknown option 'tokn' (did you mean 'admin.token'?)",
        ),
        (
            "shadow:\n  ramp:\n    steps: 0.5\n",
            "f.yaml:3: shadow.ramp.steps: must be a list of sample rates, e.g. "
            "[0.01, 0.05, 0.25, 1.0]; got 0.5",
        ),
        (
            "shadow:\n  ramp:\n    steps: [0.5, 0.1]\n",
            "f.yaml:3: shadow.ramp.steps: steps must rise: 0.1 comes after 0.5",
        ),
        (
            "shadow:\n  ramp:\n    steps: [0, 1]\n",
            "f.yaml:3: shadow.ramp.steps: every step must be a number above 0 and at most 1, "
            "got 0",
        ),
        (
            "shadow:\n  ramp:\n    hold: soon\n",
            "f.yaml:3: shadow.ramp.hold: must be a duration above zero: seconds, or with a unit "
            "as in 500ms, 90s, 15m, 2h; got 'soon'",
        ),
        (
            "shadow:\n  ramp:\n    mismatch_target: 0\n",
            "f.yaml:3: shadow.ramp.mismatch_target: must be a number above 0 and below 1, got 0",
        ),
        (
            "shadow:\n  ramp:\n    min_comparisons: 0\n",
            "f.yaml:3: shadow.ramp.min_comparisons: must be a whole number above zero, got 0",
        ),
        (
            "shadow:\n  guards:\n    drops:\n      action: pause\n",
            "f.yaml:4: shadow.guards.drops.action: must be one of hold, step_back, stop; "
            "got 'pause'",
        ),
        (
            "shadow:\n  guards:\n    errors:\n      action: stpo\n",
            "f.yaml:4: shadow.guards.errors.action: must be one of hold, step_back, stop; "
            "got 'stpo' (did you mean 'stop'?)",
        ),
        (
            "shadow:\n  guards:\n    errors:\n      threshold: 5%\n",
            "f.yaml:4: shadow.guards.errors.threshold: must be a number between 0 and 1, "
            "got '5%'",
        ),
        (
            "shadow:\n  guards:\n    mismatch:\n      enabled: maybe\n",
            "f.yaml:4: shadow.guards.mismatch.enabled: must be true or false, got 'maybe'",
        ),
        (
            "shadow:\n  guards:\n    latency:\n      threshold: 1\n",
            "f.yaml:4: shadow.guards.latency.threshold: must be a ratio above 1 "
            "(2: twice as slow); got 1",
        ),
        (
            "shadow:\n  guards:\n    latency:\n      window: 0\n",
            "f.yaml:4: shadow.guards.latency.window: must be a duration above zero: seconds, "
            "or with a unit as in 500ms, 90s, 15m, 2h; got 0",
        ),
        (
            "shadow:\n  guards:\n    speed: {}\n",
            "f.yaml:3: shadow.guards.speed: unknown option 'speed'; valid options here: "
            "interval, mismatch, errors, drops, latency",
        ),
    ],
)
def test_mistakes_name_the_line_the_option_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value) == message
