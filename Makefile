# memshadow developer commands. On a fresh Debian machine with Python 3.11+:
#   make run     memcached + redis-server on loopback, memshadow in front of them
#   make test    lint, type-check, then the whole test suite
# Both create .venv and install what they need (apt-get for the servers, pip for Python).

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
LINT_PATHS := proxy tests $(wildcard bench)

.PHONY: run test lint typecheck bench fuzz soak clean venv

run: $(RUN_STAMP)
	scripts/ensure-packages.sh $(RUN_PACKAGES)
	scripts/dev-run.sh $(ARGS)

test: $(STAMP)
	scripts/ensure-packages.sh $(TEST_PACKAGES)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	scripts/ensure-packages.sh $(TEST_PACKAGES)
	$(BIN)/python bench/run.py $(ARGS)

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

$(STAMP): pyproject.toml $(VENV_STAMP)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	@touch $@ $(RUN_STAMP)

clean:
	rm -rf $(VENV) .run build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
