"""Trainer device check: the titan backend against the torch backend on the same weights and batches.

    python bench/gpu_trainer_check.py --device cuda --out DIR      # run by bench/gpu_check.sh, ~1-2 min
    .venv/bin/python bench/gpu_trainer_check.py --device cpu --quick --out /tmp/x   # the CPU-possible part

Per model (random Llamas: tiny = 4 layers x 128, medium = 8 layers x 512 as in gpu_generator.py):

    steps        DAPO + KL (beta 0.02) steps on 16 episodes (prompts 8-32, responses 8-64 tokens),
                 both backends: loss, grad_norm, step_seconds; loss_rel_diff per step
    tokens_per_s trained tokens / step time, steps after the first (the first compiles)
    publish      titan's weights out under HF names: save_pretrained -> HF load -> the same tensors;
                 weight store publish (bf16) -> load_into an HF model's tensors -> bit-equal to the cast
    resume       save a checkpoint, step; a fresh backend loads it and steps: bit-identical weights?
    ac           activation checkpointing: first-step loss equals the plain first step's

On CPU titan cannot train (FlexAttention has no CPU backward): its steps become forward-only
losses on the same batches, compared with the torch backend's. Writes DIR/trainer_gpu_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

from _checkout import ensure_importable  # noqa: E402 - bench/ is sys.path[0]

ensure_importable()

import torch  # noqa: E402

from forgerpc.services.common.models import load_model, make_tiny_model  # noqa: E402
from forgerpc.services.trainer.backends.titan_backend import TitanBackend  # noqa: E402
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend  # noqa: E402
from forgerpc.services.trainer.config import TrainerConfig  # noqa: E402

MODELS = {"tiny": dict(hidden_size=128, num_layers=4),
          "medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536)}


def batch(seed: int, n: int = 16, vocab: int = 90) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, vocab, (int(torch.randint(8, 65, (1,), generator=g)),), generator=g).tolist()
        logprobs = (-4.5 + 0.3 * torch.randn(len(r), generator=g)).tolist()
        out.append(Sample(prompt=p, response=r, generator_logprobs=logprobs,
                          mask=[1] * len(r), advantage=float(torch.randn(1, generator=g)), group_id=str(i // 4)))
    return out


def make(kind: str, path, device: str, **kw):
    cfg = TrainerConfig(model_path=str(path), device=device, micro_batch_size=8,
                        optim={"lr": 1e-4}, loss={"kind": "dapo", "beta": 0.02}, **kw)
    model, tok = load_model(path)
    return (TitanBackend if kind == "titan" else TorchBackend)(cfg, model, tok)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_loss(b, samples) -> dict:
    """CPU stand-in for a titan step: the loss of the same batch, forward only."""
    start = time.perf_counter()
    counts = dict(num_sequences=len(samples), num_tokens=sum(sum(s.mask) for s in samples),
                  max_tokens=max(len(s.response) for s in samples))
    with torch.no_grad():
        out, _ = b._micro_batch(samples, b._advantages(samples), "policy_gradient", counts)
    return {"loss": float(out.loss), "grad_norm": None, "tokens": counts["num_tokens"],
            "step_seconds": time.perf_counter() - start, "forward_only": True}


def run_steps(b, n_steps: int, trains: bool) -> list[dict]:
    rows = []
    for s in range(n_steps):
        if trains:
            r = b.train_step(batch(s))
            sync(b.cfg.device)
            rows.append({"loss": r.loss, "grad_norm": r.grad_norm, "tokens": r.tokens,
                         "step_seconds": r.step_seconds, "skipped": r.skipped})
        else:
            rows.append(forward_loss(b, batch(s)))
    return rows


def tokens_per_s(rows: list[dict]) -> float | None:
    timed = rows[1:] or rows
    return sum(r["tokens"] for r in timed) / sum(r["step_seconds"] for r in timed) if timed else None


async def store_round_trip(sd: dict, hf_model) -> dict:
    """Publishes `sd` (HF names) to a real weight store process as bf16; loads it into `hf_model`'s tensors."""
    from forgerpc.clients import WeightStoreClient
    from forgerpc.clients.weights import load_into, publish

    store = subprocess.Popen([sys.executable, "-m", "forgerpc.services", "serve", "weight_store", "--port", "0",
                              "retain_versions=2"], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    try:
        address = store.stdout.readline().split()[2]
        client = WeightStoreClient(address, timeout=300)
        start = time.perf_counter()
        await publish(client, sd, 1, dtype=torch.bfloat16)
        target = {k: torch.zeros(v.shape, dtype=torch.bfloat16, device=v.device)
                  for k, v in hf_model.state_dict().items()}
        await load_into(client, target, 1)
        seconds = time.perf_counter() - start
        ok = set(target) == set(sd) and all(torch.equal(target[k], sd[k].to(torch.bfloat16)) for k in sd)
        return {"ok": ok, "publish_plus_load_s": seconds, "tensors": len(sd)}
    finally:
        store.terminate()
        store.wait(30)


def check_publish(titan, tmp: pathlib.Path) -> dict:
    sd = titan.full_state_dict()
    titan.save_pretrained(tmp / "published")
    hf_model, _ = load_model(tmp / "published")
    reloaded = hf_model.state_dict()
    same = set(reloaded) == set(sd) and all(torch.equal(reloaded[k], sd[k].cpu()) for k in sd)
    out = {"hf_names": sorted(sd)[:3], "save_pretrained_reload_equal": same}
    out["weight_store"] = asyncio.run(store_round_trip(sd, hf_model.to(titan.device)))
    return out


def check_resume(kind: str, path, device: str, trains: bool, tmp: pathlib.Path) -> dict:
    if not trains:
        return {"skipped": "titan does not train on CPU"}
    a = make(kind, path, device)
    for s in range(2):
        a.train_step(batch(s))
    ck = a.save_checkpoint(tmp / f"ck-{kind}", keep=1)
    a.train_step(batch(2))
    b = make(kind, path, device)
    b.load_checkpoint(ck)
    b.train_step(batch(2))
    wa, wb = a.model.state_dict(), b.model.state_dict()
    return {"bit_identical": all(torch.equal(wa[k], wb[k]) for k in wa),
            "max_abs_diff": max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)}


