"""Typed arguments of the requests the shadow replays (meta flags, classic storage fields), sans-IO.

Each parser applies memcached 1.6.18's acceptance rules and the shadow's canonical-input rule
(REFERENCE 1.2): what memcached rejects, what the shadow does not emulate and what is accepted
but oddly spelled come back as a `reason` string, so the caller counts it instead of guessing.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Final, NamedTuple

from proxy.memcache.commands import KEY_MAX_LENGTH, META_COMMANDS
from proxy.memcache.numbers import (
    INT32_MAX,
    canonical_int32,
    is_canonical_decimal,
    safe_strtol,
    safe_strtoul,
    safe_strtoull,
)
from proxy.shadow.words import SkipReason

# Reasons a request is not replayed (memshadow_shadow_skipped_total{reason}), from most to
# least serious: when a request has several problems the first of these is reported.
UNSHADOWABLE_INPUT: Final = SkipReason.UNSHADOWABLE_INPUT
META_UNEMULATED: Final = SkipReason.META_UNEMULATED
NON_CANONICAL: Final = SkipReason.NON_CANONICAL
_SEVERITY: Final = (UNSHADOWABLE_INPUT, META_UNEMULATED, NON_CANONICAL)

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1

# memcached 1.6.18 refuses a meta command of more than 20 tokens, its empty end token
# included (MFLAG_MAX_OPT_LENGTH): 19 words. Observed for mg, ms, md and ma.
META_MAX_WORDS: Final = 19
# An opaque token (the 'O' included) longer than this is refused (observed: 32 ok, 33 not).
OPAQUE_MAX_TOKEN: Final = 32

# How memcached 1.6.18's flag pre-parser reads each flag's value. Any other flag character
# is "CLIENT_ERROR invalid flag". (E and x arrived later: 1.6.18 refuses them.)
_BARE = "bare"  # no value; memcached ignores anything after the character
_INT32 = "int32"  # exptime-like: safe_strtol
_U32 = "u32"  # client flags: safe_strtoul, truncated to 32 bits
_U64 = "u64"  # cas, delta, initial value: safe_strtoull
_MODE = "mode"  # exactly one character after the M
_TEXT = "text"  # free text (opaque; P and L, reserved for proxies)
_FLAG_KINDS: Final[dict[str, str]] = {
    **dict.fromkeys("bcfhklqstuvI", _BARE),
    **dict.fromkeys("NTR", _INT32),
    "F": _U32,
    **dict.fromkeys("CDJ", _U64),
    "M": _MODE,
    **dict.fromkeys("OPL", _TEXT),
}

# The flags 1.6.18 documents for each command (protocol.txt, and REFERENCE 2.1-2.4 for ma's
# k and O). Others pass the pre-parser and are silently ignored by 1.6.18, but later versions
# give several of them a meaning (mg C, ms N and s...), so they are not replayed.
_DOCUMENTED: Final[dict[str, frozenset[str]]] = {
    "mg": frozenset("bcfhklOqstuvNRTPL"),
    "ms": frozenset("bcCFIkOqTMPL"),
    "md": frozenset("bCIkOqTPL"),
    "ma": frozenset("bCNJDTMqtcvOkPL"),
}
# Documented flags whose effects a plain Redis mapping does not reproduce (REFERENCE 4.3):
# stubs and recache wins (mg N, R), stale items (ms I, md I). (E, an explicit cas from
# 1.6.27 on, is refused by 1.6.18: UNSHADOWABLE_INPUT like any unknown flag.)
_UNEMULATED: Final[dict[str, frozenset[str]]] = {
    "mg": frozenset("NR"),
    "ms": frozenset("I"),
    "md": frozenset("I"),
    "ma": frozenset(),
}
_MS_MODES: Final = frozenset("SEAPR")
_MA_MODES: Final = {"I": "I", "+": "I", "D": "D", "-": "D"}

# memcached's base64 decoder (base64.c, after Jouni Malinen): characters outside the alphabet
# are skipped, the rest must come in groups of 4, and '=' pads only the last group.
_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUES: Final[dict[int, int]] = {c: i for i, c in enumerate(_B64_ALPHABET)} | {61: 0}


def meta_key(words: list[bytes]) -> bytes | None:
    """The key a meta request names, as memcached stores it: decoded when one of its flag
    tokens starts with `b` (memcached reads a flag token's first character only, so `b1` is
    the b flag too); None when there is no key or it does not decode. The one decoder the
    sampler, the shadow's per-key state and parse_meta_request agree on."""
    if len(words) < 2:
        return None
    first_flag = 3 if words[0] == b"ms" else 2
    for token in words[first_flag:]:
        if token[:1] == b"b":
            return decode_base64_key(words[1])
    return words[1]


