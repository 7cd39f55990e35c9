"""KeySampler: sampled fraction, stability, the subset property, base64 keys, the capture hook.

(decide()'s cost per call, quoted in proxy/shadow/sampler.py: `python bench/micro.py sampler`.)
"""

from __future__ import annotations

import base64
import random
import zlib

import pytest

from proxy.memcache.request import Request, parse_line
from proxy.shadow.control import ShadowControl
from proxy.shadow.sampler import SEED, KeySampler

RATES = (0.01, 0.05, 0.25, 0.5)


def random_keys(n: int = 10_000, seed: int = 1234) -> list[bytes]:
    rng = random.Random(seed)
    keys: set[bytes] = set()
    while len(keys) < n:
        length = rng.randint(1, 40)
        keys.add(bytes(rng.randrange(33, 127) for _ in range(length)))
    return sorted(keys)


def sampler_at(rate: float, enabled: bool = True) -> KeySampler:
    return KeySampler(ShadowControl(sample_rate=rate, enabled=enabled))


def request(line: bytes) -> Request:
    return parse_line(line)


@pytest.mark.parametrize("rate", RATES)
def test_fraction_of_random_keys_is_within_ten_percent(rate: float) -> None:
    keys = random_keys()
    sampler = sampler_at(rate)
    fraction = sum(sampler.sampled(k) for k in keys) / len(keys)
    assert abs(fraction - rate) <= 0.1 * rate, fraction


@pytest.mark.parametrize("rate", RATES)
def test_fraction_of_sequential_keys_is_within_ten_percent(rate: float) -> None:
    # Real key spaces are structured ("user:1", "user:2"...), not random. 100,000 keys: at 1%
    # a 10% tolerance on 10,000 keys is only one standard deviation (sqrt(100) = 10 keys), so
    # a perfect hash would miss it a third of the time; here it is over three.
    keys = [b"user:%d" % i for i in range(100_000)]
    sampler = sampler_at(rate)
    fraction = sum(sampler.sampled(k) for k in keys) / len(keys)
    assert abs(fraction - rate) <= 0.1 * rate, fraction


def test_raising_the_rate_only_adds_keys() -> None:
    keys = random_keys()
    previous: set[bytes] = set()
    for rate in (0.01, 0.05, 0.25, 1.0):
        sampler = sampler_at(rate)
        chosen = {k for k in keys if sampler.sampled(k)}
        assert previous <= chosen
        previous = chosen
    assert previous == set(keys)


def test_rate_one_samples_everything_and_disabled_nothing() -> None:
    keys = [*random_keys(2000), b"", b"\xff" * 250]
    everything = sampler_at(1.0)
    assert all(everything.sampled(k) for k in keys)
    assert all(everything.decide(request(b"get " + k)) for k in keys if k)
    for sampler in (sampler_at(0.0), sampler_at(1.0, enabled=False)):
        assert not any(sampler.sampled(k) for k in keys)
        assert not sampler.decide(request(b"flush_all"))
        assert not any(sampler.decide(request(b"set " + k + b" 0 0 1")) for k in keys if k)


def test_decision_is_a_fixed_function_of_the_key() -> None:
    # Same on every instance and across restarts: pinned against literal CRC values.
    assert SEED == 0x6D736864
    assert zlib.crc32(b"foo", SEED) == zlib.crc32(b"foo", SEED)
    control = ShadowControl(sample_rate=0.5)
    a, b = KeySampler(control), KeySampler(ShadowControl(sample_rate=0.5))
    keys = random_keys(1000)
    assert [a.sampled(k) for k in keys] == [b.sampled(k) for k in keys]
    threshold = int(0.5 * 2**32)
    assert [a.sampled(k) for k in keys] == [zlib.crc32(k, SEED) < threshold for k in keys]


def test_rate_changes_apply_to_the_next_call() -> None:
    control = ShadowControl(sample_rate=0.0)
    sampler = KeySampler(control)
    assert not sampler.decide(request(b"get foo"))
    control.set_rate(1.0, "test")
    assert sampler.decide(request(b"get foo"))
    control.set_enabled(False, "test")
    assert not sampler.decide(request(b"get foo"))


