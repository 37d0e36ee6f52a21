"""The main job: `forgerpc run CONFIG` = start the stack (+ a private Redis), run the app, report.

    Redis (private unless redis_url) -> Stack (one process per service replica)
      -> SFT warm start (sft.steps > 0) -> GRPO (app: grpo) -> summary table + plots + metrics.jsonl

`forgerpc run CONFIG --resume RUN_DIR` continues a run from its newest trainer checkpoint:

    resumed                      how
    trainer (weights, AdamW,     LoadCheckpoint: the next TrainStep is checkpoint step + 1
      schedule, torch RNG, step)
    phase, step counters,        the app's Position, saved as the checkpoint's data_position
      data position, SFT RNG     (an SFT that stopped at sft.until_accuracy is over: GRPO next)
    generator weights            the loaded weights are published under a version number above
                                 any the run ever published (run_dir/published_version), so a
                                 number never names two sets of weights
    replay buffer                the private Redis keeps an append-only file in RUN_DIR/redis; the
                                 buffer re-claims unacked episodes and in-flight batches from it.
                                 Leftover episodes are older than the new version: the buffer's
                                 max_policy_age evicts them or the trainer weights them by TIS.
                                 With redis_url, resuming the stream is that Redis's business.
    metrics.jsonl                appended (a {"event": "resume"} row marks the seam)

Not resumed: steps taken after the newest checkpoint (their rows stay in metrics.jsonl; the
resumed run redoes those steps), rollouts in flight at the interruption, the generators' own
sampling RNG, and the weight store's contents (the trainer publishes again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import grpc

from rich.console import Console

from forgerpc.clients import ForgeRPCError
from forgerpc.clients.config import dump_config
from forgerpc.clients.telemetry import otlp_endpoint, setup_metrics, setup_tracing, shutdown_telemetry
from forgerpc.orchestrator.config import RunConfig, ServiceEntry, StackConfig
from forgerpc.orchestrator.grpo import GRPO
from forgerpc.orchestrator.launcher import Stack
from forgerpc.orchestrator.loop import PUBLISHED_VERSION, Metrics, Position, Services, last_published, publish
from forgerpc.orchestrator.progress import Progress
from forgerpc.orchestrator.redis_server import PrivateRedis
from forgerpc.orchestrator.report import summary_table, write_plots
from forgerpc.orchestrator.sft import SFT
from forgerpc.orchestrator.tasks import make_task

log = logging.getLogger("forgerpc.run")

# Services whose config takes the episode stream's Redis URL, and those that load the policy.
NEEDS_REDIS = ("replay_buffer",)
NEEDS_MODEL = ("generator", "trainer")
# What a run keeps in its directory between a run and its resumption; a fresh run starts without.
RUN_STATE = ("metrics.jsonl", PUBLISHED_VERSION, "checkpoints", "published", "redis")


def prepare_model(cfg: RunConfig, run_dir: pathlib.Path) -> str:
    """The policy directory: the configured one, or a tiny model built once for this run (in a
    subprocess: the orchestrator starts service code only as processes, never imports it)."""
    if cfg.model.path:
        return cfg.model.path
    path = run_dir / "model"
    stamp = path / "forgerpc_model.json"  # the settings it was built from: rebuilt when they change
    if not (path / "config.json").is_file() or not stamp.is_file() or stamp.read_text() != cfg.model.model_dump_json():
        shutil.rmtree(path, ignore_errors=True)
        m = cfg.model
        subprocess.run([sys.executable, "-m", "forgerpc.services.common.models", "tiny", str(path),
                        "--arch", m.arch, "--hidden-size", str(m.hidden_size), "--layers", str(m.layers),
                        "--heads", str(m.heads), "--kv-heads", str(m.kv_heads),
                        "--intermediate-size", str(m.intermediate_size), "--seed", str(m.seed),
                        *(["--bos"] if m.bos else [])],
                       check=True, capture_output=True)
        stamp.write_text(cfg.model.model_dump_json())
    return str(path)


# Addresses a service must know when it starts: {consumer: {provider: the consumer's config key}}.
ADDRESS_KEYS = {
    "reward": {"sandbox": "sandbox_address"},  # code_tests rewards run in the sandbox
    "trainer": {"weight_store": "weight_store_address"},  # publishes versions there
    "generator": {"weight_store": "weight_store_address"},  # pulls them from there
}


@contextlib.asynccontextmanager
async def start_stack(cfg: RunConfig, log_dir: pathlib.Path | None):
    """`Stack(cfg)`, plus the start-up order a run needs: a provider of ADDRESS_KEYS that some
    consumer started here needs (the sandbox, the weight store) is started first, on its own, and
    the rest of the stack gets it by address (the consumer's key, unless its config sets it)."""
    cfg = cfg.model_copy(deep=True)
    log_dir = log_dir or pathlib.Path(tempfile.mkdtemp(prefix="forgerpc-stack-"))
    wanted = {(consumer, provider, key) for consumer, deps in ADDRESS_KEYS.items() for provider, key in deps.items()
              if consumer in cfg.services and provider in cfg.services
              and not cfg.services[consumer].addresses() and key not in cfg.services[consumer].config}
    async with contextlib.AsyncExitStack() as first:
        early = {p: cfg.services[p] for _, p, _ in wanted if not cfg.services[p].addresses()}
        if early:
            alone = StackConfig(services=early, client=cfg.client, start_timeout_seconds=cfg.start_timeout_seconds)
            started = await first.enter_async_context(Stack(alone, log_dir=log_dir))
            for name, addresses in started.addresses.items():
                cfg.services[name] = ServiceEntry(address=addresses)
        for consumer, provider, key in wanted:
            cfg.services[consumer].config[key] = cfg.services[provider].addresses()[0]
        async with Stack(cfg, log_dir=log_dir) as stack:
            yield stack


def health_table(report: dict):
    from rich.table import Table

    table = Table(title="forgerpc stack")
    for col in ("service", "address", "health"):
        table.add_column(col)
    for name, rows in report.items():
        for address, status in rows:
            table.add_row(name, address, status)
    return table


def clear_run_state(run_dir: pathlib.Path) -> None:
    """A fresh run into a used directory must not inherit its checkpoints, metrics or Redis data
    (a later --resume would pick up the wrong run)."""
    for name in RUN_STATE:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_resumable(cfg: RunConfig, run_dir: pathlib.Path) -> None:
    """Fails before anything starts when a trainer this run starts has no checkpoint to load."""
    trainer = cfg.services.get("trainer")
    if trainer is None or trainer.addresses():
        return  # a remote trainer: LoadCheckpoint will tell
    root = pathlib.Path(trainer.config.get("checkpoint_dir", run_dir / "checkpoints")).expanduser()
    if not any(root.glob("step-*/meta.json")):
        raise RuntimeError(f"--resume {run_dir}: no checkpoint under {root} (a run saves one every "
                           "grpo.checkpoint_every steps, at SFT evals and at its last step)")


async def run(cfg: RunConfig, console: Console | None = None, resume: bool = False) -> dict:
    """Runs `cfg`; with `resume`, continues the run in cfg.run_dir from its newest checkpoint."""
    console = console or Console()
    run_dir = pathlib.Path(cfg.run_dir)
    if resume and not run_dir.is_dir():
        raise RuntimeError(f"--resume: run directory {run_dir} does not exist")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_run_state(run_dir)
    else:
        check_resumable(cfg, run_dir)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    # Traces and OpenTelemetry metrics of every process of the run, as JSON lines in the run
    # directory, and over OTLP too when an endpoint is configured (services inherit the variables).
    if cfg.otlp_endpoint:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = cfg.otlp_endpoint
    for signal, directory in (("traces", "traces"), ("metrics", "otel-metrics")):
        os.environ.setdefault(f"FORGERPC_{signal.upper()}",
                              f"file:{run_dir / directory}" + (",otlp" if otlp_endpoint(signal) else ""))
    if cfg.trace_sample_ratio < 1:  # read by the OpenTelemetry SDK of every process
        os.environ.setdefault("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        os.environ.setdefault("OTEL_TRACES_SAMPLER_ARG", str(cfg.trace_sample_ratio))
    setup_tracing("orchestrator")
    setup_metrics("orchestrator")
    with contextlib.ExitStack() as exits:
        redis_url = cfg.redis_url
        if not redis_url and any(name in cfg.services for name in NEEDS_REDIS):
            # Its data lives in the run directory, so that --resume finds the episode stream again.
            redis_url = exits.enter_context(PrivateRedis(data_dir=run_dir / "redis"))
            console.print(f"private Redis at {redis_url}")
        for name in NEEDS_REDIS:
            if name in cfg.services and not cfg.services[name].addresses():
                cfg.services[name].config.setdefault("redis", {}).setdefault("url", redis_url)
        if cfg.app != "none":
            model_path = prepare_model(cfg, run_dir)
            for name in NEEDS_MODEL:
                if name in cfg.services and not cfg.services[name].addresses():
                    cfg.services[name].config.setdefault("model_path", model_path)
            if "trainer" in cfg.services and not cfg.services["trainer"].addresses():
                # Everything a run writes stays in its run directory.
                trainer = cfg.services["trainer"].config
                trainer.setdefault("publish_dir", str(run_dir / "published"))
                trainer.setdefault("checkpoint_dir", str(run_dir / "checkpoints"))
        async with start_stack(cfg, run_dir / "logs") as stack:
            report = await stack.health()
            console.print(health_table(report))
            result = {"healthy": all(s == "SERVING" for rows in report.values() for _, s in rows)}
            if cfg.app != "none":
                progress = Progress(console, totals={"sft": cfg.sft.steps, "grpo": cfg.grpo.steps},
                                    health=stack.health)
                progress.health = report
                async with progress:
                    result.update(await run_app(cfg, stack.addresses, run_dir, resume, progress.update))
    shutdown_telemetry()
    plots = write_plots(run_dir)
    console.print(summary_table(result))
    if plots:
        console.print(f"plots: {', '.join(str(p) for p in plots)}")
    console.print(f"run directory: {run_dir}")
    return result


async def resume_point(services: Services, run_dir: pathlib.Path) -> tuple[Position, int]:
    """Restores the trainer's newest checkpoint and puts its weights on every generator.

    Returns the app's saved Position and the version the weights were published as: one above
    the highest the run ever published (the interrupted run may have gone past its checkpoint)."""
    try:
        loaded = await services.trainer.load_checkpoint.call_one()
    except ForgeRPCError as e:
        if e.code == grpc.StatusCode.NOT_FOUND:
            raise RuntimeError(f"--resume {run_dir}: nothing to resume from: {e.message}") from None
        raise
    if not loaded.data_position:
        raise RuntimeError(f"--resume {run_dir}: the checkpoint at trainer step {loaded.step} has no app "
                           "position (saved outside `forgerpc run`)")
    try:
        position = Position.from_json(loaded.data_position)
    except ValueError as e:
        raise RuntimeError(f"--resume {run_dir}: {e}") from None
    version = max(position.version, loaded.policy_version, last_published(run_dir)) + 1
    metrics = Metrics(run_dir)
    try:
        await publish(services, metrics, version)
        row = {"event": "resume", "phase": position.phase, "from_step": position.step, "trainer_step": loaded.step,
               "checkpoint_version": position.version, "version": version, "time": time.time()}
        if services.buffer is not None:  # what the episode stream still held
            stats = await services.buffer.get_stats.call_one()
            row.update(buffer_episodes=stats.stream_length, buffer_acked_total=stats.acked_total)
        metrics.write(row)
    finally:
        metrics.close()
    return position, version


async def run_app(cfg: RunConfig, addresses: dict[str, list[str]], run_dir: pathlib.Path,
                  resume: bool = False, on_row=None) -> dict:
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
    services = Services.connect(addresses, cfg.client.settings())
    result: dict = {}
    try:
        version, position = 0, None
        if resume:
            position, version = await resume_point(services, run_dir)
            result["resumed_from"] = f"{position.phase} step {position.step}"
        sft_done = position is not None and (position.phase != "sft" or position.done)
        if (cfg.sft.steps or cfg.app == "sft") and not sft_done:
            sft = SFT(services, task, cfg.sft, run_dir, eval_size=cfg.grpo.eval_size,
                      max_tokens=cfg.grpo.max_tokens, stop=cfg.grpo.stop, seed=cfg.task.seed,
                      resume=position, on_row=on_row)
            result.update(await sft.run(start_version=version))
            version = result["version"]
        if cfg.app == "grpo":
            grpo_resume = position if position is not None and position.phase == "grpo" else None
            grpo = GRPO(services, task, cfg.grpo, run_dir, resume=grpo_resume, on_row=on_row)
            result.update(await grpo.run(start_version=version))
    finally:
        await services.close()
    return result
