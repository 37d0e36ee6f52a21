"""Every config file validates through the loaders that will read it, and says how to run it.

configs/*.yaml: the whole file as RunConfig (what `forgerpc run` / `forgerpc up` read), each
started service's `config` through that service's own model (the registry's, as `forgerpc serve`
reads it), the task through make_task; the header names `forgerpc run|up configs/<this file>`,
which the real CLI parser accepts. deploy/configs/*.yaml: each service file through the model of
the service its header's `forgerpc serve NAME` names, each stack file as RunConfig.
"""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

from conftest import ROOT
from forgerpc.clients.config import load_config, validate
from forgerpc.orchestrator.cli import _parser
from forgerpc.orchestrator.config import RunConfig
from forgerpc.orchestrator.tasks import make_task
from forgerpc.services import registry
from forgerpc.services.common.models import smollm2_dir

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DEPLOY = sorted(p for p in (ROOT / "deploy" / "configs").glob("*.yaml") if p.name != "kustomization.yaml")
GPU = {"grpo_qwen3_1_7b.yaml", "grpo_qwen3_8b.yaml", "grpo_llama3_8b.yaml"}


def header(path: pathlib.Path) -> str:
    """The comment block a YAML file starts with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def service_model(name: str):
    """The model `forgerpc serve NAME` validates its config with (a service not built yet has a
    placeholder that accepts `server` only)."""
    return registry.load(name).config_model


def test_the_issue_configs_exist():
    assert {"grpo_tiny.yaml", "grpo_code_tiny.yaml", "grpo_smollm2.yaml", "sft_tiny.yaml"} | GPU <= {
        p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_its_header_names_the_command(path):
    cfg = load_config(RunConfig, path)
    commands = re.findall(r"forgerpc (run|up) (\S+\.yaml)", header(path))
    assert commands, f"{path.name}: the header names no `forgerpc run|up configs/{path.name}` command"
    verb, file = commands[0]
    assert file == f"configs/{path.name}"
    args = _parser().parse_args([verb, file])  # the real CLI: SystemExit on a command it would refuse
    assert args.command == verb and (ROOT / args.config).resolve() == path.resolve()
    assert verb == "run" or cfg.app == "none", f"{path.name} runs an app: its command is `forgerpc run`"
    for name, entry in cfg.services.items():
        if not entry.addresses():
            validate(service_model(name), entry.config, f"{path.name}: services.{name}.config")
    if cfg.app != "none":
        task = make_task(cfg.task.name, seed=cfg.task.seed, eval_size=cfg.task.eval_size, **cfg.task.options)
        assert len(task.eval_set) >= min(cfg.grpo.eval_size, cfg.task.eval_size)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_code_rewards_have_a_sandbox(path):
    """A config whose reward runs code (code_tests) also starts or names a sandbox, and a code task
    is scored by code_tests (an exact match on the canonical answer would reward one spelling)."""
    cfg = load_config(RunConfig, path)
    reward = cfg.services.get("reward")
    kinds = {f["kind"] for f in reward.config.get("functions", [])} if reward else set()
    if "code_tests" in kinds:
        assert "sandbox" in cfg.services or reward.config.get("sandbox_address"), path.name
    if cfg.app != "none" and cfg.task.name == "code":
        assert kinds == {"code_tests"}, (path.name, kinds)


def test_gpu_configs_use_vllm_and_name_local_model_dirs():
    for name in GPU:
        cfg = load_config(RunConfig, ROOT / "configs" / name)
        generator = validate(service_model("generator"), cfg.services["generator"].config)
        trainer = validate(service_model("trainer"), cfg.services["trainer"].config)
        assert generator.backend == "vllm" and generator.dtype == "bfloat16", name
        assert trainer.device.startswith("cuda"), name
        assert pathlib.PurePosixPath(cfg.model.path).is_absolute(), f"{name}: model.path must be a local directory"
        # The titan backend converts Llama checkpoints only (titan_backend.titan_model_config).
        assert trainer.backend == ("titan" if cfg.model.arch == "llama" else "torch"), name
    assert load_config(RunConfig, ROOT / "configs/grpo_llama3_8b.yaml").services["trainer"].config["backend"] == "titan"


def test_smollm2_config_reads_the_directory_the_converter_writes():
    cfg = load_config(RunConfig, ROOT / "configs/grpo_smollm2.yaml")
    cache = inspect.signature(smollm2_dir).parameters["cache_dir"].default
    assert pathlib.Path(cfg.model.path).expanduser() == pathlib.Path(cache).expanduser() / "SmolLM2-135M-Instruct"
    assert "python -m forgerpc.services.common.models smollm2" in header(ROOT / "configs/grpo_smollm2.yaml")
    task = make_task(cfg.task.name, seed=0, eval_size=4, **cfg.task.options)
    assert task.eval_set[0].prompt.startswith("<|im_start|>user\nWhat is ") and "=" not in task.eval_set[0].prompt


@pytest.mark.parametrize("path", DEPLOY, ids=lambda p: p.name)
def test_deploy_config_validates(path, monkeypatch):
    # The values the containers' environment supplies to the files' ${oc.env:...} entries.
    monkeypatch.setenv("REDIS_URL", "redis://:secret@redis:6379/0")
    if path.name.startswith("stack-"):
        cfg = load_config(RunConfig, path)
        assert cfg.app != "none" and cfg.services
        return
    served = re.findall(r"forgerpc serve (\w+) --config deploy/configs/(\S+)", header(path))
    assert served and served[0][1] == path.name, f"{path.name}: the header names no `forgerpc serve NAME --config`"
    load_config(service_model(served[0][0]), path)
