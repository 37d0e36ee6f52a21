"""Pipeline benchmark (issue #8): episodes/s of the whole GRPO loop, framework alone and with a model.

    .venv/bin/python bench/pipeline.py                       # full: ~20-30 min on a quiet 2-core machine
    .venv/bin/python bench/pipeline.py --quick --threads 1   # every part shortened: ~2 min quiet, ~3 loaded
    .venv/bin/python bench/pipeline.py --parts null --null-seconds 30 --no-traces [--no-metrics]
    .venv/bin/python bench/pipeline.py --parts null --profile orch.prof --profile-services DIR  # cProfile all

Service runs are the real main job, `python -m forgerpc.orchestrator run CONFIG key=value...`
(= `forgerpc run`: every service its own process, a private Redis, orchestrator/grpo.py), read back
from the run's metrics.jsonl (one row per step, after its ack) and traces (one span per named
phase). Episodes/s counts *trained* episodes in steady state, k = the step at 20 % of the run:

    episodes_per_s = batch * (last_step - k) / (time[last_step] - time[k])

Parts:
  null       The framework alone: rollout -> buffer -> sample -> ack. Generator backend "null" (fixed
             tokens, plausible logprobs, no model), reward `constant`, the real replay buffer on a
             private Redis, all started by the launcher; the real GRPO class runs its rollout workers
             unchanged, its training loop cut to the buffer side of a step (Sample, Ack, permits back,
             GetStats). The trainer is left out on purpose: a TrainStep even on a 1-layer model costs
             ~30 ms per 128 episodes in-process (4,000 episodes/s at most, on its own), so with it the
             figure would measure a model step, not the framework. CPU per episode of every process
             (orchestrator, generator, reward, buffer, Redis) comes from /proc over the timed window.
             Traces on and sampled, as `forgerpc run` has them (CONFIG's trace_sample_ratio; --no-traces
             to compare). Rollouts of --null-groups-per-rollout groups (default 8, by --null-workers 8
             workers): one Generate / Evaluate / AddEpisodes per 8 groups, since a gRPC call costs
             ~0.8 ms of CPU on its two ends whatever its size (--null-groups-per-rollout 1 --null-workers 32
             for one group per call, as configs/grpo_tiny.yaml runs).
             -> null_episodes_per_s (target >= 5,000)
  null_full  The same null stack plus the real trainer (1-layer hidden-16 model) through `forgerpc run`
             with max_staleness 4: the whole loop, TrainStep/PublishWeights/UpdateWeights included;
             per-phase ms per step beside it show what the trainer's step costs. (Not in --quick.)
  bare       One process, no services: HF `generate` of CONFIG's model (prompts x group, sampled,
             logprobs from the scores), reward SIGNAL_PATTERN (below), group advantages, the trainer's
             own `grpo_loss` (services/trainer/losses.py) over the nonzero-advantage episodes (as the
             trainer), AdamW, grad clipping; one step per batch.
             Run before and after the service run; the figure is the mean of the two.
             -> bare_episodes_per_s
  service    CONFIG as written (grpo_tiny: the `make run` default, one version ahead, one torch thread
             per service), no SFT, no eval in the window, all --steps (its max_seconds off), reward
             SIGNAL_PATTERN like bare (since 2026-11-27: with exact match and no SFT every advantage
             is 0 and the trainer, which skips those, would train nothing).
             -> service_episodes_per_s, service_vs_bare = service / bare (target >= 0.7)
  staleness  CONFIG with max_staleness 0, then 4 (buffer max_policy_age alike), the generator pinned to
             core 0 and the trainer to core 1 (stack config `cpus`; each stands in for its own
             accelerator), one torch thread each, CONFIG's SFT warm start, evals every --eval-every
             steps (inside the timed window for both modes).
             From the sync run: t = train + publish + update_weights spans per step, g = median step
             wall time - t (the rollout side the sync loop waits for).
             -> sync_episodes_per_s, async_episodes_per_s, async_speedup = async / sync (target >= 1.3),
                ideal_async_speedup = (g + t) / max(g, t); time_to_target_s per mode = seconds from
                the GRPO start until eval accuracy >= its GRPO-start value + --target-gain (0.5)

--threads N sets the torch threads of bare and of the service run (0 = all cores for bare, CONFIG's
for the services): on a machine
shared with other jobs, 2-thread GEMMs stall when a sibling thread is descheduled (bare measured
17 vs 197 episodes/s with 2 vs 1 threads at load average 11), so compare like with like.
Results go to bench/results/pipeline.json (parts not run keep their previous figures).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "pipeline.json"
CONFIG = ROOT / "configs" / "grpo_tiny.yaml"

NULL_OVERRIDES = [  # the framework alone: no model generates, the reward reads nothing
    "sft.steps=0", "grpo.max_staleness=4", "grpo.max_seconds=0", "grpo.eval_size=16",
    "model.hidden_size=16", "model.layers=1", "model.heads=2", "model.kv_heads=1",
    "services.generator.config={backend: 'null', max_n: 16}",
    "services.reward.config.functions=[{kind: constant}]",
    "services.replay_buffer.config.max_policy_age=4",
    "services.trainer.config.threads=1",
]
PIN = ["services.generator.cpus=[0]", "services.trainer.cpus=[1]",
       "services.generator.config.torch_threads=1", "services.trainer.config.threads=1"]


# ---- running the main job -------------------------------------------------------------------------
def forgerpc_run(config: pathlib.Path, overrides: list[str], run_dir: pathlib.Path, log: pathlib.Path) -> dict:
    """Runs `forgerpc run` in a subprocess; returns its metrics rows and phase spans (traces go to
    RUN_DIR/traces, as `forgerpc run` does by default; the figures need them)."""
    cmd = [sys.executable, "-m", "forgerpc.orchestrator", "run", str(config), f"run_dir={run_dir}", *overrides]
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "FORGERPC_TRACES": f"file:{run_dir / 'traces'}"})
    if proc.returncode != 0:
        raise RuntimeError(f"forgerpc run failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"command": "forgerpc run " + " ".join(cmd[4:]), "wall_s": time.time() - start,
            "rows": [r for r in rows if r.get("phase") == "grpo"], "spans": phase_spans(run_dir / "traces")}


def phase_spans(traces: pathlib.Path) -> dict[str, list[float]]:
    """{phase name: [seconds, ...]} of the orchestrator's spans (the loop's named phases)."""
    spans: dict[str, list[float]] = {}
    for path in traces.glob("orchestrator-*.jsonl"):
        for line in path.read_text().splitlines():
            s = json.loads(line)
            start = datetime.datetime.fromisoformat(s["start_time"].replace("Z", "+00:00"))
            end = datetime.datetime.fromisoformat(s["end_time"].replace("Z", "+00:00"))
            spans.setdefault(s["name"], []).append((end - start).total_seconds())
    return spans


def steady_rate(rows: list[dict], batch: int, skip: float = 0.2) -> float:
    """Trained episodes/s between the step at `skip` of the run and the last step."""
    steps = [r for r in rows if r["step"] >= 1]
    k = min(int(len(steps) * skip), len(steps) - 2)
    first, last = steps[k], steps[-1]
    return batch * (last["step"] - first["step"]) / (last["time"] - first["time"])


def time_to_target(rows: list[dict], gain: float) -> tuple[float | None, float | None, float | None]:
    """(seconds from GRPO start to eval accuracy >= start + gain, start accuracy, best accuracy)."""
    evals = [r for r in rows if r.get("eval_accuracy") is not None]
    if not evals:
        return None, None, None
    base = evals[0]
    best = max(r["eval_accuracy"] for r in evals)
    for r in evals[1:]:
        if r["eval_accuracy"] >= base["eval_accuracy"] + gain:
            return r["time"] - base["time"], base["eval_accuracy"], best
    return None, base["eval_accuracy"], best


def per_step_ms(spans: dict[str, list[float]], names=("sample", "train", "publish", "update_weights")):
    """Mean ms of each once-per-step phase over the spans recorded. A run that samples traces
    (grpo_tiny: trace_sample_ratio 0.1) records ~1 step in 10, so this is the mean of those, not
    their sum over all steps (which read 10x too small before 2026-11-27)."""
    return {n: round(1000 * sum(spans[n]) / len(spans[n]), 2) if spans.get(n) else None for n in names}


def summarize(run: dict, batch: int) -> dict:
    steps = max(r["step"] for r in run["rows"])
    return {"command": run["command"], "steps": steps, "wall_s": round(run["wall_s"], 1),
            "episodes_per_s": round(steady_rate(run["rows"], batch), 1),
            "phase_ms_per_step": per_step_ms(run["spans"])}


# ---- the parts ------------------------------------------------------------------------------------
def part_null_full_loop(args, work: pathlib.Path, batch: int) -> dict:
    overrides = [*NULL_OVERRIDES, f"grpo.steps={args.null_steps}", f"grpo.eval_every={10 ** 9}",
                 f"grpo.rollout_workers={args.null_workers}", f"grpo.groups_per_rollout={args.null_groups_per_rollout}"]
    run = forgerpc_run(args.config, overrides, work / "null", work / "null.log")
    return summarize(run, batch)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def part_null(args, work: pathlib.Path) -> dict:
    """The rollout -> buffer -> sample -> ack path of orchestrator/grpo.py, timed for --null-seconds.

    The stack is the null run's minus the trainer, started by the same launcher with a private Redis;
    the GRPO app is the real class with its training loop cut down to the buffer side of a step
    (sample, ack, permits back, GetStats): no TrainStep, no publish, version stays 0.
    CPU per episode is read from /proc for every process over the timed window.
    """
    from forgerpc.clients import GeneratorClient, ReplayBufferClient, ReplicaGroup, RewardClient
    from forgerpc.clients.config import load_config
    from forgerpc.clients.telemetry import setup_metrics, setup_tracing, shutdown_telemetry
    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.orchestrator.grpo import GRPO
    from forgerpc.orchestrator.launcher import Stack
    from forgerpc.orchestrator.loop import Services
    from forgerpc.orchestrator.redis_server import PrivateRedis
    from forgerpc.orchestrator.tasks import make_task
    from forgerpc.services.common.models import make_tiny_model

    cfg = load_config(RunConfig, args.config, [*NULL_OVERRIDES, f"grpo.rollout_workers={args.null_workers}",
                                               f"grpo.groups_per_rollout={args.null_groups_per_rollout}",
                                               *args.null_set])
    m = cfg.model  # the null generator tokenizes with this model's tokenizer, as a real one would
    model = make_tiny_model(work / "null-model", arch=m.arch, hidden_size=m.hidden_size, num_layers=m.layers,
                            num_heads=m.heads, num_kv_heads=m.kv_heads, intermediate_size=2 * m.hidden_size)
    del cfg.services["trainer"]
    # as `forgerpc run` does by default (the services inherit it); --no-traces measures without.
    # The sampler too, as orchestrator/run.py sets it (grpo_tiny: 1 trace in 10); before
    # 2026-11-27 02:30 this part traced every rollout, which `forgerpc run` does not.
    os.environ["FORGERPC_TRACES"] = "none" if args.no_traces else f"file:{work / 'null-path' / 'traces'}"
    # OpenTelemetry metrics likewise (since 2026-11-28; --no-metrics measures without).
    os.environ["FORGERPC_METRICS"] = "none" if args.no_metrics else f"file:{work / 'null-path' / 'otel-metrics'}"
    if cfg.trace_sample_ratio < 1:
        os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = str(cfg.trace_sample_ratio)
    if args.profile_services:  # every service process writes DIR/<service>-<pid>.prof at exit
        os.environ["FORGERPC_PROFILE"] = str(args.profile_services.resolve())
    setup_tracing("orchestrator")
    setup_metrics("orchestrator")
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)

    class BufferSideGRPO(GRPO):
        async def evaluate(self) -> float:
            return 0.0

        async def train(self) -> None:
            batch_size = self.cfg.prompts_per_step * self.cfg.group_size
            self.window = []  # (perf_counter, episodes acked so far, {pid: cpu seconds})
            acked, start = 0, time.perf_counter()
            while (now := time.perf_counter()) < start + args.null_warmup + args.null_seconds:
                if not self.window and now >= start + args.null_warmup:
                    self.window.append((now, acked, {pid: cpu_seconds(pid) for pid in pids}))
                with self.metrics.phase("sample"):
                    batch = await self.s.buffer.sample.call_one(
                        batch_size=batch_size, whole_groups=True, current_policy_version=self.version, wait_seconds=60)
                if batch.episodes:
                    await self.s.buffer.ack.call_one(batch_id=batch.batch_id)
                    acked += len(batch.episodes)
                self.release(len({e.group_id for e in batch.episodes}) + await self.dropped_groups())
            self.window.append((time.perf_counter(), acked, {pid: cpu_seconds(pid) for pid in pids}))

    with PrivateRedis() as redis_url:
        cfg.services["replay_buffer"].config.setdefault("redis", {})["url"] = redis_url
        cfg.services["generator"].config["model_path"] = str(model)
        async with Stack(cfg, log_dir=work / "null-path" / "logs") as stack:
            pids = {os.getpid(): "orchestrator", **{p.process.pid: p.name for p in stack.processes}}
            redis_pid = _redis_pid(redis_url)
            if redis_pid:
                pids[redis_pid] = "redis"
            a = stack.addresses
            services = Services(
                generator=ReplicaGroup(GeneratorClient, a["generator"], strategy="least_loaded"),
                reward=ReplicaGroup(RewardClient, a["reward"]), buffer=ReplicaGroup(ReplayBufferClient, a["replay_buffer"]),
                trainer=None)
            app = BufferSideGRPO(services, task, cfg.grpo, work / "null-path")
            try:
                await app.run()
            finally:
                await services.close()
    shutdown_telemetry()
    for name in ("FORGERPC_PROFILE", "FORGERPC_METRICS", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):  # not for later parts
        os.environ.pop(name, None)
    (t0, n0, cpu0), (t1, n1, cpu1) = app.window
    episodes = n1 - n0
    cpu = {name: round(1e6 * (cpu1[pid] - cpu0[pid]) / max(episodes, 1), 1) for pid, name in pids.items()}
    return {"seconds": round(t1 - t0, 1), "episodes": episodes, "episodes_per_s": round(episodes / (t1 - t0), 1),
            "rollout_workers": cfg.grpo.rollout_workers, "group_size": cfg.grpo.group_size,
            "cpu_us_per_episode": cpu, "cpu_cores_used": round(sum(cpu1[p] - cpu0[p] for p in pids) / (t1 - t0), 2),
            "phase_ms_mean": {k: round(1000 * sum(v) / len(v), 2)
                              for k, v in phase_spans(work / "null-path" / "traces").items()}}


def _redis_pid(url: str) -> int | None:
    """The pid of the private redis-server listening on `url`'s port (its INFO says it)."""
    import redis

    try:
        return int(redis.Redis.from_url(url).info("server")["process_id"])
    except Exception:  # noqa: BLE001 - CPU of Redis is reported when it can be found, not required
        return None


