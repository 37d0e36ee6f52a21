#!/usr/bin/env bash
# Every GPU check of forgerpc in one script, for a lent GPU machine (H100/H200: Python 3.12, torch
# 2.11 + CUDA, Triton, transformers, safetensors, pytest; no TorchTitan, no internet). < 8 min.
#
#   bash bench/gpu_check.sh prepare     # here: wheels for what the device lacks -> build/gpu-check-wheels
#   bash bench/gpu_check.sh             # there, carrying build/gpu-check-wheels -> $OUT (default bench/results/gpu)
#                                       # (device tool: carry=["build/gpu-check-wheels"], timeout_s >= 480)
#   bash bench/gpu_check.sh --dry-run   # here: the same steps on CPU at toy sizes, nothing installed
#                                       # (PYTHON=... a venv with torchtitan; titan then runs forward-only)
#
# Steps, most important first; each gets its own timeout, all together at most $GPU_CHECK_BUDGET_S
# (default 420 s). A failing step is recorded and the rest still run; the exit status says if any failed.
#   titan_trainer    bench/gpu_trainer_check.py: titan vs torch backend, same weights and batches
#                    (losses, grad norms, tokens/s), a weight publish (HF dir + weight store),
#                    checkpoint resume, activation checkpointing      -> trainer_gpu_check.json
#   titan_tests      tests/test_trainer_titan.py, whose CUDA tests run there      -> titan_tests.log
#   weight_sync      bench/gpu_weight_sync_check.py: fp32 CUDA -> bf16 CUDA parity per transport,
#                    1.7B bf16 publish + load into CUDA                    -> weight_sync_gpu_check.json
#   weight_sync_bench  bench/weight_sync.py --sizes 1.7b (vs memcpy, raw gRPC) -> weight_sync_device.json
#   generator        bench/gpu_generator.py (torch engine vs HF generate)        -> gpu_generator.json
#   torch_trainer    bench/trainer.py --device cuda (torch backend vs bare loop)  -> trainer_gpu.json
# Summary: $OUT/gpu_check.json (rc and seconds per step).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=build/gpu-check-wheels

if [ "${1:-}" = prepare ]; then
    # Versions of our own venv; --no-deps: each need is listed (the device has numpy, pyyaml, psutil,
    # xxhash, rich, triton, pytest). Pure-Python sdists (antlr4) are built into wheels here.
    rm -rf "$WHEELS"; mkdir -p "$WHEELS"
    reqs=(grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3
          protobuf==7.36.2 googleapis-common-protos==1.76.0 pydantic==2.14.4 pydantic-core==2.50.5
          annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 omegaconf==2.4.0
          antlr4-python3-runtime==4.13.2 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
          opentelemetry-semantic-conventions==0.66b2 redis==8.1.0 hpack==4.2.0
          torchtitan==0.3.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 spmd-types==0.2.3 dill==0.4.0)
    for r in "${reqs[@]}"; do
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$r" 2>/dev/null || .venv/bin/python -m pip wheel -q --no-deps -w "$WHEELS" "$r"
    done
    du -sh "$WHEELS"; ls "$WHEELS" | wc -l
    exit 0
fi

DRY=0
[ "${1:-}" = --dry-run ] && DRY=1
OUT=${OUT:-$ROOT/bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
DEADLINE=$((SECONDS + BUDGET))
STATUS="$OUT/gpu_check.status"
: > "$STATUS"

if [ "$DRY" = 1 ]; then
    [ -n "${PYTHON:-}" ] || PY=.venv/bin/python
    DEV=cpu; QUICK=--quick; SIZES=(); TRAINER_MODELS=tiny
else
    DEV=cuda; QUICK=; SIZES=(1.7b); TRAINER_MODELS=tiny,medium
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        echo "no wheels in $WHEELS: run 'bash bench/gpu_check.sh prepare' on the dev machine and carry $WHEELS" >&2
        exit 2
    fi
    # Into a private site dir that shadows the image's older grpcio/protobuf/typing-extensions.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/forgerpc-site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/forgerpc-site
fi

# forgerpc's import namespace from the checkout, without installing it (protos/forgerpc + the folders).
SHIM=$(mktemp -d)/shim
mkdir -p "$SHIM/forgerpc"
for f in "$ROOT"/protos/forgerpc/*; do ln -s "$f" "$SHIM/forgerpc/"; done
for d in services clients orchestrator; do ln -s "$ROOT/$d" "$SHIM/forgerpc/$d"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.cuda.is_available())'

# step NAME SECONDS CMD...: runs CMD under min(SECONDS, what is left of the budget), logs to $OUT/NAME.log.
step() {
    local name=$1 want=$2; shift 2
    local left=$((DEADLINE - SECONDS)) start=$SECONDS rc=0
    if [ "$left" -lt 20 ]; then
        echo "$name skipped 0" >> "$STATUS"; echo "== $name: skipped (budget spent)"; return 0
    fi
    [ "$want" -lt "$left" ] || want=$left
    echo "== $name (timeout ${want}s)"
    timeout "$want" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    tail -n 5 "$OUT/$name.log"
    echo "$name $rc $((SECONDS - start))" >> "$STATUS"
}

step titan_trainer 180 "$PY" bench/gpu_trainer_check.py --device "$DEV" $QUICK --out "$OUT"
step titan_tests 90 "$PY" -m pytest -x -q -p no:cacheprovider -rs tests/test_trainer_titan.py
step weight_sync 60 "$PY" bench/gpu_weight_sync_check.py --device "$DEV" --sizes "${SIZES[@]}" --out "$OUT"
if [ "$DRY" = 1 ]; then
    echo "weight_sync_bench dry_run 0" >> "$STATUS"  # 1.7B needs ~14 GB of free RAM
else
    step weight_sync_bench 120 "$PY" bench/weight_sync.py --sizes 1.7b --threads 8 --out "$OUT/weight_sync_device.json"
fi
step generator 80 "$PY" bench/gpu_generator.py --device "$DEV" $QUICK --out "$OUT"
step torch_trainer 60 "$PY" bench/trainer.py --device "$DEV" --models "$TRAINER_MODELS" --threads 0 \
    --out "$OUT/trainer_gpu.json"

"$PY" - "$STATUS" "$OUT/gpu_check.json" "$DRY" <<'PY'
import json, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
# rc: the exit status; "skipped": the budget ran out first (a failure); "dry_run": not run on CPU by design
steps = {name: {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(s)} for name, rc, s in rows}
json.dump({"dry_run": sys.argv[3] == "1", "steps": steps}, open(sys.argv[2], "w"), indent=1)
print(json.dumps(steps))
sys.exit(0 if all(v["rc"] in (0, "dry_run") for v in steps.values()) else 1)
PY
