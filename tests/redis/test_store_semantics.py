"""Each REFERENCE edge case run on memcached 1.6.18 and on the Redis store: both must agree,
and the shared answer must be the documented one."""

from __future__ import annotations

import time

import pytest

from proxy.memcache.words import Mode, Status
from proxy.redis.layout import max_numeric_len, max_value_len
from tests.redis.twin import Hit, KeyState, Twin

U64_MAX = 2**64 - 1


def value(twin: Twin, key: bytes) -> bytes | None:
    state = twin.state(key)
    return state.data if state.present else None


def gets_cas(twin: Twin, key: bytes) -> tuple[int, int]:
    """(memcached cas, redis cas) of a present key, remembered as a pair by the twin."""
    [(_, _, _, mc_cas)] = twin.mc.values(b"gets " + key)
    item = twin.run(twin.store.get(key))
    assert mc_cas is not None and item is not None
    twin.cas_map[(key, mc_cas)] = item.cas
    return mc_cas, item.cas


# incr / decr ---------------------------------------------------------------------------------


def test_incr_wraps_at_2_64(twin: Twin) -> None:
    twin.storage("set", b"n", 0, 0, str(U64_MAX).encode())
    assert twin.delta("incr", b"n", 1) == "0"
    assert value(twin, b"n") == b"0" + b" " * 19
    twin.storage("set", b"n", 0, 0, b"18446744073709551614")
    assert twin.delta("incr", b"n", 3) == "1"


def test_incr_with_the_largest_delta(twin: Twin) -> None:
    twin.storage("set", b"n", 0, 0, b"5")
    assert twin.delta("incr", b"n", U64_MAX) == "4"
    assert twin.delta("decr", b"n", U64_MAX) == "0"


def test_decr_stops_at_zero_and_pads(twin: Twin) -> None:
    twin.storage("set", b"n", 0, 0, b"10")
    assert twin.delta("decr", b"n", 100) == "0"
    assert value(twin, b"n") == b"0 "


def test_padding_when_shorter_new_item_when_longer(twin: Twin) -> None:
    twin.storage("set", b"n", 0, 0, b"100")
    assert twin.delta("decr", b"n", 1) == "99"
    assert value(twin, b"n") == b"99 "
    twin.storage("set", b"m", 0, 0, b"99")
    assert twin.delta("incr", b"m", 1) == "100"
    assert value(twin, b"m") == b"100"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (b" 12", "13"),
        (b"12 ", "13"),
        (b"+1", "2"),
        (b"012", "13"),
        (b"12 abc", "13"),
        (b"\t7\n", "8"),
        (b"\r\n5", "6"),
        (b"5\x00abc", "6"),
        (b"-0", "1"),
        (b"000000000000000000000001", "2"),  # leading zeros are not limited to 20 digits
        (b"-9223372036854775809", "9223372036854775808"),  # strtoull wraps; below 2^63: taken
        (b"-18446744073709551615", "2"),
        (b"12abc", "NON_NUMERIC"),
        (b"-12", "NON_NUMERIC"),
        (b"-9223372036854775808", "NON_NUMERIC"),
        (b"1.5e3", "NON_NUMERIC"),
        (b"0x10", "NON_NUMERIC"),
        (b"", "NON_NUMERIC"),
        (b"+", "NON_NUMERIC"),
        (b"+-1", "NON_NUMERIC"),
        (b"18446744073709551616", "NON_NUMERIC"),
        (b"abc", "NON_NUMERIC"),
    ],
)
def test_number_parser(twin: Twin, stored: bytes, expected: str) -> None:
    # Not here: an all-whitespace value. memcached's strtoull then skips the item's "\r\n"
    # and reads whatever bytes follow the item in its slab, so the answer depends on memory.
    twin.storage("set", b"n", 0, 0, stored)
    assert twin.delta("incr", b"n", 1) == expected
    twin.state(b"n")


