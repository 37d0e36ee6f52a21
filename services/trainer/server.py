"""The TrainerService servicer: validates episodes at the edge, runs steps on the backend.

    forgerpc serve trainer tiny_model=true publish_dir=/tmp/pub checkpoint_dir=/tmp/ckpt
    forgerpc serve trainer weight_store_address=127.0.0.1:50061 replay_buffer_address=127.0.0.1:50062

Advantages are computed trainer-side when an episode lacks one (`has_advantage` false): the trainer
is the one place that sees whole groups in one batch and owns the loss choice (Dr.GRPO wants them
without std normalization), while a producer that knows better (e.g. a reward model with a
baseline) can still set them. Steps run one at a time in a worker thread, so health checks and
GetState stay responsive during a step.

Where a batch comes from. Either inline (`TrainStep(episodes=...)`: the caller sampled the buffer and
acks), or `TrainStep(from_buffer=BufferSample(batch_size=...))`: the trainer itself calls the
replay buffer's Sample (with its own policy version, for the staleness bound), trains, and only
then Acks the batch_id, which it returns. The buffer hands out batches only through Sample (a
batch cannot be fetched by id), so "train on batch X" means the trainer samples X; and acking in
the process that applied the step is what makes the guarantee hold: a trainer that dies anywhere
before the Ack (mid-step included) leaves the batch un-acked, and the buffer serves it again after
its visibility timeout. A batch whose episodes fail validation is not acked either
(FAILED_PRECONDITION naming the batch); an empty buffer after wait_seconds is a skipped step. A
step skipped for a non-finite loss is acked: it ran to the end, and the same batch would skip again.

Where weights go. With `weight_store_address`, PublishWeights uploads the full HF-named state dict
to the weight store (clients/weights.py, cast to `publish_dtype`) and answers location = the store
address; without, it writes an HF directory under publish_dir (location = that directory). Either
is what GeneratorService.UpdateWeights takes. Store and buffer failures leave as canonical statuses
naming the configured address (UNAVAILABLE when it cannot be reached), never a traceback.
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

import grpc

from forgerpc.clients import ForgeRPCError, ReplayBufferClient, WeightStoreClient
from forgerpc.services.common.errors import ServiceError, failed_precondition, not_found, require
from forgerpc.services.common.runtime import ServiceDefinition
from forgerpc.services.trainer import backends
from forgerpc.services.trainer.backends.torch_backend import Sample, StepResult
from forgerpc.services.trainer.config import TrainerConfig
from forgerpc.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("forgerpc.trainer")


def to_samples(request, vocab_size: int, max_positions: int, max_episodes: int, sft: bool,
               pack_length: int = 0) -> list[Sample]:
    """Validates the `episodes` of a TrainStepRequest (or of the buffer's SampleResponse); every
    problem is INVALID_ARGUMENT naming the field. `pack_length` > 0: packed SFT, an episode must fit a row."""
    episodes = request.episodes
    require(len(episodes) > 0, "episodes", "must hold at least one episode")
    require(len(episodes) <= max_episodes, "episodes",
            f"at most {max_episodes} episodes per step, got {len(episodes)}")
    samples = []
    for i, ep in enumerate(episodes):
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
        require(not pack_length or len(prompt) + len(response) <= pack_length, f"{f}.response_token_ids",
                f"prompt + response is {len(prompt) + len(response)} tokens, over sft.pack_length={pack_length}")
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


def build_backend(cfg: TrainerConfig):
    """Builds the configured backend over model_path (or a tiny random model); returns
    (backend, temporary dir to remove)."""
    from forgerpc.services.common.models import make_tiny_model

    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    tmp = None
    if cfg.tiny_model or not cfg.model_path:
        tmp = tempfile.mkdtemp(prefix="forgerpc-trainer-tiny-")
        path = make_tiny_model(tmp, arch=cfg.tiny_arch, seed=cfg.seed)
        log.warning("trainer: no model_path, training a tiny random %s model (demo)", cfg.tiny_arch)
    else:
        path = cfg.model_path  # a missing directory raises ModelNotFoundError naming the path
    return backends.build(cfg, str(path)), tmp


def peer_error(what: str, key: str, address: str, e: ForgeRPCError) -> ServiceError:
    """A failed call to the weight store / replay buffer, as this trainer's own status.

    Unreachable (UNAVAILABLE, DEADLINE_EXCEEDED) -> UNAVAILABLE naming the config key and address;
    the peer's INVALID_ARGUMENT is not the caller's fault -> FAILED_PRECONDITION; others keep their code.
    """
    if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"{what.upper().replace(' ', '_')}_UNAVAILABLE",
                            f"{key}: {what} at {address} is unreachable ({e.code.name}: {e.message[:300]});"
                            f" is it running, and is {key} right?", address=address)
    code = grpc.StatusCode.FAILED_PRECONDITION if e.code == grpc.StatusCode.INVALID_ARGUMENT else e.code
    return ServiceError(code, e.reason, f"{what} at {address}: {e.message[:500]}", address=address)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, cfg: TrainerConfig, backend, store: WeightStoreClient | None = None,
                 buffer: ReplayBufferClient | None = None):
        self.cfg = cfg
        self.backend = backend
        self.store = store  # None: publish to publish_dir
        self.buffer = buffer  # None: TrainStep(from_buffer) is FAILED_PRECONDITION
        self.lock = asyncio.Lock()  # one step / save / load / publish at a time
        self.published = -1  # last published version; 0 (the initial weights) may be published once

    def _samples(self, request, objective: str) -> list[Sample]:
        b, sft = self.backend, objective == "sft"
        return to_samples(request, b.vocab_size, b.max_positions, self.cfg.max_batch_episodes, sft,
                          self.cfg.sft.pack_length if sft and self.cfg.sft.packing else 0)

    async def _step(self, samples: list[Sample], objective: str, learning_rate: float,
                    reset_optimizer: bool = False) -> StepResult:
        async with self.lock:
            if reset_optimizer:
                self.backend.reset_optimizer()
                log.info("trainer: optimizer state and schedule reset before step %d", self.backend.step + 1)
            r = await asyncio.to_thread(self.backend.train_step, samples, objective, learning_rate)
        if r.skipped:
            log.warning("trainer: step skipped: %s", r.skip_reason)
        return r

    async def TrainStep(self, request, context) -> trainer_pb2.TrainStepResponse:
        objective = {trainer_pb2.OBJECTIVE_SFT: "sft", trainer_pb2.OBJECTIVE_POLICY_GRADIENT: "policy_gradient"}.get(
            request.objective, self.cfg.objective)
        require(math.isfinite(request.learning_rate) and request.learning_rate >= 0, "learning_rate",
                f"must be a finite number >= 0 (0 = the schedule), got {request.learning_rate}")
        if request.HasField("from_buffer"):
            require(not request.episodes, "from_buffer", "set either episodes or from_buffer, not both")
            return await self._train_from_buffer(request.from_buffer, objective, request.learning_rate,
                                                 request.reset_optimizer)
        samples = self._samples(request, objective)
        return response(await self._step(samples, objective, request.learning_rate, request.reset_optimizer),
                        request.episodes)

    async def _train_from_buffer(self, spec: trainer_pb2.BufferSample, objective: str, learning_rate: float,
                                 reset_optimizer: bool = False) -> trainer_pb2.TrainStepResponse:
        """Sample -> step -> Ack (see the module docstring): the Ack is the last thing, after the step."""
        if self.buffer is None:
            raise failed_precondition("REPLAY_BUFFER_NOT_CONFIGURED",
                                      "from_buffer: this trainer has no replay_buffer_address; start it with"
                                      " replay_buffer_address=HOST:PORT, or send episodes inline")
        limit = self.cfg.max_batch_episodes
        require(0 < spec.batch_size <= limit, "from_buffer.batch_size",
                f"must be in [1, {limit}] (max_batch_episodes), got {spec.batch_size}")
        require(math.isfinite(spec.wait_seconds) and spec.wait_seconds >= 0, "from_buffer.wait_seconds",
                f"must be a finite number >= 0, got {spec.wait_seconds}")
        address = self.cfg.replay_buffer_address
        try:
            batch = await self.buffer.sample(batch_size=spec.batch_size, whole_groups=spec.whole_groups,
                                             wait_seconds=spec.wait_seconds,
                                             current_policy_version=self.backend.policy_version,
                                             timeout=spec.wait_seconds + 60)
        except ForgeRPCError as e:
            raise peer_error("replay buffer", "replay_buffer_address", address, e) from None
        if not batch.episodes:
            return trainer_pb2.TrainStepResponse(
                step=self.backend.step, skipped=True,
                skip_reason=f"replay buffer at {address} had no eligible episodes after {spec.wait_seconds:g}s")
        try:
            samples = self._samples(batch, objective)
        except ServiceError as e:  # the buffer's data, not the caller's request
            raise failed_precondition("INVALID_BUFFER_EPISODE",
                                      f"replay buffer batch {batch.batch_id} (not acked; served again after the"
                                      f" buffer's visibility timeout): {e.message}",
                                      batch_id=batch.batch_id, field=e.metadata.get("field", "")) from None
        r = await self._step(samples, objective, learning_rate, reset_optimizer)
        try:
            await self.buffer.ack(batch_id=batch.batch_id)
        except ForgeRPCError as e:
            again = ("it expired before the step finished (raise the buffer's visibility_timeout_seconds)"
                     if e.code == grpc.StatusCode.NOT_FOUND else f"{e.code.name}: {e.message[:300]}")
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE if e.code == grpc.StatusCode.UNAVAILABLE else grpc.StatusCode.ABORTED,
                "ACK_FAILED", f"step {r.step} was applied, but the replay buffer at {address} did not ack batch"
                f" {batch.batch_id}: {again}; its episodes will be served again", batch_id=batch.batch_id) from None
        return response(r, batch.episodes, batch.batch_id)

    async def PublishWeights(self, request, context) -> trainer_pb2.PublishWeightsResponse:
        start = time.perf_counter()
        async with self.lock:  # checked under the lock: two concurrent publishes cannot both take a version
            require(request.version > self.published, "version",
                    f"must be greater than the last published version {self.published}, got {request.version}")
            if self.store is not None:
                location, size = self.cfg.weight_store_address, await self._publish_store(request.version)
            else:
                location, size = await asyncio.to_thread(self._publish_local, request.version)
            self.published = self.backend.policy_version = request.version
        version = common_pb2.WeightVersion(version=request.version, producer=self.cfg.producer,
                                           step=self.backend.step, created_unix_ms=int(time.time() * 1000))
        return trainer_pb2.PublishWeightsResponse(version=version, bytes=size, location=str(location),
                                                  seconds=time.perf_counter() - start)

    async def _publish_store(self, version: int) -> int:
        """Uploads the full HF-named state dict as `version` (cast to publish_dtype); returns bytes."""
        from forgerpc.clients import weights

        try:
            put = await weights.publish(self.store, self.backend.full_state_dict(), version,
                                        producer=self.cfg.producer, step=self.backend.step,
                                        dtype=self.cfg.torch_publish_dtype())
        except ForgeRPCError as e:
            raise peer_error("weight store", "weight_store_address", self.cfg.weight_store_address, e) from None
        return put.bytes

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


def response(r: StepResult, episodes, batch_id: str = "") -> trainer_pb2.TrainStepResponse:
    return trainer_pb2.TrainStepResponse(
        step=r.step, loss=r.loss, grad_norm=r.grad_norm, learning_rate=r.learning_rate, tokens=r.tokens,
        kl=r.kl, clip_fraction=r.clip_fraction, entropy=r.entropy, step_seconds=r.step_seconds,
        skipped=r.skipped, skip_reason=r.skip_reason, batch_id=batch_id, episodes=len(episodes),
        groups=len({e.group_id or e.episode_id or str(i) for i, e in enumerate(episodes)}))


_tmp_dirs: list[str] = []
_clients: list = []


async def create(cfg: TrainerConfig):
    backend, tmp = await asyncio.to_thread(build_backend, cfg)
    if tmp:
        _tmp_dirs.append(tmp)
    settings = cfg.client.settings()
    # A publish of a large model over gRPC takes minutes; the store answers fast when it is down.
    store = (WeightStoreClient(cfg.weight_store_address, settings=settings, timeout=1800.0)
             if cfg.weight_store_address else None)
    buffer = ReplayBufferClient(cfg.replay_buffer_address, settings=settings) if cfg.replay_buffer_address else None
    _clients.extend(c for c in (store, buffer) if c is not None)
    return [TrainerServicer(cfg, backend, store, buffer)]


async def close():
    for c in _clients:
        await c.close()
    _clients.clear()
    for d in _tmp_dirs:
        shutil.rmtree(d, ignore_errors=True)


SERVICE = ServiceDefinition(name="trainer", config_model=TrainerConfig, create=create, close=close)
