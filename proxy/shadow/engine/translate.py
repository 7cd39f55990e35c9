"""Translation, sans-IO: a (request, Memcached reply) pair becomes per-key shadow operations.

Each ShadowOp says what to do on Redis (read, store, delta, touch, delete, flush) and what
Memcached answered, already normalised to the classic vocabulary (memcache.words.Status:
STORED, NOT_FOUND, a number...) so that classic and meta commands share one comparison, and
when and where the request was seen. It is an observation: made whole here, never changed
after (what the replay learns lives in the engine's key state). Anything that cannot be
replayed exactly is a Skip with a reason, counted and never guessed (REFERENCE 4.10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from proxy.memcache.arguments import (
    MetaRequest,
    canonical_storage,
    parse_meta_request,
)
from proxy.memcache.commands import COMMANDS, KEY_MAX_LENGTH
from proxy.memcache.numbers import canonical_int32, is_canonical_decimal, safe_strtol
from proxy.memcache.reply import MalformedReply, MetaReply, parse_meta, parse_retrieval
from proxy.memcache.request import Captured
from proxy.memcache.words import Mode, Status
from proxy.redis.layout import DEFAULT_ITEM_SIZE_MAX, REALTIME_MAXDELTA, max_value_len
from proxy.shadow.words import SkipReason

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1

# Memcached's outcomes (memcache.words.Status), by their short names.
STORED: Final = Status.STORED
NOT_STORED: Final = Status.NOT_STORED
EXISTS: Final = Status.EXISTS
NOT_FOUND: Final = Status.NOT_FOUND
TOO_LARGE: Final = Status.TOO_LARGE
DELETED: Final = Status.DELETED
TOUCHED: Final = Status.TOUCHED
NON_NUMERIC: Final = Status.NON_NUMERIC
CREATED: Final = Status.CREATED  # ma N autovivified the item
HIT: Final = Status.HIT
MISS: Final = Status.MISS

# What an operation does on Redis (ShadowOp.action).
READ: Final = 0
STORE: Final = 1
DELTA: Final = 2
TOUCH: Final = 3
DELETE: Final = 4
FLUSH: Final = 5

Seen = tuple[int, int, float, float, float]
"""When and where a request was seen: (its place in reply order, the client session, when the
proxy sent it and when Memcached's reply came: perf_counter; that reply's unix time)."""
NOT_SEEN: Final[Seen] = (0, 0, 0.0, 0.0, 0.0)


@dataclass(slots=True)
class McValue:
    """An item as Memcached returned it; None fields were not asked for (meta flags)."""

    flags: int | None
    data: bytes | None
    cas: int | None


_FIELDS: Final = (
    "action",
    "cas",
    "command",
    "create",
    "data",
    "data_len",
    "delta",
    "exptime",
    "flags",
    "inferred",
    "initial",
    "key",
    "mc_number",
    "mc_status",
    "mc_value",
    "meta",
    "mode",
    "replied_at",
    "replied_wall",
    "sent_at",
    "seq",
    "session",
    "too_large_deletes",
    "want_cas",
)


@final
class ShadowOp:
    """One key's share of a shadowed request: what the client asked, what Memcached answered,
    when. Never changed once made (its attributes are Final; compiled, they are read-only).

    A relative exptime (and ma's N) is anchored to Memcached's reply: memcached turns "30 s"
    into "now + 30" when it runs the request, and a shadow replaying it later (queued,
    batched, a worker behind) must not add its lag to the item's life. The op holds the unix
    time memcached computed (exptimes over 30 days are absolute already)."""

    __slots__ = _FIELDS

    def __init__(
        self,
        command: str,
        action: int,
        key: bytes,
        mc_status: Status | None,
        seen: Seen = NOT_SEEN,
        *,
        mc_value: McValue | None = None,
        mc_number: int | None = None,
        mode: Mode | None = None,
        flags: int = 0,
        exptime: int | None = None,
        data: bytes = b"",
        data_len: int = 0,
        cas: int | None = None,
        delta: int = 0,
        create: int | None = None,
        initial: int = 0,
        too_large_deletes: bool | None = None,
        want_cas: bool = False,
        meta: bool = False,
        inferred: bool = False,
    ) -> None:
        self.command: Final = command  # metrics label: the client's command
        self.action: Final = action  # READ, STORE, DELTA, TOUCH, DELETE or FLUSH
        self.key: Final = key
        # Memcached's outcome; None when it is unknown (noreply, quiet).
        self.mc_status: Final = mc_status
        self.mc_value: Final = mc_value  # reads: the item Memcached returned
        self.mc_number: Final = mc_number  # incr/decr/ma: the new value Memcached returned
        self.mode: Final = mode  # store: set/add/replace/append/prepend/cas; delta: incr/decr
        self.flags: Final = flags
        seq, session, sent_at, replied_at, replied_wall = seen
        wall = int(replied_wall)
        if wall and action != FLUSH:  # (flush_all's delay counts from the command itself)
            if exptime is not None and 0 < exptime <= REALTIME_MAXDELTA:
                exptime += wall
            if create is not None and 0 < create <= REALTIME_MAXDELTA:
                create += wall
        self.exptime: Final = exptime  # None: no TTL change (reads), else memcached exptime
        self.data: Final = data
        self.data_len: Final = data_len
        self.cas: Final = cas  # the cas token the client sent (Memcached's numbering)
        self.delta: Final = delta
        self.create: Final = create  # ma N: create with this exptime on a miss
        self.initial: Final = initial  # ma J
        self.too_large_deletes: Final = too_large_deletes
        self.want_cas: Final = want_cas  # reads: record the Memcached<->Redis cas pair
        self.meta: Final = meta
        # Memcached's outcome was inferred, not answered (a classic set with noreply that
        # memcached took without an error, whose value fits an item): it is compared, but
        # does not prove the key defined in Memcached (an out-of-memory refusal is hidden).
        self.inferred: Final = inferred
        self.seq: Final = seq  # the request's place in reply order
        self.session: Final = session  # the client connection
        self.sent_at: Final = sent_at or replied_at  # perf_counter
        self.replied_at: Final = replied_at
        self.replied_wall: Final = replied_wall  # unix time of Memcached's reply

    def __repr__(self) -> str:
        return f"ShadowOp({self.command} {self.key[:40]!r} {self.mc_status} seq={self.seq})"

    def __eq__(self, other: object) -> bool:
        """The same observation (every field): the plain-get shortcut is checked by it."""
        if not isinstance(other, ShadowOp):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _FIELDS)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Skip:
    """A shadowed request that is not replayed, and why (memshadow_shadow_skipped_total)."""

    reason: SkipReason
    keys: tuple[bytes, ...] = ()  # keys whose Redis copy may now differ (they turn cold)


Translation = list[ShadowOp] | Skip


def translate(
    request: Captured,
    sampled: Callable[[bytes], bool],
    seen: Seen = NOT_SEEN,
    item_size_max: int = DEFAULT_ITEM_SIZE_MAX,
) -> Translation:
    """Turn one completed request (with its captured reply), seen as `seen`, into shadow
    operations. item_size_max: Memcached's (`stats settings`), for the value limit."""
    reply = request.response
    if reply is None:
        return Skip(SkipReason.REPLY_NOT_CAPTURED, tuple(request.keys))
    if request.command == "get" and len(request.words) == 2:
        ops = _plain_get(request.words[1], reply, sampled, seen)
        if ops is not None:
            return ops
    handler = _HANDLERS.get(request.command)
    if handler is None:
        return Skip(SkipReason.NOT_SHADOWED)
    return handler(_Context(request, reply, sampled, seen, item_size_max))


class _Context:
    """One request's translation: what every handler needs."""

    __slots__ = ("item_size_max", "reply", "request", "sampled", "seen")

    def __init__(
        self,
        request: Captured,
        reply: bytes,
        sampled: Callable[[bytes], bool],
        seen: Seen,
        item_size_max: int,
    ) -> None:
        self.request = request
        self.reply = reply
        self.sampled = sampled
        self.seen = seen
        self.item_size_max = item_size_max


# -- reply helpers ----------------------------------------------------------------------------


def _line(reply: bytes) -> bytes:
    end = reply.find(b"\r\n")
    return reply if end < 0 else reply[:end]


_STORE_LINES: Final[dict[bytes, Status]] = {
    b"STORED": STORED,
    b"NOT_STORED": NOT_STORED,
    b"EXISTS": EXISTS,
    b"NOT_FOUND": NOT_FOUND,
    b"SERVER_ERROR object too large for cache": TOO_LARGE,
}


def _store_outcome(line: bytes) -> Status | None:
    return _STORE_LINES.get(line)


# -- classic commands -------------------------------------------------------------------------

_VALUE_END = b"\r\nEND\r\n"


def _plain_get(
    key: bytes, reply: bytes, sampled: Callable[[bytes], bool], seen: Seen
) -> Translation | None:
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
    return [ShadowOp("get", READ, key, MISS if hit is None else HIT, seen, mc_value=hit)]


def _retrieval(ctx: _Context) -> Translation:
    request, reply, sampled = ctx.request, ctx.reply, ctx.sampled
    words = request.words
    gat = request.command in ("gat", "gats")
    keys = words[2:] if gat else words[1:]
    if not keys or any(len(k) > KEY_MAX_LENGTH for k in keys) or words[-1] == b"noreply":
        return Skip(SkipReason.UNSHADOWABLE_INPUT)
    exptime = None
    if gat:
        exptime = canonical_int32(words[1])
        if exptime is None:
            return Skip(SkipReason.NON_CANONICAL, tuple(k for k in keys if sampled(k)))
    try:
        parsed = parse_retrieval(reply)
    except MalformedReply:
        return Skip(SkipReason.MEMCACHED_ERROR)
    if parsed.error is not None:
        return Skip(SkipReason.MEMCACHED_ERROR)
    found: dict[bytes, McValue] = {}
    for item in parsed.items:
        found.setdefault(item.key, McValue(item.flags, item.data, item.cas))
    ops: list[ShadowOp] = []
    done: set[bytes] = set()
    want_cas = request.command in ("gets", "gats")
    for key in keys:
        if key in done or not sampled(key):
            continue
        done.add(key)
        hit = found.get(key)
        ops.append(
            ShadowOp(
                request.command,
                READ,
                key,
                HIT if hit is not None else MISS,
                ctx.seen,
                mc_value=hit,
                exptime=exptime,
                want_cas=want_cas,
            )
        )
    return ops


def _storage(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    words = request.words
    key = words[1] if len(words) > 1 else b""
    args = canonical_storage(words)
    if isinstance(args, SkipReason):
        return Skip(args, (key,) if request.data_len >= 0 else ())
    if not request.data_ok:
        return Skip(SkipReason.BAD_DATA_CHUNK)  # memcached stored nothing
    mode = Mode(request.command)
    if request.data is None:
        # Too large to buffer: memcached refused it (set also deleted the old item).
        return [_too_large(ctx, key, mode, None if args.noreply else TOO_LARGE)]
    status = None if args.noreply else _store_outcome(_line(reply))
    if not args.noreply and status is None:
        return Skip(SkipReason.MEMCACHED_ERROR, (key,))
    inferred = False
    if status is None and mode is Mode.SET:
        # A classic set with noreply that memcached took without an error (the sentinel
        # came back alone) and whose value fits an item: memcached stored it.
        limit = max_value_len(ctx.item_size_max, len(key), args.flags)
        if len(request.data) <= limit:
            status, inferred = STORED, True
    return [
        ShadowOp(
            request.command,
            STORE,
            key,
            status,
            ctx.seen,
            mode=mode,
            flags=args.flags,
            exptime=args.exptime,
            data=request.data,
            data_len=args.length,
            cas=args.cas,
            inferred=inferred,
        )
    ]


def _too_large(
    ctx: _Context, key: bytes, mode: Mode, status: Status | None, meta: bool = False
) -> ShadowOp:
    """A value too large to buffer: memcached refused it (set, and every ms, delete too)."""
    return ShadowOp(
        ctx.request.command,
        STORE,
        key,
        status,
        ctx.seen,
        mode=mode,
        data_len=ctx.request.data_len,
        too_large_deletes=True if meta else None,
        meta=meta,
    )


def _delete(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    words = request.words
    noreply = words[-1] == b"noreply"
    valid = (
        len(words) == 2
        or (len(words) == 3 and words[2] in (b"0", b"noreply"))
        or (len(words) == 4 and words[2] == b"0" and noreply)
    )
    if not valid or len(words[1]) > KEY_MAX_LENGTH:
        return Skip(SkipReason.UNSHADOWABLE_INPUT)
    status: Status | None = None
    if not noreply:
        status = _DELETE_LINES.get(_line(reply))
        if status is None:
            return Skip(SkipReason.MEMCACHED_ERROR, (words[1],))
    return [ShadowOp(request.command, DELETE, words[1], status, ctx.seen)]


_DELETE_LINES: Final[dict[bytes, Status]] = {b"DELETED": DELETED, b"NOT_FOUND": NOT_FOUND}
_TOUCH_LINES: Final[dict[bytes, Status]] = {b"TOUCHED": TOUCHED, b"NOT_FOUND": NOT_FOUND}


def _arith(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    words = request.words
    noreply = words[-1] == b"noreply"
    if len(words) != 3 + noreply or len(words[1]) > KEY_MAX_LENGTH:
        return Skip(SkipReason.UNSHADOWABLE_INPUT)
    key = words[1]
    if not is_canonical_decimal(words[2], U64_MAX):
        return Skip(SkipReason.NON_CANONICAL, (key,))
    status: Status | None = None
    number: int | None = None
    if not noreply:
        line = _line(reply)
        if line.isdigit():
            status, number = STORED, int(line)
        elif line == b"NOT_FOUND":
            status = NOT_FOUND
        elif line == b"CLIENT_ERROR cannot increment or decrement non-numeric value":
            status = NON_NUMERIC
        else:
            return Skip(SkipReason.MEMCACHED_ERROR, (key,))
    mode = Mode(request.command)
    delta = int(words[2])
    op = ShadowOp(
        request.command, DELTA, key, status, ctx.seen, mc_number=number, mode=mode, delta=delta
    )
    return [op]


def _touch(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    words = request.words
    noreply = words[-1] == b"noreply"
    if len(words) != 3 + noreply or len(words[1]) > KEY_MAX_LENGTH:
        return Skip(SkipReason.UNSHADOWABLE_INPUT)
    exptime = canonical_int32(words[2])
    if exptime is None:
        return Skip(SkipReason.NON_CANONICAL, (words[1],))
    status: Status | None = None
    if not noreply:
        status = _TOUCH_LINES.get(_line(reply))
        if status is None:
            return Skip(SkipReason.MEMCACHED_ERROR, (words[1],))
    return [ShadowOp(request.command, TOUCH, words[1], status, ctx.seen, exptime=exptime)]


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


def _flush(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    delay = flush_delay(request.words)
    if delay is None:
        return Skip(SkipReason.MEMCACHED_ERROR)
    noreply = request.words[-1] == b"noreply"
    if not noreply and _line(reply) != b"OK":
        return Skip(SkipReason.MEMCACHED_ERROR)
    status = None if noreply else Status.OK
    return [ShadowOp(request.command, FLUSH, b"", status, ctx.seen, exptime=delay)]


# -- meta commands ----------------------------------------------------------------------------

_META_STATUS: Final[dict[str, Status]] = {
    "HD": STORED,
    "NS": NOT_STORED,
    "EX": EXISTS,
    "NF": NOT_FOUND,
}
_MS_MODES = {"S": Mode.SET, "E": Mode.ADD, "A": Mode.APPEND, "P": Mode.PREPEND, "R": Mode.REPLACE}


def _meta(request: Captured) -> MetaRequest | Skip:
    meta = parse_meta_request(request.words)
    if meta.reason is not None:
        return Skip(meta.reason, (meta.key,) if meta.key else ())
    return meta


def _meta_reply(reply: bytes, key: bytes) -> MetaReply | Skip:
    try:
        parsed = parse_meta(reply)
    except MalformedReply:
        return Skip(SkipReason.MEMCACHED_ERROR, (key,))
    if parsed.is_error:
        if parsed.line == b"CLIENT_ERROR cannot increment or decrement non-numeric value":
            return parsed
        return Skip(SkipReason.MEMCACHED_ERROR, (key,))
    return parsed


def _mg(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    if meta.ttl is not None or meta.autoviv is not None or meta.recache is not None:
        return Skip(SkipReason.META_UNEMULATED, (meta.key,))  # T changes the TTL, N/R create items
    parsed = _meta_reply(reply, meta.key)
    if isinstance(parsed, Skip):
        return parsed
    if parsed.code in ("", "EN"):  # quiet mode hides only a miss
        return [ShadowOp(request.command, READ, meta.key, MISS, ctx.seen, meta=True)]
    if parsed.code not in ("HD", "VA"):
        return Skip(SkipReason.MEMCACHED_ERROR, (meta.key,))
    returned = parsed.flags
    mc = McValue(
        int(returned["f"]) if "f" in returned else None,
        parsed.value if meta.has("v") else None,
        int(returned["c"]) if "c" in returned else None,
    )
    cas = mc.cas is not None
    return [
        ShadowOp(
            request.command, READ, meta.key, HIT, ctx.seen, mc_value=mc, want_cas=cas, meta=True
        )
    ]


def _ms(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    key = meta.key
    if meta.invalidate:
        return Skip(SkipReason.META_UNEMULATED, (key,))
    if not request.data_ok:
        return Skip(SkipReason.BAD_DATA_CHUNK)
    mode = _MS_MODES.get(meta.mode or "S")
    if mode is None:
        return Skip(SkipReason.UNSHADOWABLE_INPUT, (key,))
    status: Status | None
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
                return Skip(SkipReason.MEMCACHED_ERROR, (key,))
    if meta.cas is not None and mode in (Mode.SET, Mode.REPLACE):
        mode = Mode.CAS
    if request.data is None:
        return [_too_large(ctx, key, mode, None if status is None else TOO_LARGE, meta=True)]
    return [
        ShadowOp(
            request.command,
            STORE,
            key,
            status,
            ctx.seen,
            mode=mode,
            flags=meta.client_flags or 0,
            exptime=meta.ttl or 0,
            data=request.data,
            data_len=meta.datalen or 0,
            cas=meta.cas if mode in (Mode.CAS, Mode.APPEND, Mode.PREPEND) else None,
            too_large_deletes=True,
            meta=True,
        )
    ]


def _md(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    if meta.invalidate or meta.ttl is not None or meta.has("x"):
        return Skip(SkipReason.META_UNEMULATED, (meta.key,))
    status: Status | None
    if not reply:
        status = DELETED if meta.quiet else None
    else:
        parsed = _meta_reply(reply, meta.key)
        if isinstance(parsed, Skip):
            return parsed
        status = _MD_STATUS.get(parsed.code)
        if status is None:
            return Skip(SkipReason.MEMCACHED_ERROR, (meta.key,))
    return [
        ShadowOp(request.command, DELETE, meta.key, status, ctx.seen, cas=meta.cas, meta=True)
    ]


_MD_STATUS: Final[dict[str, Status]] = {"HD": DELETED, "NF": NOT_FOUND, "EX": EXISTS}


def _ma(ctx: _Context) -> Translation:
    request, reply = ctx.request, ctx.reply
    meta = _meta(request)
    if isinstance(meta, Skip):
        return meta
    key = meta.key
    if meta.ttl is not None and meta.autoviv is not None:
        return Skip(SkipReason.META_UNEMULATED, (key,))  # N with T: order-dependent TTL rules
    parsed = _meta_reply(reply, key)
    if isinstance(parsed, Skip):
        return parsed
    status: Status | None
    number: int | None = None
    if parsed.code == "":
        if not meta.quiet:
            return Skip(SkipReason.MEMCACHED_ERROR, (key,))
        status = STORED  # q hides only a successful update of an existing item
    elif parsed.is_error:
        status = NON_NUMERIC
    elif parsed.code in ("HD", "VA"):
        status = STORED
        if parsed.value is not None:
            number = int(parsed.value)
    else:
        status = _META_STATUS.get(parsed.code)
        if status is None:
            return Skip(SkipReason.MEMCACHED_ERROR, (key,))
    return [
        ShadowOp(
            request.command,
            DELTA,
            key,
            status,
            ctx.seen,
            mc_number=number,
            mode=Mode.DECR if meta.mode == "D" else Mode.INCR,
            delta=1 if meta.delta is None else meta.delta,
            cas=meta.cas,
            create=meta.autoviv,
            initial=meta.initial or 0,
            exptime=meta.ttl,
            meta=True,
        )
    ]


_Handler = Callable[[_Context], Translation]
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
