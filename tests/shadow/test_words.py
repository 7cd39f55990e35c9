"""The shadow's vocabulary (proxy/shadow/words.py): every word is known where it is read, and
the members count, render and cross the worker's pipe as the plain words."""

from __future__ import annotations

import marshal

from prometheus_client import CollectorRegistry, generate_latest

from proxy.config import GUARD_ACTIONS
from proxy.ops.causes import DROP_REASONS as CAUSED_DROPS
from proxy.ops.causes import ERROR_KINDS as CAUSED_ERRORS
from proxy.ops.guards import Action
from proxy.shadow.control import ShadowControl
from proxy.shadow.metrics import DROP_REASONS, ERROR_KINDS, install_shadow_metrics
from proxy.shadow.stats import ShadowStats
from proxy.shadow.wire import stats_state
from proxy.shadow.words import (
    GUARD_SEVERITY,
    DropReason,
    ErrorKind,
    GuardAction,
    NoiseReason,
    Outcome,
    SkipReason,
)


def test_every_error_kind_and_drop_reason_has_a_cause() -> None:
    assert set(CAUSED_ERRORS) == set(ErrorKind)
    assert set(CAUSED_DROPS) == set(DropReason)
    assert set(ERROR_KINDS) <= set(ErrorKind) and set(DROP_REASONS) <= set(DropReason)


def test_guard_actions_are_one_list() -> None:
    assert Action is GuardAction
    assert GUARD_ACTIONS == ("hold", "step_back", "stop")
    assert all(type(word) is str for word in GUARD_ACTIONS)  # (config errors show them)
    assert set(GUARD_SEVERITY) == set(GuardAction)


def test_members_count_under_their_words() -> None:
    stats = ShadowStats()
    stats.count_comparison("get", Outcome.NOISE, NoiseReason.COLD_KEY)
    stats.count_comparison("get", "noise", "cold_key")
    stats.skipped[SkipReason.NOT_SHADOWED] += 1
    assert stats.noise == {("get", "cold_key"): 2}
    assert stats.comparisons == {("get", "noise"): 2}
    assert stats.skipped == {"not_shadowed": 1}


def test_members_cross_the_pipe_as_plain_words() -> None:
    stats = ShadowStats()
    stats.comparisons[stats.for_command("get").match] += 1
    stats.count_comparison("set", Outcome.NOISE, NoiseReason.UNVERIFIED)
    stats.dropped[DropReason.QUEUE_FULL] += 1
    state = marshal.loads(marshal.dumps(stats_state(stats)))
    assert state["comparisons"] == {("get", "match"): 1, ("set", "noise"): 1}
    assert state["dropped"] == {"queue_full": 1}
    assert all(type(word) is str for label in state["noise"] for word in label)


def test_the_scrape_shows_the_words() -> None:
    stats = ShadowStats()
    stats.count_comparison("get", Outcome.MISMATCH, "value")
    stats.errors[ErrorKind.INTERNAL] += 1
    registry = CollectorRegistry()
    install_shadow_metrics(registry, stats, ShadowControl())
    text = generate_latest(registry).decode()
    assert 'memshadow_shadow_comparisons_total{command="get",outcome="mismatch"} 1.0' in text
    assert 'memshadow_shadow_comparisons_total{command="get",outcome="noise"} 0.0' in text
    assert 'memshadow_shadow_errors_total{kind="internal"} 1.0' in text
    assert "Outcome" not in text and "ErrorKind" not in text
