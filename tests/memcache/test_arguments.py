"""Meta request flags and classic storage fields: derived settings and the skip reasons.

The last tests send the same lines to a real memcached 1.6.18 and check that exactly the lines
classified UNSHADOWABLE_INPUT are the ones it refuses.
"""

from __future__ import annotations

import base64
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.memcache.arguments import (
    META_UNEMULATED,
    NON_CANONICAL,
    UNSHADOWABLE_INPUT,
    MetaRequest,
    StorageArgs,
    canonical_storage,
    decode_base64_key,
    is_canonical_base64,
    parse_meta_request,
)
from proxy.memcache.request import parse_line
from tests.support import ServerProcess


def meta(line: bytes) -> MetaRequest:
    return parse_meta_request(parse_line(line).words)


# -- mg ---------------------------------------------------------------------------------------


def test_mg_flags_in_order_and_presence() -> None:
    request = meta(b"mg foo v f s c t k Oabc q h l u")
    assert request.reason is None
    assert request.command == "mg" and request.key == b"foo" and request.raw_key == b"foo"
    assert request.flags == (
        ("v", b""),
        ("f", b""),
        ("s", b""),
        ("c", b""),
        ("t", b""),
        ("k", b""),
        ("O", b"abc"),
        ("q", b""),
        ("h", b""),
        ("l", b""),
        ("u", b""),
    )
    assert request.present == frozenset("vfsctkOqhlu")
    assert request.quiet and not request.base64
    assert request.opaque == b"abc"
    assert request.has("v") and not request.has("T")
    assert request.mode is None and request.ttl is None


def test_mg_touch_and_flag_order() -> None:
    request = meta(b"mg foo t T30 v")
    assert request.reason is None and request.ttl == 30
    assert request.position("t") < request.position("T")
    assert request.position("N") == -1
    assert meta(b"mg foo T-1 v").ttl == -1  # negative: value returned, then gone


@pytest.mark.parametrize(
    "line",
    [
        b"mg foo N30 v",  # creates a stub on a miss
        b"mg foo R30 v",  # recache win tokens
        b"mg foo C5 v",  # skip-value-if-cas (1.6.40); 1.6.18 silently ignores it
        b"mg foo I v",
        b"mg foo F5 v",
        b"mg foo D5 v",
        b"mg foo MS v",
        b"mg foo T-5 t v",  # 1.6.18 reports a wrapped TTL
    ],
)
def test_mg_unemulated(line: bytes) -> None:
    assert meta(line).reason == META_UNEMULATED


def test_mg_reports_recache_and_autoviv_values() -> None:
    request = meta(b"mg foo N30 R5")
    assert (request.autoviv, request.recache) == (30, 5)


# -- ms ---------------------------------------------------------------------------------------


def test_ms_defaults() -> None:
    request = meta(b"ms foo 3")
    assert request.reason is None
    assert request.datalen == 3 and request.mode == "S"
    assert request.client_flags is None and request.ttl is None and request.cas is None
    assert not request.invalidate and not request.quiet


def test_ms_settings() -> None:
    request = meta(b"ms foo 10 F4294967295 T-1 C18446744073709551615 MA c k O1 q")
    assert request.reason is None
    assert (request.datalen, request.mode, request.client_flags, request.ttl, request.cas) == (
        10,
        "A",
        2**32 - 1,
        -1,
        2**64 - 1,
    )
    assert request.quiet and request.opaque == b"1"


