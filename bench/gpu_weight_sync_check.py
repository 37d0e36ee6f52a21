"""Weight store device check: publish from / load into CUDA tensors (run by bench/gpu_check.sh).

    python bench/gpu_weight_sync_check.py --out DIR                          # on the GPU machine, ~1 min
    .venv/bin/python bench/gpu_weight_sync_check.py --device cpu --sizes 135m --out /tmp/x   # dry run

1. 135M-shaped fp32 trainer weights on the device -> bf16 generator tensors on the device, through
   each put/get pair of transports (shm, grpc): bit-exact after the cast?
2. Per `--sizes` (default 1.7b): bf16 CPU weights -> device tensors over shared memory, twice (the
   second is steady state: the store reuses the first's segment): publish_s, load_s.
Writes DIR/weight_sync_gpu_check.json. Synthetic tensors with SmolLM2 layer shapes (bench/weight_sync.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from weight_sync import llama_state_dict  # noqa: E402

from forgerpc.clients import WeightStoreClient  # noqa: E402
from forgerpc.clients.weights import load_into, publish  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def main(device: str, sizes: list[str], out_dir: pathlib.Path) -> None:
    store = subprocess.Popen([sys.executable, "-m", "forgerpc.services", "serve", "weight_store", "--port", "0",
                              "retain_versions=2", "verify_threads=8"], stdout=subprocess.PIPE, text=True)
    address = store.stdout.readline().split()[2]
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device,
           "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    try:
        client, version = WeightStoreClient(address, timeout=600), 1
        trainer = {k: v.to(device, torch.float32) for k, v in llama_state_dict("135m", True).items()}
        for put in ("shm", "grpc"):
            await publish(client, trainer, version, transport=put, dtype=torch.bfloat16, threads=8)
            for get in ("shm", "grpc"):
                gen = {k: torch.zeros(t.shape, dtype=torch.bfloat16, device=device) for k, t in trainer.items()}
                sync(device)
                t = time.perf_counter()
                await load_into(client, gen, version, transport=get)
                sync(device)
                ok = all(torch.equal(gen[k], trainer[k].bfloat16()) for k in trainer)
                out[f"135m_fp32_{device}_put_{put}_get_{get}_bf16"] = {"ok": ok, "load_s": time.perf_counter() - t}
                print(f"put {put} get {get}: ok={ok}", flush=True)
            version += 1
        del trainer, gen
        for size in sizes:
            sd = llama_state_dict(size, True)
            gen = {k: torch.empty(t.shape, dtype=t.dtype, device=device) for k, t in sd.items()}
            for _ in range(2):  # the second is steady state (the store reuses the first's segment)
                t0 = time.perf_counter()
                await publish(client, sd, version, threads=8)
                t1 = time.perf_counter()
                await load_into(client, gen, version)
                sync(device)
                t2 = time.perf_counter()
                version += 1
            ok = all(torch.equal(gen[k].cpu(), sd[k]) for k in sd)
            out[f"{size}_bf16_cpu_to_{device}_shm"] = {"ok": ok, "publish_s": t1 - t0, "load_s": t2 - t1,
                                                       "publish_plus_load_s": t2 - t0}
            del sd, gen
    finally:
        store.terminate()
        store.wait(30)
    print(json.dumps(out, indent=2), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "weight_sync_gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", nargs="*", default=["1.7b"])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    asyncio.run(main(args.device, args.sizes, pathlib.Path(args.out)))
