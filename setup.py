"""Build of memshadow: the compiled build (the hot modules as C extensions, compiled from the
same typed Python with mypyc) where a C compiler and Python's headers are present, pure Python
otherwise. Everything else about the package is in pyproject.toml.

    pip install .                              # compiled if it can be, pure Python if not
    MEMSHADOW_PURE_PYTHON=1 pip install .      # pure Python, whatever the machine has

The modules compiled are proxy/buildinfo.py's COMPILED_MODULES (the one list). An editable
install (pip install -e .) is always pure Python: extensions built in place would sit beside the
sources and silently keep running old code after an edit.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILDINFO = ROOT / "proxy" / "buildinfo.py"
PURE_PYTHON_ENV = "MEMSHADOW_PURE_PYTHON"
# What compiling needs besides setuptools: mypyc (it comes with mypy, in the range the test
# extras type-check with) and the types of what the compiled modules import, so that mypyc
# sees the types `make typecheck` sees (prometheus_client is typed; PyYAML's are a stub
# package).
MYPYC_REQUIREMENTS = ["mypy>=1.10", "prometheus-client>=0.20", "types-PyYAML"]


def say(message: str) -> None:
    print(f"memshadow build: {message}", file=sys.stderr, flush=True)


def compiled_modules() -> list[str]:
    """COMPILED_MODULES from proxy/buildinfo.py, read without importing the package."""
    for node in ast.parse(BUILDINFO.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "COMPILED_MODULES"
            and node.value is not None
        ):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"{BUILDINFO}: no COMPILED_MODULES tuple")


def why_pure() -> str | None:
    """Why this build is pure Python, or None to compile."""
    if os.environ.get(PURE_PYTHON_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return f"{PURE_PYTHON_ENV} is set"
    if {"editable_wheel", "develop"} & set(sys.argv):
        return "an editable install is always pure Python (no extensions beside the sources)"
    if sys.implementation.name != "cpython":
        return f"mypyc needs CPython, this is {sys.implementation.name}"
    return compiler_problem()


def compiler_problem() -> str | None:
    """None when a C compiler builds against Python.h here, else what went wrong."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory(prefix="memshadow-cc-") as tmp:
        source = Path(tmp, "probe.c")
        source.write_text("#include <Python.h>\nint memshadow_probe(void) { return 0; }\n")
        try:
            compiler.compile(
                [str(source)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except Exception as exc:  # CompileError, a missing executable: any is a no
            detail = " ".join(str(exc).split())[:200]
            return f"no working C compiler with Python's headers ({detail})"
    return None


def extensions() -> tuple[list[object], list[str]]:
    """(ext_modules, setup_requires) for this build."""
    reason = why_pure()
    if reason is not None:
        say(f"pure Python: {reason}")
        return [], []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if "egg_info" in sys.argv:
            # pip asking for the build's requirements (PEP 517): mypyc comes with mypy.
            return [], MYPYC_REQUIREMENTS
        say(
            "pure Python: mypyc is not installed where this build runs "
            f"(pip install {' '.join(MYPYC_REQUIREMENTS)}, or let pip build in isolation)"
        )
        return [], []
    modules = compiled_modules()
    say(
        f"compiling {len(modules)} modules with mypyc (set {PURE_PYTHON_ENV}=1 for pure Python)"
    )
    paths = [str(Path(*name.split(".")).with_suffix(".py")) for name in modules]
    return list(mypycify(paths)), []


if __name__ == "__main__":  # as setuptools runs it (tests/test_build.py imports it)
    ext_modules, setup_requires = extensions()
    setup(ext_modules=ext_modules, setup_requires=setup_requires)
