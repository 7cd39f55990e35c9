"""memshadow benchmark: memcached, twemproxy, a bare relay and memshadow under three loads.

All targets sit in front of the SAME memcached (started here on a free loopback port).
Each target is measured under each load (--modes):
  saturated  memcaslap, 16 connections, unthrottled: every target at its own maximum, with a
             paced latency prober alongside;
  fixed      bench/loadgen.py, open loop at --fixed-rate requests/s on 16 connections (below
             every target's saturation): every target does the same work;
  single     memcaslap, one connection, closed loop: no batching at all, the pure cost of one
             request.
For R rounds, every (target, load) pair is measured once in a shuffled order (a short warm-up
of the same load first). The figure that counts is CPU per request of the target's own
processes (/proc: the proxy and its shadow worker). Per target we report the median over
rounds; ratios are computed per round (paired, same round = same machine conditions) and
summarised by their median. --compiled-python runs every memshadow target twice: on the
interpreter running this script (`make bench`: .venv, the sources, pure Python) and on the
compiled build's (NAME-mypyc). --tree NAME=PATH runs every memshadow target also on the sources
at PATH (another checkout: a git worktree of an earlier commit), pure Python on this
interpreter, as TARGET@NAME: the CPU of two versions of the code from one run, paired per round.

Usage:
    python bench/run.py [--rounds 5] [--seconds 10] [--targets direct,relay,...]
                        [--modes saturated,fixed,single] [--fixed-rate 5000]
                        [--compiled-python .venv-compiled/bin/python]
                        [--tree before=/path/to/an/earlier/checkout]
                        [--variant 'NAME=EXTRA MEMSHADOW ARGS'] [--json [PATH]]

See bench/README.md for what is measured and how to read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    HOST,
    Processes,
    Samples,
    affinity_preexec,
    bucket_quantile,
    cpu_seconds,
    free_port,
    histogram_buckets,
    log_tail,
    metric_total,
    parse_cpus,
    scrape,
    wait_ready,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHADOW_SETTLE = 1.0  # seconds after a run before memshadow's shadow figures are scraped

BUILTIN_TARGETS = ("direct", "nutcracker", "relay", "memshadow")
SATURATED, FIXED, SINGLE = "saturated", "fixed", "single"
MODES = (SATURATED, FIXED, SINGLE)
COMPILED_SUFFIX = "-mypyc"  # the compiled build's twin of a memshadow target
TREE_MARK = "@"  # TARGET@NAME: a memshadow target on the sources of --tree NAME=PATH
# The halt rules off in the bench's configs: a saturated run on a shared machine trips them
# (drops, Redis timeouts), and a halted shadow would be measured as rate 0 in every later run
# of that target (seen: rate 1 in process mode shadowed nothing after its first run).
BENCH_GUARDS = "  guards:\n" + "".join(
    f"    {rule}:\n      enabled: false\n" for rule in ("mismatch", "errors", "drops", "latency")
)
# memshadow with a shadow configured, at each rate of a ramp, in both worker modes; the
# targets `make bench` runs unless --variant names others. `memshadow` alone has no shadow.
DEFAULT_VARIANTS = tuple(
    (f"rate{rate}{suffix}", ["--config", config, "--redis", "{redis_url}", "--sample-rate", rate])
    for suffix, config in (("", "{process_config}"), ("-inline", "{inline_config}"))
    for rate in ("0", "0.01", "1")
)


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    kind: str  # direct | nutcracker | relay | memshadow
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    status: str = "pending"  # ok | skipped | died
    reason: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    argv: list[str] = field(default_factory=list)
    admin_port: int = 0  # memshadow targets: where /metrics is scraped
    cpu_pid: int = 0  # whose CPU is the target's (direct: memcached's)
    python: str = ""  # memshadow targets: the interpreter ("": this one, the sources)
    build: str = ""  # memshadow targets: "pure" or "compiled", checked at start
    tree: str = ""  # pure memshadow targets: the sources they run ("": this checkout's)


def nutcracker_config(path: Path, listen: int, memcached: int) -> None:
    path.write_text(
        "bench:\n"
        f"  listen: {HOST}:{listen}\n"
        "  hash: fnv1a_64\n"
        "  distribution: ketama\n"
        "  timeout: 4000\n"
        "  auto_eject_hosts: false\n"
        "  preconnect: true\n"
        "  server_connections: 1\n"
        "  servers:\n"
        f"    - {HOST}:{memcached}:1\n"
    )


def substitute(arg: str, values: dict[str, str]) -> str:
    for key, val in values.items():
        arg = arg.replace("{" + key + "}", val)
    return arg


def target_argv(t: Target, mc_port: int, workdir: Path, subst: dict[str, str]) -> list[str]:
    if t.kind == "nutcracker":
        conf = workdir / f"{t.name}.yml"
        nutcracker_config(conf, t.port, mc_port)
        exe = shutil.which("nutcracker") or "/usr/sbin/nutcracker"
        stats_port = free_port()
        return [exe, "-c", str(conf), "-s", str(stats_port), "-a", HOST, "-v", "4"]
    if t.kind == "relay":
        return [
            sys.executable, str(BENCH_DIR / "relay.py"),
            "--listen", f"{HOST}:{t.port}", "--upstream", f"{HOST}:{mc_port}",
        ]  # fmt: skip
    if t.kind == "memshadow":
        t.admin_port = free_port()
        return [
            t.python or sys.executable, "-m", "proxy",
            "--listen", f"{HOST}:{t.port}",
            "--memcached", f"{HOST}:{mc_port}",
            "--admin", f"{HOST}:{t.admin_port}",
            *(substitute(a, subst) for a in t.extra_args),
        ]  # fmt: skip
    raise ValueError(t.kind)


def start_target(t: Target, procs: Processes, mc_port: int, workdir: Path,
                 subst: dict[str, str], cpus: set[int] | None, timeout: float) -> None:  # fmt: skip
    if t.kind == "direct":
        t.port, t.status = mc_port, "ok"
        return
    t.port = free_port()
    try:
        t.argv = target_argv(t, mc_port, workdir, subst)
        if t.build == "compiled":
            # Its own installed package: neither the sources' directory nor PYTHONPATH.
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            cwd = workdir
        else:  # the sources, found first (`-m proxy` from their directory)
            cwd = Path(t.tree) if t.tree else REPO_ROOT
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (str(cwd), os.environ.get("PYTHONPATH", "")) if p))  # fmt: skip
        t.proc, t.log = procs.start(t.name, t.argv, cpus=cpus, cwd=cwd, env=env)
        t.cpu_pid = t.proc.pid
    except OSError as exc:
        t.status, t.reason = "skipped", f"cannot start: {exc}"
        return
    why = wait_ready(t.proc, t.port, b"version\r\n", b"VERSION ", timeout)
    if why is None and t.build:
        # The start line says which build runs (proxy/buildinfo.py): never measure the other.
        said = t.log.read_text(errors="replace") if t.log else ""
        wanted = "compiled with mypyc" if t.build == "compiled" else "pure Python"
        if wanted not in said:
            why = f"does not run the {t.build} build (its log has no {wanted!r})"
    if why is None:
        t.status = "ok"
        return
    tail = log_tail(t.log)
    t.status, t.reason = "skipped", why + (f"; log: {tail}" if tail else "")
    Processes.kill_group(t.proc)


# --------------------------------------------------------------------------- memcaslap


def memcaslap_config(path: Path, key_size: int, value_size: int, get_ratio: float) -> None:
    # Format: see `man memcaslap`, section CONFIGURATION FILE. cmd 0 = set, 1 = get.
    path.write_text(
        "key\n"
        f"{key_size} {key_size} 1\n"
        "value\n"
        f"{value_size} {value_size} 1\n"
        "cmd\n"
        f"0 {1 - get_ratio:.3f}\n"
        f"1 {get_ratio:.3f}\n"
    )


_RUN_LINE = re.compile(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)")
_BLOCK = re.compile(
    r"^(Get|Set|Total) Statistics \((\d+) events\)\n(.*?)(?:\n\s*\n|\Z)", re.M | re.S
)
_FIELD = re.compile(r"^\s*(Min|Max|Avg|Geo|Std):\s+([\d.]+)", re.M)
_DIST_ROW = re.compile(r"^\s*(\d+):((?:[ \t]+\d+)+)[ \t]*$", re.M)
_COUNTER = re.compile(r"^(cmd_get|cmd_set|get_misses): (\d+)", re.M)


def parse_memcaslap(out: str) -> dict[str, Any]:
    """Parse the end-of-run summary memcaslap prints (needs --stat_freq for the histograms)."""
    m = _RUN_LINE.search(out)
    if not m:
        raise ValueError("no 'Run time: ... TPS:' line in memcaslap output")
    run_time, ops = float(m.group(1)), int(m.group(2))
    res: dict[str, Any] = {
        "run_time_s": run_time,
        "ops": ops,
        "tps": ops / run_time if run_time > 0 else float(m.group(3)),
        "tps_reported": int(m.group(3)),
    }
    res.update({k: int(v) for k, v in _COUNTER.findall(out)})
    for kind, events, body in _BLOCK.findall(out):
        block: dict[str, Any] = {"events": int(events)}
        block.update({k.lower(): float(v) for k, v in _FIELD.findall(body)})
        dist: dict[int, int] = {}
        for start, values in _DIST_ROW.findall(body.split("Log2 Dist:", 1)[-1]):
            for i, v in enumerate(values.split()):
                dist[int(start) + i] = int(v)
        block["log2_dist"] = dist
        block["p50_log2"] = log2_percentile(dist, 50)
        block["p99_log2"] = log2_percentile(dist, 99)
        res[kind.lower()] = block
    return res


def log2_percentile(dist: dict[int, int], q: float) -> float | None:
    """Percentile from memcaslap's Log2 histogram.

    memcaslap (ms_stats.c, ms_local_log2) counts a latency v (integer µs) in bucket
    i = the smallest i with 2**i >= v, i.e. bucket i holds (2**(i-1), 2**i] µs.
    We interpolate geometrically inside the bucket, so the result is only good to
    within a factor of 2 (the bucket width).
    """
    total = sum(dist.values())
    if total == 0:
        return None
    rank = total * q / 100.0
    cum = 0
    for i in sorted(dist):
        n = dist[i]
        if n and cum + n >= rank:
            frac = float(rank - cum) / n
            if i == 0:
                return frac
            lo = 2.0 ** (i - 1)
            return lo * math.pow(2.0, frac)
        cum += n
    return None


@dataclass
class LoadSpec:
    memcaslap: str
    cfg: Path
    concurrency: int
    threads: int
    tps: int
    probe_rate: float
    probe_cpus: set[int] | None
    probe_rt: int
    value_size: int
    key_size: int = 32
    get_ratio: float = 0.9
    fixed_rate: float = 5000.0
    keys: int = 10000


def run_memcaslap(
    spec: LoadSpec, port: int, seconds: int, concurrency: int | None = None
) -> tuple[int, str]:
    argv = [
        spec.memcaslap,
        f"--servers={HOST}:{port}",
        f"--concurrency={concurrency or spec.concurrency}",
        f"--threads={spec.threads}",
        f"--time={seconds}s",
        f"--cfg_cmd={spec.cfg}",
        "--division=1",  # single-key get
        f"--stat_freq={seconds}s",  # needed for the Log2 latency histograms at exit
    ]
    if spec.tps > 0 and concurrency is None:
        # memcaslap wants a k/m suffix ("--tps=5000" is refused); whole thousands are exact.
        argv.append(f"--tps={max(1, round(spec.tps / 1000))}k")
    code, out, _ = run_tool("memcaslap", argv, seconds + 30, merge_stderr=True)
    return code, out


def run_tool(
    name: str, argv: list[str], timeout: float, *, merge_stderr: bool
) -> tuple[int, str, str]:
    """Run a load generator in a process group of its own, killed after `timeout` seconds:
    (exit code, -9 when killed; its stdout; its stderr, or "" when merged into stdout)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    killed = ""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Processes.kill_group(proc)
        out, err = proc.communicate()
        killed = f"\n[killed: {name} timed out]"
    finally:
        Processes.kill_group(proc, timeout=1)
    text, errors = out.decode(errors="replace"), (err or b"").decode(errors="replace")
    if killed:
        return -9, text + killed, errors + killed
    return proc.returncode, text, errors


