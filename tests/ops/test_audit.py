"""The audit log: every ShadowControl change recorded and logged, bounded, paged by seq."""

from __future__ import annotations

import logging

import pytest

from proxy.ops.audit import AuditLog
from proxy.shadow.control import ShadowControl


def test_control_changes_are_recorded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "memshadow.audit")
    audit = AuditLog()
    control = ShadowControl(0.1)
    control.add_listener(audit.on_change)
    control.set_rate(0.2, "api", "testing")
    control.set_rate(0.2, "api")  # no change, no entry
    control.set_enabled(False, "halt:errors")
    entries = audit.entries()
    assert [(e.seq, e.source, e.field, e.old, e.new) for e in entries] == [
        (1, "api", "sample_rate", 0.1, 0.2),
        (2, "halt:errors", "enabled", True, False),
    ]
    assert caplog.messages == [
        "audit: sample_rate 0.1 -> 0.2 by api: testing",
        "audit: enabled true -> false by halt:errors",
    ]


def test_halts_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    AuditLog().record("halt:drops", "halt", False, True, "step_back: drops ratio 2%")
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.messages[-1] == (
        "audit: halt false -> true by halt:drops: step_back: drops ratio 2%"
    )


def test_bounded_and_paged() -> None:
    audit = AuditLog(capacity=3)
    for n in range(5):
        audit.record("api", "sample_rate", n / 10, (n + 1) / 10)
    assert [e.seq for e in audit.entries()] == [3, 4, 5]
    assert [e.seq for e in audit.entries(since=3)] == [4, 5]
    assert [e.seq for e in audit.entries(limit=1)] == [5]
    entry = audit.entries()[-1].as_json()
    assert entry["old"] == 0.4 and entry["new"] == 0.5 and entry["time"].endswith("Z")
