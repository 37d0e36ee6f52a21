"""How much GRPO signal does a warm start offer? p(target) per held-out prompt, by teacher forcing.

    .venv/bin/python bench/warm_start_signal.py --checkpoint RUN_DIR/checkpoints/step-N --seed S [KEY=VALUE ...]

Loads CONFIG's model (seed S = the run's model.seed and task.seed; overrides such as
model.hidden_size=256 as the run had them) with the checkpoint's model.safetensors and computes, for
each held-out prompt, the probability that one sample at T = 1 is exactly the target:

    p = prod_t softmax(logits_t)[target_t]      over the target's characters and the EOS

A group of n samples carries a gradient only when its rewards differ (exact match), so the expected
fraction of groups with a gradient is mean(1 - p^n - (1 - p)^n) ("mixed_groups"). Prints it with
pass@n = mean(1 - (1 - p)^n) and a histogram of p. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
BINS = (0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/grpo_tiny.yaml"))
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of CONFIG, e.g. model.hidden_size=256")
    args = ap.parse_args()

    import pipeline
    import torch
    from safetensors.torch import load_model as load_safetensors

    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.orchestrator.tasks import make_task

    torch.set_num_threads(1)
    cfg = load_config(RunConfig, args.config, [f"model.seed={args.seed}", f"task.seed={args.seed}", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = pipeline.bare_model(cfg, tmp)
    load_safetensors(model, str(pathlib.Path(args.checkpoint) / "model.safetensors"))
    model.eval()
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
    probs = []
    with torch.no_grad():
        for ex in task.eval_set:
            prompt = tok(ex.prompt)["input_ids"]
            target = tok(ex.target.strip())["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(target)[:, None])
            probs.append(logp.sum().exp().item())
    n = cfg.grpo.group_size
    print(json.dumps({
        "checkpoint": args.checkpoint, "group_size": n, "mean_p": round(statistics.fmean(probs), 3),
        "pass_at_n": round(statistics.fmean(1 - (1 - p) ** n for p in probs), 3),
        "mixed_groups": round(statistics.fmean(1 - p ** n - (1 - p) ** n for p in probs), 3),
        "histogram": {f"[{lo}, {hi})": sum(lo <= p < hi or (hi == 1.0 and p == 1.0) for p in probs)
                      for lo, hi in zip(BINS, BINS[1:])},
    }))


if __name__ == "__main__":
    main()
