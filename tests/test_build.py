"""The two builds: setup.py compiles exactly proxy/buildinfo.py's list, or nothing when told
not to or when it cannot; memshadow says which build runs; and under `make test` the suite runs
on the build it claims to (MEMSHADOW_EXPECT_BUILD=compiled|pure), in this process and in the
memshadow processes the tests start."""

from __future__ import annotations

import ast
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


SUSPENSIONS = (ast.Await, ast.AsyncFor, ast.AsyncWith, ast.Yield, ast.YieldFrom)


def waits_while_handling(source: str) -> list[int]:
    """Lines of the suspension points (await, async for, async with, yield) inside an except
    block or a finally block of `source`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ExceptHandler):
            blocks: list[ast.stmt] = list(node.body)
        elif isinstance(node, ast.Try | ast.TryStar):
            blocks = list(node.finalbody)
        else:
            continue
        for statement in blocks:
            for inner in ast.walk(statement):
                if isinstance(inner, SUSPENSIONS):
                    lines.append(inner.lineno)
    return sorted(set(lines))


def test_waits_while_handling_are_found() -> None:
    source = (
        "async def f():\n"
        "    try:\n"
        "        await a()\n"
        "    except OSError:\n"
        "        await b()\n"
        "    finally:\n"
        "        async with c():\n"
        "            pass\n"
        "    await d()\n"
        "def g():\n"
        "    try:\n"
        "        yield 1\n"
        "    except OSError:\n"
        "        yield 2\n"
    )
    assert waits_while_handling(source) == [5, 7, 14]


def test_compiled_modules_never_wait_while_handling_an_exception() -> None:
    """A coroutine compiled by mypyc (2.4) that is suspended inside an except block leaves the
    exception it handles set for the whole thread: every exception raised later in the process
    carries it as its context (a log of an unrelated error then shows a stale connect failure
    "during handling"), sys.exc_info() reports it, and it keeps its traceback's frames alive.
    In a finally block an await can lose the exception (mypyc/mypyc#1114). A generator
    suspended there is the same case. The compiled modules wait after the block instead."""
    found = {}
    for name in buildinfo.COMPILED_MODULES:
        path = (ROOT / Path(*name.split("."))).with_suffix(".py")
        if lines := waits_while_handling(path.read_text()):
            found[name] = lines
    assert found == {}


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