@pytest.mark.parametrize("mode", "SEAPR")
def test_ms_modes(mode: str) -> None:
    request = meta(b"ms foo 1 M" + mode.encode())
    assert request.reason is None and request.mode == mode


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"ms foo 1 I", META_UNEMULATED),
        (b"ms foo 1 I C5", META_UNEMULATED),
        (b"ms foo 1 N30 MA", META_UNEMULATED),  # autoviv on append: 1.6.20
        (b"ms foo 1 s", META_UNEMULATED),  # size: later versions
        (b"ms foo 1 v", META_UNEMULATED),
        (b"ms foo 1 E5", UNSHADOWABLE_INPUT),  # explicit cas: 1.6.27; 1.6.18 refuses it
        (b"ms foo 1 Ms", UNSHADOWABLE_INPUT),  # modes are upper case
        (b"ms foo 1 MX", UNSHADOWABLE_INPUT),
        (b"ms foo 1 MSS", UNSHADOWABLE_INPUT),
        (b"ms foo 1 M", UNSHADOWABLE_INPUT),
        (b"ms foo 1 F-1", UNSHADOWABLE_INPUT),
        (b"ms foo 1 F", UNSHADOWABLE_INPUT),
        (b"ms foo 1 Tabc", UNSHADOWABLE_INPUT),
        (b"ms foo 1 T", UNSHADOWABLE_INPUT),
        (b"ms foo 1 C", UNSHADOWABLE_INPUT),
        (b"ms foo 1 C18446744073709551616", UNSHADOWABLE_INPUT),
        (b"ms foo 1 T 2", UNSHADOWABLE_INPUT),  # "2" is not a flag
        (b"ms foo 1 O" + b"x" * 32, UNSHADOWABLE_INPUT),  # opaque token over 32 bytes
        (b"ms foo 1 c c", UNSHADOWABLE_INPUT),
        (b"ms foo -1", UNSHADOWABLE_INPUT),
        (b"ms foo abc", UNSHADOWABLE_INPUT),
        (b"ms foo", UNSHADOWABLE_INPUT),
        (b"ms " + b"k" * 251 + b" 1", UNSHADOWABLE_INPUT),
        (b"ms foo 1 " + b" ".join(b"O%d" % i for i in range(17)), UNSHADOWABLE_INPUT),
        (b"ms foo 1 F4294967296", NON_CANONICAL),  # truncated to 0 by 1.6.18
        (b"ms foo 1 F+1", NON_CANONICAL),
        (b"ms foo 1 F01", NON_CANONICAL),
        (b"ms foo 1 T-0", NON_CANONICAL),
        (b"ms foo 1 T+5", NON_CANONICAL),
        (b"ms foo 1 T2147483648", NON_CANONICAL),  # wraps to int32
        (b"ms foo 1 C007", NON_CANONICAL),
        (b"ms foo 02", NON_CANONICAL),
        (b"ms foo +2", NON_CANONICAL),
        (b"ms foo 1 cx", NON_CANONICAL),  # memcached reads only the first character
    ],
)
def test_ms_reasons(line: bytes, reason: str) -> None:
    assert meta(line).reason == reason


def test_meta_word_limit_is_nineteen_words() -> None:
    # memcached 1.6.18: "options flags (are) too long" from the 20th word on (observed).
    ms19 = b"ms foo 1 c k O P L q T1 F1 C1 MS D1 J1 v f s h"
    mg19 = b"mg foo v t c f s k h l u O P L q T1 D1 J1 C1"
    for line in (ms19, mg19):
        assert len(line.split()) == 19
        assert meta(line).reason == META_UNEMULATED  # D, J...: ignored by 1.6.18
        assert meta(line + b" I").reason == UNSHADOWABLE_INPUT


# -- md ---------------------------------------------------------------------------------------


def test_md_settings() -> None:
    request = meta(b"md foo C12 q k O9")
    assert request.reason is None
    assert (request.cas, request.quiet, request.opaque, request.invalidate) == (
        12,
        True,
        b"9",
        False,
    )
    assert meta(b"md foo T30").ttl == 30  # T only acts with I: a no-op here


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"md foo I", META_UNEMULATED),
        (b"md foo I T30", META_UNEMULATED),
        (b"md foo E1", UNSHADOWABLE_INPUT),
        (b"md foo x", UNSHADOWABLE_INPUT),  # 1.6.27; 1.6.18: invalid flag
        (b"md foo v", META_UNEMULATED),  # accepted and ignored by 1.6.18
        (b"md foo C", UNSHADOWABLE_INPUT),
        (b"md foo C-1", UNSHADOWABLE_INPUT),
        (b"md foo C01", NON_CANONICAL),
        (b"md", UNSHADOWABLE_INPUT),
    ],
)
def test_md_reasons(line: bytes, reason: str) -> None:
    assert meta(line).reason == reason


# -- ma ---------------------------------------------------------------------------------------


def test_ma_defaults() -> None:
    request = meta(b"ma foo")
    assert request.reason is None
    assert request.mode == "I"
    assert (request.delta, request.initial, request.autoviv, request.ttl, request.cas) == (
        None,
        None,
        None,
        None,
        None,
    )


def test_ma_settings() -> None:
    request = meta(b"ma foo MD D18446744073709551615 N0 J13 T-1 C5 v t c q k O1")
    assert request.reason is None
    assert (request.mode, request.delta, request.autoviv, request.initial) == (
        "D",
        2**64 - 1,
        0,
        13,
    )
    assert (request.ttl, request.cas, request.quiet) == (-1, 5, True)


