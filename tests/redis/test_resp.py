"""RESP encoding: the pure-Python encoder gives hiredis's bytes."""

import hiredis

from proxy.redis.resp import encode_command, resp_encode


def test_resp_encoder_matches_hiredis() -> None:
    args = (b"SET", "k\u00e9y", 12, b"\x00\r\nbin", 1.5, b"")
    assert resp_encode(args) == bytes(hiredis.pack_command(args))
    assert encode_command(args) == resp_encode(args)
