"""The what-if report, sans-IO: from the sampled traffic, what Redis would look like at 100%.

Latency: Memcached's and Redis's on the same shadowed requests, per command. Capacity: Redis
memory and operations per second divided by the sampled key fraction. The key sample is
uniform by construction (a hash of the key against a threshold), so the number of keys Redis
holds is Binomial(all keys, rate), and the shadowed request count in a window is close to
Poisson; the intervals below are 95% intervals of those two counts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.metrics import LatencyHistogram
from proxy.ops.ramp import Z_95
from proxy.shadow.stats import ShadowStats


@dataclass(frozen=True, slots=True)
class TrafficWindow:
    """Shadow traffic over a recent stretch of time at one sample rate."""

    seconds: float
    shadowed: int  # requests handed to the shadow
    redis_commands: int  # Redis commands those requests became
    client_requests: int  # every client request, sampled or not


def _latency(hist: LatencyHistogram | None) -> dict[str, Any]:
    if hist is None or not hist.count:
        return {"samples": 0, "p50": None, "p99": None, "mean": None}
    count = hist.count
    return {
        "samples": count,
        "p50": hist.quantile(0.5),
        "p99": hist.quantile(0.99),
        "mean": hist.total / count,
    }


WAIT_UNTRUSTED = 0.02
"""Share of the time the worker may wait for a CPU before its Redis service time is not
trusted: a reply that arrives while the worker waits is read that much later, and the p99
is made of such tails."""
CPU_UNTRUSTED = 0.9
"""Share of a core the worker may use: past it, it has no slack to read replies promptly."""


def parse_commandstats(info: Mapping[str, str]) -> dict[str, tuple[int, float]]:
    """INFO commandstats: command -> (calls, microseconds in all), from fields like
    ``cmdstat_get: calls=10,usec=20,usec_per_call=2.00,...``."""
    found: dict[str, tuple[int, float]] = {}
    for name, value in info.items():
        if not name.startswith("cmdstat_"):
            continue
        fields = dict(part.partition("=")[::2] for part in value.split(","))
        try:
            found[name.removeprefix("cmdstat_")] = (int(fields["calls"]), float(fields["usec"]))
        except (KeyError, ValueError):
            continue
    return found


def parse_latencystats(info: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """INFO latencystats (Redis 7+): command -> {"p50", "p99", "p99.9"} in microseconds."""
    found: dict[str, dict[str, float]] = {}
    for name, value in info.items():
        if not name.startswith("latency_percentiles_usec_"):
            continue
        points: dict[str, float] = {}
        for part in value.split(","):
            label, _, number = part.partition("=")
            try:
                points[label.strip()] = float(number)
            except ValueError:
                continue
        found[name.removeprefix("latency_percentiles_usec_")] = points
    return found


def redis_own(
    info: Mapping[str, str] | None,
    previous: Mapping[str, tuple[int, float]] | None = None,
    seconds: float | None = None,
    top: int = 6,
) -> dict[str, Any]:
    """Redis's own account of its commands (the cross-check): per command the microseconds
    per call, over the time since ``previous`` when given (else since Redis started), and
    the server-side p99 where Redis keeps one. The busiest commands first."""
    if info is None:
        return {"available": False, "commands": []}
    now = parse_commandstats(info)
    latency = parse_latencystats(info)
    rows: list[dict[str, Any]] = []
    for command, (calls, usec) in now.items():
        base_calls, base_usec = (previous or {}).get(command, (0, 0.0))
        if previous is not None and calls >= base_calls:
            calls, usec = calls - base_calls, usec - base_usec
        if calls <= 0:
            continue
        rows.append(
            {
                "command": command,
                "calls": calls,
                "usec_per_call": usec / calls,
                "p99_usec": latency.get(command, {}).get("p99"),
            }
        )
    rows.sort(key=lambda row: -row["calls"])
    return {
        "available": bool(now),
        "over_seconds": seconds if previous is not None else None,
        "commands": rows[:top],
        "note": "INFO commandstats and latencystats: time inside Redis, without the network "
        "or the client; for the whole Redis instance, not only the shadow's database",
    }


def trust(service: Mapping[str, Any], worker: Mapping[str, Any] | None,
          own: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Can Redis's service time as the shadow measured it be believed? Not when the worker
    that measured it was short of CPU: it then read replies late. Says so in one sentence,
    with Redis's own figures beside it."""
    own_rows = own.get("commands") or []
    own_text = ", ".join(
        f"{row['command'].upper()} {row['usec_per_call']:.3g} µs" for row in own_rows[:3]
    )
    own_sentence = (
        f" Redis itself reports {own_text} per call (INFO commandstats)." if own_text else ""
    )
    if worker is None:
        return {
            "trustworthy": None,
            "sentence": "The shadow worker's CPU is not known yet (it is read from /proc every "
            f"10 s), so this figure cannot be checked.{own_sentence}",
        }
    cpu, wait = worker["cpu_share"], worker.get("wait_share")
    load = f"used {cpu:.0%} of a core"
    if wait is not None:
        load += f" and waited for a CPU {wait:.1%} of the time"
    load += f" over the last {worker['seconds']:.0f} s"
    starved = (wait is not None and wait >= WAIT_UNTRUSTED) or cpu >= CPU_UNTRUSTED
    if starved:
        sentence = (
            f"Not trustworthy: the shadow worker {load}, so Redis's replies waited to be "
            "read and the service time above includes that wait: it blames Redis for the "
            f"shadow's own CPU starvation.{own_sentence} Lower the sample rate, give the "
            "worker a core of its own, or judge Redis by its own figures."
        )
    else:
        sentence = (
            f"Trustworthy: the shadow worker {load}, so replies were read as they came: "
            f"Redis's service time is Redis's own plus the network.{own_sentence}"
        )
    return {"trustworthy": not starved, "sentence": sentence}


