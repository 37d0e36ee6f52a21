"""GPU check of the torch engine: greedy parity with HF `generate` on CUDA, and tokens/s of both.

    python bench/gpu_generator.py [--device cuda] [--out DIR]      # on a GPU machine, ~1-2 min

Runs from a plain checkout (no install): if `forgerpc` is not importable it builds a small
symlink tree that maps the repository folders onto the package names. Same protocol as
bench/generator.py (random 16-token prompts, greedy, 64 new tokens, EOS neither stops nor is
masked), on a tiny and a medium random Llama, float32 and bfloat16. Writes gpu_generator.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

from _checkout import ensure_importable  # noqa: E402 - bench/ is sys.path[0]

ensure_importable()

import torch  # noqa: E402

from forgerpc.services.common.models import load_model, make_tiny_model  # noqa: E402
from forgerpc.services.generator.backends import Sampling  # noqa: E402
from forgerpc.services.generator.backends.torch_engine import TorchEngine  # noqa: E402

MODELS = {"tiny": dict(), "medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                                         intermediate_size=1536)}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def run(device: str, out_dir: pathlib.Path, quick: bool) -> None:
    rows = []
    models = {"tiny": MODELS["tiny"]} if quick else MODELS
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in models.items():
            path = make_tiny_model(pathlib.Path(tmp) / name, initializer_range=0.1, **shape)
            for dtype in ("float32",) if quick else ("float32", "bfloat16"):
                model, _ = load_model(path, dtype=getattr(torch, dtype), device=device)
                model.generation_config.eos_token_id = None
                engine = TorchEngine(str(path), dtype=dtype, device=device, max_batch_size=64)
                engine.start()
                for batch in (16,) if quick else (16, 64):
                    ids = torch.randint(4, model.config.vocab_size, (batch, 16),
                                        generator=torch.Generator().manual_seed(batch)).to(device)
                    prompts = [(str(i), row) for i, row in enumerate(ids.tolist())]
                    params = Sampling(max_tokens=64, ignore_eos=True)
                    model.generate(ids[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
                    await engine.generate(prompts[:2], Sampling(max_tokens=4, ignore_eos=True))
                    t_hf, t_eng = [], []
                    for _ in range(2):
                        sync(device)
                        start = time.perf_counter()
                        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                            do_sample=False, pad_token_id=0)
                        sync(device)
                        t_hf.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        outs = await engine.generate(prompts, params)
                        sync(device)
                        t_eng.append(time.perf_counter() - start)
                    hf_tokens = hf[:, 16:].tolist()
                    same = sum(o.token_ids == h for o, h in zip(outs, hf_tokens))
                    row = {"model": name, "dtype": dtype, "batch": batch, "hf_tok_s": batch * 64 / min(t_hf),
                           "engine_tok_s": batch * 64 / min(t_eng), "rows_identical": f"{same}/{batch}"}
                    row["ratio_engine_vs_hf"] = row["engine_tok_s"] / row["hf_tok_s"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                await engine.close()
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
              "torch": torch.__version__, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_generator.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny model, float32, batch 16 only")
    args = parser.parse_args()
    asyncio.run(run(args.device, pathlib.Path(args.out), args.quick))