def key_sampled_and_not(rate: float = 0.25) -> tuple[bytes, bytes]:
    sampler = sampler_at(rate)
    keys = random_keys(200)
    return (
        next(k for k in keys if sampler.sampled(k)),
        next(k for k in keys if not sampler.sampled(k)),
    )


def test_single_key_commands_go_by_their_key() -> None:
    sampler = sampler_at(0.25)
    yes, no = key_sampled_and_not()
    for template in (
        b"set %s 0 0 1",
        b"add %s 0 0 1 noreply",
        b"replace %s 0 0 1",
        b"append %s 0 0 1",
        b"prepend %s 0 0 1",
        b"cas %s 0 0 1 5",
        b"delete %s",
        b"incr %s 1",
        b"decr %s 1",
        b"touch %s 10",
        b"mg %s v",
        b"ms %s 1 T0",
        b"md %s q",
        b"ma %s D2",
    ):
        assert sampler.decide(request(template % yes)), template
        assert not sampler.decide(request(template % no)), template


def test_multi_key_gets_are_taken_when_any_key_is_sampled() -> None:
    sampler = sampler_at(0.25)
    yes, no = key_sampled_and_not()
    for prefix in (b"get", b"gets", b"bget", b"gat 10", b"gats 0"):
        assert sampler.decide(request(b"%s %s %s %s" % (prefix, no, no, yes)))
        assert sampler.decide(request(b"%s %s" % (prefix, yes)))
        assert not sampler.decide(request(b"%s %s %s" % (prefix, no, no)))
    # gat's first word is the exptime, never a key.
    assert not sampler.decide(request(b"gat %s %s" % (yes, no)))


def test_flush_all_is_taken_whenever_the_shadow_is_active() -> None:
    assert sampler_at(0.0001).decide(request(b"flush_all"))
    assert sampler_at(0.0001).decide(request(b"flush_all 10 noreply"))
    assert not sampler_at(0.0).decide(request(b"flush_all"))


def test_commands_never_replayed_are_not_taken() -> None:
    sampler = sampler_at(1.0)
    for line in (
        b"version",
        b"stats",
        b"stats items",
        b"verbosity 1",
        b"me foo",
        b"mn",
        b"quit",
        b"watch",
        b"lru_crawler metadump all",
        b"GET foo",
        b"",
        b"get",
        b"delete",
        b"mg",
    ):
        assert not sampler.decide(request(line)), line


def test_base64_meta_keys_hash_the_decoded_key() -> None:
    sampler = sampler_at(0.25)
    keys = [k for k in random_keys(400) if b" " not in k]
    for key in keys:
        encoded = base64.b64encode(key)
        plain = sampler.sampled(key)
        assert sampler.sampled_meta([b"mg", encoded, b"b", b"v"]) == plain
        assert sampler.sampled_meta([b"ms", encoded, b"1", b"T0", b"b"]) == plain
        assert sampler.decide(request(b"md " + encoded + b" q b")) == plain
        assert sampler.decide(request(b"ma " + key + b" D2")) == plain
    assert any(sampler.sampled(k) for k in keys) and not all(sampler.sampled(k) for k in keys)


def test_base64_decoding_follows_memcached() -> None:
    sampler = sampler_at(1.0)
    # memcached skips characters outside the alphabet (observed: `mg Zm!9v b` hits foo).
    assert sampler_at(0.25).sampled_meta([b"mg", b"Zm!9v", b"b"]) == sampler_at(0.25).sampled(
        b"foo"
    )
    # Undecodable keys (memcached: CLIENT_ERROR error decoding key) are never sampled.
    for token in (b"Zm9", b"Zm9v=", b"a2V5NA", b"====", b"!!!!"):
        assert not sampler.sampled_meta([b"mg", token, b"b", b"v"]), token
    # Any token starting with b turns base64 on, as in memcached's pre-parser.
    assert not sampler.sampled_meta([b"mg", b"Zm9", b"bxyz"])
    # Without b, the token is the key itself, even if it looks like base64.
    assert sampler.sampled_meta([b"mg", b"Zm9"])
    # In ms the word after the key is the length, never a flag.
    assert sampler.sampled_meta([b"ms", b"Zm9", b"b"])
