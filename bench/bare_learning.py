"""Does the service loop learn as fast per step as a bare one? GRPO in one process from a checkpoint.

    .venv/bin/python bench/bare_learning.py --checkpoint RUN_DIR/checkpoints/step-00000800
    .venv/bin/python bench/bare_learning.py --checkpoint DIR --lr 1e-4 --warmup 50 --schedule constant

Loads CONFIG's model (the real loading code) with the checkpoint's weights (a trainer checkpoint's
model.safetensors, e.g. an SFT warm start of `forgerpc run CONFIG app=sft`), then runs
bench/pipeline.py's `bare_grpo_step` (HF generate, the trainer's own grpo_loss, AdamW) with CONFIG's
task, group size, prompts per step, temperature and reward functions (services.reward.config.functions,
scored in-process by the reward service's own functions), and evaluates the
held-out split greedily every --eval-every steps, as the run's own eval does (same split, greedy,
exact match after stripping). No services, RPC, Redis or staleness: a run of the service loop
resumed from the same checkpoint (`forgerpc run CONFIG app=grpo --resume RUN_DIR grpo.max_seconds=0`)
can be compared with it step by step. The learning-rate schedule is the trainer's (linear warmup,
then cosine to 0.1 x lr over --steps, or constant). Prints one JSON line per eval; --out writes them.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def greedy_answers(model, tok, examples, max_tokens: int, batch: int = 100) -> list[str]:
    """Greedy completions of the examples' prompts, stripped (as the run's own eval reads them)."""
    import torch

    model.eval()
    texts = []
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            enc = tok([e.prompt for e in examples[i:i + batch]], return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
            texts += [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return texts


def greedy_accuracy(model, tok, examples, max_tokens: int) -> float:
    answers = greedy_answers(model, tok, examples, max_tokens)
    return sum(a == e.target.strip() for a, e in zip(answers, examples)) / len(examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/grpo_tiny.yaml"))
    ap.add_argument("--checkpoint", required=True, help="a checkpoint directory holding model.safetensors")
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--lr", type=float, default=None, help="default: CONFIG's trainer optim.lr")
    ap.add_argument("--warmup", type=int, default=None, help="default: CONFIG's trainer optim.warmup_steps")
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--minibatches", type=int, default=1, help="optimizer steps per generated batch")
    ap.add_argument("--replay-failed", type=float, default=0.0,
                    help="probability of drawing a prompt from the pool of recent prompts with a failed sample")
    ap.add_argument("--all-wrong-advantage", type=float, default=0.0,
                    help="advantage -C for every sample of a group whose rewards are all 0 (default 0: GRPO's)")
    ap.add_argument("--kept-mean", action="store_true", help="average the loss over nonzero-advantage episodes")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of CONFIG, e.g. grpo.prompts_per_step=8")
    args = ap.parse_args()

    import pipeline
    import torch
    from safetensors.torch import load_model as load_safetensors

    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.orchestrator.tasks import make_task
    from forgerpc.services.reward.config import RewardConfig
    from forgerpc.services.reward.server import RewardServicer
    from forgerpc.v1.reward_pb2 import RewardItem

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = load_config(RunConfig, args.config, args.overrides)
    g = cfg.grpo
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = pipeline.bare_model(cfg, tmp)
    load_safetensors(model, str(pathlib.Path(args.checkpoint) / "model.safetensors"))
    trainer = cfg.services["trainer"].config
    optim = trainer.get("optim", {})
    lr = args.lr if args.lr is not None else optim.get("lr", 1e-5)
    warmup = args.warmup if args.warmup is not None else optim.get("warmup_steps", 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def lr_factor(step: int) -> float:  # the trainer's: linear warmup, then cosine to 0.1 x lr (or constant)
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
    clip = trainer.get("loss", {}).get("clip_low", 0.2)
    reward = RewardServicer(RewardConfig(**cfg.services["reward"].config))  # its functions, built and checked

    def score(response: str, target: str) -> float:  # the service's weighted sum, in-process (sync functions)
        item = RewardItem(response=response, target=target)
        return sum(weight * fn(item)[0] for _, weight, fn, _ in reward.functions)

    rng = random.Random(args.seed)
    rows = [{"step": 0, "eval_accuracy": greedy_accuracy(model, tok, task.eval_set, g.max_tokens), "seconds": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    started, rewards, pool = time.perf_counter(), [], []
    for step in range(1, args.steps + 1):
        examples = [pool.pop(rng.randrange(len(pool))) if pool and rng.random() < args.replay_failed
                    else task.sample_train(rng) for _ in range(g.prompts_per_step)]
        targets = [e.target.strip() for e in examples for _ in range(g.group_size)]
        out = pipeline.bare_grpo_step(
            model, tok, optimizer, [e.prompt for e in examples], g.group_size, g.temperature, g.max_tokens, clip,
            g.std_normalize, lambda texts: [score(t, y) for t, y in zip(texts, targets)],
            minibatches=args.minibatches, kept_mean=args.kept_mean, all_wrong_advantage=args.all_wrong_advantage)
        schedule.step()
        rewards.append(statistics.fmean(out["rewards"]))
        for i, e in enumerate(examples):  # a prompt with a failed sample may be drawn again
            if min(out["rewards"][i * g.group_size:(i + 1) * g.group_size]) < 1.0:
                pool.append(e)
        del pool[:-2048]
        if step % args.eval_every == 0 or step == args.steps:
            rows.append({"step": step, "eval_accuracy": greedy_accuracy(model, tok, task.eval_set, g.max_tokens),
                         "reward_mean": round(statistics.fmean(rewards[-args.eval_every:]), 3),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "lr": lr, "warmup": warmup, "rows": rows},
                                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
