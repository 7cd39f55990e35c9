"""MismatchExamples: bounded per kind, private by default, rate-limited JSON-line logging."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.admin import Request
from proxy.shadow.examples import (
    MAX_KINDS,
    OTHER_KIND,
    REVEAL_MAX_BYTES,
    MismatchExamples,
    escape_bytes,
    mismatches_route,
)

SECRET = b"test-secret"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def keyed(data: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()[:16]


def examples(
    *,
    per_kind: int = 20,
    reveal: bool = False,
    secret: bytes = SECRET,
    log_per_second: int = 10,
    clock: Callable[[], float] | None = None,
    wall_clock: Callable[[], float] = lambda: 1700000000.25,
) -> MismatchExamples:
    return MismatchExamples(
        per_kind,
        reveal,
        secret,
        log_per_second=log_per_second,
        clock=clock or FakeClock(),
        wall_clock=wall_clock,
    )


def record(store: MismatchExamples, kind: str = "value", key: bytes = b"user:1") -> None:
    store.record(
        kind,
        "get",
        key,
        {"present": True, "flags": 5, "value": b"secret value"},
        {"present": True, "flags": 5, "value": b"other"},
        "memcached=hit (12 bytes) redis=hit (5 bytes)",
    )


def test_private_by_default() -> None:
    store = examples()
    record(store)
    assert store.to_json() == {
        "reveal": False,
        "kinds": {
            "value": [
                {
                    "at": 1700000000.25,
                    "time": "2023-11-14T22:13:20.250+00:00",
                    "kind": "value",
                    "command": "get",
                    "key": keyed(b"user:1"),
                    "key_hash": keyed(b"user:1"),
                    "memcached": {
                        "present": True,
                        "flags": 5,
                        "value": {"len": 12, "hmac": keyed(b"secret value")},
                    },
                    "redis": {
                        "present": True,
                        "flags": 5,
                        "value": {"len": 5, "hmac": keyed(b"other")},
                    },
                    "detail": "memcached=hit (12 bytes) redis=hit (5 bytes)",
                }
            ]
        },
    }
    text = json.dumps(store.to_json())
    assert "user:1" not in text and "secret value" not in text


def test_equal_values_hash_equal_and_the_secret_matters() -> None:
    a, b = examples(), examples(secret=b"another")
    for store in (a, b):
        store.record("value", "get", b"k", {"value": b"same"}, {"value": b"same"}, "")
    sides = a.examples("value")[0]
    assert sides.memcached == sides.redis
    assert a.examples("value")[0].key != b.examples("value")[0].key


def test_random_secret_per_process_when_none_is_configured() -> None:
    a, b = MismatchExamples(), MismatchExamples()
    assert a.hash(b"k") == a.hash(b"k")
    assert a.hash(b"k") != b.hash(b"k")
    assert len(a.hash(b"k")) == 16


def test_nested_and_odd_values_never_leak() -> None:
    class Item:
        def __repr__(self) -> str:
            return "Item(data=b'plaintext')"

    store = examples()
    store.record(
        "status",
        "mg",
        b"k",
        {"items": [b"a", (b"bc", 1)], "raw": bytearray(b"xyz"), "obj": Item(), "none": None},
        {"nested": {"v": memoryview(b"q")}},
        "",
    )
    example = store.examples("status")[0]
    assert example.memcached == {
        "items": [{"len": 1, "hmac": keyed(b"a")}, [{"len": 2, "hmac": keyed(b"bc")}, 1]],
        "raw": {"len": 3, "hmac": keyed(b"xyz")},
        "obj": "<Item>",
        "none": None,
    }
    assert example.redis == {"nested": {"v": {"len": 1, "hmac": keyed(b"q")}}}
    assert "plaintext" not in json.dumps(store.to_json())


def test_reveal_shows_escaped_plaintext() -> None:
    store = examples(reveal=True)
    key = b"caf\xc3\xa9\t\\x\"'\x00"
    value = b"line\r\nnext\xff"
    store.record("value", "get", key, {"value": value}, {"value": None}, "d")
    data = store.to_json()
    assert data["reveal"] is True
    example = data["kinds"]["value"][0]
    assert example["key"] == "caf\\xc3\\xa9\\x09\\\\x\"'\\x00"
    assert example["memcached"]["value"] == {
        "len": len(value),
        "hmac": keyed(value),
        "text": "line\\x0d\\x0anext\\xff",
        "truncated": False,
    }
    assert example["redis"] == {"value": None}
    json.dumps(data)  # serialisable


def test_reveal_truncates_long_values() -> None:
    store = examples(reveal=True)
    value = b"v" * (REVEAL_MAX_BYTES + 10)
    store.record("value", "get", b"k", {"value": value}, {}, "")
    shown = store.examples("value")[0].memcached["value"]
    assert shown["len"] == len(value) and shown["truncated"] is True
    assert shown["text"] == "v" * REVEAL_MAX_BYTES


def test_escape_bytes_is_unambiguous() -> None:
    assert escape_bytes(b"\\x41") != escape_bytes(b"A")
    assert escape_bytes(bytes(range(256))).isascii()
    assert escape_bytes(b"plain text-123") == "plain text-123"


def test_last_n_per_kind_newest_first() -> None:
    clock = iter(range(100))
    store = examples(per_kind=3, wall_clock=lambda: float(next(clock)))
    for i in range(5):
        record(store, "value", b"k%d" % i)
    record(store, "flags", b"f")
    data = store.to_json()
    assert [e["key"] for e in data["kinds"]["value"]] == [keyed(b"k%d" % i) for i in (4, 3, 2)]
    assert [e["at"] for e in data["kinds"]["value"]] == [4.0, 3.0, 2.0]
    assert len(data["kinds"]["flags"]) == 1
    assert store.recorded == 6
    assert store.to_json("flags")["kinds"].keys() == {"flags"}
    assert store.to_json("nope") == {"reveal": False, "kinds": {}}


def test_kinds_are_bounded() -> None:
    store = examples(per_kind=2)
    for i in range(MAX_KINDS + 10):
        record(store, f"kind{i}")
    kinds = store.to_json()["kinds"]
    assert len(kinds) == MAX_KINDS
    assert len(kinds[OTHER_KIND]) == 2
    assert kinds[OTHER_KIND][0]["kind"] == f"kind{MAX_KINDS + 9}"  # the real kind is kept


def test_per_kind_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MismatchExamples(per_kind=0)


def log_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "memshadow.mismatch"]


def test_log_lines_are_json_and_private(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="memshadow.mismatch")
    store = examples()
    record(store)
    [line] = log_lines(caplog)
    assert line["event"] == "mismatch"
    assert line["key"] == keyed(b"user:1")
    assert line["memcached"] == {
        "present": True,
        "flags": 5,
        "value": {"len": 12, "hmac": keyed(b"secret value")},
    }
    assert "secret value" not in caplog.text and "user:1" not in caplog.text


def test_log_is_rate_limited_with_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="memshadow.mismatch")
    clock = FakeClock()
    store = examples(log_per_second=3, clock=clock)
    for _ in range(10):
        record(store)
        clock.now += 0.05  # 10 in half a second
    assert [line["event"] for line in log_lines(caplog)] == ["mismatch"] * 3
    assert store.suppressed_total == 7
    assert store.recorded == 10  # every example is still kept in memory (bounded)

    store.flush_log()  # the window (started at 1000.0) is not over yet
    assert len(log_lines(caplog)) == 3
    clock.now = 1001.0
    record(store)  # a new window: first the summary, then the line
    lines = log_lines(caplog)
    assert lines[3] == {"event": "mismatch_log_suppressed", "suppressed": 7, "limit_per_second": 3}
    assert lines[4]["event"] == "mismatch"
    assert len(lines) == 5


def test_summary_from_a_timer_after_the_last_burst(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="memshadow.mismatch")
    clock = FakeClock()
    store = examples(log_per_second=1, clock=clock)
    record(store)
    record(store)
    clock.now += 1.5
    store.flush_log()
    store.flush_log()  # only once
    events = [line["event"] for line in log_lines(caplog)]
    assert events == ["mismatch", "mismatch_log_suppressed"]


async def test_route_serves_json() -> None:
    store = examples()
    record(store, "value")
    record(store, "flags")
    handler = mismatches_route(store)
    response = await handler(Request("GET", "/api/mismatches"))
    assert response.status == 200
    assert response.content_type == "application/json"
    assert json.loads(response.body) == store.to_json()
    filtered = await handler(Request("GET", "/api/mismatches", query={"kind": ["flags"]}))
    assert list(json.loads(filtered.body)["kinds"]) == ["flags"]


def test_a_configured_secret_keeps_hashes_stable_across_processes(tmp_path: Path) -> None:
    from proxy.config import Config, ShadowConfig

    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123\n", encoding="utf-8")
    config = Config(shadow=ShadowConfig(examples_secret_file=str(secret)))
    first, second = MismatchExamples.for_config(config, {}), MismatchExamples.for_config(config, {})
    assert first.hash(b"user:42") == second.hash(b"user:42") == keyed(
        b"user:42", b"0123456789abcdef0123"
    )
    assert first.describe()["secret"] == "shadow.examples_secret_file"
    # The environment wins over the file.
    env = MismatchExamples.for_config(config, {"MEMSHADOW_EXAMPLES_SECRET": "x" * 20})
    assert env.hash(b"k") == keyed(b"k", b"x" * 20)
    assert env.describe()["secret"] == "MEMSHADOW_EXAMPLES_SECRET"
    # Without either: random per process, and said so.
    assert MismatchExamples.for_config(Config(), {}).describe()["stable_hashes"] is False


def test_a_short_or_unreadable_secret_is_a_config_error(tmp_path: Path) -> None:
    from proxy.config import ShadowConfig, examples_secret, load_config
    from proxy.errors import ConfigError

    short = tmp_path / "short"
    short.write_text("abc\n", encoding="utf-8")
    path = tmp_path / "memshadow.yaml"
    path.write_text(f"shadow:\n  examples_secret_file: {short}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"{path}:2: shadow.examples_secret_file: '{short}' holds a secret of 3 characters; "
        "it needs at least 16 (for example: openssl rand -hex 32)"
    )
    with pytest.raises(ConfigError) as info:
        examples_secret(ShadowConfig(), {"MEMSHADOW_EXAMPLES_SECRET": "short"}, "my.yaml")
    assert str(info.value).startswith("my.yaml: MEMSHADOW_EXAMPLES_SECRET: ")
    assert "short" not in str(info.value).split(": ", 2)[2].replace("a secret", "")


def test_lookup_finds_a_suspect_key_s_examples() -> None:
    clock = iter(range(100))
    store = examples(wall_clock=lambda: float(next(clock)))
    record(store, "value", b"user:7")
    record(store, "flags", b"user:8")
    record(store, "missing_in_redis", b"user:7")
    found = store.lookup(b"user:7")
    assert found["key_hash"] == keyed(b"user:7")
    assert [e["kind"] for e in found["examples"]] == ["missing_in_redis", "value"]  # newest first
    assert store.lookup(b"nobody")["examples"] == []


def test_a_runtime_reveal_applies_from_then_on_and_is_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="memshadow.mismatch")
    store = examples()
    record(store, "value", b"before")
    assert store.set_reveal(True) and not store.set_reveal(True)
    record(store, "value", b"after")
    private = store.to_json()["kinds"]["value"]  # as the config says: private
    assert [e["key"] for e in private] == [keyed(b"after"), keyed(b"before")]
    assert "secret value" not in json.dumps(private)
    shown = store.to_json(show_text=True)["kinds"]["value"]
    assert shown[0]["key"] == "after" and shown[0]["key_hash"] == keyed(b"after")
    assert shown[0]["memcached"]["value"]["text"] == "secret value"
    assert shown[1]["key"] == keyed(b"before")  # recorded before: nothing to reveal
    assert "text" not in shown[1]["memcached"]["value"]
    assert "secret value" not in caplog.text and "after" not in caplog.text
    store.set_reveal(False)
    record(store, "value", b"later")
    assert store.to_json(show_text=True)["kinds"]["value"][0]["key"] == keyed(b"later")