def thread_overrides(args) -> list[str]:
    if not args.threads:
        return []
    return [f"services.generator.config.torch_threads={args.threads}", f"services.trainer.config.threads={args.threads}"]


# The service run and the bare loop start from a random model, whose exact-match rewards are all 0:
# every advantage would be 0, and the trainer skips zero-advantage episodes (no gradient), so the
# service run would train nothing while the bare loop trains everything. Both therefore score "the
# response holds a digit" instead: a random model's responses do about half the time, so nearly
# every group has mixed rewards and both sides train every episode. (A real grpo_tiny run's
# exact-match batches are 40-55 % zero-advantage, which its trainer leaves out.)
SIGNAL_PATTERN = "[0-9]"
SIGNAL_REWARD = f"services.reward.config={{functions: [{{kind: regex_match, options: {{pattern: '{SIGNAL_PATTERN}'}}}}]}}"


def part_service(args, work: pathlib.Path, batch: int) -> dict:
    overrides = ["sft.steps=0", f"grpo.steps={args.steps}", "grpo.max_seconds=0", f"grpo.eval_every={10 ** 9}",
                 "grpo.eval_size=16", SIGNAL_REWARD, *thread_overrides(args)]
    return summarize(forgerpc_run(args.config, overrides, work / "service", work / "service.log"), batch)


