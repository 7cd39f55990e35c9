"""Translation, sans-IO: a (request, Memcached reply) pair becomes per-key shadow operations.

Each ShadowOp says what to do on Redis (read, store, delta, touch, delete, flush) and what
Memcached answered, already normalised to the classic vocabulary (STORED, NOT_FOUND, a
number...) so that classic and meta commands share one comparison. Anything that cannot be
replayed exactly is a Skip with a reason, counted and never guessed (REFERENCE 4.10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.memcache.arguments import (
    MetaRequest,
    canonical_storage,
    parse_meta_request,
)
from proxy.memcache.commands import COMMANDS, KEY_MAX_LENGTH
from proxy.memcache.numbers import canonical_int32, is_canonical_decimal, safe_strtol
from proxy.memcache.reply import MalformedReply, MetaReply, parse_meta, parse_retrieval
from proxy.memcache.request import Captured
from proxy.redis.layout import REALTIME_MAXDELTA

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

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
    # Memcached's outcome was inferred, not answered (a classic set with noreply): it is
    # compared, but does not prove the key defined in Memcached (an out-of-memory refusal
    # is hidden by noreply).
    inferred: bool = False
    # Set by the dispatcher: the request's place in reply order, the client connection, and
    # when the proxy sent it and got Memcached's reply (perf_counter; replied_wall: unix).
    seq: int = 0
    session: int = 0
    sent_at: float = 0.0
    replied_at: float = 0.0
    replied_wall: float = 0.0
    # Set when the op is replayed: the key's expiry clock then (KeyState.expiry_clock), for
    # the evidence a difference is judged by.
    expiry_clock: float = 0.0

    def anchor_expiry(self, replied_wall: float) -> None:
        """Make relative exptimes count from Memcached's reply, not from the replay.

        memcached turns a relative exptime into "now + exptime" when it runs the request; a
        shadow replaying it later (queued, batched, a worker behind) must not add its lag to
        the item's life, or a read between the two expiries would differ. The op gets the
        absolute unix time memcached computed (exptimes over 30 days are absolute already).
        """
        exptime = self.exptime
        if exptime is not None and 0 < exptime <= REALTIME_MAXDELTA:
            self.exptime = int(replied_wall) + exptime
        create = self.create
        if create is not None and 0 < create <= REALTIME_MAXDELTA:
            self.create = int(replied_wall) + create


@dataclass(frozen=True, slots=True)
class Skip:
    """A shadowed request that is not replayed, and why (memshadow_shadow_skipped_total)."""

    reason: str
    keys: tuple[bytes, ...] = ()  # keys whose Redis copy may now differ (they turn cold)


Translation = list[ShadowOp] | Skip


def translate(request: Captured, sampled: Callable[[bytes], bool]) -> Translation:
    """Turn one completed request (with its captured reply) into shadow operations."""
    reply = request.response
    if reply is None:
        return Skip("reply_not_captured", tuple(request.keys))
    if request.command == "get" and len(request.words) == 2:
        ops = _plain_get(request.words[1], reply, sampled)
        if ops is not None:
            return ops
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


# -- classic commands -------------------------------------------------------------------------

_VALUE_END = b"\r\nEND\r\n"


def _plain_get(key: bytes, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation | None:
    """`get <key>` answered by END or by its one VALUE (the commonest request): the same
    operations as _retrieval, without its general parse; None for any other shape, which
    _retrieval then judges. timeit (2-core VM): hit 3.96 -> 1.46 us, miss 2.20 -> 0.47 us."""
    if len(key) > KEY_MAX_LENGTH or key == b"noreply":
        return None
    hit: McValue | None = None
    if reply != b"END\r\n":
        if reply[:6] != b"VALUE ":
            return None
        eol = reply.find(b"\r\n")
        if eol < 0:
            return None
        words = reply[6:eol].split(b" ")
        if len(words) != 3 or words[0] != key:
            return None
        flags, size = words[1], words[2]
        if not (flags.isdigit() and size.isdigit()):
            return None
        length = int(size)
        start = eol + 2
        end = start + length
        if length > 2**31 or reply[end:] != _VALUE_END or int(flags) > U32_MAX:
            return None
        hit = McValue(int(flags), reply[start:end], None)
    if not sampled(key):
        return []
    return [ShadowOp("get", "read", key, MISS if hit is None else HIT, hit)]


def _retrieval(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    gat = request.command in ("gat", "gats")
    keys = words[2:] if gat else words[1:]
    if not keys or any(len(k) > KEY_MAX_LENGTH for k in keys) or words[-1] == b"noreply":
        return Skip("unshadowable_input")
    exptime = None
    if gat:
        exptime = canonical_int32(words[1])
        if exptime is None:
            return Skip("non_canonical", tuple(k for k in keys if sampled(k)))
    try:
        parsed = parse_retrieval(reply)
    except MalformedReply:
        return Skip("memcached_error")
    if parsed.error is not None:
        return Skip("memcached_error")
    found: dict[bytes, McValue] = {}
    for item in parsed.items:
        found.setdefault(item.key, McValue(item.flags, item.data, item.cas))
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


def _storage(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    key = words[1] if len(words) > 1 else b""
    args = canonical_storage(words)
    if isinstance(args, str):
        return Skip(args, (key,) if request.data_len >= 0 else ())
    if not request.data_ok:
        return Skip("bad_data_chunk")  # memcached stored nothing
    if request.data is None:
        # Too large to buffer: memcached refused it (set also deleted the old item).
        return [_too_large(request, key, args.noreply)]
    status = None if args.noreply else _store_outcome(_line(reply))
    if not args.noreply and status is None:
        return Skip("memcached_error", (key,))
    return [
        ShadowOp(
            request.command,
            "store",
            key,
            status,
            mode=request.command,
            flags=args.flags,
            exptime=args.exptime,
            data=request.data,
            data_len=args.length,
            cas=args.cas,
        )
    ]


def _too_large(request: Captured, key: bytes, noreply: bool) -> ShadowOp:
    return ShadowOp(
        request.command,
        "store",
        key,
        None if noreply else TOO_LARGE,
        mode=request.command,
        data_len=request.data_len,
    )


def _delete(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
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


def _arith(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
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


def _touch(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    words = request.words
    noreply = words[-1] == b"noreply"
    if len(words) != 3 + noreply or len(words[1]) > KEY_MAX_LENGTH:
        return Skip("unshadowable_input")
    exptime = canonical_int32(words[2])
    if exptime is None:
        return Skip("non_canonical", (words[1],))
    status = None if noreply else _line(reply).decode(errors="replace")
    if status not in (None, TOUCHED, NOT_FOUND):
        return Skip("memcached_error", (words[1],))
    return [ShadowOp(request.command, "touch", words[1], status, exptime=exptime)]


def flush_delay(words: list[bytes]) -> int | None:
    """The delay of `flush_all [delay] [noreply]` read as memcached does, None when it flushes
    nothing: 4 words or more are an ERROR; the delay is the second word (strtol: a sign, any
    number; <= 0 is now) and a third is ignored unless it is noreply; a delay memcached
    refuses is a CLIENT_ERROR."""
    if len(words) > 3:
        return None
    noreply = words[-1] == b"noreply"
    if len(words) - noreply > 1:
        return safe_strtol(words[1])
    return 0


def _flush(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    delay = flush_delay(request.words)
    if delay is None:
        return Skip("memcached_error")
    noreply = request.words[-1] == b"noreply"
    if not noreply and _line(reply) != b"OK":
        return Skip("memcached_error")
    return [ShadowOp(request.command, "flush", b"", None if noreply else "OK", exptime=delay)]


# -- meta commands ----------------------------------------------------------------------------

_META_STATUS = {"HD": STORED, "NS": NOT_STORED, "EX": EXISTS, "NF": NOT_FOUND}
_MS_MODES = {"S": "set", "E": "add", "A": "append", "P": "prepend", "R": "replace"}


def _meta(request: Captured) -> MetaRequest | Skip:
    meta = parse_meta_request(request.words)
    if meta.reason is not None:
        return Skip(meta.reason, (meta.key,) if meta.key else ())
    return meta


def _meta_reply(reply: bytes, key: bytes) -> MetaReply | Skip:
    try:
        parsed = parse_meta(reply)
    except MalformedReply:
        return Skip("memcached_error", (key,))
    if parsed.is_error:
        if parsed.line == b"CLIENT_ERROR cannot increment or decrement non-numeric value":
            return parsed
        return Skip("memcached_error", (key,))
    return parsed


def _mg(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    if meta.ttl is not None or meta.autoviv is not None or meta.recache is not None:
        return Skip("meta_unemulated", (meta.key,))  # T changes the TTL, N/R create items
    parsed = _meta_reply(reply, meta.key)
    if isinstance(parsed, Skip):
        return parsed
    if parsed.code in ("", "EN"):  # quiet mode hides only a miss
        return [ShadowOp(request.command, "read", meta.key, MISS, meta=True)]
    if parsed.code not in ("HD", "VA"):
        return Skip("memcached_error", (meta.key,))
    returned = parsed.flags
    mc = McValue(
        int(returned["f"]) if "f" in returned else None,
        parsed.value if meta.has("v") else None,
        int(returned["c"]) if "c" in returned else None,
    )
    op = ShadowOp(request.command, "read", meta.key, HIT, mc_value=mc, meta=True)
    op.want_cas = mc.cas is not None
    return [op]


def _ms(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    key = meta.key
    if meta.invalidate:
        return Skip("meta_unemulated", (key,))
    if not request.data_ok:
        return Skip("bad_data_chunk")
    mode = _MS_MODES.get(meta.mode or "S")
    if mode is None:
        return Skip("unshadowable_input", (key,))
    status: str | None
    if not reply:
        status = STORED if meta.quiet else None
    else:
        line = _line(reply)
        if line == b"SERVER_ERROR object too large for cache":
            status = TOO_LARGE
        else:
            parsed = _meta_reply(reply, key)
            if isinstance(parsed, Skip):
                return parsed
            status = _META_STATUS.get(parsed.code)
            if status is None:
                return Skip("memcached_error", (key,))
    if meta.cas is not None and mode in ("set", "replace"):
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
            flags=meta.client_flags or 0,
            exptime=meta.ttl or 0,
            data=request.data,
            data_len=meta.datalen or 0,
            cas=meta.cas if mode in ("cas", "append", "prepend") else None,
            too_large_deletes=True,
            meta=True,
        )
    ]


def _md(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    if meta.invalidate or meta.ttl is not None or meta.has("x"):
        return Skip("meta_unemulated", (meta.key,))
    status: str | None
    if not reply:
        status = DELETED if meta.quiet else None
    else:
        parsed = _meta_reply(reply, meta.key)
        if isinstance(parsed, Skip):
            return parsed
        status = {"HD": DELETED, "NF": NOT_FOUND, "EX": EXISTS}.get(parsed.code)
        if status is None:
            return Skip("memcached_error", (meta.key,))
    return [ShadowOp(request.command, "delete", meta.key, status, cas=meta.cas, meta=True)]


def _ma(request: Captured, reply: bytes, sampled: Callable[[bytes], bool]) -> Translation:
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    key = meta.key
    if meta.ttl is not None and meta.autoviv is not None:
        return Skip("meta_unemulated", (key,))  # N with T: order-dependent TTL rules
    op = ShadowOp(
        request.command,
        "delta",
        key,
        None,
        mode="decr" if meta.mode == "D" else "incr",
        delta=1 if meta.delta is None else meta.delta,
        cas=meta.cas,
        create=meta.autoviv,
        initial=meta.initial or 0,
        exptime=meta.ttl,
        meta=True,
    )
    parsed = _meta_reply(reply, key)
    if isinstance(parsed, Skip):
        return parsed
    if parsed.code == "":
        if not meta.quiet:
            return Skip("memcached_error", (key,))
        op.mc_status = STORED  # q hides only a successful update of an existing item
    elif parsed.is_error:
        op.mc_status = NON_NUMERIC
    elif parsed.code in ("HD", "VA"):
        op.mc_status = STORED
        if parsed.value is not None:
            op.mc_number = int(parsed.value)
    else:
        op.mc_status = _META_STATUS.get(parsed.code)
        if op.mc_status is None:
            return Skip("memcached_error", (key,))
    return [op]


_Handler = Callable[[Captured, bytes, Callable[[bytes], bool]], Translation]
# The families of commands.COMMANDS' `shadow` column; the table says which command is which.
_FAMILIES: dict[str, _Handler] = {
    "retrieval": _retrieval,
    "storage": _storage,
    "delete": _delete,
    "arith": _arith,
    "touch": _touch,
    "flush": _flush,
    "mg": _mg,
    "ms": _ms,
    "md": _md,
    "ma": _ma,
}
_HANDLERS: dict[str, _Handler] = {
    name: _FAMILIES[command.shadow] for name, command in COMMANDS.items() if command.shadow
}