def test_memcached_overread_of_a_big_number_is_followed(twin: Twin) -> None:
    """memcached 1.6.18 looks for a '-' in a number of 2^63 or more with strchr(), from the
    value to the first NUL: past the item, into the bytes its slab chunk held before. Where
    they hold a '-', incr/decr answers NON_NUMERIC (the shadow's noise reason
    memcached_overread). The twin follows memcached there and puts Redis back, so the
    differential's random histories cannot diverge on it."""
    keys = [b"big:%d" % i for i in range(100)]
    for key in keys:  # slab chunks of the same class full of '-', freed again
        assert twin.mc.line(b"set %s 0 0 24" % key, b"-" * 24) == b"STORED"
        assert twin.mc.line(b"delete %s" % key) == b"DELETED"
    outcomes = []
    for key in keys:
        twin.storage("set", key, 0, 0, b"18446744073709551614")
        outcomes.append(twin.delta("decr", key, 1))
        twin.state(key)
    assert set(outcomes) == {"NON_NUMERIC", "18446744073709551613"}, outcomes


def test_incr_decr_missing_key(twin: Twin) -> None:
    assert twin.delta("incr", b"missing", 1) == "NOT_FOUND"
    assert twin.delta("decr", b"missing", 1) == "NOT_FOUND"
    assert not twin.state(b"missing").present


def test_incr_keeps_flags_and_ttl_and_changes_cas(twin: Twin) -> None:
    twin.storage("set", b"n", 4242, 1000, b"1")
    before = gets_cas(twin, b"n")
    assert twin.delta("incr", b"n", 1) == "2"
    after = gets_cas(twin, b"n")
    assert after[0] != before[0] and after[1] > before[1]
    assert twin.state(b"n") == KeyState(True, 4242, b"2")  # the TTL is compared inside
    assert 998_000 <= twin.run(twin.store.pttl(b"n")) <= 1_000_000


def test_numeric_only_up_to_the_chunked_item_size(twin: Twin) -> None:
    limit = max_numeric_len(twin.slab_chunk_max, 1)
    twin.storage("set", b"n", 0, 0, b"1" + b" " * (limit - 1))
    assert twin.delta("incr", b"n", 1) == "2"
    twin.storage("set", b"n", 0, 0, b"1" + b" " * limit)
    assert twin.delta("incr", b"n", 1) == "NON_NUMERIC"


def test_empty_value_is_non_numeric_before_the_cas_check(twin: Twin) -> None:
    twin.storage("set", b"n", 0, 0, b"")
    assert twin.ma(b"n", "incr", 1, cas=U64_MAX) == "NON_NUMERIC"
    twin.storage("set", b"n", 0, 0, b"abc")
    assert twin.ma(b"n", "incr", 1, cas=U64_MAX) == "EXISTS"


# meta arithmetic -----------------------------------------------------------------------------


def test_ma_autovivify_returns_initial_without_delta(twin: Twin) -> None:
    assert twin.ma(b"x", "incr", 5, create=0, initial=13) == "13"
    assert twin.state(b"x") == KeyState(True, 0, b"13")
    assert twin.ma(b"x", "incr", 5, create=0, initial=13) == "18"
    assert twin.ma(b"y", "decr", 5, create=0) == "0"


def test_ma_autovivify_ttls_follow_flag_order(twin: Twin) -> None:
    assert twin.ma(b"a", "incr", 1, create=500, ttl=1000) == "0"
    assert twin.run(twin.store.pttl(b"a")) > 900_000
    assert twin.ma(b"b", "incr", 1, create=500, ttl=1000, ttl_first=True) == "0"
    assert twin.run(twin.store.pttl(b"b")) < 501_000
    twin.state(b"a")
    twin.state(b"b")


def test_ma_autovivify_with_negative_ttl_is_created_then_gone(twin: Twin) -> None:
    assert twin.ma(b"x", "incr", 1, create=-1, initial=7) == "7"
    assert not twin.state(b"x").present


