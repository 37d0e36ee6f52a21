"""Does GRPO teach? `configs/grpo_tiny.yaml` over several seeds, eval gain within a time budget.

    .venv/bin/python bench/learning.py                       # seeds 0 1 2, ~8 min each on 2 cores
    .venv/bin/python bench/learning.py --seeds 0 --config configs/grpo_tiny.yaml grpo.steps=200

Each seed is one `forgerpc run` (every service its own process, a private Redis) with
`model.seed`, `task.seed` and the trainer's seed set to it. From the run's metrics.jsonl:

    gain_at_budget = acc(last eval with t - t0 <= budget) - acc(t0)

where t0 is the GRPO baseline eval (the SFT warm start's accuracy, same held-out split) and the
budget is the issue's 5 minutes of GRPO. A run that stops on `grpo.max_seconds` (configs/grpo_tiny.yaml:
300, the same clock) ends on the step that crosses the budget, a fraction of a second past it: its
final eval counts (`STEP_SLACK`).

Machines differ (the same 2-core kind ran the bare loop at 1,165 and at 488 episodes/s on two days),
so the run also measures `bare_episodes_per_s` (bench/pipeline.py's single-process loop of the same
model, all cores) and reports each seed's episodes/s beside it. Reports mean and sample std over seeds, plus each run's
GRPO episodes/s. Writes bench/results/learning.json. Nothing here tunes the eval: the split,
greedy decoding and exact-match scoring are the run's own.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEP_SLACK = 2.0  # seconds: one GRPO step (~0.3-0.5 s here) past the budget still counts


def summarize(metrics_file: pathlib.Path, budget: float) -> dict:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    grpo = [r for r in rows if r.get("phase") == "grpo"]
    sft = [r for r in rows if r.get("phase") == "sft" and "eval_accuracy" in r]
    start = next(r for r in grpo if r["step"] == 0)
    t0, acc0 = start["time"], start["eval_accuracy"]
    evals = [r for r in grpo if "eval_accuracy" in r and r["step"] > 0]
    within = [r for r in evals if r["time"] - t0 <= budget + STEP_SLACK]
    last = grpo[-1]
    return {
        "sft_start": sft[0]["eval_accuracy"] if sft else None,
        "grpo_start": acc0,
        "acc_at_budget": within[-1]["eval_accuracy"] if within else acc0,
        "gain_at_budget": (within[-1]["eval_accuracy"] if within else acc0) - acc0,
        "best_within_budget": max([r["eval_accuracy"] for r in within], default=acc0),
        "final": evals[-1]["eval_accuracy"] if evals else acc0,
        "final_gain": (evals[-1]["eval_accuracy"] if evals else acc0) - acc0,
        "grpo_seconds": last["time"] - t0,
        "grpo_steps": last["step"],
        "episodes_per_s": last.get("episodes_per_s"),
        "curve": [(round(r["time"] - t0, 1), r["eval_accuracy"]) for r in evals],
    }


def bare_reference(config: str, steps: int = 60) -> dict:
    """bench/pipeline.py's bare in-process GRPO loop on CONFIG's model (the machine's speed). It
    trains ~98 % of its episodes (`trained_fraction`), a real run's trainer only those of groups
    with mixed rewards (40-60 % here): the runs' episodes/s over this is not a framework-overhead
    ratio (bench/pipeline.py's service_vs_bare is)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import pipeline
    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig

    path = ROOT / config
    grpo = load_config(RunConfig, path).grpo
    return pipeline.part_bare(argparse.Namespace(config=path, threads=0, bare_steps=steps),
                              grpo.prompts_per_step, grpo.group_size)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/grpo_tiny.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-seconds", type=float, default=300.0, help="GRPO wall-clock budget")
    ap.add_argument("--runs-dir", default="runs/learning")
    ap.add_argument("--out", default=str(ROOT / "bench/results/learning.json"))
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()

    forgerpc = pathlib.Path(sys.executable).with_name("forgerpc")
    runs = []
    for seed in args.seeds:
        run_dir = pathlib.Path(args.runs_dir) / f"seed{seed}"
        if run_dir.exists():
            for f in run_dir.glob("metrics.jsonl"):
                f.unlink()  # metrics append; a rerun must not mix with an old one
        cmd = [str(forgerpc), "run", args.config, f"run_dir={run_dir}", f"model.seed={seed}", f"task.seed={seed}",
               f"services.trainer.config.seed={seed}", *args.overrides]
        print("+", " ".join(cmd), flush=True)
        started = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            sys.exit(f"seed {seed} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = summarize(ROOT / run_dir / "metrics.jsonl", args.budget_seconds)
        result.update(seed=seed, wall_seconds=time.time() - started)
        runs.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)

    bare = bare_reference(args.config)
    print(json.dumps({"bare": bare}), flush=True)
    out = {"config": args.config, "overrides": args.overrides, "budget_seconds": args.budget_seconds,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_end": os.getloadavg()[0],
           "bare_episodes_per_s": bare["episodes_per_s"], "bare": bare, "runs": runs}
    for key in ("grpo_start", "acc_at_budget", "gain_at_budget", "final", "final_gain", "episodes_per_s"):
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std(values)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