def run_loadgen(spec: LoadSpec, port: int, seconds: float, prefill: bool) -> tuple[int, str]:
    """bench/loadgen.py at the fixed rate: (exit code, its JSON or what went wrong)."""
    argv = [
        sys.executable, str(BENCH_DIR / "loadgen.py"), "--target", f"{HOST}:{port}",
        "--rate", str(spec.fixed_rate), "--seconds", str(seconds),
        "--connections", str(spec.concurrency), "--keys", str(spec.keys),
        "--key-size", str(spec.key_size), "--value-size", str(spec.value_size),
        "--get-ratio", str(spec.get_ratio), *(["--prefill"] if prefill else []),
    ]  # fmt: skip
    code, out, err = run_tool("loadgen", argv, seconds + 60, merge_stderr=False)
    return code, out if out.strip() and code != -9 else err


def run_load(spec: LoadSpec, mode: str, port: int, seconds: int, warmup: bool) -> tuple[int, str]:
    if mode == FIXED:
        return run_loadgen(spec, port, seconds, prefill=warmup)
    return run_memcaslap(spec, port, seconds, 1 if mode == SINGLE else None)


def shadow_figures(before: Samples, after: Samples) -> dict[str, float | None]:
    """What the shadow did during one measured run (differences of two scrapes)."""

    def delta(name: str, label: str = "") -> float:
        return metric_total(after, name, label) - metric_total(before, name, label)

    shadowed = delta("memshadow_shadow_requests_total")
    lag_before = histogram_buckets(before, "memshadow_shadow_lag_seconds")
    lag = {
        bound: n - lag_before.get(bound, 0.0)
        for bound, n in histogram_buckets(after, "memshadow_shadow_lag_seconds").items()
    }
    return {
        "client_requests": delta("memshadow_requests_total"),
        "shadowed": shadowed,
        "dropped": delta("memshadow_shadow_dropped_total"),
        "compared": delta("memshadow_shadow_comparisons_total"),
        "mismatches": delta("memshadow_shadow_comparisons_total", 'outcome="mismatch"'),
        "redis_commands": delta("memshadow_shadow_redis_commands_total"),
        "lag_p50": bucket_quantile(lag, 0.5),
        "lag_p99": bucket_quantile(lag, 0.99),
    }