def part_staleness(args, work: pathlib.Path, batch: int) -> dict:
    out = {}
    for name, staleness in (("sync", 0), ("async", 4)):
        overrides = [*PIN, f"sft.steps={args.sft_steps}", f"grpo.steps={args.staleness_steps}", "grpo.max_seconds=0",
                     f"grpo.eval_every={args.eval_every}", f"grpo.max_staleness={staleness}",
                     f"services.replay_buffer.config.max_policy_age={staleness}"]
        run = forgerpc_run(args.config, overrides, work / name, work / f"{name}.log")
        row = summarize(run, batch)
        # Step wall time without the steps that ran an eval (their time belongs to no mode's overlap).
        walls = [b["time"] - a["time"] for a, b in zip(run["rows"], run["rows"][1:])
                 if a["step"] >= 1 and a.get("eval_accuracy") is None]
        row["step_wall_ms_median"] = round(1000 * sorted(walls)[len(walls) // 2], 2)
        seconds, start_acc, best = time_to_target(run["rows"], args.target_gain)
        row.update(time_to_target_s=seconds, eval_at_grpo_start=start_acc, eval_best=best,
                   max_staleness_seen=max(r.get("staleness", 0) for r in run["rows"]))
        out[name] = row
    sync = out["sync"]
    # A phase no sampled trace recorded (a short run) counts 0, as before the per-span mean.
    t = sum(sync["phase_ms_per_step"][n] or 0.0 for n in ("train", "publish", "update_weights"))
    g = max(sync["step_wall_ms_median"] - t, 0.0)
    out["g_ms"], out["t_ms"] = round(g, 2), round(t, 2)
    out["ideal_async_speedup"] = round((g + t) / max(g, t), 3) if max(g, t) > 0 else None
    return out


def bare_grpo_step(model, tok, optimizer, prompts: list[str], group: int, temperature: float, max_tokens: int,
                   clip: float, std_normalize: bool, score, minibatches: int = 1, kept_mean: bool = False,
                   all_wrong_advantage: float = 0.0) -> dict:
    """One on-policy GRPO step in this process (no services, no RPC, no Redis): HF `generate` of
    prompts x group (sampled, logprobs from the scores), `score(texts) -> rewards` (one per response),
    group advantages, the trainer's own `grpo_loss` over the nonzero-advantage episodes (as the
    trainer), AdamW, grad clipping. `tok.padding_side` must be "left". Returns timings and rewards.
    Experiments: `minibatches` > 1 splits the trained episodes into that many optimizer steps (PPO
    ratio against the sampling policy, clipped); `kept_mean` averages the loss over the
    nonzero-advantage episodes instead of all of them (seq_mean's G = kept episodes);
    `all_wrong_advantage` c > 0 gives every sample of a group whose rewards are all 0 the advantage
    -c instead of 0 (negative-sample reinforcement: the confident wrong answers lose mass)."""
    import torch

    from forgerpc.orchestrator.grpo import group_advantages
    from forgerpc.services.trainer import losses

    t0 = time.perf_counter()
    enc = tok(prompts, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():  # generate: the rollout side
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_tokens, num_return_sequences=group,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    P = enc["input_ids"].shape[1]
    response = out.sequences[:, P:]  # (B, R), B = prompts x group
    old = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(
        -1, response.unsqueeze(-1)).squeeze(-1)
    # a sequence is live up to and including its EOS; after it, generate pads
    done_before = (response == tok.eos_token_id).int().cumsum(-1) - (response == tok.eos_token_id).int()
    mask = (done_before == 0).float()
    rewards = score(tok.batch_decode(response, skip_special_tokens=True))
    adv = torch.tensor([a for i in range(0, len(rewards), group)
                        for a in group_advantages(rewards[i:i + group], std_normalize)])
    if all_wrong_advantage:
        for i in range(0, len(rewards), group):
            if max(rewards[i:i + group]) == 0:
                adv[i:i + group] = -all_wrong_advantage
    t1 = time.perf_counter()
    keep = adv.nonzero().flatten()  # as the trainer: zero-advantage episodes carry no gradient
    model.train()  # train on the batch just generated (on-policy, like max_staleness 0)
    attn_all = torch.cat([enc["attention_mask"].repeat_interleave(group, 0), mask.long()], 1)
    old_all = old.nan_to_num(0.0, neginf=0.0) * mask
    for part in keep[torch.randperm(len(keep))].chunk(minibatches) if minibatches > 1 else [keep]:
        if not len(part):  # nothing to learn from this batch (e.g. a random model that emits no digit)
            continue
        attn = attn_all[part]
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=out.sequences[part], attention_mask=attn, position_ids=positions,
                       logits_to_keep=response.shape[1] + 1).logits
        logp, _ = losses.token_logprobs_and_entropy(logits[:, :-1], response[part], temperature)
        loss = losses.grpo_loss(logp, old_all[part], adv[part], mask[part], clip=clip,
                                num_sequences=len(part) if kept_mean else len(adv) / minibatches).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {"gen_s": t1 - t0, "train_s": time.perf_counter() - t1, "trained_fraction": len(keep) / len(adv),
            "rewards": rewards}


def bare_model(cfg, tmp: str):
    """CONFIG's model, random-initialized through the real loading code, and its tokenizer (left padding)."""
    from forgerpc.services.common.models import load_model, make_tiny_model

    m = cfg.model
    path = make_tiny_model(tmp, arch=m.arch, hidden_size=m.hidden_size, num_layers=m.layers, num_heads=m.heads,
                           num_kv_heads=m.kv_heads, intermediate_size=m.intermediate_size or 2 * m.hidden_size,
                           seed=m.seed, bos=m.bos)
    model, tok = load_model(path)
    tok.padding_side = "left"
    return model, tok


def part_bare(args, batch_prompts: int, group: int) -> dict:
    """A single-process GRPO loop of the same model: no services, no RPC, no Redis."""
    import random

    import torch

    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig
    from forgerpc.orchestrator.tasks import make_task

    cfg = load_config(RunConfig, args.config)
    g = cfg.grpo
    # The reference gets every core (torch's default), whatever threads the services are given.
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = bare_model(cfg, tmp)
    trainer_cfg = cfg.services["trainer"].config
    optimizer = torch.optim.AdamW(model.parameters(), lr=trainer_cfg.get("optim", {}).get("lr", 1e-5))
    clip = trainer_cfg.get("loss", {}).get("clip_low", 0.2)
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
    rng = random.Random(0)

    def score(texts):  # see SIGNAL_PATTERN
        return [float(re.search(SIGNAL_PATTERN, t) is not None) for t in texts]

    times, gen_s, train_s, trained = [], [], [], []
    for _ in range(args.bare_steps):
        prompts = [task.sample_train(rng).prompt for _ in range(batch_prompts)]
        step = bare_grpo_step(model, tok, optimizer, prompts, group, g.temperature, g.max_tokens, clip,
                              g.std_normalize, score)
        times.append(time.perf_counter())
        gen_s.append(step["gen_s"])
        train_s.append(step["train_s"])
        trained.append(step["trained_fraction"])
    k = min(max(1, int(len(times) * 0.2)), len(times) - 2)
    return {"steps": args.bare_steps, "threads": threads, "generate_ms_median": round(1000 * sorted(gen_s)[len(gen_s) // 2], 1),
            "train_ms_median": round(1000 * sorted(train_s)[len(train_s) // 2], 1),
            "trained_fraction": round(statistics.fmean(trained), 3),
            "episodes_per_s": round(batch_prompts * group * (len(times) - 1 - k) / (times[-1] - times[k]), 1)}


# ---- main -----------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=pathlib.Path, default=CONFIG)
    p.add_argument("--parts", help="comma-separated, of: null,null_full,bare,service,staleness "
                   "(default: all; with --quick all but null_full)")
    p.add_argument("--quick", action="store_true", help="shorten every part (~2 min in all)")
    p.add_argument("--null-seconds", type=float, default=60, help="timed window of the null rollout path")
    p.add_argument("--null-warmup", type=float, default=5)
    p.add_argument("--no-traces", action="store_true", help="null rollout path without OpenTelemetry traces")
    p.add_argument("--no-metrics", action="store_true", help="null rollout path without OpenTelemetry metrics")
    p.add_argument("--null-steps", type=int, default=300, help="GRPO steps of the null full loop")
    p.add_argument("--null-workers", type=int, default=8, help="rollout workers of the null rollout path")
    p.add_argument("--null-groups-per-rollout", type=int, default=8, help="grpo.groups_per_rollout of the null rollout path")
    p.add_argument("--null-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override of the null rollout path (repeatable), e.g. grpo.rollout_workers=8")
    p.add_argument("--bare-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=100, help="GRPO steps of the service run")
    p.add_argument("--staleness-steps", type=int, default=1000, help="GRPO steps of each staleness run")
    p.add_argument("--sft-steps", type=int, default=850, help="SFT warm start of each staleness run")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--target-gain", type=float, default=0.5, help="eval accuracy gain over the GRPO start")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the bare loop and of the service run's generator and trainer "
                        "(0 = as CONFIG says; 1 on a loaded machine, where 2-thread GEMMs stall)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    p.add_argument("--out", default=str(OUT), help="results file (parts not run keep the figures it holds)")
    p.add_argument("--profile", type=pathlib.Path, help="cProfile the orchestrator of the null rollout path to FILE")
    p.add_argument("--profile-services", type=pathlib.Path, metavar="DIR",
                   help="cProfile every service of the null rollout path to DIR/<service>-<pid>.prof")
    args = p.parse_args()
    if args.quick:
        args.null_seconds, args.null_warmup, args.null_steps, args.bare_steps, args.steps = 8, 2, 20, 6, 8
        args.staleness_steps, args.sft_steps, args.eval_every = 16, 0, 8  # 8 steps: async still filling
    parts = set((args.parts or ("null,bare,service,staleness" if args.quick else
                                "null,null_full,bare,service,staleness")).split(","))
    from forgerpc.clients.config import load_config
    from forgerpc.orchestrator.config import RunConfig

    grpo = load_config(RunConfig, args.config).grpo
    batch = grpo.prompts_per_step * grpo.group_size
    work = pathlib.Path(tempfile.mkdtemp(prefix="forgerpc-pipeline-"))
    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}  # parts not run keep their last figures
    result.update(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), machine=platform.machine(),
                  cpus=os.cpu_count(), quick=args.quick, config=os.path.relpath(args.config, ROOT))
    try:
        if "null" in parts:
            if args.profile:
                import cProfile

                with cProfile.Profile() as prof:
                    result["null"] = asyncio.run(part_null(args, work))
                prof.dump_stats(args.profile)
            else:
                result["null"] = asyncio.run(part_null(args, work))
            result["null_episodes_per_s"] = result["null"]["episodes_per_s"]
            print("null", json.dumps(result["null"]), flush=True)
        if "null_full" in parts:
            result["null_full_loop"] = part_null_full_loop(args, work, batch)
            print("null_full_loop", json.dumps(result["null_full_loop"]), flush=True)
        if "bare" in parts:
            result["bare"] = part_bare(args, grpo.prompts_per_step, grpo.group_size)
            result["bare_episodes_per_s"] = result["bare"]["episodes_per_s"]
            print("bare", json.dumps(result["bare"]), flush=True)
        if "service" in parts:
            result["service"] = part_service(args, work, batch)
            result["service_episodes_per_s"] = result["service"]["episodes_per_s"]
            print("service", json.dumps(result["service"]), flush=True)
            if "bare" in parts:  # the reference again after the service run: bracket the load drift
                after = part_bare(args, grpo.prompts_per_step, grpo.group_size)
                result["bare"] = {"before": result["bare"], "after": after}
                result["bare_episodes_per_s"] = round((result["bare"]["before"]["episodes_per_s"]
                                                       + after["episodes_per_s"]) / 2, 1)
                print("bare (after service)", json.dumps(after), flush=True)
        if "staleness" in parts:
            s = result["staleness"] = part_staleness(args, work, batch)
            result["sync_episodes_per_s"] = s["sync"]["episodes_per_s"]
            result["async_episodes_per_s"] = s["async"]["episodes_per_s"]
            result["async_speedup"] = round(s["async"]["episodes_per_s"] / s["sync"]["episodes_per_s"], 3)
            result["ideal_async_speedup"] = s["ideal_async_speedup"]
            print("staleness", json.dumps(s), flush=True)
        if {"bare", "service"} <= parts:  # a ratio of the same run only: machines differ 3x between days
            result["service_vs_bare"] = round(result["service_episodes_per_s"] / result["bare_episodes_per_s"], 3)
        elif parts & {"bare", "service"}:
            result.pop("service_vs_bare", None)
        result["load_average_end"] = os.getloadavg()
    finally:
        if args.keep:
            print(f"run directories: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("null_episodes_per_s", "bare_episodes_per_s", "service_episodes_per_s", "service_vs_bare",
            "sync_episodes_per_s", "async_episodes_per_s", "async_speedup", "ideal_async_speedup")
    print(json.dumps({k: result.get(k) for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
