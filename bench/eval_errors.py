"""Which held-out addition prompts does a checkpoint get wrong? Greedy, as the run's own eval.

    .venv/bin/python bench/eval_errors.py --checkpoint RUN_DIR/checkpoints/step-N --seed S

Loads configs/grpo_tiny.yaml's model with the checkpoint's model.safetensors (seed S = the run's
model.seed and task.seed), decodes the held-out split greedily (bench/bare_learning.py's
`greedy_answers`), prints the wrong answers, then counts right/wrong by two properties of
the prompt: the number of carries, and whether the operands have the same number of digits.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def carries(a: int, b: int) -> int:
    count, carry = 0, 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) >= 10
        count += carry
        a, b = a // 10, b // 10
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/grpo_tiny.yaml"))
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=25, help="wrong answers to print")
    args = ap.parse_args()

    import pipeline
    import torch
    from bare_learning import greedy_answers
    from safetensors.torch import load_model as load_safetensors

    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.orchestrator.tasks import make_task

    torch.set_num_threads(1)
    cfg = load_config(RunConfig, args.config, [f"model.seed={args.seed}", f"task.seed={args.seed}"])
    if cfg.task.name != "addition":
        sys.exit(f"{args.config}: task {cfg.task.name!r}; this script reads addition prompts")
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = pipeline.bare_model(cfg, tmp)
    load_safetensors(model, str(pathlib.Path(args.checkpoint) / "model.safetensors"))
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
    examples = task.eval_set
    texts = greedy_answers(model, tok, examples, cfg.grpo.max_tokens)
    by_carries, by_lengths, shown = collections.Counter(), collections.Counter(), 0
    for text, ex in zip(texts, examples):
        a, b = map(int, ex.prompt.rstrip("=").split("+"))
        ok = text == ex.target.strip()
        by_carries[carries(a, b), ok] += 1
        by_lengths[len(str(a)) == len(str(b)), ok] += 1
        if not ok and shown < args.show:
            shown += 1
            print(f"{ex.prompt}{ex.target}  got {text!r}")
    right = sum(n for (_, ok), n in by_carries.items() if ok)
    print(f"accuracy {right / len(examples):.3f} over {len(examples)} held-out prompts")
    for name, counter in (("carries", by_carries), ("same length", by_lengths)):
        for key in sorted({k for k, _ in counter}):
            wrong, good = counter[key, False], counter[key, True]
            print(f"  {name} = {key}: {good}/{good + wrong} right")


if __name__ == "__main__":
    main()