def decode_base64_key(token: bytes) -> bytes | None:
    """The key memcached 1.6.18 decodes from a `b`-flagged key token, or None when it cannot.

    Lenient like memcached's: junk characters are skipped (`Zm!9v` is `foo`). Use
    `is_canonical_base64` to tell whether the token is plain, padded base64.
    """
    # Fast path (0.4 us against 5 us) for canonical base64, which memcached decodes the same
    # way. Not for anything strict mode merely accepts: it takes "Zm9v=", memcached does not.
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return _decode_leniently(token)
    if decoded and binascii.b2a_base64(decoded, newline=False) == token:
        return decoded
    return _decode_leniently(token)


def _decode_leniently(token: bytes) -> bytes | None:
    values = _B64_VALUES
    digits = [c for c in token if c in values]
    if not digits or len(digits) % 4:
        return None
    out = bytearray()
    for i in range(0, len(digits), 4):
        group = digits[i : i + 4]
        pad = group.count(61)  # '='
        a, b, c, d = (values[x] for x in group)
        out += bytes(((a << 2 | b >> 4) & 0xFF, (b << 4 | c >> 2) & 0xFF, (c << 6 | d) & 0xFF))
        if pad:
            # memcached stops at the first group holding '=': 1 or 2 drop that many bytes.
            if pad > 2:
                return None
            del out[-pad:]
            break
    return bytes(out) if out else None


def is_canonical_base64(token: bytes) -> bool:
    """True for strict, padded, canonically encoded base64 (what a client library sends)."""
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return False
    return bool(decoded) and binascii.b2a_base64(decoded, newline=False) == token


@dataclass(frozen=True, slots=True)
class MetaRequest:
    """One mg/ms/md/ma request line, read as memcached 1.6.18 reads it.

    `reason` is None when the request may be replayed; otherwise it is one of
    UNSHADOWABLE_INPUT, META_UNEMULATED, NON_CANONICAL and the derived settings are only a
    best effort. Numeric settings are None when their flag is absent (defaults noted).
    """

    command: str  # "mg", "ms", "md" or "ma"
    key: bytes  # decoded when `base64`; b"" when missing or undecodable
    raw_key: bytes  # the key token as sent
    flags: tuple[tuple[str, bytes], ...]  # (flag character, rest of the token), request order
    quiet: bool  # q
    base64: bool  # b
    reason: SkipReason | None
    datalen: int | None = None  # ms: the data block length
    mode: str | None = None  # ms: S E A P R (default S); ma: I or D (+ and - folded; default I)
    client_flags: int | None = None  # ms F (memcached's default: 0)
    ttl: int | None = None  # T
    cas: int | None = None  # C
    invalidate: bool = False  # I
    autoviv: int | None = None  # N: exptime of the item created on a miss
    recache: int | None = None  # mg R
    delta: int | None = None  # ma D (memcached's default: 1)
    initial: int | None = None  # ma J (memcached's default: 0)
    opaque: bytes | None = None  # O, without the 'O'

    @property
    def present(self) -> frozenset[str]:
        """The flag characters the request carries."""
        return frozenset(flag for flag, _ in self.flags)

    def has(self, flag: str) -> bool:
        return any(f == flag for f, _ in self.flags)

    def position(self, flag: str) -> int:
        """Index of `flag` among the flags, -1 if absent (mg t before T reports the old TTL)."""
        for index, (f, _) in enumerate(self.flags):
            if f == flag:
                return index
        return -1


