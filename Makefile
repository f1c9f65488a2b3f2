# bioc-webstats — every entry point a developer, CI or SysAdmin needs.
# `make demo` and `make test` install everything they need from nothing (as root on Debian 12).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help deps venv lint static pytest molecule molecule-newer test demo demo-down bench bench-web bench-etl bench-daily bench-history wheelhouse clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

deps: ## Debian packages for tests, demo and benchmarks (apt, idempotent)
	scripts/install-deps.sh

# (setup.py and the C sources and header: the editable install builds the native parts in place)
$(STAMP): requirements/dev.txt requirements/runtime.txt pyproject.toml setup.py $(wildcard src/bioc_webstats/etl/*.c src/bioc_webstats/etl/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade 'pip>=24,<27'
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/dev.txt -c requirements/runtime.txt
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/runtime.txt -e .
	touch $@

venv: $(STAMP) ## the development/test virtualenv (.venv) + Ansible collections (requirements.yml)
	scripts/install-collections.sh $(VENV)

lint: venv ## ruff (Python)
	$(BIN)/ruff check src tests bench molecule
	$(BIN)/ruff format --check src tests bench molecule

# pytest-xdist workers: each has its own PostgreSQL cluster, moto and nginx (free ports, own
# directories). On the 2-CPU CI machine two take 8.7 minutes, one 13.5.
PYTEST_WORKERS ?= 2
pytest: deps venv ## unit, integration (PostgreSQL + SQLite), contract and browser tests
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS)

PLAYBOOKS := $(wildcard playbooks/*.yml)

static: venv ## Ansible + units, no container: ansible-lint (production), yamllint, syntax-check, systemd gates
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint -q
	for inv in inventory/production inventory/staging inventory/local; do \
	  for p in $(PLAYBOOKS); do $(BIN)/ansible-playbook --syntax-check -i $$inv $$p >/dev/null || exit 1; done; \
	done
	$(BIN)/ruff check roles/webstats_release/files
	$(BIN)/ruff format --check roles/webstats_release/files
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_units_static.py tests/test_roles_static.py

MOLECULE_SCENARIOS ?= default upgrade ssm

# Newest image first: the default scenario on each of MOLECULE_NEWER (Debian suites, built with
# debootstrap), then MOLECULE_SCENARIOS on the reference image (Debian 12). With
# WEBSTATS_MOLECULE_IMAGE set, MOLECULE_SCENARIOS run on that image only. On the newer suites
# the tests marked `replay` (deploy.yml or db-bootstrap.yml run again: 5 of the 7.5 minutes of
# checks) are left to the reference image; converge and idempotence run the deploy there.
MOLECULE_NEWER ?= trixie
molecule: deps venv ## the real playbook on a real systemd host (podman): Debian 13, then $(MOLECULE_SCENARIOS) on 12
	if [ -z "$${WEBSTATS_MOLECULE_IMAGE:-}" ]; then $(MAKE) --no-print-directory molecule-newer; fi
	for s in $(MOLECULE_SCENARIOS); do scripts/molecule.sh test -s $$s; done

molecule-newer: deps venv ## the default scenario on each of $(MOLECULE_NEWER) (its replays: on Debian 12 only)
	for suite in $(MOLECULE_NEWER); do \
	  WEBSTATS_MOLECULE_IMAGE=localhost/bioc-webstats-systemd:$$suite WEBSTATS_MOLECULE_MARKERS="not replay" \
	    scripts/molecule.sh test -s default; \
	done

demo: deps venv ## deploy into a local systemd container (PostgreSQL, sample logs), print the URL
	scripts/demo.sh up

demo-down: ## remove the demo container
	scripts/demo.sh down

# `make test` runs the scenarios two at a time (scripts/together.sh): a scenario waits half its
# time (SSH round trips, systemd, the database), so two share the 2 cores. pytest, which keeps
# both busy, runs alone first; then the newer Debian beside the scenarios other than the pair
# (ssm), then the pair (default, upgrade). 29.5 minutes on the CI machine, against 42 to 49 one
# after the other. With WEBSTATS_MOLECULE_IMAGE set, no newer Debian (that image only).
MOLECULE_PAIR := $(filter default upgrade,$(MOLECULE_SCENARIOS))
MOLECULE_REST := $(filter-out $(MOLECULE_PAIR),$(MOLECULE_SCENARIOS))
test: deps venv lint static pytest ## everything CI runs
	if [ -z "$${WEBSTATS_MOLECULE_IMAGE:-}" ]; then \
	  for suite in $(MOLECULE_NEWER); do \
	    WEBSTATS_MOLECULE_IMAGE=localhost/bioc-webstats-systemd:$$suite scripts/prepare-molecule.sh >/dev/null; \
	  done; \
	  newer=("make --no-print-directory molecule-newer"); \
	fi; \
	scripts/prepare-molecule.sh >/dev/null; \
	scripts/together.sh "$${newer[@]}" $(foreach s,$(MOLECULE_REST),"scripts/molecule.sh test -s $(s)")
	scripts/together.sh $(foreach s,$(MOLECULE_PAIR),"scripts/molecule.sh test -s $(s)")
	@echo "make test: all green"

# Options of a bench script: make bench-etl BENCH_ARGS="--skip-recompute --repeat 3"
BENCH_ARGS ?=

bench-web: deps venv ## web benchmark: nginx + gunicorn as deployed vs plain nginx, same bytes, wrk; publish time and disk
	$(BIN)/python bench/bench_web.py $(BENCH_ARGS)

bench-etl: deps venv ## ETL benchmark: 3M log lines into PostgreSQL vs zcat; month/year recompute
	$(BIN)/python bench/bench_etl.py $(BENCH_ARGS)

bench-daily: deps venv ## daily-run benchmark: sync + etl run on Dec 31 of a 36M-record year and on Feb 1, vs zcat
	$(BIN)/python bench/bench_daily.py $(BENCH_ARGS)

bench-history: deps venv ## history: import legacy-db of a 10M-row legacy database vs sqlite3; a 30-day backfill vs zcat
	$(BIN)/python bench/bench_history.py $(BENCH_ARGS)

bench: bench-web bench-etl bench-daily bench-history ## every benchmark (prints ratios against same-run baselines)

clean: ## remove build products (keeps .venv)
	rm -rf build dist src/*.egg-info