@pytest.mark.parametrize(
    ("token", "mode"), [(b"MI", "I"), (b"M+", "I"), (b"MD", "D"), (b"M-", "D")]
)
def test_ma_modes_are_folded(token: bytes, mode: str) -> None:
    request = meta(b"ma foo " + token)
    assert request.reason is None and request.mode == mode


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"ma foo Mi", UNSHADOWABLE_INPUT),
        (b"ma foo Md", UNSHADOWABLE_INPUT),
        (b"ma foo Mx", UNSHADOWABLE_INPUT),
        (b"ma foo D-1", UNSHADOWABLE_INPUT),
        (b"ma foo Dabc", UNSHADOWABLE_INPUT),
        (b"ma foo D", UNSHADOWABLE_INPUT),
        (b"ma foo J", UNSHADOWABLE_INPUT),
        (b"ma foo J-5", UNSHADOWABLE_INPUT),
        (b"ma foo D18446744073709551616", UNSHADOWABLE_INPUT),
        (b"ma foo E5", UNSHADOWABLE_INPUT),
        (b"ma foo I", META_UNEMULATED),
        (b"ma foo R5", META_UNEMULATED),
        (b"ma foo F5", META_UNEMULATED),
        (b"ma foo h", META_UNEMULATED),
        (b"ma foo D+5", NON_CANONICAL),
        (b"ma foo D05", NON_CANONICAL),
        (b"ma foo N+5", NON_CANONICAL),
    ],
)
def test_ma_reasons(line: bytes, reason: str) -> None:
    assert meta(line).reason == reason


# -- shared rules -----------------------------------------------------------------------------


def test_base64_key_is_decoded() -> None:
    request = meta(b"mg Zm9v b v k")
    assert request.reason is None and request.base64
    assert request.key == b"foo" and request.raw_key == b"Zm9v"
    binary = meta(b"ms " + base64.b64encode(b"\x00\xff key\r\n") + b" 2 b")
    assert binary.reason is None and binary.key == b"\x00\xff key\r\n"


@pytest.mark.parametrize(
    ("line", "reason", "key"),
    [
        (b"mg Zm9 b", UNSHADOWABLE_INPUT, b""),  # error decoding key
        (b"mg Zm9v= b", UNSHADOWABLE_INPUT, b""),
        (b"mg a2V5NA b", UNSHADOWABLE_INPUT, b""),  # missing padding
        (b"mg ==== b", UNSHADOWABLE_INPUT, b""),
        (b"mg Zm!9v b", NON_CANONICAL, b"foo"),  # memcached skips the junk character
        (b"mg Zm9v bx", NON_CANONICAL, b"foo"),
    ],
)
def test_base64_problems(line: bytes, reason: str, key: bytes) -> None:
    request = meta(line)
    assert (request.reason, request.key) == (reason, key)


def test_decode_base64_key_matches_memcacheds_decoder() -> None:
    assert decode_base64_key(b"Zm9v") == b"foo"
    assert decode_base64_key(b"Zg==") == b"f"
    assert decode_base64_key(b"Zm8=") == b"fo"
    assert decode_base64_key(b"Z!m9v") == b"foo"
    assert decode_base64_key(b"Zg==Zm9v") == b"f"  # memcached stops at the padded group
    for bad in (b"", b"Zm9", b"Zm9v=", b"Zm9v==", b"Zm9v====", b"====", b"Z===", b"!!!!"):
        assert decode_base64_key(bad) is None, bad
    assert is_canonical_base64(b"Zm9v") and is_canonical_base64(b"Zg==")
    for odd in (b"Zh==", b"Zg", b"Z!m9v", b"Zg==Zm9v", b""):
        assert not is_canonical_base64(odd), odd


@given(st.binary(min_size=1, max_size=40))
def test_base64_round_trip(key: bytes) -> None:
    encoded = base64.b64encode(key)
    assert decode_base64_key(encoded) == key
    assert is_canonical_base64(encoded)


@given(st.lists(st.sampled_from(list(b"AZaz09+/=!\xff")), max_size=16).map(bytes))
def test_fast_and_lenient_decoders_agree(token: bytes) -> None:
    from proxy.memcache.arguments import _decode_leniently

    strict = decode_base64_key(token)
    assert strict == _decode_leniently(token)


def test_invalid_beats_unemulated_beats_non_canonical() -> None:
    assert meta(b"mg foo N30 v v").reason == UNSHADOWABLE_INPUT
    assert meta(b"mg foo N30 T+5").reason == META_UNEMULATED
    assert meta(b"mg foo T+5").reason == NON_CANONICAL


