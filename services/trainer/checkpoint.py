"""Atomic training checkpoints: everything needed for the next step to equal an uninterrupted run's.

Layout of one checkpoint (a directory `step-00000042` under the checkpoint root):

    model.safetensors   weights (safetensors; tied weights stored once)
    optimizer.pt        AdamW state (moments, step counts)
    scheduler.pt        LR scheduler state
    rng.pt              torch CPU (+ CUDA) and Python RNG states
    meta.json           step, policy_version, data_position, config

It is written into a hidden temporary directory beside its final place and renamed into place, so
a reader (or a restart after SIGKILL) only ever sees complete checkpoints. The last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil

import torch
from safetensors.torch import load_model, save_model

PREFIX = "step-"


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: str | pathlib.Path, model: torch.nn.Module, optimizer, scheduler, meta: dict,
         keep: int = 3) -> pathlib.Path:
    """Writes checkpoint `step-<meta['step']>` under `root` atomically; prunes to the newest `keep`."""
    root = pathlib.Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{meta['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    for f in tmp.iterdir():  # durable before it becomes visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step: move the old one aside, never leave a gap with no copy
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are hidden, never listed)."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: str | pathlib.Path) -> pathlib.Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load(path: str | pathlib.Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restores model, optimizer, scheduler and RNG from `path`; returns meta.json's dict.

    Raises:
        FileNotFoundError: `path` is not a complete checkpoint.
    """
    path = pathlib.Path(path).expanduser()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"not a checkpoint (no meta.json): {path}")
    meta = json.loads((path / "meta.json").read_text())
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if not _is_tied(model, m)]:
        raise ValueError(f"checkpoint {path} does not match the model: missing={missing} unexpected={unexpected}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return meta


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """save_model stores a tied weight once; its alias shows up as "missing" on load but is restored."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and sum(p is target for p in params.values()) > 1