def test_ma_ttl_on_an_existing_item(twin: Twin) -> None:
    twin.storage("set", b"n", 0, 0, b"1")
    assert twin.ma(b"n", "incr", 1, ttl=777) == "2"
    twin.state(b"n")
    assert twin.ma(b"n", "incr", 1, ttl=-1) == "3"
    assert not twin.state(b"n").present


def test_ma_ttl_is_lost_when_the_number_grows(twin: Twin) -> None:
    # memcached 1.6.18: a longer result goes into a new item, and T is set on the old one
    twin.storage("set", b"n", 0, 300, b"9")
    assert twin.ma(b"n", "incr", 1, ttl=5000) == "10"
    assert twin.run(twin.store.pttl(b"n")) <= 300_000
    assert twin.ma(b"n", "incr", 1, ttl=0) == "11"  # in place: T applies
    assert twin.run(twin.store.pttl(b"n")) == -1
    twin.state(b"n")


def test_ma_cas(twin: Twin) -> None:
    twin.storage("set", b"n", 0, 0, b"1")
    mc_cas, _ = gets_cas(twin, b"n")
    assert twin.ma(b"n", "incr", 1, cas=mc_cas + 1000) == "EXISTS"
    assert twin.ma(b"n", "incr", 1, cas=mc_cas) == "2"
    assert twin.ma(b"n", "incr", 1, cas=mc_cas) == "EXISTS"  # the cas changed
    assert twin.ma(b"n", "incr", 1, cas=0) == "3"  # C0 is no check for ma


def test_ma_missing_without_create(twin: Twin) -> None:
    assert twin.ma(b"nope", "incr", 1) == "NOT_FOUND"


# storage -------------------------------------------------------------------------------------


def test_storage_matrix(twin: Twin) -> None:
    assert twin.storage("add", b"k", 1, 0, b"a") == "STORED"
    assert twin.storage("add", b"k", 2, 0, b"b") == "NOT_STORED"
    assert twin.storage("replace", b"k", 3, 0, b"c") == "STORED"
    assert twin.storage("replace", b"nope", 3, 0, b"c") == "NOT_STORED"
    assert twin.storage("set", b"k", 4, 0, b"d") == "STORED"
    assert twin.state(b"k") == KeyState(True, 4, b"d")
    assert twin.storage("set", b"f", 2**32 - 1, 0, b"") == "STORED"
    assert twin.state(b"f") == KeyState(True, 2**32 - 1, b"")


def test_append_prepend_keep_flags_and_ttl(twin: Twin) -> None:
    twin.storage("set", b"k", 7, 1000, b"mid")
    assert twin.storage("append", b"k", 9, 0, b"-end") == "STORED"
    assert twin.storage("prepend", b"k", 9, -1, b"start-") == "STORED"
    assert twin.state(b"k") == KeyState(True, 7, b"start-mid-end")
    assert twin.run(twin.store.pttl(b"k")) > 990_000


def test_append_prepend_to_missing_key(twin: Twin) -> None:
    assert twin.storage("append", b"k", 0, 0, b"x") == "NOT_STORED"
    assert twin.storage("prepend", b"k", 0, 0, b"x") == "NOT_STORED"
    assert not twin.state(b"k").present


def test_too_large_set_deletes_the_old_value(twin: Twin) -> None:
    limit = max_value_len(twin.item_size_max, 3)
    assert limit == 1_048_514
    twin.storage("set", b"foo", 0, 0, b"small")
    assert twin.storage("set", b"foo", 0, 0, b"x" * (limit + 1)) == "TOO_LARGE"
    assert not twin.state(b"foo").present
    assert twin.storage("set", b"foo", 0, 0, b"x" * limit) == "STORED"
    assert twin.state(b"foo").data == b"x" * limit


