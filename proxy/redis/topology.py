"""Sans-IO rules of a Redis Cluster: key slots, the slot map, redirect replies, lost writes.

Nothing here touches a socket or a clock: the cluster client (cluster.py) feeds it replies
and times. A Redis Cluster spreads keys over 16384 slots (CRC16/XMODEM of the key, or of its
`{hash tag}`); each slot belongs to one primary, whose replicas take over when it fails.
"""

from __future__ import annotations

import binascii
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

SLOTS = 16384


def key_slot(key: bytes) -> int:
    """The cluster slot of a key: CRC16/XMODEM (binascii.crc_hqx with 0 is that CRC) of the
    key, or of the part between the first `{` and the next `}` when that part is not empty."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) & (SLOTS - 1)


# Replies a cluster (or a failing-over primary) gives instead of an answer --------------------


class Redirect(NamedTuple):
    """MOVED or ASK: the slot lives (for good, or for this one command) on another node."""

    kind: str  # "moved" | "ask"
    slot: int
    host: str
    port: int


TRANSIENT = {
    "TRYAGAIN": "tryagain",  # a multi-key command during a slot migration
    "LOADING": "loading",  # the node is loading its data set
    "CLUSTERDOWN": "clusterdown",  # some slot has no reachable primary
    "MASTERDOWN": "masterdown",  # a replica lost its primary (replica-serve-stale-data no)
    "READONLY": "readonly",  # a write reached a node that is a replica now (failover)
}
"""Error replies that say "not now" rather than "no": the command was not carried out and is
worth sending again a little later. Values are the reasons drops are counted under."""

_REDIRECT_WORDS = {"MOVED": "moved", "ASK": "ask"}


def cluster_reply(message: str) -> Redirect | str | None:
    """What an error reply means to the cluster client: a Redirect, the reason of a transient
    refusal (TRANSIENT's values), or None for an ordinary error (the caller's business)."""
    word, _, rest = message.partition(" ")
    kind = _REDIRECT_WORDS.get(word)
    if kind is None:
        return TRANSIENT.get(word)
    slot, _, address = rest.partition(" ")
    host, _, port = address.strip().rpartition(":")
    if not slot.isdigit() or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Redirect(kind, int(slot), host, int(port))


def is_cluster_refusal(message: str) -> bool:
    """Cheap test, for the error path of every reply: might cluster_reply() want it?"""
    return message.split(" ", 1)[0] in _CLUSTER_WORDS


_CLUSTER_WORDS = frozenset(TRANSIENT) | frozenset(_REDIRECT_WORDS)


# The slot map ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """A node as CLUSTER SHARDS (or SLOTS) describes it. `primary` is the id of the primary
    a replica follows, None for a primary."""

    id: str
    host: str
    port: int
    primary: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(slots=True)
class SlotMap:
    """Which primary owns each slot (node ids; None: no owner), and every node known."""

    owners: list[str | None] = field(default_factory=lambda: [None] * SLOTS)
    nodes: dict[str, Node] = field(default_factory=dict)

    def primaries(self) -> list[Node]:
        """The primaries that own at least one slot."""
        owning = {owner for owner in self.owners if owner is not None}
        return [self.nodes[node_id] for node_id in sorted(owning)]

    def uncovered(self) -> int:
        return self.owners.count(None)

    def merged(self, newer: SlotMap) -> SlotMap:
        """Each slot's newest known owner: `newer`'s, or this map's where `newer` has none."""
        owners = [
            new if new is not None else old
            for old, new in zip(self.owners, newer.owners, strict=True)
        ]
        return SlotMap(owners, {**self.nodes, **newer.nodes})

    def assign(self, first: int, last: int, owner: str) -> None:
        if not 0 <= first <= last < SLOTS:
            raise ValueError(f"slot range {first}-{last} is outside 0-{SLOTS - 1}")
        self.owners[first : last + 1] = [owner] * (last - first + 1)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """A RESP2 flat [name, value, name, value...] list as a dict of text names."""
    if len(flat) % 2:
        raise ValueError(f"odd field list {flat!r}")
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _node_port(fields: dict[str, Any], tls: bool) -> int:
    port = (fields.get("tls-port") if tls else None) or fields.get("port")
    return int(port or 0)


def _node_host(fields: dict[str, Any]) -> str:
    # "endpoint" is what clients should use (cluster-preferred-endpoint-type); "?" or empty
    # means unknown, and then the ip is the best there is.
    endpoint = _text(fields.get("endpoint", b""))
    if endpoint and endpoint != "?":
        return endpoint
    return _text(fields.get("ip", b""))


def parse_shards(reply: Any, tls: bool = False) -> SlotMap:
    """CLUSTER SHARDS (Redis 7): [[b"slots", [a, b, ...], b"nodes", [[field, value...]...]]...].
    ValueError when the reply is not one."""
    try:
        return _parse_shards(reply, tls)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"CLUSTER SHARDS: malformed reply ({exc!r})") from None


