"""Translation, sans-IO: a (request, Memcached reply) pair becomes per-key shadow operations.

Each ShadowOp says what to do on Redis (read, store, delta, touch, delete, flush) and what
Memcached answered, already normalised to the classic vocabulary (STORED, NOT_FOUND, a
number...) so that classic and meta commands share one comparison. Anything that cannot be
replayed exactly is a Skip with a reason, counted and never guessed (REFERENCE 4.10).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

from proxy.memcache.numbers import is_canonical_decimal
from proxy.memcache.request import KEY_MAX_LENGTH, Request

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1

# Reply lines normalised to these outcomes.
STORED = "STORED"
NOT_STORED = "NOT_STORED"
EXISTS = "EXISTS"
NOT_FOUND = "NOT_FOUND"
TOO_LARGE = "TOO_LARGE"
DELETED = "DELETED"
TOUCHED = "TOUCHED"
NON_NUMERIC = "NON_NUMERIC"
CREATED = "CREATED"  # ma N autovivified the item
HIT = "HIT"
MISS = "MISS"


@dataclass(slots=True)
class McValue:
    """An item as Memcached returned it; None fields were not asked for (meta flags)."""

    flags: int | None
    data: bytes | None
    cas: int | None


@dataclass(slots=True)
class ShadowOp:
    """One key's share of a shadowed request."""

    command: str  # metrics label: the client's command
    action: str  # read | store | delta | touch | delete | flush
    key: bytes
    mc_status: str | None  # Memcached's outcome; None when it is unknown (noreply, quiet)
    mc_value: McValue | None = None  # reads: the item Memcached returned
    mc_number: int | None = None  # incr/decr/ma: the new value Memcached returned
    mode: str = ""  # store: set/add/replace/append/prepend/cas; delta: incr/decr
    flags: int = 0
    exptime: int | None = None  # None: no TTL change (reads), else memcached exptime
    data: bytes = b""
    data_len: int = 0
    cas: int | None = None  # the cas token the client sent (Memcached's numbering)
    delta: int = 0
    create: int | None = None  # ma N: create with this exptime on a miss
    initial: int = 0  # ma J
    too_large_deletes: bool | None = None
    want_cas: bool = False  # reads: record the Memcached<->Redis cas pair
    meta: bool = False


@dataclass(frozen=True, slots=True)
class Skip:
    """A shadowed request that is not replayed, and why (memshadow_shadow_skipped_total)."""

    reason: str
    keys: tuple[bytes, ...] = ()  # keys whose Redis copy may now differ (they turn cold)


Translation = list[ShadowOp] | Skip


def translate(request: Request, sampled: Callable[[bytes], bool]) -> Translation:
    """Turn one completed request (with its captured reply) into shadow operations."""
    reply = request.response
    if reply is None:
        return Skip("reply_not_captured", tuple(request.keys))
    handler = _HANDLERS.get(request.command)
    if handler is None:
        return Skip("not_shadowed")
    return handler(request, reply, sampled)


# -- reply helpers ----------------------------------------------------------------------------


def _line(reply: bytes) -> bytes:
    end = reply.find(b"\r\n")
    return reply if end < 0 else reply[:end]


