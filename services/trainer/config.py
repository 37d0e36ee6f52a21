"""Trainer service config.

    forgerpc serve trainer tiny_model=true                          # demo / tests: a tiny random Llama
    forgerpc serve trainer model_path=~/.cache/forgerpc/SmolLM2-135M-Instruct loss.kind=dapo optim.lr=1e-6

    forgerpc serve trainer weight_store_address=127.0.0.1:50061 replay_buffer_address=127.0.0.1:50062

Keys: `model_path` (HF directory) or `tiny_model: true`; `loss` (which GRPO-family objective and its
clip range, beta, TIS); `optim` (AdamW, warmup + cosine, grad clipping); `micro_batch_size` (gradient
accumulation: a step never holds more than one micro-batch of activations); `sft` (sequence packing);
checkpoint and publish dirs; the weight store and replay buffer this trainer talks to (empty = none).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from forgerpc.clients.config import Config
from forgerpc.services.common.runtime import ServiceConfig


class LossConfig(Config):
    """Which policy-gradient objective; see services/trainer/losses.py for the formulas."""

    kind: Literal["grpo", "dapo", "dr_grpo", "gspo"] = "grpo"
    # None: the paper's default for `kind` (grpo/dr_grpo 0.2/0.2, dapo 0.2/0.28, gspo 3e-4/4e-4)
    clip_low: float | None = Field(default=None, ge=0)
    clip_high: float | None = Field(default=None, ge=0)
    beta: float = Field(default=0.0, ge=0)  # k3 KL to the initial weights; 0 = no reference model
    # Entropy bonus: the loss subtracts entropy_coef x the policy's per-token entropy (aggregated like
    # the policy term; verl's entropy_coeff). Every episode then carries a gradient, so the trainer
    # no longer skips zero-advantage ones. 0 = off.
    entropy_coef: float = Field(default=0.0, ge=0)
    # Generation budget, Dr.GRPO's constant normalizer; 0 = the longest response of the batch.
    max_tokens: int = Field(default=0, ge=0)
    # Truncated importance sampling. "off": the PPO ratio is taken against the generator's logprobs
    # (the policy that sampled the episode), so clipping bounds the update relative to it however
    # stale the episode is. "auto" (on for stale episodes, policy_version < trainer's) / "on": a
    # proximal ratio against the trainer's own logprobs, weighted by min(pi_trainer / pi_generator,
    # tis_cap): the tool for a generator whose logprobs differ numerically from the trainer's (vLLM),
    # but with one optimizer step per batch its ratio is 1, so nothing bounds the step: at
    # max_staleness 4 on grpo_tiny it took held-out accuracy from 0.46 to 0.12-0.33 in 150 steps,
    # where "off" rose to 0.645 by step 400 (bench/README.md, 2026-11-27).
    tis: Literal["auto", "on", "off"] = "off"
    tis_cap: float = Field(default=2.0, gt=0)
    # The generator's sampling temperature: policy-gradient logprobs are log_softmax(logits / T), the
    # distribution the episodes were sampled from (the generator's logprobs are of that one too), so
    # the PPO ratio is 1 on-policy. SFT ignores it. `forgerpc run` sets it from grpo.temperature when
    # the trainer config leaves it out, and refuses another value.
    temperature: float = Field(default=1.0, gt=0)
    # Advantages for episodes without has_advantage: group-relative over equal group_id in the batch.
    normalize_std: bool = True  # False = Dr.GRPO advantages


class OptimConfig(Config):
    """AdamW with linear warmup then cosine decay to lr * min_lr_ratio over total_steps."""

    lr: float = Field(default=1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(default=0.0, ge=0)
    eps: float = Field(default=1e-8, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    total_steps: int = Field(default=1000, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0)


class SFTConfig(Config):
    """SFT batching. Packing concatenates episodes into rows of `pack_length` tokens, each episode
    with positions restarting at 0 and attention confined to itself; `micro_batch_size` then counts
    rows. Same loss as unpacked (tests/test_trainer_packing.py), without the padding."""

    packing: bool = False
    pack_length: int = Field(default=2048, gt=1)  # tokens per row; a longer episode is INVALID_ARGUMENT


class TrainerConfig(ServiceConfig):
    # A key of backends.BACKENDS: "torch" (CPU/GPU); "titan" needs a GPU (issue #7 device check).
    backend: str = "torch"
    model_path: str = ""  # empty: a tiny random model (as tiny_model=true), so `forgerpc serve trainer` runs
    tiny_model: bool = False  # build a tiny random model at start (demos, tests); ignores model_path
    tiny_arch: Literal["llama", "qwen2", "qwen3"] = "llama"
    seed: int = 0
    objective: Literal["policy_gradient", "sft"] = "policy_gradient"
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    micro_batch_size: int = Field(default=8, gt=0)  # episodes per forward/backward
    activation_checkpointing: bool = False
    # Policy-gradient micro-batches whose episodes share prompts (a GRPO group: n samples of one
    # prompt) run each distinct prompt once and its n responses on the prompt's K/V, when that
    # computes at most 3/4 of the tokens of padding every episode to prompt + response. Same loss
    # and gradients (tests/test_trainer_shared_prompts.py). Llama / Qwen2 / Qwen3 only
    # (backends/shared_forward.py); off under activation checkpointing and under FSDP (ranks would
    # make different numbers of forward calls, each a collective). The torch backend's; the titan
    # backend packs episodes into rows.
    share_prompts: bool = True
    # With share_prompts: a distinct prompt whose responses fit in this many tokens together with it
    # (prompt + episodes x longest response) runs as one row, its responses side by side under a
    # block mask: one pass per layer instead of two (shared_forward.packed_group_logits). Pays at
    # short rows on CPU, where each layer call's fixed cost dominates; the attention grows with the
    # square of the row. Batches with nothing to share (SFT) take such rows too, one episode each
    # (the padded batch without HF's per-layer glue). 0: two passes, or HF's forward.
    pack_group_tokens: int = Field(default=128, ge=0)
    device: str = "cpu"  # "cuda" turns on bf16 autocast
    threads: int = Field(default=0, ge=0)  # torch intra-op threads; 0 = torch's default
    max_batch_episodes: int = Field(default=4096, gt=0)
    checkpoint_dir: str = "~/.cache/forgerpc/trainer/checkpoints"
    keep_checkpoints: int = Field(default=3, gt=0)
    sft: SFTConfig = SFTConfig()
    publish_dir: str = "~/.cache/forgerpc/trainer/published"
    producer: str = "trainer-0"
    # "host:port" of the weight store: PublishWeights uploads there (location = this address);
    # empty: PublishWeights writes an HF directory under publish_dir (location = that directory).
    weight_store_address: str = ""
    # Dtype of floating-point weights in the store. "auto": bfloat16 on CUDA (the trainer computes
    # in bf16 autocast and GPU generators serve bf16, so half the bytes lose nothing they would keep),
    # float32 elsewhere (the CPU generator computes in fp32; rounding weights to bf16 would add a
    # trainer/generator logprob mismatch that every importance ratio then carries).
    publish_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "host:port" of the replay buffer for TrainStep(from_buffer=...); empty: episodes come inline.
    replay_buffer_address: str = ""

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from forgerpc.services.trainer.backends import BACKENDS

        if v not in BACKENDS:
            raise ValueError(f"unknown trainer backend {v!r}; one of: {', '.join(sorted(BACKENDS))}")
        return v

    def torch_publish_dtype(self):
        """The torch dtype PublishWeights casts floating-point weights to (see publish_dtype)."""
        import torch

        name = self.publish_dtype
        if name == "auto":
            name = "bfloat16" if self.device.startswith("cuda") else "float32"
        return getattr(torch, name)
