"""The Redis URL the client connects with: parsed with its query options, printed back."""

import pytest

from proxy.redis.url import RedisURL, parse_url


def test_parse_url_defaults() -> None:
    assert parse_url("redis://localhost") == RedisURL("localhost", 6379, 0)


def test_parse_url_everything() -> None:
    url = parse_url("rediss://al%40ice:p%3Ass@cache.example:6380/5?timeout=0.25")
    assert url == RedisURL(
        "cache.example", 6380, 5, username="al@ice", password="p:ss", tls=True, timeout=0.25
    )
    assert "p:ss" not in str(url) and "***" in str(url)
    assert parse_url(url.to_url()) == url  # one URL type: what the config writes, the client reads


def test_parse_url_password_only_and_options() -> None:
    url = parse_url("redis://:secret@127.0.0.1?db=2")
    assert (url.username, url.password, url.db) == (None, "secret", 2)
    assert not parse_url("rediss://h?ssl_cert_reqs=none").tls_verify


@pytest.mark.parametrize(
    "bad",
    [
        "http://h",
        "redis://h/x",
        "redis://h:notaport",
        "redis://h?timeout=-1",
        "redis://h/-1",
        "redis://h?tiemout=1",  # an unknown option is named, not ignored
    ],
)
def test_parse_url_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_url(bad)