def parse_slots(reply: Any) -> SlotMap:
    """CLUSTER SLOTS (before Redis 7): [[first, last, [host, port, id], [replica...]...]...].
    ValueError when the reply is not one."""
    try:
        return _parse_slots(reply)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"CLUSTER SLOTS: malformed reply ({exc!r})") from None


def _parse_shards(reply: Any, tls: bool) -> SlotMap:
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SHARDS: expected a list, got {reply!r}")
    slot_map = SlotMap()
    for shard in reply:
        fields = _pairs(shard)
        ranges = [int(n) for n in fields.get("slots", [])]
        nodes = [_pairs(raw) for raw in fields.get("nodes", [])]
        masters = [node for node in nodes if _text(node.get("role", b"")) == "master"]
        if not masters:
            continue
        # The shard's primary is its healthy master. A failed one keeps the slots until a
        # replica takes them over (as in CLUSTER SLOTS), so that the failover is seen as
        # one (failed_over); Redis 7.2 lists the failed old primary in the new one's shard.
        healthy = [node for node in masters if _text(node.get("health", b"online")) != "fail"]
        chosen = (healthy or masters)[0]
        primary = Node(_text(chosen["id"]), _node_host(chosen), _node_port(chosen, tls))
        slot_map.nodes[primary.id] = primary
        for node in nodes:
            if node is not chosen and _text(node["id"]) not in slot_map.nodes:
                replica = Node(
                    _text(node["id"]), _node_host(node), _node_port(node, tls), primary.id
                )
                slot_map.nodes[replica.id] = replica
        for i in range(0, len(ranges) - 1, 2):
            slot_map.assign(ranges[i], ranges[i + 1], primary.id)
    return slot_map


def _parse_slots(reply: Any) -> SlotMap:
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SLOTS: expected a list, got {reply!r}")
    slot_map = SlotMap()
    for entry in reply:
        first, last, *members = entry
        nodes = []
        for member in members:
            host, port = _text(member[0]), int(member[1])
            node_id = _text(member[2]) if len(member) > 2 else f"{host}:{port}"
            nodes.append((node_id, host, port))
        if not nodes:
            continue
        primary_id = nodes[0][0]
        slot_map.nodes[primary_id] = Node(primary_id, nodes[0][1], nodes[0][2])
        for node_id, host, port in nodes[1:]:
            slot_map.nodes[node_id] = Node(node_id, host, port, primary_id)
        slot_map.assign(int(first), int(last), primary_id)
    return slot_map


def failed_over(old: SlotMap, new: SlotMap) -> set[str]:
    """Primaries of `old` whose slots one of their own replicas now owns: a failover, after
    which the writes the old primary had not yet replicated are gone. A slot that moved to
    another shard's primary was migrated (MIGRATE copies keys synchronously): nothing lost."""
    if old.owners == new.owners:
        return set()
    changes = {(a, b) for a, b in zip(old.owners, new.owners, strict=True) if a != b}
    result: set[str] = set()
    for before, after in changes:
        if before is None or after is None:
            continue
        follower = old.nodes.get(after)
        if follower is not None and follower.primary == before:
            result.add(before)
    return result


# Writes that a failover may have lost ---------------------------------------------------------


class WriteLog:
    """The keys written recently, with when: a primary that fails over (or is demoted) loses
    the writes it had not replicated yet, and those keys can no longer be trusted in step.

    Bounded: once more than `capacity` writes are logged, or a write is older than twice the
    window when a new one comes, the oldest are forgotten, and a question about a period they
    covered gets None ("unknown: assume every key"). (Without the time bound a busy shadow
    held all 262,144 entries, about 35 MB, for a 10 s window: seen in the soak.)"""

    def __init__(self, window: float = 10.0, capacity: int = 262_144) -> None:
        self.window = window
        """How far back a failover may lose writes (see shadow.redis_failover_window)."""
        self._log: deque[tuple[float, bytes]] = deque(maxlen=capacity)
        self._forgot_until = float("-inf")  # the newest time forgotten for lack of room

    def __len__(self) -> int:
        return len(self._log)

    def add(self, when: float, key: bytes) -> None:
        log = self._log
        stale = when - 2 * self.window
        while log and (log[0][0] < stale or len(log) == log.maxlen):
            self._forgot_until = log.popleft()[0]
        log.append((when, key))

    def before(self, when: float) -> list[bytes] | None:
        """Keys written in the `window` seconds up to `when` (and since), or None (since)."""
        return self.since(when - self.window)

    def since(self, when: float) -> list[bytes] | None:
        """Keys written at or after `when` (each once), or None when some were forgotten."""
        if self._forgot_until >= when:
            return None
        keys: dict[bytes, None] = {}
        for written, key in reversed(self._log):
            if written < when:
                break
            keys[key] = None
        return list(keys)


def keys_of(keys: Iterable[bytes], slot_map: SlotMap, owner: str) -> list[bytes]:
    """The keys whose slot `owner` owned in `slot_map`."""
    owners = slot_map.owners
    return [key for key in keys if owners[key_slot(key)] == owner]
