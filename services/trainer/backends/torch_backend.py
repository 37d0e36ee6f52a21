"""The torch backend: plain PyTorch over an HF-format causal LM (CPU or GPU, optionally FSDP2).

One `train_step(samples)`:

    advantages (given, or group-relative over the batch) -> for each micro-batch:
        forward (left-padded prompts, so every response starts at the same column) -> per-token
        logprobs -> loss with the *whole* batch's counts -> backward (gradients accumulate)
    -> if loss and grad norm are finite: clip, AdamW step, LR schedule step; else: drop the gradients.

SFT with `sft.packing`: the micro-batches are rows of `sft.pack_length` tokens holding several
episodes each (services/trainer/packing.py); `micro_batch_size` then counts rows.

Policy gradient with `share_prompts` (default): a micro-batch whose episodes repeat prompts (a GRPO
group) runs each distinct prompt once, then every response on a copy of its prompt's KV cache
(`_shared_logprobs`, shared_forward.py); same loss and gradients as the padded forward, (n - 1) / n
of the prompt tokens fewer for groups of n. Short rows (prompt + its responses <= `pack_group_tokens`)
run as one sequence each instead, in one pass (`packed_group_logits`); SFT batches take those rows too.
Single-process Llama / Qwen2 / Qwen3 only (see `_shared_prompts`).

Under `torchrun` (torch.distributed initialized) the model is sharded with FSDP2 (`fully_shard` per
decoder layer, then the root), each rank takes every world_size-th sample, and because FSDP averages
gradients over ranks each rank's loss is multiplied by world_size: the result equals one process
(tests/test_trainer_fsdp.py). Not yet under FSDP: `save_checkpoint` / `save_pretrained` (they need
the gathered state from `full_state_dict`), and serving gRPC from rank 0 with the other ranks
following its steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time

import torch
import torch.distributed as dist

from forgerpc.services.trainer import checkpoint, losses, packing
from forgerpc.services.trainer.backends import shared_forward
from forgerpc.services.trainer.config import TrainerConfig


# loss kind -> (ratio level, aggregation, default clip_low, default clip_high); see losses.py for each paper.
LOSS_KINDS = {
    "grpo": ("token", "seq_mean", 0.2, 0.2),
    "dapo": ("token", "token_mean", 0.2, 0.28),
    "dr_grpo": ("token", "constant", 0.2, 0.2),
    "gspo": ("sequence", "seq_mean", 3e-4, 4e-4),
}


@dataclasses.dataclass
class Sample:
    """One episode, already validated. `advantage` None: compute it group-relative from `reward`."""

    prompt: list[int]
    response: list[int]
    generator_logprobs: list[float]
    mask: list[int]
    reward: float = 0.0
    advantage: float | None = None
    group_id: str = ""
    policy_version: int = 0


@dataclasses.dataclass
class SharedPrompts:
    """A policy-gradient micro-batch of b episodes over u distinct prompts (TrainerConfig.share_prompts).

    prompt_ids, prompt_attn, prompt_positions (u, P): left-padded distinct prompts.
    index (b,): episode -> its prompt's row.
    response_ids, response_positions (b, R - 1): responses without their last token, right-padded;
        positions continue from the episode's real prompt length.
    slot (b,): the episode's place among its prompt's episodes; slots: the most episodes of one prompt.
    packed: run as one row per prompt (shared_forward.packed_group_logits), else in two passes.
    """

    prompt_ids: torch.Tensor
    prompt_attn: torch.Tensor
    prompt_positions: torch.Tensor
    index: torch.Tensor
    response_ids: torch.Tensor
    response_positions: torch.Tensor
    slot: torch.Tensor
    slots: int
    packed: bool


@dataclasses.dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    tokens: int
    kl: float
    clip_fraction: float
    entropy: float
    step_seconds: float
    skipped: bool = False
    skip_reason: str = ""


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Multiplier of the base LR at step s: linear warmup (s+1)/warmup, then cosine from 1 to min_ratio."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: TrainerConfig, model, tokenizer=None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        torch.manual_seed(cfg.seed)
        self.tokenizer = tokenizer
        self.model = model.to(self.device).train()
        self.model.config.use_cache = False
        self.vocab_size = self.model.config.vocab_size
        self.max_positions = getattr(self.model.config, "max_position_embeddings", 1 << 30)
        self.pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.ref_model = None
        if cfg.loss.beta > 0:  # the KL reference is the initial policy, frozen
            import copy
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if cfg.activation_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.world > 1:
            self._shard()
        self._init_training_state(cfg)

    def _init_training_state(self, cfg) -> None:
        """AdamW over self.model, warmup + cosine schedule, counters at zero (every backend)."""
        o = cfg.optim
        # One process: the fused kernel, one call for all parameters instead of a loop over tensors
        # (a small model's step pays per tensor). Sharded parameters keep the default loop.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay, fused=self.world == 1 or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.warmup_steps, o.total_steps, o.min_lr_ratio))
        self.step = 0
        self.policy_version = 0
        self.data_position = ""

    def reset_optimizer(self) -> None:
        """Fresh AdamW moments and a restarted schedule; weights and counters stay (TrainStepRequest.
        reset_optimizer: the first RL step after an SFT warm start)."""
        step, version, position = self.step, self.policy_version, self.data_position
        self._init_training_state(self.cfg)
        self.step, self.policy_version, self.data_position = step, version, position

    def _shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.model.model.layers:
            fully_shard(layer)
        fully_shard(self.model)

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, samples: list[Sample], objective: str = "policy_gradient",
                   learning_rate: float = 0.0) -> StepResult:
        """One optimizer step. `learning_rate` > 0 overrides the schedule for this step only and
        leaves the schedule where it was (an SFT warm start must not eat the RL warmup)."""
        start = time.perf_counter()
        scheduled = self.scheduler.get_last_lr()[0]
        lr = learning_rate or scheduled
        self.optimizer.zero_grad(set_to_none=True)
        loss, kl_sum, clipped, tokens, entropy_sum = self.accumulate_gradients(samples, objective)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        reason = ""
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm ({grad_norm})"
        if reason:
            self.optimizer.zero_grad(set_to_none=True)  # weights, optimizer and schedule stay untouched
        else:
            if learning_rate:
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate
                self.optimizer.step()
                for group in self.optimizer.param_groups:
                    group["lr"] = scheduled
            else:
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        t = max(tokens, 1.0)
        return StepResult(step=self.step, loss=loss, grad_norm=grad_norm, learning_rate=lr, tokens=int(tokens),
                          kl=kl_sum / t, clip_fraction=clipped / t, entropy=entropy_sum / t,
                          step_seconds=time.perf_counter() - start, skipped=bool(reason), skip_reason=reason)

    def accumulate_gradients(self, samples: list[Sample], objective: str = "policy_gradient") -> list[float]:
        """Forward and backward over the whole batch, micro-batch by micro-batch; gradients add up
        in the parameters' `.grad` (the caller zeroes them). Returns the batch's
        [loss, kl_sum, clipped, tokens, entropy_sum], summed over micro-batches and ranks; a
        policy-gradient batch's zero-advantage episodes are skipped, so tokens, clipped and
        entropy_sum count only the episodes that carry a gradient."""
        n_tokens = sum(sum(s.mask) for s in samples)
        counts = dict(num_sequences=len(samples), num_tokens=max(n_tokens, 1),
                      max_tokens=self.cfg.loss.max_tokens or max(len(s.response) for s in samples))
        if objective == "sft" and self.cfg.sft.packing:
            length = self.cfg.sft.pack_length
            rows = [[samples[i] for i in row]
                    for row in packing.pack([len(s.prompt) + len(s.response) for s in samples], length)]
            units, run = rows, lambda idx: self._packed_micro_batch([rows[j] for j in idx], counts)
        else:
            advantages = self._advantages(samples)
            if objective == "policy_gradient" and self.ref_model is None and not self.cfg.loss.entropy_coef:
                # Without a KL term an episode with advantage 0 has loss -min(r * 0, clip(r) * 0) = 0
                # and no gradient, and `counts` above are the whole batch's: leaving it out gives the
                # same gradient for less compute. In GRPO that is every group whose rewards are all
                # equal (all right or all wrong), often half a batch. (A KL term or an entropy bonus
                # gives every episode a gradient.)
                keep = advantages.nonzero().flatten().tolist()
                samples, advantages = [samples[j] for j in keep], advantages[keep]
            units, run = samples, lambda idx: self._micro_batch(
                [samples[j] for j in idx], advantages[idx], objective, counts)
        mine = list(range(self.rank, len(units), self.world))
        totals = torch.zeros(5, device=self.device)  # loss, kl_sum, clipped, tokens, entropy_sum; read once
        mb = self.cfg.micro_batch_size
        # Every rank runs the same number of micro-batches, or FSDP's collectives would not pair up.
        n_micro = math.ceil(math.ceil(len(units) / self.world) / mb)
        for i in range(0, n_micro * mb, mb):
            idx = mine[i:i + mb]
            weight = 1.0 if idx else 0.0  # a rank out of samples runs a zero-weight pass to join the collectives
            out, entropy_sum = run(idx or [0])
            (out.loss * weight * self.world).backward()
            totals += torch.stack([out.loss.detach(), out.kl_sum, out.clipped_sum, out.tokens, entropy_sum]) * weight
        if self.world > 1:
            totals = totals if dist.get_backend() == "nccl" else totals.cpu()
            dist.all_reduce(totals)
        return totals.tolist()

    def _advantages(self, samples: list[Sample]) -> torch.Tensor:
        """Given advantages where present; the rest group-relative over the batch (see losses.group_advantages)."""
        given = [s.advantage for s in samples]
        if all(a is not None for a in given):
            return torch.tensor(given, dtype=torch.float32)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        ids = [s.group_id or f"#{i}" for i, s in enumerate(samples)]  # no group id: a group of one
        computed = losses.group_advantages(rewards, ids, normalize_std=self.cfg.loss.normalize_std)
        return torch.tensor([a if a is not None else c for a, c in zip(given, computed.tolist())])

    def _batch(self, chunk: list[Sample], inputs: bool = True):
        """Left-pads prompts and right-pads responses so all responses start at column P = max prompt length.

        Returns input_ids, attention_mask, position_ids (b, P + R); targets, gen_logprobs, mask (b, R).
        With inputs=False (the shared-prompt path builds its own) the first three are None.
        """
        P = max(len(s.prompt) for s in chunk) if inputs else 0
        R = max(len(s.response) for s in chunk)
        # Rows are built as Python lists and converted once: one torch.tensor per batch, not four
        # per sample (512 small-tensor creations for a 128-episode batch cost ~5-10 ms on CPU).
        ids, attn, gen, mask = [], [], [], []
        for s in chunk:
            p, r = len(s.prompt), len(s.response)
            prompt = [self.pad_id] * (P - p) + list(s.prompt) if inputs else []
            ids.append(prompt + list(s.response) + [self.pad_id] * (R - r))
            if inputs:
                attn.append([0] * (P - p) + [1] * (p + r) + [0] * (R - r))
            gen.append(list(s.generator_logprobs) + [0.0] * (R - r))
            mask.append(list(s.mask) + [0.0] * (R - r))
        ids = torch.tensor(ids, dtype=torch.long)
        gen = torch.tensor(gen, dtype=torch.float32)
        mask = torch.tensor(mask, dtype=torch.float32)
        d = self.device
        if not inputs:
            return None, None, None, ids.to(d), gen.to(d), mask.to(d)
        attn = torch.tensor(attn, dtype=torch.long)
        # Positions count real tokens only, so a left-padded prompt sees the positions the generator saw.
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        return ids.to(d), attn.to(d), positions.to(d), ids[:, P:].to(d), gen.to(d), mask.to(d)

    def _logprobs(self, model, ids, attn, positions, targets, temperature: float = 1.0, entropy_grad: bool = False):
        R = targets.shape[1]
        with self._autocast():
            # Logits at columns P-1 .. P+R-2 predict the R response tokens.
            logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=R + 1).logits
        return losses.token_logprobs_and_entropy(logits[:, :-1], targets, temperature, entropy_grad)

    def _autocast(self):
        """bf16 autocast on CUDA (fp32 master weights), nothing on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _packed_micro_batch(self, rows: list[list[Sample]], counts: dict):
        """SFT loss of packed rows (see packing.py): position ids restart per episode, no attention mask."""
        length = self.cfg.sft.pack_length
        ids, positions, targets, mask = (t.to(self.device) for t in packing.packed_batch(
            [[(s.prompt, s.response, s.mask) for s in row] for row in rows], length, self.pad_id))
        logp, entropy = self.packed_logprobs(ids, positions, targets)
        return losses.sft_loss(logp, mask, num_tokens=counts["num_tokens"]), (entropy * mask).sum()

    def packed_logprobs(self, ids, positions, targets):
        """(logprobs, entropy) (rows, L - 1) of packed rows. No attention mask and no KV cache: that
        is when transformers derives the per-episode block-diagonal mask from the position ids."""
        with self._autocast():
            logits = self.model(input_ids=ids, position_ids=positions, use_cache=False).logits
        return losses.token_logprobs_and_entropy(logits[:, :-1], targets)

    def _shared_prompts(self, chunk: list[Sample]) -> SharedPrompts | None:
        """The micro-batch as distinct prompts + responses (see SharedPrompts), or None (the padded
        HF forward) when sharing would not save a quarter of the tokens, u * P + b * (R - 1) vs
        b * (P + R) for u distinct prompts among b episodes, P and R the longest prompt and response,
        and the rows do not fit `pack_group_tokens` either: packed rows pay even without repeated
        prompts (an SFT batch: one episode per row, the padded batch computed without HF's
        per-layer glue)."""
        # Not under FSDP: each layer's all-gather pairs up across ranks, and one rank's micro-batch
        # may share (two passes) while another's does not (one). Not with activation checkpointing:
        # HF's layer call is what checkpoints, and shared_forward.py calls the layer's parts.
        if (not self.cfg.share_prompts or self.cfg.activation_checkpointing or self.world > 1
                or not shared_forward.supports(self.model)):
            return None
        distinct: dict[tuple[int, ...], int] = {}
        index = [distinct.setdefault(tuple(s.prompt), len(distinct)) for s in chunk]
        seen = [0] * len(distinct)
        slot = []
        for i in index:
            slot.append(seen[i])
            seen[i] += 1
        P = max(len(s.prompt) for s in chunk)
        R = max(len(s.response) for s in chunk)
        saves = 4 * (len(distinct) * P + len(chunk) * (R - 1)) <= 3 * len(chunk) * (P + R)
        packed = R > 1 and P + max(seen) * (R - 1) <= self.cfg.pack_group_tokens
        if not (saves or packed):
            return None
        prompts, p_attn = [], []
        for prompt in distinct:
            prompts.append([self.pad_id] * (P - len(prompt)) + list(prompt))
            p_attn.append([0] * (P - len(prompt)) + [1] * len(prompt))
        responses = []
        for s in chunk:  # inputs: every response token but the last (it predicts nothing trained)
            responses.append(list(s.response[:-1]) + [self.pad_id] * (R - len(s.response)))
        d = self.device
        p_attn = torch.tensor(p_attn, dtype=torch.long)
        index = torch.tensor(index, dtype=torch.long)
        lengths = p_attn.sum(-1)[index]  # each episode's real prompt length: its first response position
        return SharedPrompts(
            prompt_ids=torch.tensor(prompts, dtype=torch.long).to(d), prompt_attn=p_attn.to(d),
            prompt_positions=(p_attn.cumsum(-1) - 1).clamp(min=0).to(d), index=index.to(d),
            response_ids=torch.tensor(responses, dtype=torch.long).to(d),
            response_positions=(lengths[:, None] + torch.arange(R - 1)).to(d),
            slot=torch.tensor(slot, dtype=torch.long).to(d), slots=max(seen), packed=packed)

    def _shared_logprobs(self, model, sp: SharedPrompts, targets, temperature: float = 1.0,
                         entropy_grad: bool = False):
        """`_logprobs` of the same episodes, each distinct prompt computed once.

        prompts (u, P) -> logits of the last column (u, 1, V) and each layer's K/V (u, kv_heads, P, d)
        -> rows picked by `index` (b, ...) -> responses (b, R - 1) attending to them -> logits
        (b, R - 1, V) (shared_forward.py). Column 0 of the result predicts response token 0 (from the
        prompt's last column), column k token k (from response input k - 1): the same (b, R, V) as
        the padded path's slice. Rows of at most `pack_group_tokens` (prompt + its responses) run as
        one sequence each instead (shared_forward.packed_group_logits): same logits, one pass.
        """
        with self._autocast():
            if sp.packed:
                logits = shared_forward.packed_group_logits(
                    model, sp.prompt_ids, sp.prompt_attn, sp.prompt_positions, sp.index, sp.slot, sp.slots,
                    sp.response_ids, sp.response_positions)
            else:
                logits = shared_forward.shared_prompt_logits(
                    model, sp.prompt_ids, sp.prompt_attn, sp.prompt_positions, sp.index, sp.response_ids,
                    sp.response_positions)
        return losses.token_logprobs_and_entropy(logits, targets, temperature, entropy_grad)

    def _micro_batch(self, chunk: list[Sample], adv: torch.Tensor, objective: str, counts: dict):
        temperature = 1.0 if objective == "sft" else self.cfg.loss.temperature
        shared = self._shared_prompts(chunk)
        ids, attn, positions, targets, gen, mask = self._batch(chunk, inputs=shared is None)
        bonus = 0.0 if objective == "sft" else self.cfg.loss.entropy_coef
        if shared is not None:
            logprobs = lambda model, grad=False: self._shared_logprobs(model, shared, targets, temperature, grad)  # noqa: E731
        else:
            logprobs = lambda model, grad=False: self._logprobs(model, ids, attn, positions, targets, temperature, grad)  # noqa: E731
        logp, entropy = logprobs(self.model, bonus > 0)
        entropy_sum = (entropy.detach() * mask).sum()
        if objective == "sft":
            return losses.sft_loss(logp, mask, num_tokens=counts["num_tokens"]), entropy_sum
        lc = self.cfg.loss
        kw = dict(num_sequences=counts["num_sequences"], num_tokens=counts["num_tokens"])
        if self.ref_model is not None:
            with torch.no_grad():
                kw["ref_logprobs"], _ = logprobs(self.ref_model)
            kw["beta"] = lc.beta
        old = gen
        stale = torch.tensor([[s.policy_version < self.policy_version] for s in chunk], device=self.device)
        use_tis = {"on": torch.ones_like(stale), "off": torch.zeros_like(stale), "auto": stale}[lc.tis]
        if use_tis.any():
            # Proximal ratio against our own current logprobs; the sampling mismatch goes into TIS weights.
            old = torch.where(use_tis, logp.detach(), gen)
            kw["is_weights"] = torch.where(use_tis, losses.tis_weights(logp.detach(), gen, lc.tis_cap),
                                           torch.ones_like(gen))
        level, aggregation, clip_low, clip_high = LOSS_KINDS[lc.kind]
        out = losses.policy_loss(
            logp, old, adv.to(self.device), mask, level=level, aggregation=aggregation,
            clip_low=lc.clip_low if lc.clip_low is not None else clip_low,
            clip_high=lc.clip_high if lc.clip_high is not None else clip_high,
            max_tokens=counts["max_tokens"], entropy=entropy, entropy_coef=bonus, **kw)
        return out, entropy_sum

    # ---- weights and checkpoints ----------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (HF names); under FSDP every rank must call it (it gathers)."""
        if self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def save_pretrained(self, directory: pathlib.Path) -> int:
        """Writes an HF directory (config, safetensors, tokenizer) that a generator can load; returns bytes."""
        self.model.save_pretrained(str(directory), safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        return sum(f.stat().st_size for f in directory.glob("*.safetensors"))

    def save_checkpoint(self, root: pathlib.Path, keep: int) -> pathlib.Path:
        meta = {"step": self.step, "policy_version": self.policy_version, "data_position": self.data_position,
                "config": self.cfg.model_dump(mode="json")}
        return checkpoint.save(root, self.model, self.optimizer, self.scheduler, meta, keep=keep)

    def load_checkpoint(self, path: pathlib.Path) -> dict:
        meta = checkpoint.load(path, self.model, self.optimizer, self.scheduler)
        self.step, self.policy_version = meta["step"], meta["policy_version"]
        self.data_position = meta.get("data_position", "")
        return meta


def build(cfg: TrainerConfig, model_path: str) -> TorchBackend:
    """The backend over the HF model directory `model_path` (fp32 master weights)."""
    from forgerpc.services.common.models import load_model

    model, tokenizer = load_model(model_path, dtype=torch.float32)
    return TorchBackend(cfg, model, tokenizer)