def measure(
    spec: LoadSpec, t: Target, seconds: int, warmup: int, mode: str = SATURATED
) -> dict[str, Any]:
    sample: dict[str, Any] = {"target": t.name, "mode": mode}
    # The fixed load's warm-up stores every key (--prefill), so that its gets find values.
    if warmup > 0 or mode == FIXED:
        rc, out = run_load(spec, mode, t.port, max(warmup, 1), warmup=True)
        if rc != 0 and mode != FIXED:
            sample["error"] = f"warm-up rc={rc}: {out.strip()[-300:]}"
            return sample
    before: Samples | None = None
    if t.admin_port:
        with contextlib.suppress(OSError):
            before = scrape(t.admin_port)
    probe = None
    if mode == SATURATED:
        probe = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "probe.py"), "--target", f"{HOST}:{t.port}",
             "--rate", str(spec.probe_rate), "--value-size", str(spec.value_size),
             "--max-seconds", str(seconds + 30), "--realtime", str(spec.probe_rt)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=affinity_preexec(spec.probe_cpus),
        )  # fmt: skip
    cpu_before = cpu_seconds(t.cpu_pid) if t.cpu_pid else None
    try:
        rc, out = run_load(spec, mode, t.port, seconds, warmup=False)
    finally:
        if probe is not None:
            with contextlib.suppress(ProcessLookupError):
                probe.send_signal(signal.SIGTERM)
            try:
                pout, perr = probe.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                Processes.kill_group(probe)
                pout, perr = probe.communicate()
            try:
                sample["probe"] = json.loads(pout.decode())
            except ValueError:
                sample["probe"] = {"n": 0, "errors": [perr.decode(errors="replace")[-300:]]}
    if before is not None:
        time.sleep(SHADOW_SETTLE)  # verdicts still on their way count for this run
        with contextlib.suppress(OSError):
            figures = shadow_figures(before, scrape(t.admin_port))
            if figures["shadowed"]:
                sample["shadow"] = figures
    if cpu_before is not None:
        # After the settle: the shadow's verdicts on this run's requests are its cost too.
        own, below = cpu_seconds(t.cpu_pid)
        sample["cpu"] = {"own": own - cpu_before[0], "children": below - cpu_before[1]}
    if mode == FIXED:
        # Errors and unanswered requests are figures of the run (exit code 1), not a failure.
        try:
            sample["loadgen"] = json.loads(out)
        except ValueError:
            sample["error"] = f"loadgen rc={rc}: {out.strip()[-300:]}"
        return sample
    if rc != 0:
        sample["error"] = f"memcaslap rc={rc}: {out.strip()[-300:]}"
        return sample
    try:
        sample["memcaslap"] = parse_memcaslap(out)
    except ValueError as exc:
        sample["error"] = f"{exc}: {out.strip()[-300:]}"
    return sample


# --------------------------------------------------------------------------- statistics


def med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def sample_metrics(s: dict[str, Any]) -> dict[str, float | None]:
    if "error" in s:
        return {}
    shadow = s.get("shadow") or {}
    shadowed = shadow.get("shadowed") or 0
    shadow_metrics: dict[str, float | None] = {
        "dropped_pct": 100 * shadow["dropped"] / shadowed if shadowed else None,
        "lag_p99": shadow.get("lag_p99"),
        "redis_per_req": shadow["redis_commands"] / shadowed if shadowed else None,
        "shadowed": shadowed or None,
        "mismatches": shadow.get("mismatches"),
    }
    if "loadgen" in s:
        lg = s["loadgen"]
        return {
            **cpu_per_request(s.get("cpu"), lg["answered"]),
            **shadow_metrics,
            "tps": lg["achieved_rate"],
            "achieved_pct": 100 * lg["achieved_rate"] / lg["offered_rate"],
            "errors": lg["errors"] + lg["unanswered"],
            "p50": lg["p50"],
            "p99": lg["p99"],
            "service_p99": lg["service_p99"],
            "send_lag_p99": lg["send_lag_p99"],
        }
    mc = s["memcaslap"]
    total = mc.get("total", {})
    probe = s.get("probe", {})
    return {
        **cpu_per_request(s.get("cpu"), mc["ops"] + (probe.get("n") or 0)),
        **shadow_metrics,
        "tps": mc["tps"],
        "p50": probe.get("p50"),
        "p99": probe.get("p99"),
        "mc_avg": total.get("avg"),
        "mc_p50_log2": total.get("p50_log2"),
        "mc_p99_log2": total.get("p99_log2"),
    }


def cpu_per_request(cpu: dict[str, float] | None, requests: int) -> dict[str, float | None]:
    """µs of CPU per request served (memcaslap's and the prober's): the target's processes
    together, its main process, and its child processes (memshadow's shadow worker)."""
    if not cpu or not requests:
        return dict.fromkeys(CPU_KEYS)
    return {
        "cpu_us": (cpu["own"] + cpu["children"]) / requests * 1e6,
        "cpu_main_us": cpu["own"] / requests * 1e6,
        "cpu_worker_us": cpu["children"] / requests * 1e6,
    }


