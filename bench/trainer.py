"""Trainer benchmark: tokens/s of a GRPO train step, the torch backend vs a bare PyTorch loop.

    .venv/bin/python bench/trainer.py                   # tiny Llama (+ SmolLM2-135M when converted)
    .venv/bin/python bench/trainer.py --models tiny     # quick run
    python bench/trainer.py --models tiny,medium --device cuda   # GPU check (medium: SmolLM2-135M shapes)

Both sides do the same work per step on the same batch (left-padded prompts, right-padded
responses): forward with logits for the response columns, per-token logprobs, GRPO clipped
surrogate against generator logprobs, backward, grad-norm clipping, AdamW step. The bare loop is
hand-written with tensors prepared once; the backend (`TorchBackend.train_step`) builds them from
episode lists every step and also computes its metrics (entropy, clip fraction), which is the
overhead we want to see. Rounds alternate in ABBA order (ours, bare, bare, ours, ...) so machine
noise and cache warmth hit both alike; medians are reported. tokens = prompt + response tokens of
the batch per step. One intra-op thread by default: these 2-core machines are shared, and more
threads mostly measure the neighbours. On a GPU (--device cuda) both sides run under bf16 autocast.

    tokens_per_s       = tokens / median(backend step seconds)
    bare_tokens_per_s  = tokens / median(bare step seconds)
    ratio              = tokens_per_s / bare_tokens_per_s          (target >= 0.9)

Results go to bench/results/trainer.json (bench/results/trainer_gpu.json with --device cuda).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import tempfile
import time

import torch

from forgerpc.services.common.models import ModelNotFoundError, load_model, make_tiny_model, smollm2_dir
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend
from forgerpc.services.trainer.config import TrainerConfig

OUT = pathlib.Path(__file__).parent / "results" / "trainer.json"


def make_batch(n: int, prompt_len: tuple[int, int], response_len: tuple[int, int], vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p = int(torch.randint(*prompt_len, (1,), generator=g))
        r = int(torch.randint(*response_len, (1,), generator=g))
        out.append(Sample(prompt=torch.randint(4, vocab, (p,), generator=g).tolist(),
                          response=torch.randint(4, vocab, (r,), generator=g).tolist(),
                          generator_logprobs=(-3.0 + 0.2 * torch.randn(r, generator=g)).tolist(), mask=[1] * r,
                          advantage=float(torch.randn(1, generator=g)), group_id=str(i // 4)))
    return out


class BareLoop:
    """The minimal loop: fixed tensors, inline GRPO loss, no validation, no metrics."""

    def __init__(self, model, samples: list[Sample], lr: float, clip: float = 0.2, max_grad_norm: float = 1.0,
                 device: str = "cpu"):
        self.model = model.to(device).train()
        self.device = torch.device(device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.clip, self.max_grad_norm = clip, max_grad_norm
        P, R = max(len(s.prompt) for s in samples), max(len(s.response) for s in samples)
        self.ids = torch.zeros(len(samples), P + R, dtype=torch.long)
        self.attn = torch.zeros_like(self.ids)
        self.gen, self.mask = torch.zeros(len(samples), R), torch.zeros(len(samples), R)
        for i, s in enumerate(samples):
            p, r = len(s.prompt), len(s.response)
            self.ids[i, P - p:P], self.ids[i, P:P + r] = torch.tensor(s.prompt), torch.tensor(s.response)
            self.attn[i, P - p:P + r] = 1
            self.gen[i, :r], self.mask[i, :r] = torch.tensor(s.generator_logprobs), 1.0
        self.pos = (self.attn.cumsum(-1) - 1).clamp(min=0)
        self.adv = torch.tensor([s.advantage for s in samples]).unsqueeze(-1)
        for name in ("ids", "attn", "pos", "gen", "mask", "adv"):
            setattr(self, name, getattr(self, name).to(self.device))
        self.targets, self.R = self.ids[:, P:], R

    def step(self) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(input_ids=self.ids, attention_mask=self.attn, position_ids=self.pos,
                                logits_to_keep=self.R + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - self.gen)
        per_tok = -torch.min(ratio * self.adv, ratio.clamp(1 - self.clip, 1 + self.clip) * self.adv)
        loss = ((per_tok * self.mask).sum(-1) / self.mask.sum(-1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_model(name: str, path, batch: int, prompt_len, response_len, rounds: int, device: str) -> dict:
    model_a, _ = load_model(path, dtype=torch.float32)
    model_b, _ = load_model(path, dtype=torch.float32)
    samples = make_batch(batch, prompt_len, response_len, model_a.config.vocab_size)
    cfg = TrainerConfig(model_path=str(path), micro_batch_size=batch, optim={"lr": 1e-6}, device=device)
    ours, bare = TorchBackend(cfg, model_a), BareLoop(model_b, samples, lr=1e-6, device=device)
    for _ in range(2):  # warm-up: allocator, kernels, AdamW state
        ours.train_step(samples)
        bare.step()
    t_ours, t_bare = [], []
    for i in range(rounds):
        pair = [(lambda: ours.train_step(samples), t_ours), (bare.step, t_bare)]
        for fn, times in (pair if i % 2 == 0 else pair[::-1]):
            times.append(timed(fn, device))
    tokens = sum(len(s.prompt) + len(s.response) for s in samples)
    tps, bare_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_bare)
    params = sum(p.numel() for p in model_a.parameters())
    print(f"{name}: {params / 1e6:.1f}M params, {tokens} tokens/step: ours {tps:,.0f} tok/s, "
          f"bare {bare_tps:,.0f} tok/s, ratio {tps / bare_tps:.3f}")
    return {"model": name, "params": params, "batch": batch, "tokens_per_step": tokens, "rounds": rounds,
            "tokens_per_s": tps, "bare_tokens_per_s": bare_tps, "ratio": tps / bare_tps,
            "step_seconds": statistics.median(t_ours), "bare_step_seconds": statistics.median(t_bare)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--rounds", type=int, default=0, help="0: 30 for tiny, 4 for bigger models on CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="", help="default: bench/results/trainer.json (trainer_gpu.json on cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    big_rounds = args.rounds or (4 if args.device == "cpu" else 20)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                path = make_tiny_model(pathlib.Path(tmp) / "tiny")
                results.append(bench_model("tiny-llama", path, 16, (32, 64), (64, 128), args.rounds or 30,
                                           args.device))
            elif name == "medium":  # SmolLM2-135M's shapes with the tiny char vocabulary, random weights
                path = make_tiny_model(pathlib.Path(tmp) / "medium", hidden_size=576, num_layers=30, num_heads=9,
                                       num_kv_heads=3, intermediate_size=1536)
                batch, lens = (16, ((64, 128), (128, 256))) if args.device == "cuda" else (2, ((16, 32), (32, 64)))
                results.append(bench_model("medium-135M-shapes", path, batch, *lens, big_rounds, args.device))
            elif name == "smollm2":
                try:
                    path = smollm2_dir()
                except ModelNotFoundError as e:
                    print(f"smollm2 skipped: {e}")
                    continue
                results.append(bench_model("SmolLM2-135M", path, 2, (16, 32), (32, 64), big_rounds, args.device))
    head = results[0]
    report = {"tokens_per_s": head["tokens_per_s"], "bare_tokens_per_s": head["bare_tokens_per_s"],
              "ratio": head["ratio"], "target_ratio": 0.9, "models": results,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "", "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out = pathlib.Path(args.out) if args.out else OUT.with_name("trainer_gpu.json" if args.device == "cuda" else OUT.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
