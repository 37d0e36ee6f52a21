"""What a user sees at the end of a run: a summary table and PNG plots from metrics.jsonl."""

from __future__ import annotations

import json
import pathlib

PLOTS = {  # file name -> (title, metric keys)
    "reward.png": ("reward mean", ["reward_mean"]),
    "eval_accuracy.png": ("held-out eval accuracy (greedy)", ["eval_accuracy"]),
    "loss.png": ("loss", ["loss"]),
    "kl.png": ("KL to reference", ["kl"]),
    # Mean token entropy of the episodes that carried a gradient: a policy that stops exploring
    # shows here before the reward flattens.
    "entropy.png": ("policy entropy (nats/token)", ["entropy"]),
    "staleness.png": ("staleness (versions)", ["staleness"]),
    "throughput.png": ("episodes/s", ["episodes_per_s"]),
}


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per (phase, step), the last written: a resumed run redoes the steps an interrupted
    one took after its last checkpoint, and those newer rows are the ones that count."""
    by_step = {(r["phase"], r["step"]): r for r in rows if "phase" in r and "step" in r}
    return list(by_step.values())


def write_plots(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """One PNG per metric that was recorded, x = training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest_rows(read_metrics(run_dir))
    written = []
    for name, (title, keys) in PLOTS.items():
        series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = run_dir / name
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def summary_table(result: dict):
    from rich.table import Table

    table = Table(title="forgerpc run summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(key, str(value))
    return table
