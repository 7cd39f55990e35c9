"""The worker pipe's framing and payloads, without sockets."""

from __future__ import annotations

import marshal
import struct

import pytest

from proxy.memcache.request import Request, RequestFramer
from proxy.shadow.engine.translate import translate
from proxy.shadow.stats import ShadowStats
from proxy.shadow.wire import (
    FrameDecoder,
    WireError,
    add_states,
    apply_stats_state,
    empty_state,
    encode,
    pack_request,
    stats_state,
    unpack_request,
)
from proxy.shadow.words import DropReason


def test_frames_come_out_whole_whatever_the_chunking() -> None:
    messages = [("batch", [(1, 2.5, [])]), ("idle", 7), ("lost", [b"k", b"\x00\xff"])]
    stream = b"".join(b"".join(encode(m)) for m in messages)
    for step in (1, 3, 7, len(stream)):
        decoder = FrameDecoder()
        out: list[tuple[object, ...]] = []
        for start in range(0, len(stream), step):
            out.extend(decoder.feed(stream[start : start + step]))
        assert out == messages
        assert decoder.pending == 0


def test_a_partial_frame_waits() -> None:
    frame = b"".join(encode(("idle", 1)))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [("idle", 1)]


def test_an_oversized_frame_is_refused_before_it_is_buffered() -> None:
    decoder = FrameDecoder(max_frame=16)
    with pytest.raises(WireError, match="over the 16 limit"):
        decoder.feed(struct.pack(">I", 17))


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff", marshal.dumps([1, 2]), marshal.dumps(()), marshal.dumps((1, "x"))],
    ids=["garbage", "not-a-tuple", "empty", "unnamed"],
)
def test_a_frame_that_is_not_a_message_is_an_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


def _requests(data: bytes) -> list[Request]:
    framer = RequestFramer(capture=lambda request: True)
    requests, _ = framer.feed(data)
    return requests


def test_a_request_crosses_with_what_translation_needs() -> None:
    (request,) = _requests(b"set k 5 100 2\r\nhi\r\n")
    request.response = b"STORED\r\n"
    request.started = 12.5
    item = marshal.loads(marshal.dumps(pack_request(request)))
    copy = unpack_request(item)
    assert (copy.command, copy.words, copy.data, copy.response, copy.started) == (
        "set",
        [b"set", b"k", b"5", b"100", b"2"],
        b"hi",
        b"STORED\r\n",
        12.5,
    )
    assert copy == request.captured()  # inline or over the wire: one captured request
    original = translate(request.captured(), lambda key: True)
    crossed = translate(copy, lambda key: True)
    assert repr(original) == repr(crossed)


def test_a_multi_key_get_keeps_its_keys() -> None:
    (request,) = _requests(b"get a b c\r\n")
    request.response = b"VALUE a 0 1\r\n1\r\nEND\r\n"
    copy = unpack_request(marshal.loads(marshal.dumps(pack_request(request))))
    assert copy.keys == [b"a", b"b", b"c"]


def _stats(n: int) -> ShadowStats:
    stats = ShadowStats()
    stats.count_comparison("get", "match")
    stats.count_comparison("get", "mismatch", "value")
    stats.count_comparison("set", "noise", "transient_race")
    stats.dropped["timeout"] += n
    stats.errors["redis_timeout"] += n
    stats.skipped["meta_unemulated"] += 1
    stats.redis_commands = 10 * n
    stats.repairs = n
    stats.histogram(stats.redis_latency, "get").observe(0.001)
    stats.lag.observe(0.002)
    stats.connect_failures["auth"] += n
    stats.queue_depth = n
    stats.cas_map_entries = 10 * n
    return stats


def test_stats_cross_as_plain_data_and_load_in_place() -> None:
    state = marshal.loads(marshal.dumps(stats_state(_stats(2))))
    mirror = ShadowStats()
    comparisons = mirror.comparisons
    apply_stats_state(
        mirror,
        state,
        extra_dropped={"worker_down": 3},
        extra_errors={"worker_exit": 1},
        extra_connect_failures={"auth": 1, "tls": 4},  # the proxy's own INFO connection's
    )
    assert mirror.comparisons is comparisons  # the metrics collector holds this object
    assert mirror.comparisons[("get", "mismatch")] == 1
    assert mirror.mismatches[("get", "value")] == 1
    assert mirror.noise[("set", "transient_race")] == 1
    assert mirror.dropped == {"timeout": 2, "worker_down": 3}
    assert mirror.errors == {"redis_timeout": 2, "worker_exit": 1}
    assert mirror.connect_failures == {"auth": 3, "tls": 4}
    assert mirror.redis_commands == 20
    assert mirror.redis_latency["get"].count == 1
    assert mirror.lag.count == 1
    assert mirror.queue_depth == 2
    assert mirror.cas_map_entries == 20


def test_states_add_up_so_counters_survive_a_worker_restart() -> None:
    total = add_states(add_states(empty_state(), stats_state(_stats(2))), stats_state(_stats(3)))
    mirror = ShadowStats()
    apply_stats_state(mirror, total)
    assert mirror.comparisons[("get", "match")] == 2
    assert mirror.dropped["timeout"] == 5
    assert mirror.redis_commands == 50
    assert mirror.repairs == 5
    assert mirror.redis_latency["get"].count == 2
    assert mirror.lag.count == 2
    assert mirror.queue_depth == 3  # the newer worker's queue, not a sum
    assert mirror.cas_map_entries == 30  # ...and its cas map


def test_a_word_of_the_vocabulary_crosses_as_plain_str_wherever_it_sits() -> None:
    """marshal refuses str subclasses; a StrEnum member in any message must not make a
    process unable to report (it once silenced an extra proxy process)."""
    message = ("figures", {"dropped": {DropReason.QUEUE_FULL: 3}, "l": [DropReason.TIMEOUT]})
    (decoded,) = FrameDecoder().feed(b"".join(encode(message)))
    assert decoded == ("figures", {"dropped": {"queue_full": 3}, "l": ["timeout"]})
    assert type(next(iter(decoded[1]["dropped"]))) is str
