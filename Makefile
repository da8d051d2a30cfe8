# Two commands a new user needs: `make run` (the whole stack on this machine) and
# `make test`. Both create the virtual environment and install what is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DISTS  := common agent controller store persister fleetctl sim dashboard

.PHONY: run test test-fast lint typecheck unit docs bench clean deps lock mosquitto chromium asyncapi prometheus

run: deps
	$(BIN)/fleetctl up

test: deps lint typecheck docs unit

# The unit and contract tests alone (no broker, no processes started): well under a minute.
test-fast: deps
	FLEET_TEST_FAST=1 $(BIN)/pytest -m "not slow and not faults"

lint: deps
	$(BIN)/ruff check .

typecheck: deps
	$(BIN)/mypy

# The pages in docs/ as a site in site/ (git-ignored); --strict turns a broken link, a missing
# anchor or a page left out of mkdocs.yml's nav into a failure.
docs: deps
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The dashboard's browser tests drive Debian's Chromium, docs/asyncapi.yaml is validated with the
# official AsyncAPI parser (npm), and a real Prometheus (Debian's, with promtool) scrapes /metrics and
# checks the alert rules: all installed when we may, else their tests skip saying why.
unit: deps chromium asyncapi prometheus
	$(BIN)/pytest

deps: $(STAMP) mosquitto

mosquitto:
	@bash scripts/ensure-mosquitto.sh

chromium:
	@bash scripts/ensure-chromium.sh

prometheus:
	@bash scripts/ensure-prometheus.sh

# @asyncapi/parser, pinned by tools/asyncapi/package-lock.json, into tools/asyncapi/node_modules (npm ci).
asyncapi:
	@bash scripts/ensure-asyncapi.sh

# Installs from the lock (constraints.txt: every third-party package pinned); `make lock`
# rewrites it after a dependency changes in a pyproject.toml or requirements-dev.txt.
$(STAMP): $(foreach d,$(DISTS),$(d)/pyproject.toml) requirements-dev.txt constraints.txt VERSION
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed for the services (the agent alone runs on 3.9); set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(foreach d,$(DISTS),-e ./$(d)) -r requirements-dev.txt
	touch $@

lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	BIN=$(BIN) DISTS="$(DISTS)" bash scripts/lock.sh

# The transport's ceiling and the system against it, one broker, one run (about 10 minutes):
# a table on stdout and bench/results.json. `make bench BENCH_ARGS=--tiny` proves it works in a minute.
bench: deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data site .pytest_cache .mypy_cache .ruff_cache tools/asyncapi/node_modules tools/asyncapi/.unavailable
