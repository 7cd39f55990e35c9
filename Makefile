# memshadow developer commands. On a fresh Debian machine with Python 3.11+:
#   make run     memcached + redis-server on loopback, memshadow in front of them
#   make test    lint, type-check, then the whole test suite on both builds: pure Python
#                (test-pure) and compiled with mypyc (test-compiled)
# Both create .venv and install what they need (apt-get for the servers, pip for Python).
#
# Two builds, two venvs, so that a compiled module can never shadow an edited source:
#   .venv           the development venv: an editable install, always pure Python (setup.py
#                   refuses to compile an editable install)
#   .venv-compiled  the compiled build, installed from a wheel built from the sources
#                   (pip wheel ., extensions per proxy/buildinfo.py's COMPILED_MODULES); the
#                   wheel is rebuilt whenever anything under proxy/ changes. Its suite runs in
#                   .compiled/tree: a copy of the tree whose proxy/ is the wheel's, so the
#                   tests' own subprocesses (PYTHONPATH=the tree) run the compiled build too,
#                   and tests/test_build.py fails if anything runs pure Python there.
# MEMSHADOW_PURE_PYTHON=1 at install time makes `pip install .` pure Python.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What is installed: the venv itself, what running needs, what the tests need on top.
VENV_STAMP := $(VENV)/.created
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
RUN_PACKAGES := memcached redis-server
# chromium + chromium-driver: the console's end-to-end test; prometheus: promtool for the
# alert rules; redis-tools: redis-cli, which the Redis Cluster tests create clusters with.
TEST_PACKAGES := memcached redis-server redis-tools libmemcached-tools nutcracker chromium \
	chromium-driver prometheus openssl
# gcc for the compiled build (Python's headers come with python3-dev for Debian's python3,
# installed only when $(PYTHON) has no Python.h).
BUILD_PACKAGES := gcc
PURE_ENV := MEMSHADOW_PURE_PYTHON
LINT_PATHS := proxy tests setup.py $(wildcard bench)

# The compiled build.
CVENV := .venv-compiled
CBIN := $(CVENV)/bin
CVENV_STAMP := $(CVENV)/.created
COMPILED := .compiled
WHEEL_DIR := $(COMPILED)/wheel
WHEEL_STAMP := $(COMPILED)/.wheel
CTREE := $(COMPILED)/tree
# Everything the wheel is built from: a change to any of it rebuilds the wheel (directories
# too: a file removed or added changes its directory).
PACKAGE_FILES := pyproject.toml setup.py README.md \
	$(shell find proxy -name __pycache__ -prune -o -print 2>/dev/null)

.PHONY: run test test-pure test-compiled lint typecheck bench fuzz soak clean venv \
	venv-compiled

run: $(RUN_STAMP)
	scripts/ensure-packages.sh $(RUN_PACKAGES)
	scripts/dev-run.sh $(ARGS)

test: lint typecheck test-pure test-compiled

