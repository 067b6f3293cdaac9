# Keel's developer commands. Needs only python3 (3.11 or newer) and make.
#   make run     the whole stack on http://127.0.0.1:8000/ (Ctrl-C stops it)
#   make test    the test suite (SQLite and an embedded Redis unless DATABASE_URL/REDIS_URL say otherwise)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Inside the venv, so deleting the venv also forgets that it was installed.
STAMP := $(VENV)/.installed-from-requirements.lock
TOOLS := .tools
# Pinned: the lock's layout depends on the uv that wrote it.
UV_VERSION := 0.13.9

# Overridable: `make run DEBUG=0` (then SECRET_KEY is needed), `make run ARGS="--port 8001"`.
DEBUG ?= 1
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test lint bench lock clean

help:
	@echo "make install   create $(VENV) from requirements.lock (again only when the lock changes)"
	@echo "make run       start Keel on this machine (manage.py devstack); Ctrl-C stops it"
	@echo "make test      run the test suite"
	@echo "make lint      ruff, Django's system checks, missing migrations"
	@echo "make bench     run bench/engine.py"
	@echo "make lock      regenerate requirements.lock from pyproject.toml"
	@echo "make clean     remove $(VENV), $(TOOLS) and caches (var/, the local database, stays)"

install: $(STAMP)

$(STAMP): requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "Keel needs Python 3.11 or newer; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." \
		     "Install one and run: make PYTHON=python3.11 $(MAKECMDGOALS)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --require-hashes -r requirements.lock
	touch $@

run: install
	DEBUG=$(DEBUG) $(BIN)/python manage.py devstack $(ARGS)

test: install
	$(BIN)/pytest $(ARGS)

# manage.py needs DEBUG=1 here only so that settings load without a SECRET_KEY.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DEBUG=1 $(BIN)/python manage.py check
	DEBUG=1 $(BIN)/python manage.py makemigrations --check --dry-run

bench: install
	$(BIN)/python bench/engine.py $(ARGS)

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install uv==$(UV_VERSION)

# Written beside the lock and moved over it only when it changed, so that an unchanged lock
# does not make the next `make install` run again. A URL in the lock would tie installs to one
# index; the check refuses that.
lock: $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv pip compile --quiet pyproject.toml --extra dev --generate-hashes \
		--python-version 3.11 --no-header -o requirements.lock.new
	@if grep -nE '[a-z+]+://' requirements.lock.new; then \
		echo "requirements.lock.new contains the URLs above; the lock must not. Check uv's index settings."; \
		exit 1; fi
	@if cmp -s requirements.lock.new requirements.lock; then \
		rm requirements.lock.new; echo "requirements.lock is up to date."; \
	else mv requirements.lock.new requirements.lock; echo "requirements.lock updated."; fi

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache test-results requirements.lock.new
	find . -name __pycache__ -type d -prune -not -path './var/*' -exec rm -rf {} +
