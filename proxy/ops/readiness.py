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
from typing import Any

from proxy.ops.timeline import STEP_FIELDS
from proxy.shadow.stats import ShadowStats

CONFIDENCE = 0.95
DEFAULT_TARGET = 0.0001
"""The mismatch rate a switch tolerates by default (0.01%): ready once no mismatch is seen
and the 95% upper bound of the rate is below it (about 30,000 clean comparisons)."""


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


def per_step(history: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Figures for each period of one ramp step and sample rate, in time order: the history's
    `steps`, which cover the whole run (not only the points it still holds)."""
    steps: list[dict[str, Any]] = []
    names = history.get("step_fields", STEP_FIELDS)
    for row in history.get("steps", []):
        period = dict(zip(names, row, strict=True))
        noise = period["noise"]
        comparisons = period["match"] + period["mismatch"] + noise
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
            }
        )
    return steps


def build_readiness(
    stats: ShadowStats,
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
) -> dict[str, Any]:
    """The whole report as JSON-ready data. A verdict counts the comparisons that are not
    noise: noise (races, expiry, evictions, lost writes) proves nothing either way."""
    outcomes: Counter[str] = Counter()
    commands: dict[str, dict[str, Any]] = {}
    for (command, outcome), count in stats.comparisons.items():
        outcomes[outcome] += count
        row = commands.setdefault(
            command, {"command": command, "comparisons": 0, "match": 0, "mismatch": 0, "noise": 0}
        )
        row["comparisons"] += count
        row[outcome] = row.get(outcome, 0) + count
    kinds: Counter[str] = Counter()
    for (command, kind), count in stats.mismatches.items():
        kinds[kind] += count
        commands.setdefault(command, {"command": command, "comparisons": 0, "match": 0,
                                      "mismatch": 0, "noise": 0})  # fmt: skip
        commands[command].setdefault("kinds", {})[kind] = count
    noise: Counter[str] = Counter()
    for (_, reason), count in stats.noise.items():
        noise[reason] += count
    for row in commands.values():
        row["upper_bound"] = upper_bound(row["mismatch"], row["comparisons"] - row["noise"])
    mismatches = outcomes["mismatch"]
    judged = outcomes["match"] + mismatches
    bound = upper_bound(mismatches, judged)
    shadowed = sum(stats.shadowed.values())
    halt_list = list(halts)
    blockers: list[str] = []
    if mismatches:
        shown = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
        blockers.append(f"{mismatches} mismatches ({shown}): see GET /api/mismatches")
    if bound is None:
        blockers.append("nothing compared yet")
    elif bound > target:
        blockers.append(
            f"not enough evidence: the 95% upper bound of the mismatch rate is "
            f"{_percent(bound)}, above the target {_percent(target)} (more comparisons, "
            "a higher sample rate or a longer period)"
        )
    if halted is not None:
        blockers.append(f"the shadow is halted ({halted.get('rule')}: {halted.get('reason')})")
    observed = _duration(max(0.0, now - started_at))
    if blockers:
        verdict = "Not ready: " + "; ".join(blockers)
    else:
        verdict = (
            f"Ready: 0 mismatches in {_count(judged)} comparisons over {observed}, "
            f"upper bound {_percent(bound)}"
        )
    return {
        "generated_at": now,
        "observed_since": started_at,
        "observed_for": observed,
        "ready": not blockers,
        "verdict": verdict,
        "target": target,
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
        "steps": per_step(history),
        "coverage": {
            "sampled_key_fraction": sample_rate,
            "shadowed_requests": shadowed,
            "client_requests": client_requests,
            "traffic_share": shadowed / client_requests if client_requests else None,
            "dropped": sum(stats.dropped.values()),
            "errors": sum(stats.errors.values()),
        },
        "halts": halt_list,
        "latency": what_if.get("service_time"),
        "capacity": what_if.get("capacity"),
        "notes": [
            "Counts, per ramp step too, are since this memshadow started"
            + (
                f" (the oldest {history['steps_dropped']} ramp periods are no longer listed)."
                if history.get("steps_dropped")
                else "."
            ),
            "Noise (races, expiry boundaries, evictions, writes lost in a Redis failover) is "
            "not evidence either way and is left out of the bounds.",
            "upper_bound: the exact one-sided 95% upper bound of the mismatch rate "
            "(Clopper-Pearson); with 0 mismatches in n comparisons it is about 3/n.",
        ],
    }


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
         s["comparisons"], s["mismatches"], _percent(s["upper_bound"])]
        for s in report["steps"]
    ]  # fmt: skip
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
{table(["step", "rate", "from", "until", "comparisons", "mismatches", "95% upper bound"], steps)}
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