Round = dict[str, dict[str, float | None]]  # target -> metric -> value, for one round


SHADOW_KEYS = ("shadowed", "dropped_pct", "lag_p99", "redis_per_req", "mismatches")
CPU_KEYS = ("cpu_us", "cpu_main_us", "cpu_worker_us")
FIXED_KEYS = ("achieved_pct", "errors", "service_p99", "send_lag_p99")


def summarize(
    rounds: list[list[dict[str, Any]]], names: list[str], baseline: str | None = None
) -> dict[str, Any]:
    per_target: dict[str, dict[str, Any]] = {}
    by_round: list[Round] = [{s["target"]: sample_metrics(s) for s in rnd} for rnd in rounds]
    for name in names:
        ms = [r[name] for r in by_round if r.get(name)]
        entry: dict[str, Any] = {"rounds_ok": len(ms)}
        for key in ("tps", "p50", "p99", "mc_avg", "mc_p50_log2", "mc_p99_log2", *SHADOW_KEYS,
                    *CPU_KEYS, *FIXED_KEYS):  # fmt: skip
            vals = [m.get(key) for m in ms]
            entry[key] = med(vals)
            clean = [v for v in vals if v is not None]
            entry[key + "_range"] = [min(clean), max(clean)] if clean else None
        per_target[name] = entry

    def paired(fn: Callable[[Round], float | None]) -> dict[str, Any]:
        vals: list[float] = []
        for r in by_round:
            with contextlib.suppress(KeyError, ZeroDivisionError):
                v = fn(r)
                if v is not None:
                    vals.append(v)
        return {
            "median": statistics.median(vals) if vals else None,
            "min": min(vals) if vals else None,
            "max": max(vals) if vals else None,
            "per_round": vals,
        }

    def get(r: Round, name: str, key: str) -> float:
        v = r[name][key]  # KeyError: target failed in this round
        if v is None:
            raise KeyError(key)
        return v

    def tps_ratio(name: str, base: str) -> Callable[[Round], float | None]:
        return lambda r: get(r, name, "tps") / get(r, base, "tps")

    def added(name: str, key: str) -> Callable[[Round], float | None]:
        return lambda r: get(r, name, key) - get(r, "direct", key)

    def added_ratio(name: str, key: str) -> Callable[[Round], float | None]:
        def fn(r: Round) -> float | None:
            base = get(r, "relay", key) - get(r, "direct", key)
            return (get(r, name, key) - get(r, "direct", key)) / base if base > 0 else None

        return fn

    ratios: dict[str, Any] = {}
    for name in names:
        if name in ("direct", "relay"):
            continue
        ratios[name] = {
            "tps_vs_relay": paired(tps_ratio(name, "relay")),
            "tps_vs_direct": paired(tps_ratio(name, "direct")),
            "added_p99_us": paired(added(name, "p99")),
            "added_p99_vs_relay": paired(added_ratio(name, "p99")),
            "added_p50_vs_relay": paired(added_ratio(name, "p50")),
            "added_mc_avg_vs_relay": paired(added_ratio(name, "mc_avg")),
        }
    def cpu_ratio(name: str, base: str) -> dict[str, Any]:
        """Per-round ratios of `name`'s CPU per request to `base`'s."""
        return paired(lambda r: get(r, name, "cpu_us") / get(r, base, "cpu_us"))

    cpu_vs_relay = {name: cpu_ratio(name, "relay") for name in names if "relay" in names}
    vs_baseline: dict[str, Any] = {}
    if baseline in names:
        vs_baseline = {name: paired(tps_ratio(name, baseline)) for name in names}
    if "relay" in names:
        ratios["relay"] = {
            "tps_vs_direct": paired(tps_ratio("relay", "direct")),
            "added_p99_us": paired(added("relay", "p99")),
        }
    compiled_vs_pure = {
        name: cpu_ratio(name + COMPILED_SUFFIX, name)
        for name in names
        if name + COMPILED_SUFFIX in names
    }
    # this checkout / another's (--tree): below 1, this checkout costs less CPU a request
    this_vs_tree = {
        twin: cpu_ratio(name, twin)
        for twin in names
        if TREE_MARK in twin and (name := twin.split(TREE_MARK)[0]) in names
    }
    return {
        "targets": per_target,
        "compiled_vs_pure": compiled_vs_pure,
        "this_vs_tree": this_vs_tree,
        "goals": cpu_goals(names, per_target, paired, get),
        "cpu_vs_relay": cpu_vs_relay,
        "ratios": ratios,
        "baseline": baseline,
        "vs_baseline": vs_baseline,
    }


def cpu_goals(
    names: list[str],
    per_target: dict[str, dict[str, Any]],
    paired: Callable[[Callable[[Round], float | None]], dict[str, Any]],
    get: Callable[[Round, str, str], float],
) -> list[dict[str, Any]]:
    """The performance targets (issue 22, judged at the fixed offered load), from paired
    per-round figures, for each build and worker mode: each is a (goal, paired ratio or median
    figure, limit, whether the median meets it)."""
    goals: list[dict[str, Any]] = []

    def goal(text: str, value: dict[str, Any], limit: float, at_most: bool = True) -> None:
        median = value.get("median")
        ok = None if median is None else (median <= limit if at_most else median >= limit)
        goals.append({"goal": text, "value": value, "limit": limit, "ok": ok})

    def cpu_ratio(a: str, b: str) -> dict[str, Any]:
        return paired(lambda r: get(r, a, "cpu_us") / get(r, b, "cpu_us"))

    for build in ("", COMPILED_SUFFIX):
        for mode in ("", "-inline"):
            rate0, rate001, rate1 = (f"rate{r}{mode}{build}" for r in ("0", "0.01", "1"))
            label = ("inline" if mode else "process") + (", compiled" if build else ", pure")
            if rate0 in names and "relay" in names:
                goal(f"client path: CPU/request at rate 0 / relay's ({label})",
                     cpu_ratio(rate0, "relay"), 1.10)  # fmt: skip
            if rate1 in names and rate0 in names:
                extra = paired(
                    lambda r, a=rate1, b=rate0: get(r, a, "cpu_us") / get(r, b, "cpu_us") - 1.0
                )
                goal(f"shadow at rate 1: extra CPU/request / client path's ({label})",
                     extra, 0.6)  # fmt: skip
            if rate001 in names and rate0 in names:
                goal(f"CPU/request at rate 0.01 / rate 0 ({label})",
                     cpu_ratio(rate001, rate0), 1.05)  # fmt: skip
            if rate1 in names:
                dropped = per_target[rate1].get("dropped_pct")
                goal(f"shadow work dropped at rate 1, % ({label})",
                     {"median": dropped, "min": dropped, "max": dropped}, 1.0)  # fmt: skip
    return goals


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "n/a" if v is None else format(v, spec) + suffix