def _store_outcome(line: bytes) -> str | None:
    if line in (b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND"):
        return line.decode()
    if line == b"SERVER_ERROR object too large for cache":
        return TOO_LARGE
    return None


def parse_values(reply: bytes) -> list[tuple[bytes, McValue]] | None:
    """VALUE ... END into (key, value) pairs; None when an error line replaced the list."""
    items: list[tuple[bytes, McValue]] = []
    pos = 0
    while True:
        end = reply.find(b"\r\n", pos)
        if end < 0:
            return None
        line = reply[pos:end]
        if line == b"END":
            return items
        if not line.startswith(b"VALUE "):
            return None
        words = line.split(b" ")
        size = int(words[3])
        data = reply[end + 2 : end + 2 + size]
        cas = int(words[4]) if len(words) > 4 else None
        items.append((words[1], McValue(int(words[2]), data, cas)))
        pos = end + 2 + size + 2


# -- classic commands -------------------------------------------------------------------------


def _canonical_exptime(token: bytes) -> int | None:
    negative = token.startswith(b"-")
    digits = token[1:] if negative else token
    if not is_canonical_decimal(digits, INT32_MAX):
        return None
    value = int(digits)
    return -value if negative else value


def _retrieval(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    gat = request.command in ("gat", "gats")
    keys = words[2:] if gat else words[1:]
    if not keys or any(len(k) > KEY_MAX_LENGTH for k in keys) or words[-1] == b"noreply":
        return Skip("unshadowable_input")
    exptime = None
    if gat:
        exptime = _canonical_exptime(words[1])
        if exptime is None:
            return Skip("non_canonical", tuple(k for k in keys if sampled(k)))
    items = parse_values(reply)
    if items is None:
        return Skip("memcached_error")
    found: dict[bytes, McValue] = {}
    for key, value in items:
        found.setdefault(key, value)
    ops: list[ShadowOp] = []
    seen: set[bytes] = set()
    want_cas = request.command in ("gets", "gats")
    for key in keys:
        if key in seen or not sampled(key):
            continue
        seen.add(key)
        hit = found.get(key)
        ops.append(
            ShadowOp(
                request.command,
                "read",
                key,
                HIT if hit is not None else MISS,
                mc_value=hit,
                exptime=exptime,
                want_cas=want_cas,
            )
        )
    return ops


def _storage(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    is_cas = request.command == "cas"
    key = words[1]
    if request.data_len < 0 or len(words[1]) > KEY_MAX_LENGTH:
        return Skip("unshadowable_input")
    noreply = words[-1] == b"noreply"
    expected = (6 if is_cas else 5) + (1 if noreply else 0)
    flags_ok = is_canonical_decimal(words[2], U32_MAX)
    exptime = _canonical_exptime(words[3])
    if len(words) != expected or not flags_ok or exptime is None:
        return Skip("non_canonical", (key,))
    if not is_canonical_decimal(words[4], INT32_MAX - 2):
        return Skip("non_canonical", (key,))
    cas = None
    if is_cas:
        if not is_canonical_decimal(words[5], U64_MAX):
            return Skip("non_canonical", (key,))
        cas = int(words[5])
    if not request.data_ok:
        return Skip("bad_data_chunk")  # memcached stored nothing
    if request.data is None:
        # Too large to buffer: memcached refused it (set also deleted the old item).
        return [_too_large(request, key, noreply)]
    status = None if noreply else _store_outcome(_line(reply))
    if not noreply and status is None:
        return Skip("memcached_error", (key,))
    return [
        ShadowOp(
            request.command,
            "store",
            key,
            status,
            mode=request.command,
            flags=int(words[2]),
            exptime=exptime,
            data=request.data,
            data_len=request.data_len,
            cas=cas,
        )
    ]


def _too_large(request: Request, key: bytes, noreply: bool) -> ShadowOp:
    return ShadowOp(
        request.command,
        "store",
        key,
        None if noreply else TOO_LARGE,
        mode=request.command,
        data_len=request.data_len,
    )


def _delete(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    noreply = words[-1] == b"noreply"
    valid = (
        len(words) == 2
        or (len(words) == 3 and words[2] in (b"0", b"noreply"))
        or (len(words) == 4 and words[2] == b"0" and noreply)
    )
    if not valid or len(words[1]) > KEY_MAX_LENGTH:
        return Skip("unshadowable_input")
    line = _line(reply)
    status = None if noreply else line.decode(errors="replace")
    if status not in (None, DELETED, NOT_FOUND):
        return Skip("memcached_error", (words[1],))
    return [ShadowOp(request.command, "delete", words[1], status)]


def _arith(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    noreply = words[-1] == b"noreply"
    if len(words) != 3 + noreply or len(words[1]) > KEY_MAX_LENGTH:
        return Skip("unshadowable_input")
    key = words[1]
    if not is_canonical_decimal(words[2], U64_MAX):
        return Skip("non_canonical", (key,))
    op = ShadowOp(request.command, "delta", key, None, mode=request.command, delta=int(words[2]))
    if noreply:
        return [op]
    line = _line(reply)
    if line.isdigit():
        op.mc_status, op.mc_number = STORED, int(line)
    elif line == b"NOT_FOUND":
        op.mc_status = NOT_FOUND
    elif line == b"CLIENT_ERROR cannot increment or decrement non-numeric value":
        op.mc_status = NON_NUMERIC
    else:
        return Skip("memcached_error", (key,))
    return [op]


def _touch(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    noreply = words[-1] == b"noreply"
    if len(words) != 3 + noreply or len(words[1]) > KEY_MAX_LENGTH:
        return Skip("unshadowable_input")
    exptime = _canonical_exptime(words[2])
    if exptime is None:
        return Skip("non_canonical", (words[1],))
    status = None if noreply else _line(reply).decode(errors="replace")
    if status not in (None, TOUCHED, NOT_FOUND):
        return Skip("memcached_error", (words[1],))
    return [ShadowOp(request.command, "touch", words[1], status, exptime=exptime)]


def _flush(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    noreply = words[-1] == b"noreply"
    args = words[1:-1] if noreply else words[1:]
    if len(args) > 1:
        return Skip("unshadowable_input")
    delay = 0
    if args:
        if not args[0].isdigit():
            return Skip("unshadowable_input")
        delay = int(args[0])
    if not noreply and _line(reply) != b"OK":
        return Skip("memcached_error")
    return [ShadowOp(request.command, "flush", b"", None if noreply else "OK", exptime=delay)]


# -- meta commands ----------------------------------------------------------------------------

_META_CODES = {
    b"HD": STORED,
    b"NS": NOT_STORED,
    b"EX": EXISTS,
    b"NF": NOT_FOUND,
}
# Flags whose effects the shadow does not emulate (stale items, win tokens, explicit cas...).
_UNEMULATED = frozenset(b"NRIEXZWhl")


def _meta_key(words: list[bytes], flags: list[bytes]) -> bytes | None:
    key = words[1]
    if any(f == b"b" for f in flags):
        try:
            key = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            return None
    if not key or len(key) > KEY_MAX_LENGTH:
        return None
    return key


def _meta_flags(tokens: list[bytes]) -> dict[int, bytes] | None:
    """Flag char -> value; None on duplicates (memcached rejects those)."""
    flags: dict[int, bytes] = {}
    for token in tokens:
        if token[0] in flags:
            return None
        flags[token[0]] = token[1:]
    return flags


def _meta_reply(reply: bytes) -> tuple[bytes, dict[int, bytes], bytes | None] | None:
    """(code, returned flags, value) of a meta reply; None for an error or nothing."""
    end = reply.find(b"\r\n")
    if end < 0:
        return None
    words = reply[:end].split(b" ")
    code = words[0]
    if code == b"VA":
        size = int(words[1])
        value = reply[end + 2 : end + 2 + size]
        return code, {w[0]: w[1:] for w in words[2:] if w}, value
    if code in (b"HD", b"EN", b"NF", b"NS", b"EX"):
        return code, {w[0]: w[1:] for w in words[1:] if w}, None
    return None


def _mg(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    tokens = words[2:]
    flags = _meta_flags(tokens)
    if flags is None or len(words) < 2:
        return Skip("unshadowable_input")
    key = _meta_key(words, tokens)
    if key is None:
        return Skip("unshadowable_input")
    if any(c in _UNEMULATED for c in flags) or ord("T") in flags:
        return Skip("meta_unemulated", (key,))
    quiet = ord("q") in flags
    parsed = _meta_reply(reply) if reply else None
    if parsed is None:
        if quiet and not reply:
            status = MISS  # q hides only a miss
            return [ShadowOp(request.command, "read", key, status, meta=True)]
        return Skip("memcached_error")
    code, returned, value = parsed
    if code == b"EN":
        return [ShadowOp(request.command, "read", key, MISS, meta=True)]
    mc = McValue(
        int(returned[ord("f")]) if ord("f") in returned else None,
        value if ord("v") in flags else None,
        int(returned[ord("c")]) if ord("c") in returned else None,
    )
    return [
        ShadowOp(
            request.command, "read", key, HIT, mc_value=mc, want_cas=mc.cas is not None, meta=True
        )
    ]


_MS_MODES = {b"S": "set", b"E": "add", b"A": "append", b"P": "prepend", b"R": "replace"}


def _ms(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    if request.data_len < 0 or len(words) < 3:
        return Skip("unshadowable_input")
    tokens = words[3:]
    flags = _meta_flags(tokens)
    if flags is None:
        return Skip("unshadowable_input")
    key = _meta_key(words, tokens)
    if key is None:
        return Skip("unshadowable_input")
    if any(c in _UNEMULATED for c in flags):
        return Skip("meta_unemulated", (key,))
    if not is_canonical_decimal(words[2], INT32_MAX - 2):
        return Skip("non_canonical", (key,))
    mode = _MS_MODES.get(flags.get(ord("M"), b"S"))
    client_flags = flags.get(ord("F"), b"0")
    ttl = _canonical_exptime(flags.get(ord("T"), b"0"))
    cas_token = flags.get(ord("C"))
    if mode is None or ttl is None or not is_canonical_decimal(client_flags, U32_MAX):
        return Skip("non_canonical", (key,))
    if cas_token is not None and not is_canonical_decimal(cas_token, U64_MAX):
        return Skip("non_canonical", (key,))
    if not request.data_ok:
        return Skip("bad_data_chunk")
    quiet = ord("q") in flags
    status: str | None
    if not reply:
        status = STORED if quiet else None
    else:
        line = _line(reply)
        status = _META_CODES.get(line.split(b" ", 1)[0])
        if status is None:
            if line == b"SERVER_ERROR object too large for cache":
                status = TOO_LARGE
            else:
                return Skip("memcached_error", (key,))
    cas = int(cas_token) if cas_token is not None else None
    if cas is not None and mode in ("set", "replace"):
        mode = "cas"
    if request.data is None:
        op = _too_large(request, key, status is None)
        op.too_large_deletes = True
        op.meta = True
        return [op]
    return [
        ShadowOp(
            request.command,
            "store",
            key,
            status,
            mode=mode,
            flags=int(client_flags),
            exptime=ttl,
            data=request.data,
            data_len=request.data_len,
            cas=cas if mode in ("cas", "append", "prepend") else None,
            too_large_deletes=True,
            meta=True,
        )
    ]


def _md(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    tokens = words[2:]
    flags = _meta_flags(tokens)
    if flags is None or len(words) < 2:
        return Skip("unshadowable_input")
    key = _meta_key(words, tokens)
    if key is None:
        return Skip("unshadowable_input")
    if any(c in _UNEMULATED for c in flags) or ord("T") in flags or ord("x") in flags:
        return Skip("meta_unemulated", (key,))
    cas_token = flags.get(ord("C"))
    if cas_token is not None and not is_canonical_decimal(cas_token, U64_MAX):
        return Skip("non_canonical", (key,))
    status: str | None
    if not reply:
        status = DELETED if ord("q") in flags else None
    else:
        code = _line(reply).split(b" ", 1)[0]
        status = {b"HD": DELETED, b"NF": NOT_FOUND, b"EX": EXISTS}.get(code)
        if status is None:
            return Skip("memcached_error", (key,))
    cas = int(cas_token) if cas_token is not None else None
    return [ShadowOp(request.command, "delete", key, status, cas=cas, meta=True)]


def _ma(request: Request, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    tokens = words[2:]
    flags = _meta_flags(tokens)
    if flags is None or len(words) < 2:
        return Skip("unshadowable_input")
    key = _meta_key(words, tokens)
    if key is None:
        return Skip("unshadowable_input")
    if any(c in b"EIRXZW" for c in flags):
        return Skip("meta_unemulated", (key,))
    mode = {b"I": "incr", b"+": "incr", b"D": "decr", b"-": "decr"}.get(flags.get(ord("M"), b"I"))
    numbers = {c: flags.get(ord(c)) for c in "DJC"}
    if mode is None or any(
        v is not None and not is_canonical_decimal(v, U64_MAX) for v in numbers.values()
    ):
        return Skip("non_canonical", (key,))
    create = ttl = None
    if ord("N") in flags:
        create = _canonical_exptime(flags[ord("N")])
        if create is None:
            return Skip("non_canonical", (key,))
    if ord("T") in flags:
        ttl = _canonical_exptime(flags[ord("T")])
        if ttl is None:
            return Skip("non_canonical", (key,))
    if ttl is not None and create is not None:
        return Skip("meta_unemulated", (key,))  # N with T: order-dependent TTL rules
    op = ShadowOp(
        request.command,
        "delta",
        key,
        None,
        mode=mode,
        delta=int(numbers["D"] or b"1"),
        cas=int(numbers["C"]) if numbers["C"] is not None else None,
        create=create,
        initial=int(numbers["J"] or b"0"),
        exptime=ttl,
        meta=True,
    )
    if not reply:
        if ord("q") not in flags:
            return Skip("memcached_error", (key,))
        op.mc_status = STORED  # q hides only a successful update of an existing item
        return [op]
    parsed = _meta_reply(reply)
    if parsed is None:
        if _line(reply) == b"CLIENT_ERROR cannot increment or decrement non-numeric value":
            op.mc_status = NON_NUMERIC
            return [op]
        return Skip("memcached_error", (key,))
    code, _, value = parsed
    if code in (b"HD", b"VA"):
        op.mc_status = STORED
        if value is not None:
            op.mc_number = int(value)
    else:
        op.mc_status = {b"NF": NOT_FOUND, b"NS": NOT_STORED, b"EX": EXISTS}.get(code)
        if op.mc_status is None:
            return Skip("memcached_error", (key,))
    return [op]


_HANDLERS: dict[str, Callable[[Request, bytes, Callable[[bytes], bool]], Translation]] = {
    "get": _retrieval,
    "gets": _retrieval,
    "bget": _retrieval,
    "gat": _retrieval,
    "gats": _retrieval,
    "set": _storage,
    "add": _storage,
    "replace": _storage,
    "append": _storage,
    "prepend": _storage,
    "cas": _storage,
    "delete": _delete,
    "incr": _arith,
    "decr": _arith,
    "touch": _touch,
    "flush_all": _flush,
    "mg": _mg,
    "ms": _ms,
    "md": _md,
    "ma": _ma,
}
