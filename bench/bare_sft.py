"""How fast, and how far, does CONFIG's tiny model learn its task by SFT? One process, no services.

    .venv/bin/python bench/bare_sft.py --steps 3000 --eval-every 100 [model.bos=true model.layers=6 ...]

Builds CONFIG's model through the real loading code, then trains it on the task's training split the
way the SFT app does (batches of sft.batch_size prompts, cross-entropy on the target and EOS only,
AdamW at sft.learning_rate, constant, gradient norm clipped to 1), and every --eval-every steps decodes
the held-out split greedily (exact match after stripping, as the run's own eval), split by whether the
operands have the same number of digits (addition only). The prompt is encoded by the tokenizer
(`tok(prompt)`: a leading BOS only with `model.bos=true`).
Prints one JSON line per eval; --out writes them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/grpo_tiny.yaml"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of CONFIG, e.g. model.layers=6")
    args = ap.parse_args()

    import pipeline
    import torch
    from bare_learning import greedy_answers

    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.orchestrator.tasks import make_task

    torch.set_num_threads(args.threads)
    cfg = load_config(RunConfig, args.config, args.overrides)
    torch.manual_seed(cfg.model.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = pipeline.bare_model(cfg, tmp)
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft.learning_rate)
    rng = random.Random(f"sft-{cfg.model.seed}")
    pad, eos = tok.pad_token_id, tok.eos_token_id

    def evaluate(step: int, seconds: float) -> dict:
        answers = greedy_answers(model, tok, task.eval_set, cfg.grpo.max_tokens)  # the run's own eval
        model.train()
        right = [a == e.target.strip() for a, e in zip(answers, task.eval_set)]
        row = {"step": step, "eval_accuracy": sum(right) / len(right), "seconds": round(seconds, 1)}
        if cfg.task.name == "addition":
            same = [len(a) == len(b) for a, b in (e.prompt.rstrip("=").split("+") for e in task.eval_set)]
            for key, want in (("same_length", True), ("different_length", False)):
                hits = [r for r, s in zip(right, same) if s == want]
                row[key] = f"{sum(hits)}/{len(hits)}"
        return row

    rows = [evaluate(0, 0.0)]
    print(json.dumps(rows[-1]), flush=True)
    started, train_seconds = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        examples = [task.sample_train(rng) for _ in range(cfg.sft.batch_size)]
        seqs = [(tok(e.prompt)["input_ids"], tok(e.target, add_special_tokens=False)["input_ids"] + [eos]) for e in examples]
        width = max(len(p) + len(t) for p, t in seqs)
        ids = torch.tensor([p + t + [pad] * (width - len(p) - len(t)) for p, t in seqs])
        labels = torch.tensor([[-100] * len(p) + t + [-100] * (width - len(p) - len(t)) for p, t in seqs])
        mask = (ids != pad).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            rows.append({**evaluate(step, time.perf_counter() - started), "loss": round(loss.item(), 4),
                         "train_seconds": round(train_seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