def service_times(
    stats: ShadowStats,
    *,
    worker: Mapping[str, Any] | None = None,
    own: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Both stores' service time measured the same way (the write that carried a request to
    the read that brought its reply, on the store's connection), and the shadow's own delay
    before Redis, apart: what Redis would cost a client, and what memshadow adds. Beside
    it: the worker's saturation, Redis's own figures, and whether to trust the figure."""
    memcached = LatencyHistogram()  # every command's together
    for hist in stats.memcached_latency.values():
        for index, count in enumerate(hist.buckets):
            memcached.buckets[index] += count
        memcached.total += hist.total
    both = {"memcached": _latency(memcached), "redis": _latency(stats.redis_service)}
    ratio = None
    if both["memcached"]["p99"] and both["redis"]["p99"] is not None:
        ratio = both["redis"]["p99"] / both["memcached"]["p99"]
    own_figures = dict(own) if own is not None else redis_own(None)
    return {
        **both,
        "p99_ratio": ratio,
        "worker": dict(worker) if worker is not None else None,
        "redis_own": own_figures,
        "trust": trust(both["redis"], worker, own_figures),
        "shadow_queueing": _latency(stats.queueing),
        "note": "service time: from the write that carried a request to the read that brought "
        "its reply, on the store's own connection (Memcached: the client path's requests that "
        "were shadowed; Redis: every shadow command). Neither includes memshadow's queueing, "
        "shown apart as shadow_queueing: from Memcached's reply to the start of the replay.",
    }


def latency_table(stats: ShadowStats) -> list[dict[str, Any]]:
    """Per command, both stores' latency (seconds) on the same requests since start."""
    commands = sorted({*stats.memcached_latency, *stats.redis_latency})
    rows = []
    for command in commands:
        memcached = _latency(stats.memcached_latency.get(command))
        redis = _latency(stats.redis_latency.get(command))
        ratio = None
        if memcached["p99"] and redis["p99"] is not None:
            ratio = redis["p99"] / memcached["p99"]
        rows.append(
            {"command": command, "memcached": memcached, "redis": redis, "p99_ratio": ratio}
        )
    return rows


def poisson_interval(count: int, z: float = Z_95) -> tuple[float, float]:
    """Score interval for a Poisson mean given one observed count (sound at zero too)."""
    centre = count + z * z / 2
    spread = z * math.sqrt(count + z * z / 4)
    return max(0.0, centre - spread), centre + spread


def key_count_interval(sampled: int, rate: float, z: float = Z_95) -> tuple[float, float, float]:
    """All keys, estimated from ``sampled`` keys seen at key fraction ``rate``:
    (estimate, low, high). sampled ~ Binomial(N, rate), so sd(sampled) ~ sqrt(sampled(1-rate)).
    The low end is never below what is already seen."""
    estimate = sampled / rate
    spread = z * math.sqrt(sampled * (1 - rate)) / rate
    return estimate, max(float(sampled), estimate - spread), estimate + spread


def parse_keyspace(value: str) -> dict[str, int]:
    """INFO keyspace's ``keys=3,expires=0,avg_ttl=0`` as a dict."""
    fields: dict[str, int] = {}
    for part in value.split(","):
        name, _, number = part.partition("=")
        if number.strip().isdigit():
            fields[name.strip()] = int(number)
    return fields


def merge_info(parts: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """INFO fields of several primaries (a Redis Cluster) as one server's: memory and
    keyspace counts summed, anything else as the first primary says."""
    merged: dict[str, str] = dict(parts[0]) if parts else {}
    for name in ("used_memory", "used_memory_startup"):
        values = [int(part[name]) for part in parts if part.get(name, "").isdigit()]
        if values:
            merged[name] = str(sum(values))
    databases = {name for part in parts for name in part if re.fullmatch(r"db\d+", name)}
    for name in databases:
        totals: dict[str, int] = {}
        for part in parts:
            for field, number in parse_keyspace(part.get(name, "")).items():
                totals[field] = totals.get(field, 0) + number
        merged[name] = ",".join(f"{field}={number}" for field, number in totals.items())
    commands: dict[str, tuple[int, float]] = {}
    for part in parts:
        for command, (calls, usec) in parse_commandstats(part).items():
            known = commands.get(command, (0, 0.0))
            commands[command] = (known[0] + calls, known[1] + usec)
    for command, (calls, usec) in commands.items():
        merged[f"cmdstat_{command}"] = f"calls={calls},usec={usec:g}"
    return merged


def memory_projection(info: Mapping[str, str], rate: float, db: int) -> dict[str, Any]:
    """Redis memory at 100% from INFO memory/keyspace at key fraction ``rate``."""
    used = int(info["used_memory"])
    startup = int(info.get("used_memory_startup", "0"))
    keys = parse_keyspace(info.get(f"db{db}", "")).get("keys", 0)
    result: dict[str, Any] = {
        "used_memory_bytes": used,
        "startup_memory_bytes": startup,
        "keys": keys,
        "db": db,
    }
    if keys == 0:
        result.update(estimate_bytes=None, low_bytes=None, high_bytes=None)
        result["note"] = f"no keys in Redis db {db} yet: nothing to extrapolate"
        return result
    data = max(0, used - startup)
    per_key = data / keys
    estimate, low, high = key_count_interval(keys, rate)
    result.update(
        bytes_per_key=per_key,
        projected_keys=estimate,
        projected_keys_low=low,
        projected_keys_high=high,
        estimate_bytes=startup + per_key * estimate,
        low_bytes=startup + per_key * low,
        high_bytes=startup + per_key * high,
        note="interval covers the key-count sampling; it assumes the sampled keys' mean "
        "size holds for all keys, and counts only keys written since shadowing began",
    )
    return result


def ops_projection(window: TrafficWindow, rate: float) -> dict[str, Any]:
    """Shadowed operations per second at 100% of keys."""
    seconds = window.seconds
    low_count, high_count = poisson_interval(window.shadowed)
    per_request = window.redis_commands / window.shadowed if window.shadowed else None
    estimate = window.shadowed / seconds / rate
    result: dict[str, Any] = {
        "window_seconds": seconds,
        "shadowed_requests": window.shadowed,
        "shadowed_per_second": window.shadowed / seconds,
        "estimate_per_second": estimate,
        "low_per_second": low_count / seconds / rate,
        "high_per_second": high_count / seconds / rate,
        "client_requests_per_second": window.client_requests / seconds,
        "redis_commands_per_request": per_request,
        "redis_commands_per_second_estimate": (
            estimate * per_request if per_request is not None else None
        ),
        "note": "interval covers the count of sampled requests; hot keys add spread it cannot "
        "see: compare with client_requests_per_second, which counts every key",
    }
    return result


def build_report(
    stats: ShadowStats,
    *,
    sample_rate: float,
    window: TrafficWindow | None,
    redis_info: Mapping[str, str] | None,
    redis_error: str | None = None,
    db: int = 0,
    now: float,
    worker: Mapping[str, Any] | None = None,
    own: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report as JSON-ready data."""
    capacity: dict[str, Any] = {"sample_rate": sample_rate}
    if sample_rate <= 0:
        capacity["note"] = "the sample rate is 0: nothing to extrapolate from"
    else:
        if redis_info is not None:
            try:
                capacity["memory"] = memory_projection(redis_info, sample_rate, db)
            except (KeyError, ValueError) as exc:
                capacity["memory"] = {"error": f"INFO reply lacks a usable field: {exc}"}
        else:
            capacity["memory"] = {"error": redis_error or "Redis INFO is not available"}
        if window is not None and window.seconds > 0:
            capacity["ops"] = ops_projection(window, sample_rate)
        else:
            capacity["ops"] = {"error": "not enough traffic history at this sample rate yet"}
    return {
        "generated_at": now,
        "service_time": service_times(stats, worker=worker, own=own),
        "latency": latency_table(stats),
        "latency_note": "seconds; both stores on the same shadowed requests since start; "
        "Redis's figure is the round trip as the shadow saw it (the command queued to its "
        "verdict-ready reply, so it includes the shadow's batching and its own work on "
        "earlier replies): compare service_time for what Redis itself costs; quantiles "
        "interpolated within histogram buckets",
        "capacity": capacity,
    }
