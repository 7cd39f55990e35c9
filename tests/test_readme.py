"""The README tells the story first (quick start, the dark launch, finishing the migration),
the reference after it, with Docker and Kubernetes sections of their own; every metric and
option it names exists, and every link to a section of it lands."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.config import option_paths
from tests.ops.test_packaging import METRIC_RE, defined_metrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
HEADINGS = [line for line in README.splitlines() if line.startswith("#")]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


def test_the_story_comes_first_and_the_reference_after() -> None:
    order = [h.lstrip("#").strip() for h in HEADINGS if h.startswith("## ")]
    story = ["Quick start (5 minutes)", "The dark launch, step by step", "Finishing the migration"]
    assert order[: len(story)] == story, order
    for reference in ("The data path", "Configuration", "Docker",
                      "Kubernetes: a sidecar next to Memcached", "Operating a dark launch",
                      "Differences from Memcached, on purpose or unavoidable"):  # fmt: skip
        assert order.index(reference) > len(story) - 1, reference


def test_the_quick_start_is_two_commands_and_a_config_of_one_s_own() -> None:
    start = README[README.index("## Quick start") : README.index("## The dark launch")]
    assert "make run " in start and "make test " in start
    assert "memshadow --init-config memshadow.yaml" in start


def test_finishing_the_migration_says_what_the_verdict_proves_and_the_data_format() -> None:
    finish = README[README.index("## Finishing the migration") : README.index("## The data path")]
    for words in ("What a \"Ready\" verdict proves", "What it does not prove",
                  "format version 1", "The options for the switch"):  # fmt: skip
        assert words in finish, words


def test_docker_usage_mounts_a_config() -> None:
    docker = README[README.index("## Docker") : README.index("## Kubernetes")]
    assert "docker run" in docker and ":/etc/memshadow/memshadow.yaml:ro" in docker


def test_every_metric_named_exists() -> None:
    named = {name for name in METRIC_RE.findall(README) if not name.endswith("_")}  # not a *
    assert named, "the README names no metric"
    assert named - defined_metrics() == set()


def test_every_option_named_exists() -> None:
    options = set(option_paths())
    named = set(re.findall(r"`((?:shadow|limits|log|admin)\.[a-z_.]+[a-z_])`", README))
    unknown = {o for o in named if o not in options and not any(
        p.startswith(o + ".") for p in options)}  # fmt: skip
    assert unknown == set()


def test_links_to_sections_land() -> None:
    anchors = {_anchor(h) for h in HEADINGS}
    for target in re.findall(r"\]\(#([^)]+)\)", README):
        assert target in anchors, target
