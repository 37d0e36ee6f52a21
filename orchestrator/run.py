"""The main job: `forgerpc run CONFIG` = start the stack (+ a private Redis), run the app, report.

    Redis (private unless redis_url) -> Stack (one process per service replica)
      -> SFT warm start (sft.steps > 0) -> GRPO (app: grpo) -> summary table + plots + metrics.jsonl
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import subprocess
import sys

from rich.console import Console

from forgerpc.clients.config import dump_config
from forgerpc.clients.telemetry import setup_tracing, shutdown_tracing
from forgerpc.orchestrator.config import RunConfig
from forgerpc.orchestrator.grpo import GRPO
from forgerpc.orchestrator.launcher import Stack
from forgerpc.orchestrator.loop import Services
from forgerpc.orchestrator.redis_server import PrivateRedis
from forgerpc.orchestrator.report import summary_table, write_plots
from forgerpc.orchestrator.sft import SFT
from forgerpc.orchestrator.tasks import make_task

log = logging.getLogger("forgerpc.run")

# Services whose config takes the episode stream's Redis URL, and those that load the policy.
NEEDS_REDIS = ("replay_buffer",)
NEEDS_MODEL = ("generator", "trainer")


def prepare_model(cfg: RunConfig, run_dir: pathlib.Path) -> str:
    """The policy directory: the configured one, or a tiny model built once for this run (in a
    subprocess: the orchestrator starts service code only as processes, never imports it)."""
    if cfg.model.path:
        return cfg.model.path
    path = run_dir / "model"
    if not (path / "config.json").is_file():
        m = cfg.model
        subprocess.run([sys.executable, "-m", "forgerpc.services.common.models", "tiny", str(path),
                        "--arch", m.arch, "--hidden-size", str(m.hidden_size), "--layers", str(m.layers),
                        "--heads", str(m.heads), "--kv-heads", str(m.kv_heads), "--seed", str(m.seed)],
                       check=True, capture_output=True)
    return str(path)


def health_table(report: dict):
    from rich.table import Table

    table = Table(title="forgerpc stack")
    for col in ("service", "address", "health"):
        table.add_column(col)
    for name, rows in report.items():
        for address, status in rows:
            table.add_row(name, address, status)
    return table


async def run(cfg: RunConfig, console: Console | None = None) -> dict:
    console = console or Console()
    run_dir = pathlib.Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    # Traces of every process of the run, as JSON lines (services inherit the variable).
    os.environ.setdefault("FORGERPC_TRACES", f"file:{run_dir / 'traces'}")
    setup_tracing("orchestrator")
    with contextlib.ExitStack() as exits:
        redis_url = cfg.redis_url
        if not redis_url and any(name in cfg.services for name in NEEDS_REDIS):
            redis_url = exits.enter_context(PrivateRedis())
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
        async with Stack(cfg, log_dir=run_dir / "logs") as stack:
            report = await stack.health()
            console.print(health_table(report))
            result = {"healthy": all(s == "SERVING" for rows in report.values() for _, s in rows)}
            if cfg.app != "none":
                result.update(await run_app(cfg, stack.addresses, run_dir))
    shutdown_tracing()
    plots = write_plots(run_dir)
    console.print(summary_table(result))
    if plots:
        console.print(f"plots: {', '.join(str(p) for p in plots)}")
    console.print(f"run directory: {run_dir}")
    return result


async def run_app(cfg: RunConfig, addresses: dict[str, list[str]], run_dir: pathlib.Path) -> dict:
    task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
    services = Services.connect(addresses, cfg.client.settings())
    result: dict = {}
    try:
        version = 0
        if cfg.sft.steps or cfg.app == "sft":
            sft = SFT(services, task, cfg.sft, run_dir, eval_size=cfg.grpo.eval_size,
                      max_tokens=cfg.grpo.max_tokens, stop=cfg.grpo.stop, seed=cfg.task.seed)
            result.update(await sft.run())
            version = result["version"]
        if cfg.app == "grpo":
            result.update(await GRPO(services, task, cfg.grpo, run_dir).run(start_version=version))
    finally:
        await services.close()
    return result