# The whole suite on the development venv (the sources themselves, pure Python).
test-pure: $(STAMP)
	scripts/ensure-packages.sh $(TEST_PACKAGES)
	@stale="$$(find proxy -name '*.so'; ls *__mypyc*.so 2>/dev/null)"; if [ -n "$$stale" ]; then \
		echo "error: extension modules in the source tree would shadow the sources:" \
			$$stale "(make clean removes them)" >&2; exit 1; fi
	MEMSHADOW_EXPECT_BUILD=pure $(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole suite on the compiled build, from .compiled/tree (see the top of this file).
test-compiled: $(WHEEL_STAMP)
	scripts/ensure-packages.sh $(TEST_PACKAGES)
	rm -rf $(CTREE) && mkdir -p $(CTREE)
	tar -c --exclude-vcs --exclude=./proxy --exclude='./.venv*' --exclude=./$(COMPILED) \
		--exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ \
		--exclude=./.hypothesis --exclude='./.*_cache' --exclude=./bench/results \
		--exclude=./.run -f - . | tar -x -C $(CTREE)
	$(CBIN)/python -m zipfile -e $(WHEEL_DIR)/*.whl $(CTREE)
	rm -rf $(CTREE)/*.dist-info
	cd $(CTREE) && MEMSHADOW_EXPECT_BUILD=compiled $(abspath $(CBIN))/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

# Every target on the pure-Python and the compiled build (bench/README.md).
bench: $(STAMP) $(WHEEL_STAMP)
	scripts/ensure-packages.sh $(TEST_PACKAGES)
	$(BIN)/python bench/run.py --compiled-python $(CBIN)/python $(ARGS)

# Mixed traffic with shadowing and periodic faults, plotted (matplotlib, installed here
# only): make soak ARGS="--minutes 30"
soak: $(STAMP)
	scripts/ensure-packages.sh $(TEST_PACKAGES)
	$(BIN)/pip install -q 'matplotlib>=3.7'
	$(BIN)/python bench/soak.py $(ARGS)

# The client path's differential fuzzer, for as long as asked: make fuzz ARGS="--seconds 3600"
fuzz: $(STAMP)
	scripts/ensure-packages.sh $(RUN_PACKAGES)
	$(BIN)/python -m tests.integration.fuzz $(ARGS)

venv: $(STAMP)

venv-compiled: $(WHEEL_STAMP)

# Debian's own python3 needs python3-venv for `-m venv` to work, so that is installed first
# when it is missing.
$(VENV_STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "error: memshadow needs Python 3.11 or newer, but $(PYTHON) is" \
			"$$($(PYTHON) --version 2>&1 || echo missing); run with PYTHON=/path/to/python3.11" >&2; \
		exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || scripts/ensure-packages.sh python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@touch $@

# Installed again when pyproject.toml changes. `make run` installs only what running needs;
# the test tools (pytest, ruff, mypy, hadolint...) come with the first test, lint or bench.
$(RUN_STAMP): pyproject.toml $(VENV_STAMP)
	$(BIN)/python -m pip install --quiet --editable .
	@touch $@

$(STAMP): pyproject.toml setup.py $(VENV_STAMP)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	@touch $@ $(RUN_STAMP)

$(CVENV_STAMP): $(VENV_STAMP)
	$(PYTHON) -m venv $(CVENV)
	$(CBIN)/python -m pip install --quiet --upgrade pip
	@touch $@

# The compiled build: a wheel built from the sources in an isolated build environment (pip
# brings setuptools and mypy for mypyc), installed into .venv-compiled with the test extras.
# build/ is setuptools' scratch space: emptied so that no file of an older build is packed.
$(WHEEL_STAMP): $(PACKAGE_FILES) $(CVENV_STAMP)
	scripts/ensure-packages.sh $(BUILD_PACKAGES)
	@$(PYTHON) -c 'import os, sys, sysconfig; \
		sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
		|| scripts/ensure-packages.sh python3-dev
	rm -rf build $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	env -u $(PURE_ENV) $(CBIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(WHEEL_DIR) .
	rm -rf build
	@$(CBIN)/python -c 'import sys, zipfile; \
		sys.exit(not any(n.endswith(".so") for n in zipfile.ZipFile(sys.argv[1]).namelist()))' \
		$(WHEEL_DIR)/*.whl || { echo "error: the wheel has no compiled module; run" \
		"'$(CBIN)/python -m pip wheel -v .' to see why" >&2; exit 1; }
	$(CBIN)/python -m pip install --quiet --force-reinstall --no-deps $(WHEEL_DIR)/*.whl
	$(CBIN)/python -m pip install --quiet "$$(ls $(WHEEL_DIR)/*.whl)[test]"
	@touch $@

clean:
	rm -rf $(VENV) $(CVENV) $(COMPILED) .run build dist *.egg-info .pytest_cache .mypy_cache \
		.ruff_cache .hypothesis *__mypyc*.so
	find proxy -name '*.so' -delete
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
