"""FSDP2 data parallel on CPU: `torchrun --nproc_per_node 2` (gloo) gives the loss curve of one process.

Run as a script (under torchrun) this file is the worker: it trains the torch backend for 5 steps on
fixed batches and rank 0 writes the per-step losses and grad norms as JSON. Batches of distinct
prompts, or of groups sharing 16-token prompts: one process then runs shared_forward.py's forward
(`share_prompts`; packed rows, which these short batches fit whether or not prompts repeat), two FSDP
ranks never do (one rank's micro-batch may take two forward calls, each a collective, where
another's takes one: they would deadlock).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

STEPS = 5


def grouped(samples: list, prompt_tokens: int = 16) -> list:
    """The same episodes with one long prompt per 4 (as a GRPO group of 4)."""
    import dataclasses

    return [dataclasses.replace(s, prompt=[4 + (i // 4 + j) % 80 for j in range(prompt_tokens)])
            for i, s in enumerate(samples)]


def run_steps(model_dir: str, out: str, mode: str = "distinct") -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_trainer_backend import episodes

    from forgerpc.services.common.models import load_model
    from forgerpc.services.trainer.backends.torch_backend import TorchBackend
    from forgerpc.services.trainer.config import TrainerConfig

    cfg = TrainerConfig(model_path=model_dir, micro_batch_size=3, loss={"kind": "dapo"},
                        optim={"lr": 1e-3, "warmup_steps": 2, "total_steps": 10})
    model, _ = load_model(model_dir)
    backend = TorchBackend(cfg, model)
    # does a micro-batch of this batch shape take shared_forward.py's forward here? (world 1 only)
    shares = backend._shared_prompts(grouped(episodes(n=3)) if mode == "groups" else episodes(n=3)) is not None
    curve = []
    for step in range(STEPS):
        batch = episodes(n=7, seed=step)  # 7: the ranks get 4 and 3 samples
        r = backend.train_step(grouped(batch) if mode == "groups" else batch)
        curve.append({"loss": r.loss, "grad_norm": r.grad_norm, "tokens": r.tokens, "skipped": r.skipped})
    if backend.rank == 0:
        pathlib.Path(out).write_text(json.dumps({"world": backend.world, "curve": curve, "shares": shares}))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distinct", "groups"])
def test_fsdp2_two_processes_match_one(tmp_path, mode):
    from forgerpc.services.common.models import make_tiny_model

    model_dir = str(make_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=2))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    curves = {}
    for n in (1, 2):
        out = tmp_path / f"curve{n}.json"
        proc = subprocess.run([*torchrun, f"--nproc_per_node={n}", __file__, model_dir, str(out), mode],
                              capture_output=True, text=True, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(out.read_text())
        assert result["world"] == n
        assert result["shares"] == (n == 1)
        curves[n] = result["curve"]
    one, two = curves[1], curves[2]
    assert not any(s["skipped"] for s in one + two)
    assert one[0]["loss"] != one[-1]["loss"]  # the curve moves: the comparison is not vacuous
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-4, (one, two)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (one, two)


if __name__ == "__main__":
    run_steps(*sys.argv[1:4])