@pytest.mark.parametrize(
    "line",
    [
        b"mg foo v v",  # duplicate flag
        b"mg foo O1 O2",
        b"mg foo 1",  # invalid flag
        b"mg foo x",
        b"mg foo E5 v",  # explicit cas (1.6.27); 1.6.18: invalid flag
        b"mg foo \xc3\xa9",  # first byte >= 127: "duplicate flag"
        b"mg foo Tabc",
        b"mg foo T",
        b"mg foo N",
        b"mg " + b"k" * 251,
        b"mg",
        b"mg foo v t c f s k h l u O P L q T1 D1 J1 C1 F1",  # 20 words
    ],
)
def test_mg_unshadowable(line: bytes) -> None:
    assert meta(line).reason == UNSHADOWABLE_INPUT


def test_not_a_meta_command() -> None:
    with pytest.raises(ValueError):
        parse_meta_request([b"get", b"foo"])
    with pytest.raises(ValueError):
        parse_meta_request([])


# -- classic storage --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"set foo 5 0 3", StorageArgs(5, 0, 3, None, False)),
        (b"add foo 4294967295 -1 0 noreply", StorageArgs(2**32 - 1, -1, 0, None, True)),
        (b"replace foo 0 2592000 10", StorageArgs(0, 2592000, 10, None, False)),
        (b"append foo 0 2147483647 1", StorageArgs(0, 2**31 - 1, 1, None, False)),
        (b"prepend foo 0 -2147483648 1", StorageArgs(0, -(2**31), 1, None, False)),
        (b"cas foo 1 2 3 18446744073709551615", StorageArgs(1, 2, 3, 2**64 - 1, False)),
        (b"cas foo 1 2 3 0 noreply", StorageArgs(1, 2, 3, 0, True)),
        (b"set foo 0 0 2147483645", StorageArgs(0, 0, 2**31 - 3, None, False)),
    ],
)
def test_canonical_storage(line: bytes, expected: StorageArgs) -> None:
    args = canonical_storage(parse_line(line).words)
    assert args == expected
    assert isinstance(args, StorageArgs)
    flags, exptime, length, cas, noreply = args
    assert (flags, exptime, length, cas, noreply) == tuple(expected)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"set foo 4294967296 0 3", NON_CANONICAL),  # truncated to 0 by memcached
        (b"set foo +5 0 3", NON_CANONICAL),
        (b"set foo 05 0 3", NON_CANONICAL),
        (b"set foo 0 -0 3", NON_CANONICAL),
        (b"set foo 0 007 3", NON_CANONICAL),
        (b"set foo 0 4294967296 3", NON_CANONICAL),  # truncated to 0 = never expires
        (b"set foo 0 99999999999 3", NON_CANONICAL),
        (b"set foo 0 0 +3", NON_CANONICAL),
        (b"set foo 0 0 03", NON_CANONICAL),
        (b"set foo 0 0 3 garbage", NON_CANONICAL),  # ignored by memcached
        (b"set foo 0 0 3 NOREPLY", NON_CANONICAL),
        (b"cas foo 0 0 3 +1", NON_CANONICAL),
        (b"set foo -1 0 3", UNSHADOWABLE_INPUT),
        (b"set foo abc 0 3", UNSHADOWABLE_INPUT),
        (b"set foo 0 abc 3", UNSHADOWABLE_INPUT),
        (b"set foo 0 0 -1", UNSHADOWABLE_INPUT),
        (b"set foo 0 0 2147483646", UNSHADOWABLE_INPUT),
        (b"set foo 0 0 abc", UNSHADOWABLE_INPUT),
        (b"set foo 0 0 4294967299", NON_CANONICAL),  # truncated to 3: a 3-byte block
        (b"cas foo 0 0 3 18446744073709551616", UNSHADOWABLE_INPUT),
        (b"cas foo 0 0 3 -1", UNSHADOWABLE_INPUT),
        (b"set foo 0 0", UNSHADOWABLE_INPUT),
        (b"set foo 0 0 3 noreply extra", UNSHADOWABLE_INPUT),
        (b"cas foo 0 0 3", UNSHADOWABLE_INPUT),
        (b"set " + b"k" * 251 + b" 0 0 3", UNSHADOWABLE_INPUT),
    ],
)
def test_storage_reasons(line: bytes, reason: str) -> None:
    assert canonical_storage(parse_line(line).words) == reason


def test_storage_rejects_other_commands() -> None:
    with pytest.raises(ValueError):
        canonical_storage([b"get", b"foo"])


# -- against memcached 1.6.18 -----------------------------------------------------------------