class _Problems:
    """Collects reasons and keeps the most serious one."""

    __slots__ = ("worst",)

    def __init__(self) -> None:
        self.worst: SkipReason | None = None

    def add(self, reason: SkipReason) -> None:
        if self.worst is None or _SEVERITY.index(reason) < _SEVERITY.index(self.worst):
            self.worst = reason


def _number(token: bytes, kind: str, problems: _Problems) -> int | None:
    """Parse a numeric flag value or field as memcached does, noting non-canonical spellings."""
    if kind == _INT32:
        value = safe_strtol(token)
        canonical = value is not None and canonical_int32(token) is not None
    elif kind == _U32:
        value = safe_strtoul(token)
        canonical = value is not None and is_canonical_decimal(token, U32_MAX)
    else:
        value = safe_strtoull(token)
        canonical = value is not None and is_canonical_decimal(token, U64_MAX)
    if value is None:
        problems.add(UNSHADOWABLE_INPUT)
    elif not canonical:
        problems.add(NON_CANONICAL)
    return value


def parse_meta_request(words: list[bytes]) -> MetaRequest:
    """Read an mg/ms/md/ma line already split into words (Request.words).

    Raises ValueError when the first word is not one of the four meta commands.
    """
    command = words[0].decode("latin-1") if words else ""
    if command not in META_COMMANDS:
        raise ValueError(f"not a meta command: {command!r}")
    problems = _Problems()
    first_flag = 3 if command == "ms" else 2
    if len(words) < first_flag:
        problems.add(UNSHADOWABLE_INPUT)  # no key, or ms without a length: memcached's ERROR
    if len(words) > META_MAX_WORDS:
        problems.add(UNSHADOWABLE_INPUT)  # "options flags (are) too long"
    raw_key = words[1] if len(words) > 1 else b""
    if len(raw_key) > KEY_MAX_LENGTH:
        problems.add(UNSHADOWABLE_INPUT)

    datalen: int | None = None
    if command == "ms" and len(words) > 2:
        datalen = safe_strtol(words[2])
        if datalen is None or datalen < 0 or datalen > INT32_MAX - 2:
            problems.add(UNSHADOWABLE_INPUT)
            datalen = None
        elif not is_canonical_decimal(words[2], INT32_MAX - 2):
            problems.add(NON_CANONICAL)

    documented = _DOCUMENTED[command]
    unemulated = _UNEMULATED[command]
    flags: list[tuple[str, bytes]] = []
    values: dict[str, int | None] = {}
    seen: set[int] = set()
    mode: str | None = None
    opaque: bytes | None = None
    for token in words[first_flag:]:
        char = token[0]
        if char >= 127 or char in seen:
            problems.add(UNSHADOWABLE_INPUT)  # "duplicate flag"
            continue
        seen.add(char)
        flag = chr(char)
        value = token[1:]
        flags.append((flag, value))
        kind = _FLAG_KINDS.get(flag)
        if kind is None:
            problems.add(UNSHADOWABLE_INPUT)  # "invalid flag"
            continue
        if flag in unemulated or flag not in documented:
            problems.add(META_UNEMULATED)
        if kind == _BARE:
            if value:
                problems.add(NON_CANONICAL)  # memcached ignores the rest of the token
        elif kind == _MODE:
            if len(value) != 1:
                problems.add(UNSHADOWABLE_INPUT)  # "incorrect length for M token"
            else:
                mode = value.decode("latin-1")
        elif kind == _TEXT:
            if flag == "O":
                if len(token) > OPAQUE_MAX_TOKEN:
                    problems.add(UNSHADOWABLE_INPUT)  # "opaque token too long"
                opaque = value
        else:
            values[flag] = _number(value, kind, problems)

    present = {flag for flag, _ in flags}
    key = raw_key
    if "b" in present:
        decoded = decode_base64_key(raw_key)
        if decoded is None:
            problems.add(UNSHADOWABLE_INPUT)  # "error decoding key"
            key = b""
        else:
            key = decoded
            if not is_canonical_base64(raw_key):
                problems.add(NON_CANONICAL)

    if command == "ms":
        if mode is None:
            mode = "S"
        elif mode not in _MS_MODES:
            problems.add(UNSHADOWABLE_INPUT)  # "invalid mode for ms M token"
    elif command == "ma":
        folded = _MA_MODES.get(mode or "I")
        if folded is None:
            problems.add(UNSHADOWABLE_INPUT)  # "invalid mode for ma M token"
        mode = folded
    ttl = values.get("T")
    if command == "mg" and ttl is not None and ttl < 0 and "t" in present:
        # 1.6.18 reports a wrapped, meaningless TTL after a negative T (observed t4294964567).
        problems.add(META_UNEMULATED)

    return MetaRequest(
        command=command,
        key=key,
        raw_key=raw_key,
        flags=tuple(flags),
        quiet="q" in present,
        base64="b" in present,
        reason=problems.worst,
        datalen=datalen,
        mode=mode,
        client_flags=values.get("F"),
        ttl=ttl,
        cas=values.get("C"),
        invalidate="I" in present,
        autoviv=values.get("N"),
        recache=values.get("R"),
        delta=values.get("D"),
        initial=values.get("J"),
        opaque=opaque,
    )