def fmt_ratio(r: dict[str, Any] | None, spec: str = ".2f") -> str:
    if not r or r.get("median") is None:
        return "n/a"
    return f"{r['median']:{spec}} [{r['min']:{spec}}..{r['max']:{spec}}]"


def verdict(r: dict[str, Any] | None, ok: Callable[[float], bool]) -> str:
    if not r or r.get("median") is None:
        return "n/a"
    return "PASS" if ok(r["median"]) else "FAIL"


MODE_TITLES = {
    SATURATED: "Saturated: memcaslap, {concurrency} connections, closed loop, unthrottled",
    FIXED: "Fixed offered load: bench/loadgen.py, open loop, {fixed_rate:g} requests/s on "
    "{concurrency} connections",
    SINGLE: "One connection, closed loop (memcaslap --concurrency=1): no batching",
}


def render_markdown(result: dict[str, Any]) -> str:
    """The whole report: the overview (CPU per request under each load, both builds), then
    each load's own tables."""
    cfg, env = result["config"], result["environment"]
    lines = [
        f"# memshadow benchmark — {result['started']}",
        "",
        f"Loads: {', '.join(cfg['modes'])}; {round(cfg['get_ratio'] * 100)}/"
        f"{round((1 - cfg['get_ratio']) * 100)} get/set, key {cfg['key_size']} B, value "
        f"{cfg['value_size']} B; {cfg['rounds']} rounds x {cfg['seconds']} s per target and "
        f"load (+{cfg['warmup']} s warm-up), shuffled order, seed {cfg['seed']}. memcached -t "
        f"{cfg['memcached_threads']}. Host: {env['cpus']} CPUs, load avg "
        f"{env['loadavg_start']} (start) / {env['loadavg_end']} (end).",
        "",
        *render_overview(result),
    ]
    for mode in cfg["modes"]:
        view = {**result, "summary": result["modes"][mode]["summary"]}
        lines += ["", f"## {MODE_TITLES[mode].format(**cfg)}", ""]
        if mode == SATURATED:
            lines += render_saturated(view)
        else:
            lines += [*render_cpu(view, mode), *render_shadow(view), ""]
    return "\n".join(lines)


def render_overview(result: dict[str, Any]) -> list[str]:
    """CPU µs per request, median [min..max] over rounds, per target and load; memshadow
    targets on both builds side by side, with the paired compiled / pure ratio."""
    modes = result["config"]["modes"]
    names = [t["name"] for t in result["targets"] if t["status"] != "skipped"]
    bases = [n for n in names if not n.endswith(COMPILED_SUFFIX) and TREE_MARK not in n]
    has_compiled = any(n.endswith(COMPILED_SUFFIX) for n in names)
    trees = sorted({n.split(TREE_MARK)[1] for n in names if TREE_MARK in n})
    head = "| target |"
    rule = "|---|"
    for mode in modes:
        head += f" {mode}: pure |" + (f" {mode}: compiled | {mode}: compiled/pure |"
                                       if has_compiled else "")  # fmt: skip
        rule += "---:|" + ("---:|---:|" if has_compiled else "")
        for tree in trees:
            head += f" {mode}: @{tree} | {mode}: this/@{tree} |"
            rule += "---:|---:|"
    lines = [
        "CPU µs per request of the target's own processes (proxy + shadow worker; /proc), "
        "median [min..max] over rounds. compiled/pure: median of the per-round ratios.",
        "",
        head,
        rule,
    ]
    for base in bases:
        row = f"| {base} |"
        twin = base + COMPILED_SUFFIX
        for mode in modes:
            summ = result["modes"][mode]["summary"]
            row += f" {fmt_cpu(summ['targets'].get(base))} |"
            if has_compiled:
                if twin in names:
                    ratio = summ["compiled_vs_pure"].get(base)
                    row += f" {fmt_cpu(summ['targets'].get(twin))} | {fmt_ratio(ratio)} |"
                else:
                    row += " - | - |"
            for tree in trees:
                other = f"{base}{TREE_MARK}{tree}"
                if other in names:
                    ratio = summ["this_vs_tree"].get(other)
                    row += f" {fmt_cpu(summ['targets'].get(other))} | {fmt_ratio(ratio)} |"
                else:
                    row += " - | - |"
        lines.append(row)
    if trees:
        lines += ["", "this/@NAME: median of the per-round ratios of this checkout's CPU per "
                  "request to the same target's on the sources of --tree NAME (pure Python)."]
    return lines


def fmt_cpu(s: dict[str, Any] | None) -> str:
    if not s or s.get("cpu_us") is None:
        return "n/a"
    lo, hi = s["cpu_us_range"]
    return f"{s['cpu_us']:.1f} [{lo:.1f}..{hi:.1f}]"