# Each line runs on a fresh key; ms lines are followed by a 1-byte block when memcached reads
# one. Lines memcached refuses must be exactly those classified UNSHADOWABLE_INPUT.
DIFFERENTIAL_LINES = [
    b"mg {k} v f s c t k Oabc q h l u",
    b"mg {k} t T30 v",
    b"mg {k} N30 v",
    b"mg {k} R30 v",
    b"mg {k} E5 v",
    b"mg {k} C5 v",
    b"mg {k} I v",
    b"mg {k} P L v",
    b"mg {k} x v",
    b"mg {k} v v",
    b"mg {k} O1 O2",
    b"mg {k} 1",
    b"mg {k} Tabc",
    b"mg {k} T",
    b"mg {k} T+5",
    b"mg {k} vxyz",
    b"mg {k} " + b" ".join(b"v t c f s k h l u O P L q T1 D1 J1 C1".split()),
    b"mg {k} " + b" ".join(b"v t c f s k h l u O P L q T1 D1 J1 C1 F1".split()),
    b"ms {k} 1 I",
    b"ms {k} 1 E5",
    b"ms {k} 1 Ms",
    b"ms {k} 1 MX",
    b"ms {k} 1 MSS",
    b"ms {k} 1 F-1",
    b"ms {k} 1 F4294967296",
    b"ms {k} 1 Tabc",
    b"ms {k} 1 T-1 c",
    b"ms {k} 1 C",
    b"ms {k} 1 O" + b"x" * 31,
    b"ms {k} 1 O" + b"x" * 32,
    b"ms {k} 1 c c",
    b"ms {k} 1 T 2",
    b"ms {k} 01",
    b"ms {k} 1 MA N30",
    b"ms {k} 1 c k O P L q T1 F1 C1 MS I D1 J1 v f s h",
    b"ms {k} 1 c k O P L q T1 F1 C1 MS I D1 J1 v f s h l",
    b"md {k} x",
    b"md {k} C",
    b"md {k} C01 q",
    b"md {k} I T30",
    b"md {k} v",
    b"ma {k} D-1",
    b"ma {k} Dabc",
    b"ma {k} J-5",
    b"ma {k} Mi",
    b"ma {k} M+ N0 J5 v",
    b"ma {k} MD N0 v",
    b"ma {k} R5",
    b"ma {k} D+5 N0",
    b"mg {b64} b v k",
    b"mg Zm9 b v",
    b"mg Zm9v= b v",
    b"mg Zm!9v b v",
    b"mg Zm9v bxyz v",
]


def exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data + b"mn\r\n")
    out = b""
    while not out.endswith(b"MN\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "memcached closed the connection"
        out += chunk
    return out[: -len(b"MN\r\n")]


def test_unshadowable_input_is_what_memcached_refuses(memcached: ServerProcess) -> None:
    with socket.create_connection((memcached.host, memcached.port), timeout=5) as sock:
        for index, template in enumerate(DIFFERENTIAL_LINES):
            key = b"key%d" % index
            line = template.replace(b"{k}", key).replace(b"{b64}", base64.b64encode(key))
            request = parse_line(line)
            parsed = parse_meta_request(request.words)
            data = line + b"\r\n"
            if request.data_len >= 0:
                data += b"x" * request.data_len + b"\r\n"
            reply = exchange(sock, data)
            refused = reply.startswith((b"CLIENT_ERROR", b"ERROR")) and b"non-numeric" not in reply
            assert refused == (parsed.reason == UNSHADOWABLE_INPUT), (line, reply, parsed.reason)


def test_one_meta_key_decoder_for_the_sampler_the_shadow_state_and_the_parser() -> None:
    from proxy.memcache.arguments import meta_key, parse_meta_request
    from proxy.memcache.request import RequestFramer

    # memcached reads a flag token's first character only: "b1" is the b flag.
    for line, key in [
        (b"mg Zm9v b v", b"foo"),
        (b"mg Zm9v b1 v", b"foo"),
        (b"md Zm9v q b", b"foo"),
        (b"ms Zm9v 2 b1 T0", b"foo"),
        (b"mg Zm9v v", b"Zm9v"),
        (b"ms Zm9v 2 T0", b"Zm9v"),  # the datalen is not a flag
        (b"mg !!!! b", None),
    ]:
        words = line.split()
        assert meta_key(words) == key, line
        stream = line + b"\r\n" + (b"ab\r\n" if words[0] == b"ms" else b"")
        requests, _ = RequestFramer(capture=lambda r: True).feed(stream)
        assert requests[0].keys == ([key] if key else []), line
        if key is not None:
            assert parse_meta_request(words).key == key, line
