"""The migration readiness report: can this team switch to Redis? (GET /api/readiness)

Sans-IO: fed the shadow's cumulative figures, the history (per ramp step) and the what-if
report, it gives per command the comparisons, the mismatches and the 95% upper bound of the
mismatch rate (exact, Clopper-Pearson), noise by reason, coverage, the projections, the
halts, and one plain verdict line. `to_html` renders the same data as one self-contained
page a team can attach to a change request.
"""

from __future__ import annotations

import datetime
import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.ops.timeline import STEP_FIELDS
from proxy.shadow.stats import ShadowStats
from proxy.shadow.words import NoiseReason

CONFIDENCE = 0.95
DEFAULT_TARGET = 0.0001
"""The mismatch rate a switch tolerates by default (0.01%): ready once no mismatch is seen
and the 95% upper bound of the rate is below it (about 30,000 clean comparisons)."""
DEFAULT_MIN_TRAFFIC = 0.01
"""The share of client requests the comparisons must come from (1%). Keys are sampled, not
requests: with a skewed key mix, 1% of keys can carry 0.01% of the requests, and a verdict
on those says little about the hot keys that carry the rest."""
REDIS_EVICTED: Final = NoiseReason.REDIS_EVICTED.value  # (plain text: it names a finding)
"""The noise reason of a difference a Redis eviction caused: a capacity finding."""


@dataclass(frozen=True, slots=True)
class Counts:
    """The shadow's cumulative counts at one moment (ShadowStats's counters, copied), so
    the evidence can start from a chosen moment: counts now minus counts then."""

    comparisons: Mapping[tuple[str, str], int]  # (command, outcome)
    mismatches: Mapping[tuple[str, str], int]  # (command, kind)
    noise: Mapping[tuple[str, str], int]  # (command, reason)
    shadowed: Mapping[str, int]  # command
    dropped: Mapping[str, int]  # reason
    errors: Mapping[str, int]  # kind
    client_requests: int

    @classmethod
    def of(cls, stats: ShadowStats, client_requests: int) -> Counts:
        return cls(
            dict(stats.comparisons),
            dict(stats.mismatches),
            dict(stats.noise),
            dict(stats.shadowed),
            dict(stats.dropped),
            dict(stats.errors),
            client_requests,
        )

    def minus(self, earlier: Counts) -> Counts:
        def sub(a: Mapping[Any, int], b: Mapping[Any, int]) -> dict[Any, int]:
            return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0) > 0}

        return Counts(
            sub(self.comparisons, earlier.comparisons),
            sub(self.mismatches, earlier.mismatches),
            sub(self.noise, earlier.noise),
            sub(self.shadowed, earlier.shadowed),
            sub(self.dropped, earlier.dropped),
            sub(self.errors, earlier.errors),
            max(0, self.client_requests - earlier.client_requests),
        )


def upper_bound(mismatches: int, comparisons: int, confidence: float = CONFIDENCE) -> float | None:
    """The one-sided `confidence` upper bound of a mismatch rate seen as mismatches out of
    comparisons (exact binomial, Clopper-Pearson); None without comparisons."""
    if comparisons <= 0:
        return None
    if mismatches >= comparisons:
        return 1.0
    alpha = 1.0 - confidence
    if mismatches == 0:  # closed form: (1 - p)^n = alpha
        return 1.0 - math.pow(alpha, 1.0 / comparisons)
    if mismatches > 2000:  # the exact sum gets long; Wilson's bound is as good there
        return _wilson_upper(mismatches, comparisons, confidence)
    low, high = mismatches / comparisons, 1.0
    for _ in range(100):  # bisection: P(X <= mismatches | p) = alpha
        mid = (low + high) / 2
        if _binomial_cdf(mismatches, comparisons, mid) > alpha:
            low = mid
        else:
            high = mid
    return high


def _binomial_cdf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    total = 0.0
    for i in range(k + 1):
        log_term = log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p
        total += math.exp(log_term + (n - i) * log_q)
    return min(1.0, total)


