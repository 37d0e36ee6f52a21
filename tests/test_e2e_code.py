"""configs/grpo_code_tiny.yaml end to end, shortened: real service processes (the sandbox among
them), a private Redis, SFT warm start and GRPO steps whose rewards come from running each
response's hidden tests in the sandbox, for training episodes and held-out eval alike."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

SHORT = ["sft.steps=10", "sft.eval_every=10", "sft.batch_size=16", "grpo.steps=3", "grpo.eval_every=3",
         "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.eval_size=8", "task.eval_size=8",
         "grpo.rollout_workers=2", "model.hidden_size=32", "model.layers=2",
         "services.sandbox.config.uid_base=66200"]  # uids no other test's sandbox uses


def _spans(run_dir, service: str) -> list[dict]:
    return [json.loads(line) for path in (run_dir / "traces").glob(f"{service}-*.jsonl")
            for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_grpo_code_run_scores_in_the_sandbox(tmp_path):
    out = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "run", str(ROOT / "configs/grpo_code_tiny.yaml"),
                          f"run_dir={tmp_path}", *SHORT], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "grpo" and r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in steps), "rewards recorded"
    assert sum("eval_accuracy" in r for r in rows) >= 4  # SFT 0 and 10, GRPO 0 and 3

    # The reward got the sandbox's address from `forgerpc run` (the config leaves it out) ...
    reward_cfg = (tmp_path / "logs" / "reward-0.yaml").read_text()
    sandbox = [line for line in out.stdout.splitlines() if line.strip("│ ").startswith("sandbox")]
    assert sandbox and sandbox[0].split("│")[2].strip() in reward_cfg, (sandbox, reward_cfg)
    # ... and ran every test of every scored item there: 3 tests per training episode trained on
    # and per eval item (4 evals x 8 prompts), each a sandbox Execute call (a server span).
    executes = [s for s in _spans(tmp_path, "sandbox") if s["name"] == "/forgerpc.v1.SandboxService/Execute"]
    episodes = sum(4 * 4 for _ in steps)
    assert len(executes) >= 3 * (episodes + 4 * 8), len(executes)
    assert all(s["status"]["status_code"] != "ERROR" for s in executes)
    # Each Execute belongs to a trace the orchestrator started (reward phase or eval).
    orchestrator_traces = {s["context"]["trace_id"] for s in _spans(tmp_path, "orchestrator")}
    assert {s["context"]["trace_id"] for s in executes} <= orchestrator_traces
