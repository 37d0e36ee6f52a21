"""The whole loop through real processes and a real (private) Redis: SFT warm start, GRPO steps,
weight publishing; curves recorded, version advanced, nothing left behind. Plus the swap test:
a separately started reward implementation, given by address only, is the one the run uses."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from conftest import ROOT

SHORT = ["sft.steps=20", "sft.eval_every=10", "sft.batch_size=16", "grpo.steps=4", "grpo.eval_every=2",
         "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.eval_size=16", "task.eval_size=16",
         "grpo.rollout_workers=2", "model.hidden_size=32", "model.layers=2"]


def _ours(run_dir) -> set[int]:
    """Service processes and the private redis-server of the run in `run_dir` (other test sessions
    on the machine run their own): services name their config under run_dir/logs, and the private
    Redis works in run_dir/redis."""
    found = set()
    for p in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("forgerpc.services" in cmd and str(run_dir) in cmd) or (
                "redis-server" in cmd and str(p.info["cwd"] or "").startswith(str(run_dir))):
            found.add(p.pid)
    return found


def _run(run_dir, *overrides):
    return subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "run", str(ROOT / "configs/grpo_tiny.yaml"),
                           f"run_dir={run_dir}", "trace_sample_ratio=1", *SHORT, *overrides], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_grpo_run_end_to_end(tmp_path):
    from test_telemetry import _Collector

    collector = _Collector()  # `otlp_endpoint`: every process sends its spans and metrics here too
    try:
        out = _run(tmp_path, "grpo.max_staleness=0", "services.replay_buffer.config.max_policy_age=0",  # synchronous
                   f"otlp_endpoint=http://127.0.0.1:{collector.port}")
    finally:
        collector.server.stop(None)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in rows if r.get("phase") == "sft"]
    grpo = [r for r in rows if r.get("phase") == "grpo"]
    assert [r["step"] for r in sft] == list(range(21)), "one row per SFT step (and step 0)"
    assert sum("eval_accuracy" in r for r in sft) == 3  # steps 0, 10, 20
    assert sft[-1]["loss"] < sft[1]["loss"], "SFT loss went down"
    steps = [r for r in grpo if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all("reward_mean" in r and "loss" in r for r in steps)
    assert sum("eval_accuracy" in r for r in grpo) >= 3
    # SFT published twice (steps 10 and 20); GRPO publishes after every step.
    assert steps[0]["version"] == 2 and steps[-1]["version"] == 5
    assert all(r["staleness"] == 0 for r in steps), "max_staleness 0 must train on-policy"
    for name in ("reward.png", "eval_accuracy.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # Weights went through the weight store (the config has one), not the trainer's publish dir.
    assert not (tmp_path / "published").exists()
    # One rollout's trace crosses processes: orchestrator -> generator, reward, replay buffer.
    services_of: dict[str, set[str]] = {}
    linked: set[str] = set()  # traces a training step's span links to (the episodes' rollouts)
    for f in (tmp_path / "traces").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            span = json.loads(line)
            services_of.setdefault(span["context"]["trace_id"], set()).add(f.name.rsplit("-", 1)[0])
            if span["name"] == "train":
                linked.update(link["context"]["trace_id"] for link in span.get("links") or ())
    rollouts = {t for t, s in services_of.items() if {"orchestrator", "generator", "reward", "replay_buffer"} <= s}
    assert rollouts, sorted(map(sorted, services_of.values()))[:5]
    # ...and continues across Redis: each training step's span links to the rollouts it trained on.
    assert linked and linked <= rollouts, (len(linked), len(rollouts))
    # OpenTelemetry metrics of every process, flushed at the end of the run: the orchestrator's
    # phases, counters and row gauges; each service's inbound calls.
    last = {}  # file stem (service) -> {metric name: its data points}, from the file's newest export
    for f in (tmp_path / "otel-metrics").glob("*.jsonl"):
        [resource] = json.loads(f.read_text().splitlines()[-1])["resource_metrics"]
        last[f.name.rsplit("-", 1)[0]] = {m["name"]: m["data"]["data_points"]
                                          for scope in resource["scope_metrics"] for m in scope["metrics"]}
    assert set(last) == {"orchestrator", "generator", "reward", "replay_buffer", "trainer", "weight_store"}, set(last)
    orch = last["orchestrator"]
    phases = {p["attributes"]["phase"]: p["count"] for p in orch["forgerpc.phase.duration"]}
    assert phases["train"] == 20 + 4 and phases["sft_batch"] == 20, phases  # SFT and GRPO steps
    [episodes] = [p["value"] for p in orch["forgerpc.episodes"]]  # generated: rollouts run past the last row
    assert episodes >= steps[-1]["episodes"] > 0
    accuracy = {p["attributes"]["phase"]: p["value"] for p in orch["forgerpc.run.eval_accuracy"]}
    assert accuracy == {"sft": sft[-1]["eval_accuracy"], "grpo": grpo[-1]["eval_accuracy"]}
    assert {p["value"] for p in orch["forgerpc.run.version"] if p["attributes"]["phase"] == "grpo"} == {5}
    trained = {p["attributes"]["rpc.method"]: p["count"] for p in last["trainer"]["rpc.server.duration"]
               if p["attributes"]["rpc.grpc.status_code"] == 0}
    assert trained["TrainStep"] == 20 + 4, trained
    # ...and the same signals reached the OTLP collector from every process.
    def service(resource) -> str:
        return next(a.value.string_value for a in resource.attributes if a.key == "service.name")

    spans = {service(rs.resource) for export in collector.spans for rs in export.resource_spans}
    otlp = {service(rm.resource): {m.name for sm in rm.scope_metrics for m in sm.metrics}
            for export in collector.metrics for rm in export.resource_metrics}
    assert spans == set(otlp) == {f"forgerpc-{name}" for name in last}, (spans, set(otlp))
    assert {"forgerpc.phase.duration", "forgerpc.run.eval_accuracy"} <= otlp["forgerpc-orchestrator"]
    assert "rpc.server.duration" in otlp["forgerpc-trainer"]
    assert (tmp_path / "redis").is_dir(), "the private Redis kept its data in the run directory"
    assert _ours(tmp_path) == set(), "service or Redis processes left behind"


@pytest.mark.slow
def test_time_budget_ends_grpo_with_eval_and_checkpoint(tmp_path):
    """configs/grpo_tiny.yaml as written (one version ahead), with a 3-second GRPO budget: the step
    that crosses it is the last, with its eval and checkpoint, long before grpo.steps."""
    out = _run(tmp_path, "sft.steps=0", "grpo.steps=100000", "grpo.max_seconds=3")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r.get("phase") == "grpo"]
    start, last = grpo[0], grpo[-1]
    assert start["step"] == 0 and 0 < last["step"] < 100000 and "eval_accuracy" in last
    assert 3 <= last["time"] - start["time"] < 3 + 10  # within a step (and its publish) of the budget
    assert [r["time"] - start["time"] < 3 for r in grpo[1:]] == [True] * (len(grpo) - 2) + [False]
    assert all(r["staleness"] <= 1 for r in grpo[1:]), "max_staleness 1: episodes at most one version old"
    newest = sorted((tmp_path / "checkpoints").glob("step-*/meta.json"))[-1]
    assert json.loads(json.loads(newest.read_text())["data_position"])["step"] == last["step"]
    assert _ours(tmp_path) == set()


@pytest.mark.slow
def test_dynamic_sampling_ppo_epochs_and_batched_rollouts(tmp_path):
    """grpo.drop_equal_reward_groups: a random model's responses start with a digit now and then, so
    some groups get mixed rewards and most get all 0; only the mixed ones reach the trainer.
    grpo.ppo_epochs=2: two trainer steps per batch. grpo.groups_per_rollout=2: one Generate,
    Evaluate and AddEpisodes call for two groups, dropped ones included."""
    out = _run(tmp_path, "sft.steps=0", "grpo.steps=3", "grpo.drop_equal_reward_groups=true", "grpo.ppo_epochs=2",
               "grpo.groups_per_rollout=2",
               "services.reward.config={functions: [{kind: regex_match, options: {pattern: '^[0-9]'}}]}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "grpo" and r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["zero_advantage"] == 0.0 for r in steps), "an all-equal group reached the trainer"
    assert all(r["entropy"] > 0 and 0 <= r["clip_fraction"] <= 1 for r in steps)  # the trainer's, per step
    assert (tmp_path / "entropy.png").stat().st_size > 1000
    assert steps[-1]["groups_dropped"] > 0
    assert 0 < steps[-1]["reward_mean"] < 1
    assert [r["trainer_step"] for r in steps] == [2, 4, 6]


@pytest.mark.slow
def test_swap_reward_service_by_address(tmp_path):
    calls = tmp_path / "calls"
    minimal = subprocess.Popen([sys.executable, str(ROOT / "tests/minimal_reward.py"), str(calls)],
                               stdout=subprocess.PIPE, text=True)
    try:
        port = int(minimal.stdout.readline().split()[1])
        out = _run(tmp_path / "run", f"services.reward.address=127.0.0.1:{port}", "services.reward.config={}",
                   "sft.steps=0", "grpo.steps=2")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "127.0.0.1:%d" % port in out.stdout
        assert int(calls.read_text()) >= 3, "the run did not use the swapped-in reward service"
        assert not (tmp_path / "run" / "logs" / "reward-0.log").exists(), "a reward service was started anyway"
    finally:
        minimal.terminate()
        minimal.wait(10)