def test_too_large_limit_depends_on_key_length(twin: Twin) -> None:
    key = b"k" * 250
    limit = max_value_len(twin.item_size_max, len(key))
    assert limit == 1_048_267
    assert twin.storage("set", key, 0, 0, b"y" * limit) == "STORED"
    assert twin.storage("set", key, 0, 0, b"y" * (limit + 1)) == "TOO_LARGE"
    assert not twin.state(key).present


@pytest.mark.parametrize("cmd", ["add", "replace", "append", "prepend", "cas"])
def test_too_large_other_commands_keep_the_old_value(twin: Twin, cmd: str) -> None:
    twin.storage("set", b"foo", 3, 0, b"small")
    big = b"x" * (max_value_len(twin.item_size_max, 3) + 1)
    mc_cas, _ = gets_cas(twin, b"foo")
    cas = mc_cas if cmd == "cas" else None
    assert twin.storage(cmd, b"foo", 0, 0, big, cas) == "TOO_LARGE"
    assert twin.state(b"foo") == KeyState(True, 3, b"small")


def test_append_whose_result_is_too_large_is_not_stored(twin: Twin) -> None:
    twin.storage("set", b"big", 0, 0, b"a" * 600_000)
    assert twin.storage("append", b"big", 0, 0, b"b" * 500_000) == "NOT_STORED"
    assert twin.storage("prepend", b"big", 0, 0, b"b" * 500_000) == "NOT_STORED"
    assert twin.state(b"big").data == b"a" * 600_000


@pytest.mark.parametrize("mode", ["S", "E", "A", "P", "R"])
def test_too_large_ms_deletes_in_every_mode(twin: Twin, mode: str) -> None:
    twin.storage("set", b"foo", 0, 0, b"small")
    big = b"x" * (max_value_len(twin.item_size_max, 3) + 1)
    assert twin.ms(b"foo", mode, 0, 0, big) == "TOO_LARGE"
    assert not twin.state(b"foo").present


def test_cas_outcomes(twin: Twin) -> None:
    assert twin.storage("cas", b"k", 0, 0, b"v", cas=1) == "NOT_FOUND"
    twin.storage("set", b"k", 0, 0, b"v1")
    mc_cas, _ = gets_cas(twin, b"k")
    assert twin.storage("cas", b"k", 0, 0, b"v2", cas=0) == "EXISTS"  # 0 never matches
    assert twin.storage("cas", b"k", 0, 0, b"v2", cas=mc_cas + 1000) == "EXISTS"
    assert twin.storage("cas", b"k", 5, 0, b"v2", cas=mc_cas) == "STORED"
    assert twin.storage("cas", b"k", 0, 0, b"v3", cas=mc_cas) == "EXISTS"  # stale now
    assert twin.state(b"k") == KeyState(True, 5, b"v2")


def test_ms_cas_modes(twin: Twin) -> None:
    assert twin.ms(b"k", "S", 0, 0, b"v", cas=5) == "NOT_FOUND"
    assert twin.ms(b"k", "A", 0, 0, b"v", cas=5) == "NOT_STORED"
    assert twin.ms(b"k", "E", 1, 0, b"v", cas=5) == "STORED"  # add ignores C
    mc_cas, _ = gets_cas(twin, b"k")
    assert twin.ms(b"k", "A", 0, 0, b"+", cas=mc_cas + 1000) == "EXISTS"
    assert twin.ms(b"k", "A", 0, 0, b"+", cas=0) == "STORED"  # C0: no check for append
    mc_cas, _ = gets_cas(twin, b"k")
    assert twin.ms(b"k", "P", 0, 0, b"-", cas=mc_cas) == "STORED"
    assert twin.ms(b"k", "R", 0, 0, b"r", cas=mc_cas) == "EXISTS"
    assert twin.state(b"k") == KeyState(True, 1, b"-v+")


def test_md_cas(twin: Twin) -> None:
    twin.storage("set", b"k", 0, 0, b"v")
    mc_cas, _ = gets_cas(twin, b"k")
    assert twin.md(b"k", cas=0) == "EXISTS"  # md C0 compares, unlike ma
    assert twin.md(b"k", cas=mc_cas + 1000) == "EXISTS"
    assert twin.md(b"k", cas=mc_cas) == "DELETED"
    assert twin.md(b"k", cas=mc_cas) == "NOT_FOUND"
    assert twin.delete(b"k") == "NOT_FOUND"


