#!/usr/bin/env bash
# Weight store device check: publish from / load into CUDA tensors over shared memory and gRPC
# (fp32 trainer on the GPU -> bf16 generator on the GPU, bit-exact after the cast), a 1.7B bf16
# CPU -> CUDA publish+load, and bench/weight_sync.py on the device machine's idle cores.
#
# Stage here (the service runtime's wheels for the device's Python 3.12; it has torch, xxhash):
#   mkdir -p build/ws-gpu-wheels && cp build/gpu-wheels/*{cp312,abi3,none-any}*.whl build/ws-gpu-wheels/
#   (build/gpu-wheels comes from `deploy/gpu_check.sh prepare`)
# Run there, carrying build/ws-gpu-wheels:
#   bash bench/weight_sync_gpu_check.sh        -> $OUT/weight_sync_gpu_check.json, $OUT/weight_sync_device.json
set -euo pipefail
OUT=${OUT:-/tmp/ws_gpu_out}; mkdir -p "$OUT"; export OUT
ROOT=$PWD; SHIM=/tmp/forgerpc_shim_ws
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --no-index --find-links build/ws-gpu-wheels grpcio==1.85.3 grpcio-health-checking \
    grpcio-reflection grpcio-status "protobuf>=7.35.1" googleapis-common-protos pydantic omegaconf pyyaml \
    opentelemetry-api opentelemetry-sdk rich psutil 2>&1 | tail -3
# forgerpc's import namespace without installing it.
rm -rf "$SHIM"; mkdir -p "$SHIM/forgerpc"
for f in "$ROOT"/protos/forgerpc/*; do ln -s "$f" "$SHIM/forgerpc/"; done
for d in services clients orchestrator; do ln -s "$ROOT/$d" "$SHIM/forgerpc/$d"; done
export PYTHONPATH="$SHIM"
nproc; free -g | head -2; df -h /dev/shm | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

python3 - <<'PY'
import asyncio, json, os, subprocess, sys, time
import torch
sys.path.insert(0, "bench")
from weight_sync import llama_state_dict
from forgerpc.clients import WeightStoreClient
from forgerpc.clients.weights import load_into, publish


async def main():
    store = subprocess.Popen([sys.executable, "-m", "forgerpc.services", "serve", "weight_store", "--port", "0",
                              "retain_versions=2", "verify_threads=8"], stdout=subprocess.PIPE, text=True)
    address = store.stdout.readline().split()[2]
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    try:
        client, version = WeightStoreClient(address, timeout=600), 1
        trainer = {k: v.to("cuda", torch.float32) for k, v in llama_state_dict("135m", True).items()}
        for put in ("shm", "grpc"):
            await publish(client, trainer, version, transport=put, dtype=torch.bfloat16, threads=8)
            for get in ("shm", "grpc"):
                gen = {k: torch.zeros(t.shape, dtype=torch.bfloat16, device="cuda") for k, t in trainer.items()}
                torch.cuda.synchronize()
                t = time.perf_counter()
                await load_into(client, gen, version, transport=get)
                torch.cuda.synchronize()
                ok = all(torch.equal(gen[k], trainer[k].bfloat16()) for k in trainer)
                out[f"135m_fp32_cuda_put_{put}_get_{get}_bf16_cuda"] = {"ok": ok, "load_s": time.perf_counter() - t}
                print(f"put {put} get {get}: ok={ok}", flush=True)
            version += 1
        del trainer, gen
        sd = llama_state_dict("1.7b", True)
        gen = {k: torch.empty(t.shape, dtype=t.dtype, device="cuda") for k, t in sd.items()}
        for _ in range(2):  # the second is steady state (the store reuses the first's segment)
            t0 = time.perf_counter()
            await publish(client, sd, version, threads=8)
            t1 = time.perf_counter()
            await load_into(client, gen, version)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            version += 1
        ok = all(torch.equal(gen[k].cpu(), sd[k]) for k in sd)
        out["1.7b_bf16_cpu_to_cuda_shm"] = {"ok": ok, "publish_s": t1 - t0, "load_s": t2 - t1,
                                            "publish_plus_load_s": t2 - t0}
    finally:
        store.terminate()
        store.wait(30)
    print(json.dumps(out, indent=2), flush=True)
    with open(os.path.join(os.environ["OUT"], "weight_sync_gpu_check.json"), "w") as f:
        json.dump(out, f, indent=2)


asyncio.run(main())
PY

python3 bench/weight_sync.py --threads 8 --out "$OUT/weight_sync_device.json"