def render_saturated(result: dict[str, Any]) -> list[str]:
    cfg, summ = result["config"], result["summary"]
    env = result["environment"]
    lines = [
        f"memcaslap: {cfg['concurrency']} connections, {cfg['threads']} thread, "
        f"{round(cfg['get_ratio'] * 100)}/{round((1 - cfg['get_ratio']) * 100)} get/set, "
        f"key {cfg['key_size']} B, value {cfg['value_size']} B; "
        + (f"throttled to {cfg['tps']} ops/s; " if cfg["tps"] else "unthrottled; ")
        + f"{cfg['rounds']} rounds x {cfg['seconds']} s (+{cfg['warmup']} s warm-up), "
        f"shuffled order, seed {cfg['seed']}. Latency prober: 1 connection, sequential get, "
        f"{cfg['probe_rate']:.0f} req/s, "
        + (f"SCHED_FIFO {cfg['probe_rt']}" if cfg["probe_rt"] else "normal scheduling")
        + f". memcached -t {cfg['memcached_threads']}. Host: {env['cpus']} CPUs, "
        f"load avg {env['loadavg_start']} (start) / {env['loadavg_end']} (end); "
        f"pinning: targets={cfg['pin_targets'] or 'none'}, "
        f"prober={cfg['pin_probe'] or 'none'}, memcaslap pins its worker thread i to CPU i.",
        "",
        *render_cpu(result, SATURATED),
        "",
        "| target | ops/s (median) | ops/s range | p50 µs | p99 µs "
        "| memcaslap avg µs | memcaslap p99 µs (log2, ±2x) | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["targets"]:
        name = t["name"]
        if t["status"] == "skipped":
            lines.append(f"| {name} | skipped | | | | | | 0 |")
            continue
        s = summ["targets"][name]
        rng = s.get("tps_range")
        lines.append(
            f"| {name} | {fmt(s['tps'])} | "
            f"{fmt(rng[0]) + '..' + fmt(rng[1]) if rng else 'n/a'} | "
            f"{fmt(s['p50'], '.0f')} | {fmt(s['p99'], '.0f')} | {fmt(s['mc_avg'], '.0f')} | "
            f"{fmt(s['mc_p99_log2'], '.0f')} | {s['rounds_ok']}/{cfg['rounds']} |"
        )
    skipped = [t for t in result["targets"] if t["status"] != "ok"]
    if skipped:
        lines += ["", "Skipped / failed targets:"]
        lines += [f"- **{t['name']}**: {t['reason']}" for t in skipped]

    lines += [
        "",
        "Ratios: median of per-round paired ratios [min..max over rounds]. "
        "Added p99 = target p99 - direct memcached p99 (prober).",
        "",
        "| target | throughput / relay | added p99 µs | added p99 / relay's "
        "| added p50 / relay's | added memcaslap avg / relay's | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    rr = summ["ratios"].get("relay")
    if rr:
        lines.append(
            f"| relay | 1.00 (vs direct: {fmt_ratio(rr['tps_vs_direct'])}) | "
            f"{fmt_ratio(rr['added_p99_us'], '.0f')} | 1.00 | 1.00 | 1.00 | baseline |"
        )
    for name, r in summ["ratios"].items():
        if name == "relay":
            continue
        goal = ""
        if name.startswith("memshadow"):
            goal = (
                f"tput {verdict(r['tps_vs_relay'], lambda v: v >= 0.9)} (≥0.90), "
                f"p99 {verdict(r['added_p99_vs_relay'], lambda v: v <= 1.5)} (≤1.5x)"
            )
        lines.append(
            f"| {name} | {fmt_ratio(r['tps_vs_relay'])} | {fmt_ratio(r['added_p99_us'], '.0f')} | "
            f"{fmt_ratio(r['added_p99_vs_relay'])} | {fmt_ratio(r['added_p50_vs_relay'])} | "
            f"{fmt_ratio(r['added_mc_avg_vs_relay'])} | {goal} |"
        )
    lines += render_shadow(result)
    lines += [
        "",
        "p50/p99: latency prober (Python, blocking socket, perf_counter_ns per request) running "
        "alongside the memcaslap load; memcaslap itself only reports min/avg/max/std and a "
        "power-of-2 histogram, shown for cross-checking.",
        "",
    ]
    return lines


def render_cpu(result: dict[str, Any], mode: str) -> list[str]:
    """CPU per request first: what a target costs, whatever else shares the machine."""
    summ = result["summary"]
    served = {
        SATURATED: "memcaslap's and the prober's",
        FIXED: "those the load generator got an answer to",
        SINGLE: "memcaslap's",
    }[mode]
    latency = {
        SATURATED: "p50/p99: the prober's",
        FIXED: "p50/p99 from the time each request was due (open loop: queueing and the load "
        "generator's own late wake-ups included); service p99 from its write; errors: error "
        "answers plus requests unanswered at the end",
        SINGLE: "latency: memcaslap's average",
    }[mode]
    fixed = mode == FIXED
    lines = [
        "CPU per request: CPU time of the target's processes (/proc: each thread's "
        "schedstat) over the measured run (for memshadow, plus the settle second after it, "
        "so the shadow's "
        f"verdicts on the run are counted), divided by the requests served ({served}). "
        f"Medians over rounds [min..max]; `direct` is memcached's own CPU. {latency}.",
        "",
        "| target | CPU µs/request | main process | worker | / relay | cores per 10k req/s "
        + ("| achieved req/s (% of offered) | p50 µs | p99 µs | service p99 µs | errors |"
           if fixed else
           "| ops/s | " + ("p50 µs | p99 µs |" if mode == SATURATED else "avg µs |")),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" * (5 if fixed else
                                                      2 if mode == SINGLE else 3)),
    ]  # fmt: skip
    for t in result["targets"]:
        s = summ["targets"].get(t["name"])
        if s is None or s.get("cpu_us") is None:
            continue
        vs_relay = summ["cpu_vs_relay"].get(t["name"])
        row = (
            f"| {t['name']} | {fmt_cpu(s)} | {fmt(s['cpu_main_us'], '.1f')} | "
            f"{fmt(s['cpu_worker_us'], '.1f') if s['cpu_worker_us'] else '-'} | "
            f"{fmt_ratio(vs_relay)} | {fmt(s['cpu_us'] / 100, '.2f')} | "
        )
        if fixed:
            row += (
                f"{fmt(s['tps'])} ({fmt(s['achieved_pct'], '.1f')}%) | "
                f"{fmt(s['p50'], '.0f')} | {fmt(s['p99'], '.0f')} | "
                f"{fmt(s['service_p99'], '.0f')} | {fmt(s['errors'])} |"
            )
        elif mode == SINGLE:
            row += f"{fmt(s['tps'])} | {fmt(s['mc_avg'], '.0f')} |"
        else:
            row += f"{fmt(s['tps'])} | {fmt(s['p50'], '.0f')} | {fmt(s['p99'], '.0f')} |"
        lines.append(row)
    goals = summ.get("goals") or []
    if goals and fixed:
        lines += [
            "",
            "| goal | measured: median [min..max] | limit | met |",
            "|---|---:|---:|---|",
        ]
        for g in goals:
            met = "n/a" if g["ok"] is None else ("yes" if g["ok"] else "**no**")
            value = fmt_ratio(g["value"], ".3g")
            lines.append(f"| {g['goal']} | {value} | {g['limit']:g} | {met} |")
    return lines


