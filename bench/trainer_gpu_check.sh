#!/usr/bin/env bash
# Trainer device check (torch backend on CUDA): bf16-autocast GRPO steps, a checkpoint resume, and
# bench/trainer.py on the GPU. Run from the repository root on a lent GPU machine, which has torch +
# CUDA, transformers, safetensors and grpcio but not our venv:
#   bash bench/trainer_gpu_check.sh        (carry build/gpu_site: see the staging commands below)
# Staging on the dev machine (pure-Python deps + pydantic_core wheels for several Pythons):
#   copy pydantic, omegaconf, antlr4, opentelemetry, google (protobuf), grpc_{health,reflection,status},
#   yaml, annotated_types, typing_inspection into build/gpu_site/pure; pip download pydantic-core into
#   build/gpu_site/wheels. Results: $OUT/trainer_gpu_check.json, $OUT/trainer_gpu.json.
set -euo pipefail
OUT=${OUT:-/tmp/trainer_gpu_out}; mkdir -p "$OUT"
ROOT=$PWD
SITE=/tmp/forgerpc_site; SHIM=/tmp/forgerpc_shim
rm -rf "$SITE" "$SHIM"; mkdir -p "$SITE" "$SHIM/forgerpc"
python -m pip install -q --no-index --no-deps --find-links build/gpu_site/wheels --target "$SITE" pydantic-core==2.50.5 grpcio==1.85.3
# forgerpc's import namespace without installing: forgerpc = protos/forgerpc + services, clients, orchestrator.
for f in "$ROOT"/protos/forgerpc/*; do ln -s "$f" "$SHIM/forgerpc/"; done
ln -s "$ROOT/services" "$SHIM/forgerpc/services"; ln -s "$ROOT/clients" "$SHIM/forgerpc/clients"
ln -s "$ROOT/orchestrator" "$SHIM/forgerpc/orchestrator"
export PYTHONPATH="$SHIM:$SITE:$ROOT/build/gpu_site/pure"
export TRAINER_GPU_OUT="$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python - <<'PY'
import json, os, pathlib, sys, tempfile, time
import torch, transformers
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend
from forgerpc.services.trainer.config import TrainerConfig

out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
       "gpu": torch.cuda.get_device_name()}
tmp = pathlib.Path(tempfile.mkdtemp())
path = make_tiny_model(tmp / "tiny", hidden_size=128, num_layers=4)
g = torch.Generator().manual_seed(0)
def batch(seed, n=16):
    g.manual_seed(seed)
    return [Sample(prompt=torch.randint(4, 90, (20,), generator=g).tolist(),
                   response=(r := torch.randint(4, 90, (40,), generator=g).tolist()),
                   generator_logprobs=[-4.5] * len(r), mask=[1] * len(r),
                   advantage=float(torch.randn(1, generator=g)), group_id=str(i // 4)) for i in range(n)]
def backend(**kw):
    cfg = TrainerConfig(model_path=str(path), device="cuda", micro_batch_size=8, optim={"lr": 1e-3},
                        loss={"kind": "dapo", "beta": 0.02}, **kw)
    model, tok = load_model(path)
    return TorchBackend(cfg, model, tok)
a = backend()
steps = [a.train_step(batch(s)).__dict__ for s in range(4)]
out["steps"] = steps
out["finite"] = all(torch.isfinite(torch.tensor([s["loss"], s["grad_norm"]])).all().item() for s in steps)
ck = a.save_checkpoint(tmp / "ckpt", keep=2)
a.train_step(batch(4))
b = backend()
b.load_checkpoint(ck)
b.train_step(batch(4))
wa, wb = a.model.state_dict(), b.model.state_dict()
out["resume_bit_identical"] = all(torch.equal(wa[k], wb[k]) for k in wa)
out["resume_max_abs_diff"] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
c = backend(activation_checkpointing=True)
out["activation_checkpointing_loss"] = c.train_step(batch(0)).loss
out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
pathlib.Path(os.environ["TRAINER_GPU_OUT"], "trainer_gpu_check.json").write_text(json.dumps(out, indent=1))
print(json.dumps({k: v for k, v in out.items() if k != "steps"}, indent=1))
print("steps:", [(round(s["loss"], 4), round(s["grad_norm"], 3)) for s in steps])
PY
python bench/trainer.py --device cuda --models tiny,medium --threads 0 --out "$OUT/trainer_gpu.json"
