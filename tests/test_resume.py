"""`forgerpc run CONFIG --resume RUN_DIR`: a run stopped after N steps continues at step N+1 with
the trainer, the policy version, the data position and metrics.jsonl carrying on; the private
Redis keeps its data in the run directory; weights travel through a weight store when the stack
has one. Plus the pieces that need no services (Position, the progress display)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redis
from rich.console import Console

from conftest import ROOT
from forgerpc.orchestrator.loop import Position, is_store_address
from forgerpc.orchestrator.progress import Progress
from forgerpc.orchestrator.redis_server import PrivateRedis
from forgerpc.orchestrator.report import latest_rows

SHORT = ["sft.steps=10", "sft.eval_every=5", "sft.batch_size=16", "grpo.eval_every=2", "grpo.checkpoint_every=2",
         "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.eval_size=16", "task.eval_size=16",
         "grpo.rollout_workers=2", "model.hidden_size=32", "model.layers=2",
         "grpo.max_staleness=0", "services.replay_buffer.config.max_policy_age=0",  # on-policy: see the asserts
         "services.weight_store.replicas=1", "services.generator.replicas=2"]  # (SHORT[:-2] drops these two)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "run", str(ROOT / "configs/grpo_tiny.yaml"),
                           *args, *SHORT], capture_output=True, text=True, timeout=300)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_continues_steps_versions_trainer_and_metrics(tmp_path):
    first = _run(f"run_dir={tmp_path}", "grpo.steps=3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _rows(tmp_path)
    grpo = [r for r in before if r.get("phase") == "grpo" and r["step"] > 0]
    assert [r["step"] for r in grpo] == [1, 2, 3]
    # SFT: 10 trainer steps, published v1 (step 5) and v2 (step 10); GRPO publishes after each step.
    assert [r["trainer_step"] for r in grpo] == [11, 12, 13] and grpo[-1]["version"] == 4
    assert not (tmp_path / "published").exists(), "with a weight store, nothing is published to disk"
    assert (tmp_path / "redis").is_dir() and (tmp_path / "checkpoints" / "step-00000013").is_dir()

    # The override after --resume says how far to go now.
    second = _run("--resume", str(tmp_path), "grpo.steps=5")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed_from" in second.stdout and "grpo step 3" in second.stdout
    rows = _rows(tmp_path)
    assert rows[: len(before)] == before, "metrics.jsonl is appended, never rewritten"
    new = rows[len(before):]
    event = new[0]
    assert event["event"] == "resume" and event["phase"] == "grpo" and event["from_step"] == 3
    assert event["trainer_step"] == 13 and event["checkpoint_version"] == 5
    # v5 was the last the first run published; the resumed weights get a number never used before.
    assert event["version"] == 6
    assert event["buffer_acked_total"] >= 3 * 16, "the buffer's Redis data (acks of run 1) survived"
    steps = [r for r in new[1:] if r.get("phase") == "grpo"]
    assert [r["step"] for r in steps] == [4, 5], "no SFT again, no GRPO step 0 again"
    assert [r["trainer_step"] for r in steps] == [14, 15], "the trainer continues at checkpoint step + 1"
    assert [r["version"] for r in steps] == [6, 7]
    assert all(r["staleness"] == 0 for r in steps), "generators got the resumed weights (through the store)"
    assert steps[0]["episodes"] > grpo[-1]["episodes"], "episode count carries on"
    assert "eval_accuracy" in steps[-1]
    assert (tmp_path / "published_version").read_text() == "8"


@pytest.mark.slow
def test_killed_during_sft_resumes_sft_then_grpo(tmp_path):
    """SIGTERM mid-SFT: every process stops; the resumed run redoes the SFT steps after the newest
    checkpoint (same examples: the sampler's RNG state was saved with it), then runs GRPO."""
    args = [sys.executable, "-m", "forgerpc.orchestrator", "run", str(ROOT / "configs/grpo_tiny.yaml"),
            f"run_dir={tmp_path}", *SHORT[:-2], "sft.steps=100000", "grpo.steps=2"]  # local weight files
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = tmp_path / "metrics.jsonl"
            if metrics.is_file() and any(r.get("step", 0) >= 12 for r in _rows(metrics.parent)):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert not [p for p in psutil.process_iter(["cmdline", "cwd"]) if p.pid != os.getpid() and (
        str(tmp_path) in " ".join(p.info["cmdline"] or []) or str(p.info["cwd"] or "").startswith(str(tmp_path)))], \
        "service or Redis processes left behind"
    before = _rows(tmp_path)
    last_step = max(r["step"] for r in before)
    published = int((tmp_path / "published_version").read_text())
    newest = int(max(p.name for p in (tmp_path / "checkpoints").glob("step-*")).split("-")[1])
    sft_steps = newest + 7  # SFT started at trainer step 0: checkpoint step = SFT step

    second = subprocess.run([*args[:5], "--resume", str(tmp_path), *args[6:-2], f"sft.steps={sft_steps}",
                             "grpo.steps=2"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    new = _rows(tmp_path)[len(before):]
    event = new[0]
    assert event["event"] == "resume" and event["phase"] == "sft"
    assert event["from_step"] == newest and 10 <= newest <= last_step, "the newest SFT checkpoint"
    assert event["version"] == published + 1, "a number never published before"
    sft = [r for r in new[1:] if r.get("phase") == "sft"]
    assert [r["step"] for r in sft] == list(range(newest + 1, sft_steps + 1))
    assert sft[0]["trainer_step"] == event["trainer_step"] + 1
    redone = {r["step"]: r for r in before if r.get("phase") == "sft"}
    if sft[0]["step"] in redone:  # the killed run got past its checkpoint
        # Same weights, same examples (the sampler's RNG came back): the same loss.
        assert sft[0]["loss"] == pytest.approx(redone[sft[0]["step"]]["loss"], rel=1e-4)
    grpo = [r for r in new[1:] if r.get("phase") == "grpo"]
    assert [r["step"] for r in grpo] == [0, 1, 2] and grpo[1]["trainer_step"] == sft_steps + 1
    assert all(r["staleness"] == 0 for r in grpo[1:])


def test_resume_without_checkpoint_fails_before_starting_anything(tmp_path):
    out = _run("--resume", str(tmp_path), "grpo.steps=2")
    assert out.returncode == 1 and "no checkpoint under" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "logs").exists(), "nothing was started"
    missing = _run("--resume", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_fresh_run_clears_the_state_a_resume_would_read(tmp_path):
    from forgerpc.orchestrator.run import RUN_STATE, clear_run_state

    for name in RUN_STATE:
        path = tmp_path / name
        if "." in name or name == "published_version":
            path.write_text("old")
        else:
            (path / "x").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    clear_run_state(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "the policy model is kept, run state is not"


def test_private_redis_with_data_dir_restarts_from_its_files(tmp_path):
    with PrivateRedis(data_dir=tmp_path / "redis") as url:
        client = redis.Redis.from_url(url)
        client.xadd("stream", {"k": "v"})
        client.close()
    assert (tmp_path / "redis").is_dir(), "kept after stop"
    with PrivateRedis(data_dir=tmp_path / "redis") as url:  # a new server, a new port
        client = redis.Redis.from_url(url)
        assert client.xlen("stream") == 1
        client.close()


def test_position_round_trip_and_bad_input():
    p = Position("sft", step=7, version=2, rng=[3, list(range(625)), None])
    assert Position.from_json(p.to_json()) == p
    assert Position.from_json(dataclasses.replace(p, done=True).to_json()).done
    # A checkpoint written before `done` existed reads as not done.
    assert not Position.from_json('{"phase": "sft", "step": 7, "version": 2}').done
    for bad in ("", "[1, 2]", '{"phase": "grpo"}', '{"phase": "grpo", "step": 1, "version": 1, "x": 1}'):
        with pytest.raises(ValueError, match="data_position"):
            Position.from_json(bad)


def test_store_address_or_directory():
    for address in ("127.0.0.1:50051", "weight-store:7000", "[::1]:80", "dns:///store:7000", "unix:/tmp/ws.sock"):
        assert is_store_address(address), address
    for path in ("/tmp/run/published/v00000003", "runs/grpo_tiny/published/v00000001", "v00000001", ""):
        assert not is_store_address(path), path


def test_latest_rows_keep_the_redone_step():
    rows = [{"phase": "grpo", "step": 1, "loss": 1}, {"phase": "grpo", "step": 2, "loss": 2},
            {"event": "resume"}, {"phase": "grpo", "step": 2, "loss": 5}, {"phase": "grpo", "step": 3, "loss": 3}]
    assert [(r["step"], r["loss"]) for r in latest_rows(rows)] == [(1, 1), (2, 5), (3, 3)]


async def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(Console(file=out, width=200), totals={"grpo": 10}, line_every=3600)
    assert not progress.live
    progress.update({"phase": "grpo", "step": 1, "version": 3, "reward_mean": 0.25, "episodes_per_s": 400.4,
                     "tokens_per_s": 2000, "staleness": 0, "buffer_size": 64})  # first line: printed
    progress.update({"phase": "grpo", "step": 2, "version": 4, "reward_mean": 0.5})  # throttled
    progress.update({"phase": "grpo", "step": 3, "version": 5, "eval_accuracy": 0.75})  # eval: printed
    progress.update({"event": "resume", "version": 9})  # not progress
    lines = out.getvalue().splitlines()
    assert lines == [
        "grpo step 1/10 | policy version 3 | reward mean 0.250 | episodes/s 400 | tokens/s 2000 | staleness 0 "
        "| buffer (episodes) 64",
        "grpo step 3/10 | policy version 5 | reward mean 0.500 | eval accuracy 0.750 | episodes/s 400 "
        "| tokens/s 2000 | staleness 0 | buffer (episodes) 64",
    ]
    progress.set_health({"reward": [("127.0.0.1:1", "SERVING")]})  # healthy: silent
    progress.set_health({"reward": [("127.0.0.1:1", "DOWN (UNAVAILABLE)")]})
    assert out.getvalue().splitlines()[-1] == "health: reward 127.0.0.1:1 DOWN (UNAVAILABLE)"


async def test_progress_live_table_shows_metrics_and_health():
    out = io.StringIO()
    polls = []

    async def health():
        polls.append(1)
        return {"generator": [("127.0.0.1:7001", "SERVING"), ("127.0.0.1:7002", "NOT_SERVING")]}

    progress = Progress(Console(file=out, force_terminal=True, width=120), totals={"sft": 50}, health=health,
                        health_every=0.01)
    assert progress.live
    async with progress:
        progress.update({"phase": "sft", "step": 7, "version": 1, "loss": 1.5, "eval_accuracy": 0.125})
        import asyncio

        await asyncio.sleep(0.1)
    text = Console(file=io.StringIO(), width=120)
    text.print(progress.render())
    screen = text.file.getvalue()
    assert polls, "health was polled"
    for expected in ("sft step 7/50", "policy version", "0.125 (step 7)", "1.5000", "127.0.0.1:7002", "NOT_SERVING"):
        assert expected in screen, expected
