# forgerpc — the two commands a newcomer needs: `make run` and `make test`.
# Everything installs into .venv; torch is pinned to the CPU build these machines carry.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
REDIS_URL ?= redis://127.0.0.1:6379/0
export REDIS_URL

.PHONY: run test test-fast protos install dev redis clean help

help:
	@echo "make run    - create .venv, install, start the local stack and run the main job"
	@echo "make test   - create .venv, install [dev], start Redis if needed, run the whole suite"
	@echo "make protos - regenerate protos/forgerpc/v1/*_pb2*.py from the .proto files"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[ml]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

redis:
	@bash deploy/local/ensure-redis.sh "$(REDIS_URL)"

run: install
	$(BIN)/forgerpc run configs/stack_local.yaml

test: dev redis
	$(BIN)/python -m pytest -ra tests

protos: dev
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build dist *.egg-info protos/*.egg-info