# expiry --------------------------------------------------------------------------------------


def test_negative_exptime_stores_then_misses(twin: Twin) -> None:
    twin.storage("set", b"e", 0, 0, b"old")
    assert twin.storage("set", b"e", 0, -1, b"x") == "STORED"
    assert twin.retrieve([b"e"]) == []
    assert twin.storage("add", b"e", 0, -1, b"x") == "STORED"
    assert not twin.state(b"e").present


def test_absolute_exptimes(twin: Twin) -> None:
    now = int(time.time())
    assert twin.storage("set", b"past", 0, 2_592_001, b"x") == "STORED"
    assert not twin.state(b"past").present
    assert twin.storage("set", b"past", 0, now - 100, b"x") == "STORED"
    assert not twin.state(b"past").present
    assert twin.storage("set", b"future", 0, now + 5000, b"x") == "STORED"
    assert twin.state(b"future").present
    assert 4_997_000 <= twin.run(twin.store.pttl(b"future")) <= 5_001_000


def test_exptime_truncated_to_int32_like_memcached(twin: Twin) -> None:
    assert twin.storage("set", b"t", 0, 2**32, b"x") == "STORED"  # 0: never expires
    assert twin.run(twin.store.pttl(b"t")) == -1
    assert twin.storage("set", b"t", 0, 2**32 + 600, b"x") == "STORED"  # 600 s
    twin.state(b"t")


def test_relative_ttl_is_set(twin: Twin) -> None:
    twin.storage("set", b"r", 0, 2_592_000, b"x")
    twin.state(b"r")
    assert abs(twin.run(twin.store.pttl(b"r")) - 2_592_000_000) <= 2000


def test_touch(twin: Twin) -> None:
    assert twin.touch(b"t", 100) == "NOT_FOUND"
    twin.storage("set", b"t", 0, 0, b"x")
    before = gets_cas(twin, b"t")
    assert twin.touch(b"t", 100) == "TOUCHED"
    assert gets_cas(twin, b"t") == before  # touch keeps the cas
    twin.state(b"t")
    assert twin.touch(b"t", 0) == "TOUCHED"
    assert twin.run(twin.store.pttl(b"t")) == -1
    assert twin.touch(b"t", int(time.time()) + 3000) == "TOUCHED"
    twin.state(b"t")
    assert twin.touch(b"t", -1) == "TOUCHED"
    assert not twin.state(b"t").present


def test_gat_sets_ttl_keeps_cas_and_negative_returns_then_deletes(twin: Twin) -> None:
    twin.storage("set", b"g", 9, 0, b"val")
    before = gets_cas(twin, b"g")
    assert twin.retrieve([b"g", b"nope", b"g"], cas=True, exptime=300) == [
        Hit(b"g", 9, b"val", True),
        Hit(b"g", 9, b"val", True),
    ]
    assert gets_cas(twin, b"g") == before
    twin.state(b"g")
    assert twin.retrieve([b"g"], exptime=-1) == [Hit(b"g", 9, b"val", False)]
    assert not twin.state(b"g").present


def test_get_many_keeps_request_order_and_duplicates(twin: Twin) -> None:
    for i, key in enumerate([b"a", b"b", b"c"]):
        twin.storage("set", key, i, 0, key * 3)
    hits = twin.retrieve([b"c", b"x", b"a", b"c", b"b"])
    assert [h.key for h in hits] == [b"c", b"a", b"c", b"b"]


def test_flush(twin: Twin) -> None:
    twin.storage("set", b"a", 0, 0, b"1")
    twin.flush()
    assert not twin.state(b"a").present
    assert twin.storage("add", b"a", 0, 0, b"2") == "STORED"