def render_shadow(result: dict[str, Any]) -> list[str]:
    """The shadow's own figures per memshadow target, and throughput against --baseline."""
    summ = result["summary"]
    baseline = summ.get("baseline")
    vs = summ.get("vs_baseline") or {}
    rows = []
    for t in result["targets"]:
        name = t["name"]
        s = summ["targets"].get(name)
        if s is None or (s.get("shadowed") is None and name not in vs):
            continue
        lag = s.get("lag_p99")
        rows.append(
            f"| {name} | {fmt_ratio(vs.get(name)) if baseline else 'n/a'} | "
            f"{fmt(s.get('shadowed'))} | {fmt(s.get('dropped_pct'), '.1f', '%')} | "
            f"{'n/a' if lag is None else format(lag * 1000, 'g') + ' ms'} | "
            f"{fmt(s.get('redis_per_req'), '.2f')} | {fmt(s.get('mismatches'))} |"
        )
    if not rows:
        return []
    return [
        "",
        "Shadow, per run (medians over rounds; from memshadow's /metrics before and "
        f"{SHADOW_SETTLE:g} s after each run). Lag p99 is a histogram bucket bound.",
        "",
        f"| target | throughput / {baseline or 'baseline'} | shadowed requests | dropped "
        "| shadow lag p99 | Redis cmds / shadowed req | mismatches |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


# --------------------------------------------------------------------------- main


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, sep, args = spec.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(f"--variant must be NAME=ARGS, got {spec!r}")
    return name, shlex.split(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--seconds", type=int, default=10, help="measured seconds per run (10)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up seconds per run (2; 0=off)")
    ap.add_argument(
        "--targets",
        default=None,
        help="comma-separated subset of: direct,nutcracker,relay,memshadow and variant "
        "names (default: all). 'direct' and 'relay' are needed for the ratios.",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        type=parse_variant,
        metavar="NAME=ARGS",
        help="extra memshadow target started with additional CLI args; placeholders "
        "{redis_url} {redis_port} {memcached_port} are substituted. Using {redis_*} "
        "starts a redis-server. Repeatable.",
    )
    ap.add_argument("--redis", action="store_true", help="start redis-server even if unused")
    ap.add_argument(
        "--baseline",
        metavar="NAME",
        help="also give every target's throughput as a paired ratio to this target's "
        "(e.g. a memshadow variant at sample rate 0)",
    )
    ap.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="also write the raw JSON to PATH ('-' or no value: stdout)",
    )
    ap.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated loads: saturated (memcaslap, unthrottled), fixed (open loop "
        "at --fixed-rate), single (one connection, closed loop); default all three",
    )
    ap.add_argument(
        "--fixed-rate",
        type=float,
        default=5000.0,
        help="requests/s of the fixed load (5000: below every target's saturation on the "
        "2-core dev machine; the report gives each target's achieved share)",
    )
    ap.add_argument("--keys", type=int, default=10000, help="fixed load's key space (10000)")
    ap.add_argument(
        "--compiled-python",
        metavar="PYTHON",
        help="the interpreter of the compiled build (`make bench`: .venv-compiled/bin/python):"
        f" every memshadow target also runs on it, as NAME{COMPILED_SUFFIX}",
    )
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another checkout's sources (a git worktree of an earlier commit): every "
        f"memshadow target also runs on them, pure Python, as TARGET{TREE_MARK}NAME",
    )
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="memcaslap threads (1)")
    ap.add_argument("--key-size", type=int, default=32)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--get-ratio", type=float, default=0.9)
    ap.add_argument(
        "--memcached-threads",
        type=int,
        default=1,
        help="memcached -t (default 1: on 2 cores, more worker threads than free cores "
        "make direct memcached's own p99 a scheduling lottery)",
    )
    ap.add_argument(
        "--tps",
        type=int,
        default=0,
        help="cap memcaslap at this many ops/s, rounded to thousands (memcaslap --tps=Nk) "
        "to compare latency at "
        "equal offered load; default 0 = unthrottled (max throughput)",
    )
    ap.add_argument("--probe-rate", type=float, default=1000.0, help="prober req/s (1000)")
    ap.add_argument(
        "--probe-rt",
        type=int,
        default=10,
        metavar="PRIO",
        help="SCHED_FIFO priority for the prober so its own wake-ups are not measured "
        "(default 10; 0 = normal scheduling; falls back to normal if not permitted)",
    )
    ap.add_argument("--pin-targets", metavar="CPUS", help="pin memcached+proxies, e.g. '1'")
    ap.add_argument("--pin-probe", metavar="CPUS", help="pin the latency prober, e.g. '0'")
    ap.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random)")
    ap.add_argument("--start-timeout", type=float, default=15.0)
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return ap


