"""The two builds: setup.py compiles exactly proxy/buildinfo.py's list, or nothing when told
not to or when it cannot; memshadow says which build runs; and under `make test` the suite runs
on the build it claims to (MEMSHADOW_EXPECT_BUILD=compiled|pure), in this process and in the
memshadow processes the tests start."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy import __version__, buildinfo
from proxy.metrics import ProxyMetrics

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = os.environ.get("MEMSHADOW_EXPECT_BUILD", "")


def setup_module_namespace() -> dict[str, Any]:
    """setup.py's functions, without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="memshadow_setup")


@pytest.mark.skipif(EXPECTED not in ("compiled", "pure"), reason="not run by `make test`")
def test_the_suite_runs_on_the_build_it_claims() -> None:
    expected = buildinfo.COMPILED_MODULES if EXPECTED == "compiled" else ()
    assert buildinfo.compiled_modules() == expected
    # The tests' memshadow processes: same interpreter, same PYTHONPATH as tests/support.py.
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout == f"memshadow {__version__}, {buildinfo.describe()}\n"
    assert ("compiled with mypyc" in result.stdout) == (EXPECTED == "compiled")


def test_describe_names_the_build() -> None:
    described = buildinfo.describe()
    compiled = buildinfo.compiled_modules()
    if not compiled:
        assert described.startswith("pure Python (Python 3.")
    elif buildinfo.is_compiled():
        assert described.startswith(f"compiled with mypyc ({len(compiled)} modules, Python 3.")
    else:
        assert described.startswith("partly compiled")
    assert buildinfo.version_line() == f"memshadow {__version__}, {described}"


def test_build_info_metric_says_whether_compiled() -> None:
    text = ProxyMetrics().render().decode()
    compiled = "true" if buildinfo.is_compiled() else "false"
    assert f'memshadow_build_info{{compiled="{compiled}",' in text


def test_every_listed_module_exists_once() -> None:
    modules = buildinfo.COMPILED_MODULES
    assert len(set(modules)) == len(modules)
    for name in modules:
        assert (ROOT / Path(*name.split("."))).with_suffix(".py").is_file(), name
    assert "proxy.buildinfo" not in modules  # it must answer whatever was compiled


def test_setup_compiles_the_one_list() -> None:
    assert tuple(setup_module_namespace()["compiled_modules"]()) == buildinfo.COMPILED_MODULES


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_pure_python_switch(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(buildinfo.PURE_PYTHON_ENV, value)
    why_pure = setup_module_namespace()["why_pure"]
    assert why_pure() == "MEMSHADOW_PURE_PYTHON is set"


def test_an_editable_install_is_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(buildinfo.PURE_PYTHON_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["setup.py", "editable_wheel", "--dist-dir", "x"])
    assert "editable install" in setup_module_namespace()["why_pure"]()


def test_no_compiler_means_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    problem = setup_module_namespace()["compiler_problem"]()
    assert problem is not None and problem.startswith("no working C compiler")