def _wilson_upper(k: int, n: int, confidence: float) -> float:
    z = 1.6448536269514722 if confidence == CONFIDENCE else _z(confidence)
    phat = k / n
    centre = phat + z * z / (2 * n)
    spread = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def _z(confidence: float) -> float:
    low, high = 0.0, 10.0  # one-sided normal quantile by bisection
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > 1 - confidence:
            low = mid
        else:
            high = mid
    return high


def _percent(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate * 100:.4g}%"


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.3g}M"
    if n >= 10_000:
        return f"{n / 1000:.3g}k"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    minutes = round(seconds / 60)
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


def per_step(history: Mapping[str, Any], since: float = 0.0) -> list[dict[str, Any]]:
    """Figures for each period of one ramp step and sample rate, in time order: the history's
    `steps`, which cover the whole run (not only the points it still holds); those that
    began after ``since`` (the evidence's start)."""
    steps: list[dict[str, Any]] = []
    names = history.get("step_fields", STEP_FIELDS)
    for row in history.get("steps", []):
        period = dict(zip(names, row, strict=True))
        if period["from"] <= since:
            continue
        noise = period["noise"]
        comparisons = period["match"] + period["mismatch"] + noise
        requests = period.get("requests", 0)
        shadowed = period.get("shadowed", 0)
        steps.append(
            {
                "sample_rate": period["sample_rate"],
                "ramp_step": period["ramp_step"],
                "from": period["from"],
                "until": period["until"],
                "comparisons": comparisons,
                "mismatches": period["mismatch"],
                "noise": noise,
                "upper_bound": upper_bound(period["mismatch"], comparisons - noise),
                "client_requests": requests,
                "shadowed_requests": shadowed,
                "traffic_share": shadowed / requests if requests else None,
            }
        )
    return steps