def select_targets(args: argparse.Namespace) -> list[Target]:
    all_targets = [Target(n, n) for n in BUILTIN_TARGETS]
    variants = args.variant or list(DEFAULT_VARIANTS)
    all_targets += [Target(name, "memshadow", extra) for name, extra in variants]
    if args.compiled_python:
        both = []
        for t in all_targets:
            both.append(t)
            if t.kind == "memshadow":
                t.build = "pure"
                both.append(Target(t.name + COMPILED_SUFFIX, "memshadow", t.extra_args,
                                   python=os.path.abspath(args.compiled_python),
                                   build="compiled"))  # fmt: skip
        all_targets = both
    for spec in args.tree:
        tree_name, sep, path = spec.partition("=")
        if not sep or not tree_name or not (Path(path) / "proxy" / "__main__.py").is_file():
            raise SystemExit(f"--tree {spec!r}: NAME=PATH of a checkout with proxy/__main__.py")
        source = str(Path(path).resolve())
        all_targets += [
            Target(f"{t.name}{TREE_MARK}{tree_name}", "memshadow", t.extra_args, build="pure",
                   tree=source)
            for t in list(all_targets)
            if t.kind == "memshadow" and t.build != "compiled" and TREE_MARK not in t.name
        ]
    names = [t.name for t in all_targets]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate target names: {names}")
    if args.targets is None:
        return all_targets
    wanted = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(wanted) - set(names)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; known: {names}")
    return [t for t in all_targets if t.name in wanted]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)}")
    targets = select_targets(args)
    memcaslap = shutil.which("memcaslap") or shutil.which("memaslap")
    if not memcaslap:
        raise SystemExit("memcaslap not found (apt-get install libmemcached-tools)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    need_redis = args.redis or any("{redis" in a for t in targets for a in t.extra_args)
    started = dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")

    with (
        terminate_on_sigterm(),
        tempfile.TemporaryDirectory(prefix="memshadow-bench-") as tmp,
    ):
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            return run(args, targets, procs, workdir, memcaslap, seed, rng, need_redis, started)
        finally:
            procs.close()


def run(
    args: argparse.Namespace,
    targets: list[Target],
    procs: Processes,
    workdir: Path,
    memcaslap: str,
    seed: int,
    rng: random.Random,
    need_redis: bool,
    started: str,
) -> int:
    target_cpus = parse_cpus(args.pin_targets)
    loadavg_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    mc_port = free_port()
    mc_argv = ["memcached", "-l", HOST, "-p", str(mc_port), "-U", "0",
               "-t", str(args.memcached_threads), "-m", "256", "-c", "4096"]  # fmt: skip
    if os.geteuid() == 0:
        mc_argv += ["-u", getpass.getuser()]
    mc_proc, mc_log = procs.start("memcached", mc_argv, cpus=target_cpus)
    why = wait_ready(mc_proc, mc_port, b"version\r\n", b"VERSION ", args.start_timeout)
    if why:
        raise SystemExit(f"memcached failed to start: {why}; {log_tail(mc_log)}")
    say(f"memcached on {HOST}:{mc_port}")

    subst = {"memcached_port": str(mc_port)}
    for mode in ("process", "inline"):
        config = workdir / f"{mode}.yaml"
        config.write_text(f"shadow:\n  worker: {mode}\n{BENCH_GUARDS}")
        subst[f"{mode}_config"] = str(config)
    if need_redis:
        r_port = free_port()
        r_proc, r_log = procs.start("redis", [
            "redis-server", "--bind", HOST, "--port", str(r_port), "--save", "",
            "--appendonly", "no", "--protected-mode", "yes", "--dir", str(workdir),
        ], cpus=target_cpus)  # fmt: skip
        why = wait_ready(r_proc, r_port, b"PING\r\n", b"+PONG", args.start_timeout)
        if why:
            raise SystemExit(f"redis-server failed to start: {why}; {log_tail(r_log)}")
        subst |= {"redis_port": str(r_port), "redis_url": f"redis://{HOST}:{r_port}/0"}
        say(f"redis-server on {HOST}:{r_port}")

    for t in targets:
        start_target(t, procs, mc_port, workdir, subst, target_cpus, args.start_timeout)
        if t.kind == "direct":
            t.cpu_pid = mc_proc.pid
        if t.status == "ok":
            say(f"{t.name}: ready on {HOST}:{t.port}")
        else:
            say(f"{t.name}: SKIPPED — {t.reason}")
    live = [t for t in targets if t.status == "ok"]
    if not live:
        raise SystemExit("no target could be started")

    cfg_path = workdir / "memcaslap.cnf"
    memcaslap_config(cfg_path, args.key_size, args.value_size, args.get_ratio)
    spec = LoadSpec(
        memcaslap=memcaslap, cfg=cfg_path, concurrency=args.concurrency, threads=args.threads,
        tps=args.tps,
        probe_rate=args.probe_rate, probe_cpus=parse_cpus(args.pin_probe), probe_rt=args.probe_rt,
        value_size=args.value_size, key_size=args.key_size, get_ratio=args.get_ratio,
        fixed_rate=args.fixed_rate, keys=args.keys,
    )  # fmt: skip

    rounds: list[list[dict[str, Any]]] = []
    orders: list[list[str]] = []
    for r in range(args.rounds):
        order = [(t, mode) for t in live if t.status == "ok" for mode in args.modes]
        rng.shuffle(order)
        orders.append([f"{t.name}/{mode}" for t, mode in order])
        say(f"round {r + 1}/{args.rounds}: {len(order)} runs")
        samples: list[dict[str, Any]] = []
        for t, mode in order:
            if t.status != "ok":
                continue
            s = measure(spec, t, args.seconds, args.warmup, mode)
            s["round"] = r
            samples.append(s)
            m = sample_metrics(s)
            if m:
                say(
                    f"  {t.name + '/' + mode:<28} {fmt(m['cpu_us'], '.1f')} µs CPU/req  "
                    f"{m['tps']:>9,.0f} req/s  p50 {fmt(m['p50'], '.0f')} µs  "
                    f"p99 {fmt(m['p99'], '.0f')} µs"
                    + (f"  errors {m['errors']:.0f}" if m.get("errors") else "")
                )
            else:
                say(f"  {t.name + '/' + mode:<28} FAILED: {s.get('error')}")
            if t.proc is not None and t.proc.poll() is not None:
                t.status = "died"
                t.reason = f"exited with code {t.proc.returncode} during round {r + 1}; " + (
                    log_tail(t.log) if t.log else ""
                )
                say(f"  {t.name}: DIED — {t.reason}")
        rounds.append(samples)

    names = [t.name for t in targets if t.status in ("ok", "died")]
    result: dict[str, Any] = {
        "started": started,
        "finished": dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {
            "rounds": args.rounds, "seconds": args.seconds, "warmup": args.warmup,
            "concurrency": args.concurrency, "threads": args.threads, "tps": args.tps,
            "modes": args.modes, "fixed_rate": args.fixed_rate, "keys": args.keys,
            "compiled_python": args.compiled_python,
            "key_size": args.key_size, "value_size": args.value_size,
            "get_ratio": args.get_ratio, "memcached_threads": args.memcached_threads,
            "probe_rate": args.probe_rate, "probe_rt": args.probe_rt, "seed": seed,
            "pin_targets": args.pin_targets, "pin_probe": args.pin_probe,
            "memcaslap_cfg": cfg_path.read_text(),
        },
        "environment": {
            "cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "loadavg_start": loadavg_start,
            "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "python": platform.python_version(), "platform": platform.platform(),
            "memcached_port": mc_port, "redis_port": subst.get("redis_port"),
        },
        "targets": [
            {"name": t.name, "kind": t.kind, "status": t.status, "reason": t.reason,
             "port": t.port, "argv": t.argv}
            for t in targets
        ],
        "orders": orders,
        "rounds": rounds,
        "modes": {
            mode: {"summary": summarize(
                [[s for s in rnd if s.get("mode", SATURATED) == mode] for rnd in rounds],
                names, args.baseline)}
            for mode in args.modes
        },
    }  # fmt: skip
    md = render_markdown(result)
    print(md)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "").replace("-", "")
    for suffix, text in ((".md", md), (".json", json.dumps(result, indent=2, default=str))):
        for stem in (f"bench-{stamp}", "latest"):
            (args.results_dir / (stem + suffix)).write_text(text)
    say(f"results: {args.results_dir / f'bench-{stamp}.md'} (+ .json, latest.*)")
    if args.json == "-":
        print(json.dumps(result, indent=2, default=str))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
