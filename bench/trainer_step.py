"""What does `share_prompts` save? The trainer's GRPO step with and without it, same batches, one process.

    .venv/bin/python bench/trainer_step.py                          # grpo_tiny's model and batch shape
    .venv/bin/python bench/trainer_step.py --groups 16 --prompt-tokens 200 --response-tokens 50

Builds the model CONFIG describes (model: arch, hidden_size, layers, heads, kv_heads; the real
loading code) and three TorchBackends over copies of it from CONFIG's trainer config, one with
`share_prompts: false` (the reference: every episode padded to prompt + response), one with it on
in two passes (`pack_group_tokens: 0`: prompts, then responses on their K/V) and one with each group
packed into one row (`pack_group_tokens` unbounded).
Each step gets a fresh batch of --groups groups of grpo.group_size episodes (random tokens, prompts
and responses of up to the given lengths, half the episodes of each group rewarded so no advantage
is 0); the backends take turns on the same batch, in rotating order. Reports the median step time
of each, `shared_vs_padded` = padded / shared (> 1: sharing is faster) and `packed_vs_shared` =
shared / packed, and the largest relative difference of a loss from the padded one. Then the same
for SFT steps of --sft distinct prompts (one response each): padded vs packed rows, which are the
padded batch computed by shared_forward.py instead of HF's forward (`sft_packed_vs_padded`).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def batch(rng: random.Random, groups: int, n: int, prompt_tokens: int, response_tokens: int, vocab: int):
    from forgerpc.services.trainer.backends.torch_backend import Sample

    out = []
    for g in range(groups):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(max(1, prompt_tokens // 2), prompt_tokens))]
        for i in range(n):
            length = rng.randint(max(1, response_tokens // 2), response_tokens)
            response = [rng.randrange(4, vocab) for _ in range(length)]
            out.append(Sample(prompt=prompt, response=response, generator_logprobs=[-1.0] * len(response),
                              mask=[1] * len(response), reward=float(i % 2), group_id=f"g{g}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/grpo_tiny.yaml")
    ap.add_argument("--groups", type=int, default=8, help="groups per step (grpo_tiny: ~8 of 16 carry a gradient)")
    ap.add_argument("--prompt-tokens", type=int, default=8, help="longest prompt (grpo_tiny: 'ddd+ddd=' is 8)")
    ap.add_argument("--response-tokens", type=int, default=5, help="longest response (grpo_tiny: 4 digits + eos)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sft", type=int, default=64, metavar="N",
                    help="also time SFT steps of N distinct prompts, padded vs packed (grpo_tiny's batch: 64; 0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/trainer_step.json"))
    args = ap.parse_args()

    import torch

    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.services.common.models import load_model, make_tiny_model
    from forgerpc.services.trainer.backends.torch_backend import TorchBackend
    from forgerpc.services.trainer.config import TrainerConfig

    torch.set_num_threads(args.threads)
    cfg = load_config(RunConfig, args.config)
    m = cfg.model
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(tmp, arch=m.arch, hidden_size=m.hidden_size, num_layers=m.layers, num_heads=m.heads,
                               num_kv_heads=m.kv_heads, intermediate_size=2 * m.hidden_size, seed=m.seed)
        model, _ = load_model(path, dtype=torch.float32)
    trainer = dict(cfg.services["trainer"].config)
    variants = {  # name -> trainer config overrides
        "padded": {"share_prompts": False},
        "shared": {"share_prompts": True, "pack_group_tokens": 0},            # two passes: prompts, then responses
        "packed": {"share_prompts": True, "pack_group_tokens": 1 << 30},      # one row per group
    }
    backends = {name: TorchBackend(TrainerConfig(**{**trainer, **v}), copy.deepcopy(model))
                for name, v in variants.items()}
    rng = random.Random(0)

    def timed(names: list[str], groups: int, n: int, objective: str) -> tuple[dict, float]:
        """Median step seconds per backend over fresh batches, and the largest relative loss difference."""
        times: dict[str, list[float]] = {name: [] for name in names}
        worst = 0.0
        for i in range(args.warmup + args.steps):
            samples = batch(rng, groups, n, args.prompt_tokens, args.response_tokens, model.config.vocab_size)
            losses = {}
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
                start = time.perf_counter()
                losses[name] = backends[name].train_step(samples, objective=objective).loss
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
            for name in names[1:]:
                worst = max(worst, abs(losses[name] - losses[names[0]]) / max(abs(losses[names[0]]), 1e-6))
        return {name: statistics.median(t) for name, t in times.items()}, worst

    medians, worst = timed(list(variants), args.groups, cfg.grpo.group_size, "policy_gradient")
    result = {
        "config": args.config, "groups": args.groups, "group_size": cfg.grpo.group_size,
        "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens, "threads": args.threads,
        **{f"{name}_step_ms": round(t * 1e3, 2) for name, t in medians.items()},
        "max_relative_loss_difference": worst,
    }
    result["shared_vs_padded"] = round(result["padded_step_ms"] / result["shared_step_ms"], 2)
    result["packed_vs_shared"] = round(result["shared_step_ms"] / result["packed_step_ms"], 2)
    if args.sft:  # distinct prompts, one response each: the packed rows are the padded batch, minus HF's glue
        medians, worst = timed(["padded", "packed"], args.sft, 1, "sft")
        result |= {"sft_episodes": args.sft, "sft_padded_step_ms": round(medians["padded"] * 1e3, 2),
                   "sft_packed_step_ms": round(medians["packed"] * 1e3, 2),
                   "sft_packed_vs_padded": round(medians["padded"] / medians["packed"], 2),
                   "sft_max_relative_loss_difference": worst}
    print(json.dumps(result))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