class StorageArgs(NamedTuple):
    """The fields of a canonical classic storage line (set/add/replace/append/prepend/cas)."""

    flags: int
    exptime: int
    length: int  # the <bytes> field: data block length
    cas: int | None  # cas only
    noreply: bool


_STORAGE_COMMANDS: Final = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))


def canonical_storage(words: list[bytes]) -> StorageArgs | SkipReason:
    """The fields of a classic storage line, or the reason it must not be replayed.

    Canonical means: the exact word count with an optional last word that is exactly
    `noreply`, flags a plain decimal in [0, 2^32-1], exptime a plain decimal int32 (a
    negative one written `-N`), bytes a plain decimal, cas a plain decimal u64. Input that
    memcached answers with ERROR or CLIENT_ERROR gives UNSHADOWABLE_INPUT; input it accepts but
    that is spelled otherwise (`+5`, `007`, flags 2^32 truncated to 0, an ignored sixth word)
    gives NON_CANONICAL.
    """
    if not words or words[0] not in _STORAGE_COMMANDS:
        raise ValueError(f"not a storage command: {words[:1]!r}")
    is_cas = words[0] == b"cas"
    base = 6 if is_cas else 5
    if len(words) not in (base, base + 1):
        return UNSHADOWABLE_INPUT  # ERROR
    if len(words[1]) > KEY_MAX_LENGTH:
        return UNSHADOWABLE_INPUT
    problems = _Problems()
    flags = _number(words[2], _U32, problems)
    exptime = _number(words[3], _INT32, problems)
    length = safe_strtol(words[4])
    if length is None or length < 0 or length > INT32_MAX - 2:
        problems.add(UNSHADOWABLE_INPUT)
    elif not is_canonical_decimal(words[4], INT32_MAX - 2):
        problems.add(NON_CANONICAL)
    cas = _number(words[5], _U64, problems) if is_cas else None
    noreply = False
    if len(words) == base + 1:
        noreply = words[-1] == b"noreply"
        if not noreply:
            problems.add(NON_CANONICAL)  # memcached ignores any other last word
    if problems.worst is not None:
        return problems.worst
    assert flags is not None and exptime is not None and length is not None
    return StorageArgs(flags, exptime, length, cas, noreply)
