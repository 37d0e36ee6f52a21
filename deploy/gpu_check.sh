#!/usr/bin/env bash
# GPU check of the deploy `gpu` profile (deploy/gpu_check.py), for a GPU machine without internet.
#
# Prepare here (a machine with PyPI and the dev venv):
#   deploy/gpu_check.sh prepare        # build/gpu-compose.json + build/gpu-wheels (cp310-cp312)
# Run there (carry build/gpu-compose.json and build/gpu-wheels):
#   deploy/gpu_check.sh run "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    mkdir -p build/gpu-wheels
    compose="$(.venv/bin/python -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose"
    FORGERPC_TOKEN=gpu-check-token REDIS_PASSWORD=gpu-check \
        "$compose" -f deploy/compose.yaml --profile gpu config --format json > build/gpu-compose.json
    # The service runtime's dependencies (the GPU machine has torch, transformers, grpcio).
    reqs=(setuptools wheel "grpcio==1.85.3" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1"
          "grpcio-status==1.85.3" "protobuf>=7.35.1" "googleapis-common-protos>=1.70" "pydantic>=2.10"
          "omegaconf>=2.3" "pyyaml>=6" "redis>=5" "hiredis>=3" "opentelemetry-api>=1.40"
          "opentelemetry-sdk>=1.40" "rich>=13" "psutil>=5.9" "cryptography>=42" xxhash hpack)
    for v in 3.10 3.11 3.12; do
        .venv/bin/python -m pip download -q -d build/gpu-wheels --only-binary=:all: --python-version "$v" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            "${reqs[@]}"
    done
    du -sh build/gpu-wheels build/gpu-compose.json
    exit 0
fi

out="${2:-${OUT:-/tmp/gpu-check}}"
mkdir -p "$out"
python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Into the machine's own Python (a throwaway machine): keeps its CUDA torch, adds what is missing.
py="$(python3 -c 'import sys; print(sys.executable)')"
export PIP_BREAK_SYSTEM_PACKAGES=1
"$py" -m pip install -q --no-index --find-links build/gpu-wheels setuptools wheel
"$py" -m pip install -q --no-index --find-links build/gpu-wheels \
    grpcio grpcio-health-checking grpcio-reflection grpcio-status "protobuf>=7.35.1" googleapis-common-protos \
    pydantic omegaconf pyyaml redis hiredis opentelemetry-api opentelemetry-sdk rich psutil cryptography xxhash hpack
"$py" -m pip install -q --no-deps --no-build-isolation --no-index -e .
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
timeout 420 "$py" deploy/gpu_check.py build/gpu-compose.json "$out"