def check_model(name: str, shape: dict, device: str, n_steps: int, tmp: pathlib.Path) -> dict:
    path = make_tiny_model(tmp / name, initializer_range=0.05, **shape)
    on_gpu = device.startswith("cuda")
    result = {"params": sum(t.numel() for t in load_model(path)[0].parameters())}
    for kind in ("torch", "titan"):
        b = make(kind, path, device)
        rows = run_steps(b, n_steps, trains=on_gpu or kind == "torch")
        result[kind] = {"steps": rows, "tokens_per_s": tokens_per_s(rows)}
        if kind == "titan":
            result["publish"] = check_publish(b, tmp / name)
        del b
    t, ti = result["torch"]["steps"], result["titan"]["steps"]
    # On CPU only the first step compares like for like (titan's later "steps" never trained).
    compared = range(len(t)) if on_gpu else range(1)
    result["loss_rel_diff"] = [abs(ti[i]["loss"] - t[i]["loss"]) / max(abs(t[i]["loss"]), 1e-6) for i in compared]
    if on_gpu:
        result["grad_norm_rel_diff"] = [abs(ti[i]["grad_norm"] - t[i]["grad_norm"]) / t[i]["grad_norm"]
                                        for i in compared]
        result["titan_vs_torch_tokens_per_s"] = result["titan"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    for kind in ("torch", "titan"):
        result[kind]["resume"] = check_resume(kind, path, device, on_gpu or kind == "torch", tmp)
        if on_gpu or kind == "torch":
            ac = make(kind, path, device, activation_checkpointing=True).train_step(batch(0))
            first = result[kind]["steps"][0]["loss"]
            result[kind]["ac_first_loss_equal"] = abs(ac.loss - first) <= 1e-6 * max(1.0, abs(first))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    import torchtitan
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "torchtitan": getattr(torchtitan, "__version__", "?"), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in MODELS.items():
            if args.quick and name != "tiny":
                continue
            start = time.perf_counter()
            out["models"][name] = check_model(name, shape, args.device, args.steps, pathlib.Path(tmp))
            out["models"][name]["seconds"] = time.perf_counter() - start
            print(name, json.dumps({k: v for k, v in out["models"][name].items() if k not in ("torch", "titan")}),
                  flush=True)
    if args.device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    dest = pathlib.Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "trainer_gpu_check.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