def build_readiness(
    stats: ShadowStats | Counts,
    *,
    started_at: float,
    now: float,
    sample_rate: float,
    client_requests: int,
    history: Mapping[str, Any],
    halts: Iterable[Mapping[str, Any]],
    halted: Mapping[str, Any] | None,
    what_if: Mapping[str, Any],
    target: float = DEFAULT_TARGET,
    min_traffic: float = DEFAULT_MIN_TRAFFIC,
    restarted: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report as JSON-ready data. A verdict counts the comparisons that are not
    noise: noise (races, expiry, evictions, lost writes) proves nothing either way. The
    evidence runs from ``started_at`` (the start, or when an operator restarted it:
    ``restarted`` says who and why); ``stats`` are the counts since then."""
    counts = stats if isinstance(stats, Counts) else Counts.of(stats, client_requests)
    outcomes: Counter[str] = Counter()
    commands: dict[str, dict[str, Any]] = {}
    for (command, outcome), count in counts.comparisons.items():
        outcomes[outcome] += count
        row = commands.setdefault(
            command, {"command": command, "comparisons": 0, "match": 0, "mismatch": 0, "noise": 0}
        )
        row["comparisons"] += count
        row[outcome] = row.get(outcome, 0) + count
    kinds: Counter[str] = Counter()
    for (command, kind), count in counts.mismatches.items():
        kinds[kind] += count
        commands.setdefault(command, {"command": command, "comparisons": 0, "match": 0,
                                      "mismatch": 0, "noise": 0})  # fmt: skip
        commands[command].setdefault("kinds", {})[kind] = count
    noise: Counter[str] = Counter()
    for (_, reason), count in counts.noise.items():
        noise[reason] += count
    for row in commands.values():
        row["upper_bound"] = upper_bound(row["mismatch"], row["comparisons"] - row["noise"])
    mismatches = outcomes["mismatch"]
    judged = outcomes["match"] + mismatches
    bound = upper_bound(mismatches, judged)
    shadowed = sum(counts.shadowed.values())
    requests = counts.client_requests
    share = shadowed / requests if requests else None
    evicted = noise.get(REDIS_EVICTED, 0)
    halt_list = list(halts)
    blockers: list[str] = []
    if mismatches:
        shown = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
        blockers.append(f"{mismatches} mismatches ({shown}): see GET /api/mismatches")
    if evicted:
        blockers.append(_evicted_text(evicted))
    if bound is None:
        blockers.append("nothing compared yet")
    elif bound > target:
        blockers.append(
            f"not enough evidence: the 95% upper bound of the mismatch rate is "
            f"{_percent(bound)}, above the target {_percent(target)} (more comparisons, "
            "a higher sample rate or a longer period)"
        )
    if bound is not None and (share is None or share < min_traffic):
        blockers.append(
            f"too little of the traffic: the comparisons come from {_percent(share)} of the "
            f"client requests (at least {_percent(min_traffic)} needed); the sampled keys "
            f"({_percent(sample_rate)} of keys) are not the ones that carry the traffic: "
            "raise the sample rate"
        )
    if halted is not None:
        blockers.append(f"the shadow is halted ({halted.get('rule')}: {halted.get('reason')})")
    observed = _duration(max(0.0, now - started_at))
    if blockers:
        verdict = "Not ready: " + "; ".join(blockers)
    else:
        verdict = (
            f"Ready: 0 mismatches in {_count(judged)} comparisons over {observed}, "
            f"upper bound {_percent(bound)}, from {_percent(share)} of the client requests"
        )
    notes = [
        "Counts, per ramp step too, are since "
        + ("this memshadow started" if restarted is None else "the evidence was restarted")
        + (
            f" (the oldest {history['steps_dropped']} ramp periods are no longer listed)."
            if history.get("steps_dropped")
            else "."
        ),
        "Noise (races, expiry boundaries, evictions, writes lost in a Redis failover) is "
        "not evidence either way and is left out of the bounds.",
        "upper_bound: the exact one-sided 95% upper bound of the mismatch rate "
        "(Clopper-Pearson); with 0 mismatches in n comparisons it is about 3/n.",
        "Coverage: keys are sampled by a hash of the key, so the sample rate is the share of "
        "keys; the share of requests is what those keys carried, counted.",
    ]
    if evicted:
        notes.append(
            f"{REDIS_EVICTED}: differences a Redis eviction caused, one per key until it is "
            "written again; a capacity result, not a protocol mismatch."
        )
    return {
        "generated_at": now,
        "observed_since": started_at,
        "observed_for": observed,
        "evidence_restarted": dict(restarted) if restarted is not None else None,
        "ready": not blockers,
        "verdict": verdict,
        "target": target,
        "min_traffic_share": min_traffic,
        "confidence": CONFIDENCE,
        "totals": {
            "comparisons": sum(outcomes.values()),
            "judged": judged,
            "match": outcomes["match"],
            "mismatch": mismatches,
            "noise": outcomes["noise"],
            "upper_bound": bound,
        },
        "mismatch_kinds": dict(kinds),
        "noise_reasons": dict(noise.most_common()),
        "commands": sorted(commands.values(), key=lambda r: -r["comparisons"]),
        "steps": per_step(history, started_at if restarted is not None else 0.0),
        "coverage": {
            "sampled_key_fraction": sample_rate,
            "shadowed_requests": shadowed,
            "client_requests": requests,
            "traffic_share": share,
            "dropped": sum(counts.dropped.values()),
            "errors": sum(counts.errors.values()),
        },
        "capacity_findings": [
            {"finding": REDIS_EVICTED, "count": evicted, "text": _evicted_text(evicted)}
        ]
        if evicted
        else [],
        "halts": halt_list,
        "latency": what_if.get("service_time"),
        "capacity": what_if.get("capacity"),
        "notes": notes,
    }


def _evicted_text(count: int) -> str:
    return (
        f"Redis evicted {count} keys Memcached still held: this working set needs more than "
        "maxmemory (a capacity result, not a protocol mismatch)"
    )


def to_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained, printable HTML page."""
    e = html.escape

    def table(head: list[str], rows: list[list[Any]]) -> str:
        cells = "".join(f"<th>{e(h)}</th>" for h in head)
        body = "".join(
            "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"

    totals = report["totals"]
    coverage = report["coverage"]
    commands = [
        [r["command"], r["comparisons"], r["mismatch"], r["noise"], _percent(r["upper_bound"])]
        for r in report["commands"]
    ]
    steps = [
        [s["ramp_step"] or "-", _percent(s["sample_rate"]), _when(s["from"]), _when(s["until"]),
         s["comparisons"], s["mismatches"], _percent(s["upper_bound"]),
         _percent(s.get("traffic_share"))]
        for s in report["steps"]
    ]  # fmt: skip
    findings = "".join(f"<p>{e(f['text'])}.</p>" for f in report.get("capacity_findings", []))
    restarted = report.get("evidence_restarted")
    restart_note = (
        f"<p class=\"muted\">Evidence restarted by {e(str(restarted.get('source')))}: "
        f"{e(str(restarted.get('reason') or 'no reason given'))}.</p>"
        if restarted
        else ""
    )
    noise = [[reason, count] for reason, count in report["noise_reasons"].items()]
    halts = [[_when(h.get("t")), h.get("source", ""), h.get("what", "")] for h in report["halts"]]
    latency = report.get("latency") or {}
    latency_rows = [
        [name, v.get("samples"), _ms(v.get("p50")), _ms(v.get("p99"))]
        for name, v in latency.items()
        if isinstance(v, dict)
    ]
    status = "ready" if report["ready"] else "not-ready"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>memshadow readiness report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1f2328; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 15px; margin-top: 22px; }}