def test_small_limits(twin_small: Twin) -> None:
    twin = twin_small
    limit = max_value_len(twin.item_size_max, 1)
    assert twin.storage("set", b"s", 0, 0, b"z" * limit) == "STORED"
    assert twin.storage("append", b"s", 0, 0, b"z") == "NOT_STORED"
    assert twin.storage("set", b"s", 0, 0, b"z" * (limit + 1)) == "TOO_LARGE"
    numeric = max_numeric_len(twin.slab_chunk_max, 1)
    twin.storage("set", b"s", 0, 0, b"9" + b" " * (numeric - 1))
    assert twin.delta("incr", b"s", 1) == "10"
    assert twin.storage("append", b"s", 0, 0, b" ") == "STORED"
    assert twin.delta("incr", b"s", 1) == "NON_NUMERIC"


@pytest.mark.parametrize("flags", [1, 2**32 - 1])
def test_nonzero_flags_lower_the_limits_by_4_bytes(twin: Twin, flags: int) -> None:
    limit = max_value_len(twin.item_size_max, 3, flags)
    assert limit == max_value_len(twin.item_size_max, 3) - 4
    assert twin.storage("set", b"foo", flags, 0, b"x" * (limit + 1)) == "TOO_LARGE"
    assert twin.storage("set", b"foo", flags, 0, b"x" * limit) == "STORED"
    assert twin.storage("set", b"bar", 0, 0, b"x" * (limit + 4)) == "STORED"
    # append: the request's flags count for its own block, the item's for the result
    assert twin.storage("append", b"bar", flags, 0, b"y" * (limit + 1)) == "TOO_LARGE"
    twin.storage("set", b"bar", flags, 0, b"x")
    assert twin.storage("append", b"bar", 0, 0, b"y" * limit) == "NOT_STORED"
    assert twin.storage("append", b"bar", 0, 0, b"y" * (limit - 1)) == "STORED"
    numeric = max_numeric_len(twin.slab_chunk_max, 3, flags)
    twin.storage("set", b"num", flags, 0, b"1" + b" " * (numeric - 1))
    assert twin.delta("incr", b"num", 1) == "2"
    twin.storage("set", b"num", flags, 0, b"1" + b" " * numeric)
    assert twin.delta("incr", b"num", 1) == "NON_NUMERIC"


@pytest.mark.parametrize("cmd", ["append", "prepend"])
def test_memcached_bug_chunked_request_block_into_unchunked_result(
    twin_small: Twin, cmd: str
) -> None:
    """Documents a memcached 1.6.18 bug the shadow cannot follow: the block of an append is
    chunked only because of its non-zero flags, the result (item flags 0) is not, and
    memcached stores garbage. The Redis store keeps the correct concatenation."""
    twin = twin_small
    key = b"k" * 250
    new = b"n" * (max_numeric_len(twin.slab_chunk_max, len(key)) - 2)
    twin.storage("set", key, 0, 0, b"oo")
    reply = twin.mc.line(b"%s %s 7 0 %d" % (cmd.encode(), key, len(new)), new)
    assert reply == b"STORED"
    expected = b"oo" + new if cmd == "append" else new + b"oo"
    twin.mc.sock.sendall(b"get " + key + b"\r\n")
    header = twin.mc.file.readline()
    assert header == b"VALUE %s 0 %d\r\n" % (key, len(expected))
    block = twin.mc.file.read(len(expected) + 2)
    assert block != expected + b"\r\n"  # memcached sends garbage, even in place of "\r\n"
    assert twin.mc.file.readline() == b"END\r\n"
    twin.run(twin.store.store(Mode.SET, key, 0, 0, b"oo"))
    result = twin.run(twin.store.store(Mode(cmd), key, 7, 0, new))
    assert result.status is Status.STORED
    item = twin.run(twin.store.get(key))
    assert item is not None and item.flags == 0
    assert item.data == (b"oo" + new if cmd == "append" else new + b"oo")
