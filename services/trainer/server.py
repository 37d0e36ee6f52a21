"""The TrainerService servicer: validates episodes at the edge, runs steps on the backend.

    forgerpc serve trainer tiny_model=true publish_dir=/tmp/pub checkpoint_dir=/tmp/ckpt

Advantages are computed trainer-side when an episode lacks one (`has_advantage` false): the trainer
is the one place that sees whole groups in one batch and owns the loss choice (Dr.GRPO wants them
without std normalization), while a producer that knows better (e.g. a reward model with a
baseline) can still set them. Steps run one at a time in a worker thread, so health checks and
GetState stay responsive during a step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import pathlib
import shutil
import tempfile
import time

import yaml

from forgerpc.services.common.errors import failed_precondition, not_found, require
from forgerpc.services.common.runtime import ServiceDefinition
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend
from forgerpc.services.trainer.config import TrainerConfig
from forgerpc.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("forgerpc.trainer")


def to_samples(request: trainer_pb2.TrainStepRequest, vocab_size: int, max_positions: int,
               max_episodes: int, sft: bool) -> list[Sample]:
    """Validates the episodes of a request; every problem is INVALID_ARGUMENT naming the field."""
    require(len(request.episodes) > 0, "episodes", "must hold at least one episode")
    require(len(request.episodes) <= max_episodes, "episodes",
            f"at most {max_episodes} episodes per step, got {len(request.episodes)}")
    samples = []
    for i, ep in enumerate(request.episodes):
        f = f"episodes[{i}]"
        prompt, response = list(ep.prompt_token_ids), list(ep.response_token_ids)
        require(len(prompt) > 0, f"{f}.prompt_token_ids", "must not be empty (the first response token needs context)")
        require(len(response) > 0, f"{f}.response_token_ids", "must not be empty")
        for name, ids in (("prompt_token_ids", prompt), ("response_token_ids", response)):
            lo, hi = min(ids), max(ids)
            require(lo >= 0 and hi < vocab_size, f"{f}.{name}",
                    f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
        require(len(prompt) + len(response) <= max_positions, f"{f}.response_token_ids",
                f"prompt + response is {len(prompt) + len(response)} tokens, over the model's {max_positions}")
        logprobs = list(ep.response_logprobs)
        if sft and not logprobs:
            logprobs = [0.0] * len(response)  # SFT does not use them
        require(len(logprobs) == len(response), f"{f}.response_logprobs",
                f"has {len(logprobs)} values for {len(response)} response tokens")
        require(all(math.isfinite(x) for x in logprobs), f"{f}.response_logprobs", "must be finite")
        masks = list(ep.response_masks) or [1] * len(response)
        require(len(masks) == len(response), f"{f}.response_masks",
                f"has {len(masks)} values for {len(response)} response tokens (or leave it empty)")
        require(all(m in (0, 1) for m in masks), f"{f}.response_masks", "values must be 0 or 1")
        require(math.isfinite(ep.reward), f"{f}.reward", "must be finite")
        if ep.has_advantage:
            require(math.isfinite(ep.advantage), f"{f}.advantage", "must be finite")
        samples.append(Sample(prompt=prompt, response=response, generator_logprobs=logprobs, mask=masks,
                              reward=ep.reward, advantage=ep.advantage if ep.has_advantage else None,
                              group_id=ep.group_id, policy_version=ep.policy_version))
    require(any(any(s.mask) for s in samples), "episodes[*].response_masks", "mask out every token: nothing to train")
    return samples


def build_backend(cfg: TrainerConfig) -> tuple[TorchBackend, str | None]:
    """Loads (or builds) the model and the backend; returns (backend, temporary dir to remove)."""
    import torch

    from forgerpc.services.common.models import load_model, make_tiny_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tmp = None
    if cfg.tiny_model or not cfg.model_path:
        tmp = tempfile.mkdtemp(prefix="forgerpc-trainer-tiny-")
        path = make_tiny_model(tmp, arch=cfg.tiny_arch, seed=cfg.seed)
        log.warning("trainer: no model_path, training a tiny random %s model (demo)", cfg.tiny_arch)
    else:
        path = cfg.model_path  # a missing directory raises ModelNotFoundError naming the path
    model, tokenizer = load_model(path, dtype=torch.float32)
    return TorchBackend(cfg, model, tokenizer), tmp


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, cfg: TrainerConfig, backend: TorchBackend):
        self.cfg = cfg
        self.backend = backend
        self.lock = asyncio.Lock()  # one step / save / load / publish at a time
        self.published = -1  # last published version; 0 (the initial weights) may be published once

    async def TrainStep(self, request, context) -> trainer_pb2.TrainStepResponse:
        if request.batch_id and not request.episodes:
            raise failed_precondition("BATCH_ID_NOT_SUPPORTED",
                                      "batch_id: pulling from the replay buffer is not wired yet; send episodes inline")
        objective = {trainer_pb2.OBJECTIVE_SFT: "sft", trainer_pb2.OBJECTIVE_POLICY_GRADIENT: "policy_gradient"}.get(
            request.objective, self.cfg.objective)
        b = self.backend
        samples = to_samples(request, b.vocab_size, b.max_positions, self.cfg.max_batch_episodes, objective == "sft")
        require(math.isfinite(request.learning_rate) and request.learning_rate >= 0, "learning_rate",
                f"must be a finite number >= 0 (0 = the schedule), got {request.learning_rate}")
        async with self.lock:
            r = await asyncio.to_thread(b.train_step, samples, objective, request.learning_rate)
        if r.skipped:
            log.warning("trainer: step skipped: %s", r.skip_reason)
        return trainer_pb2.TrainStepResponse(
            step=r.step, loss=r.loss, grad_norm=r.grad_norm, learning_rate=r.learning_rate, tokens=r.tokens,
            kl=r.kl, clip_fraction=r.clip_fraction, entropy=r.entropy, step_seconds=r.step_seconds,
            skipped=r.skipped, skip_reason=r.skip_reason)

    async def PublishWeights(self, request, context) -> trainer_pb2.PublishWeightsResponse:
        start = time.perf_counter()
        async with self.lock:  # checked under the lock: two concurrent publishes cannot both take a version
            require(request.version > self.published, "version",
                    f"must be greater than the last published version {self.published}, got {request.version}")
            location, size = await asyncio.to_thread(self._publish_local, request.version)
            self.published = self.backend.policy_version = request.version
        # Hook for the weight store (clients/weights.py): when a store address is configured, also
        # `await weights.publish(store, self.backend.full_state_dict(), request.version, ...)` here.
        version = common_pb2.WeightVersion(version=request.version, producer=self.cfg.producer,
                                           step=self.backend.step, created_unix_ms=int(time.time() * 1000))
        return trainer_pb2.PublishWeightsResponse(version=version, bytes=size, location=str(location),
                                                  seconds=time.perf_counter() - start)

    def _publish_local(self, version: int) -> tuple[pathlib.Path, int]:
        """Writes publish_dir/v<version> atomically (a temporary directory renamed into place)."""
        root = pathlib.Path(self.cfg.publish_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"v{version:08d}"
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        size = self.backend.save_pretrained(tmp)
        if final.exists():  # left by an earlier run of the trainer; this version supersedes it
            shutil.rmtree(final)
        tmp.rename(final)
        return final, size

    async def SaveCheckpoint(self, request, context) -> trainer_pb2.SaveCheckpointResponse:
        root = pathlib.Path(request.directory or self.cfg.checkpoint_dir).expanduser()
        async with self.lock:
            self.backend.data_position = request.data_position
            path = await asyncio.to_thread(self.backend.save_checkpoint, root, self.cfg.keep_checkpoints)
        return trainer_pb2.SaveCheckpointResponse(path=str(path), step=self.backend.step)

    async def LoadCheckpoint(self, request, context) -> trainer_pb2.LoadCheckpointResponse:
        from forgerpc.services.trainer import checkpoint

        if request.path:
            path = pathlib.Path(request.path).expanduser()
            require((path / "meta.json").is_file(), "path", f"not a checkpoint directory (no meta.json): {path}")
        else:
            path = checkpoint.latest(self.cfg.checkpoint_dir)
            if path is None:
                raise not_found("checkpoint", f"no checkpoint under {self.cfg.checkpoint_dir}")
        async with self.lock:
            try:
                meta = await asyncio.to_thread(self.backend.load_checkpoint, path)
            except ValueError as e:
                raise failed_precondition("CHECKPOINT_MISMATCH", str(e)[:500], path=str(path)) from None
        self.published = max(self.published, self.backend.policy_version)
        return trainer_pb2.LoadCheckpointResponse(step=meta["step"], policy_version=meta["policy_version"],
                                                  data_position=meta.get("data_position", ""))

    async def GetState(self, request, context) -> trainer_pb2.GetStateResponse:
        return trainer_pb2.GetStateResponse(
            step=self.backend.step, policy_version=self.backend.policy_version, backend=self.backend.name,
            config_yaml=yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))


_tmp_dirs: list[str] = []


async def create(cfg: TrainerConfig):
    backend, tmp = await asyncio.to_thread(build_backend, cfg)
    if tmp:
        _tmp_dirs.append(tmp)
    return [TrainerServicer(cfg, backend)]


async def close():
    for d in _tmp_dirs:
        shutil.rmtree(d, ignore_errors=True)


SERVICE = ServiceDefinition(name="trainer", config_model=TrainerConfig, create=create, close=close)