table {{ border-collapse: collapse; margin: 6px 0; }}
th, td {{ text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid #d0d7de; }}
.verdict {{ font-size: 16px; font-weight: 600; padding: 8px 12px; border-radius: 6px; }}
.ready {{ background: #dafbe1; }} .not-ready {{ background: #ffebe9; }}
.muted {{ color: #57606a; }}
</style></head><body>
<h1>memshadow: migration readiness report</h1>
<p class="muted">Generated {e(_when(report["generated_at"]))}, observed for
{e(report["observed_for"])} (since {e(_when(report["observed_since"]))}).</p>
<p class="verdict {status}">{e(report["verdict"])}</p>
{restart_note}
<h2>Capacity</h2>
{findings or "<p>Redis evicted no key Memcached still held.</p>"}
<h2>Totals</h2>
{
        table(
            ["comparisons", "judged (not noise)", "match", "mismatch", "noise", "95% upper bound"],
            [
                [
                    totals["comparisons"],
                    totals["judged"],
                    totals["match"],
                    totals["mismatch"],
                    totals["noise"],
                    _percent(totals["upper_bound"]),
                ]
            ],
        )
    }
<h2>By command</h2>
{table(["command", "comparisons", "mismatches", "noise", "95% upper bound"], commands)}
<h2>By ramp step</h2>
{
        table(
            ["step", "rate (keys)", "from", "until", "comparisons", "mismatches",
             "95% upper bound", "share of requests"],
            steps,
        )
    }
<h2>Noise by reason</h2>
{table(["reason", "count"], noise)}
<h2>Coverage</h2>
{
        table(
            [
                "sampled keys",
                "shadowed requests",
                "client requests",
                "traffic share",
                "dropped",
                "errors",
            ],
            [
                [
                    _percent(coverage["sampled_key_fraction"]),
                    coverage["shadowed_requests"],
                    coverage["client_requests"],
                    _percent(coverage["traffic_share"]),
                    coverage["dropped"],
                    coverage["errors"],
                ]
            ],
        )
    }
<h2>Service time, both stores measured alike</h2>
{table(["store", "samples", "p50", "p99"], latency_rows)}
<h2>Halts</h2>
{table(["time", "source", "what"], halts) if halts else "<p>none</p>"}
<h2>Notes</h2>
<ul>{"".join(f"<li>{e(note)}</li>" for note in report["notes"])}</ul>
</body></html>
"""


def _when(unix: float | None) -> str:
    if not unix:
        return "-"
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f} ms"
