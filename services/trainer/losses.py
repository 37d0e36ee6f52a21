"""Policy-gradient and SFT losses: small pure functions over per-token tensors.

Shapes (B = sequences in the batch, T = longest response, responses right-padded):
    logprobs        (B, T)  log pi_theta(y_t | x, y_<t), carries the gradient
    old_logprobs    (B, T)  log pi_old: the generator's logprobs (the policy that sampled y)
    ref_logprobs    (B, T)  log pi_ref of a frozen reference model (KL penalty)
    advantages      (B,)    one scalar per sequence
    mask            (B, T)  1.0 on response tokens that are trained, 0.0 on padding / masked tokens

Every objective below is "loss = aggregate(per_token_loss)"; `aggregate` takes optional global counts
so that gradient accumulation over micro-batches (and data parallelism) gives the same gradient as one
big batch: pass the counts of the whole batch, sum the micro-batch losses.

The importance ratio is taken against the *generator's* logprobs, so it is not identically 1: it
measures both the trainer/generator numerical mismatch and the staleness of asynchronous episodes,
and PPO clipping bounds the update by it. For stale episodes the trainer may instead use a proximal
ratio against its own current logprobs and correct the sampling mismatch with truncated importance
sampling (`tis_weights`), as TRL does with vLLM logprobs.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

Aggregation = Literal["seq_mean", "token_mean", "constant"]
Level = Literal["token", "sequence"]


@dataclasses.dataclass
class LossOutput:
    """A loss plus detached token sums for metrics (sums, so micro-batches add up). All are 0-d
    tensors on the loss's device: reading them (`float(...)`) is left to the caller, so a GPU step
    synchronizes once, not once per metric per micro-batch.

    Attributes:
        loss: scalar with gradient.
        kl_sum: sum over masked tokens of the k3 KL (0 when beta == 0).
        clipped_sum: number of masked tokens whose ratio was clipped (in the direction that matters).
        tokens: number of masked tokens.
    """

    loss: torch.Tensor
    kl_sum: torch.Tensor
    clipped_sum: torch.Tensor
    tokens: torch.Tensor


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy of each position's distribution, at sampling temperature tau.

    z_t = logits_t / tau;  logp_t = z_t[y_t] - logsumexp(z_t);  H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_t,v

    The PPO ratio compares these with the generator's logprobs, which are those of the distribution
    it sampled from, log_softmax(logits / tau): the two must use the same tau.

    Args:
        logits: (B, T, V) float.
        targets: (B, T) long.
        temperature: tau > 0 (the sampling temperature).
        entropy_grad: keep the entropy's graph (an entropy bonus, `policy_loss(entropy_coef=...)`);
            off, it is a metric and costs no (B, T, V) activations for the backward.

    Returns:
        (logprobs (B, T) with gradient, entropy (B, T), detached unless entropy_grad).
    """
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref) (Schulman, "Approximating KL divergence", 2020).

    k3 = exp(ref - logp) - (ref - logp) - 1   (>= 0, unbiased for samples from pi_theta)

    Args/returns: (B, T) tensors.
    """
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, how: Aggregation, *,
              num_sequences: float | None = None, num_tokens: float | None = None,
              max_tokens: int | None = None) -> torch.Tensor:
    """Reduces a (B, T) (or (B, 1), broadcast) per-token loss to a scalar.

    seq_mean   (GRPO, Shao et al. 2024):     1/G sum_i 1/|o_i| sum_t l_it
    token_mean (DAPO, Yu et al. 2025):       1/sum_i |o_i| sum_i sum_t l_it
    constant   (Dr.GRPO, Liu et al. 2025):   1/(G * max_tokens) sum_i sum_t l_it   (no length bias)

    `num_sequences` (G) and `num_tokens` default to this batch's; pass the whole batch's counts when
    this is one micro-batch of it.
    """
    per_token_loss = per_token_loss.expand_as(mask) * mask
    if how == "seq_mean":
        per_seq = per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / (num_sequences if num_sequences is not None else mask.shape[0])
    if how == "token_mean":
        return per_token_loss.sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1.0))
    if how == "constant":
        if not max_tokens:
            raise ValueError("aggregation 'constant' needs max_tokens (the generation budget)")
        return per_token_loss.sum() / ((num_sequences if num_sequences is not None else mask.shape[0]) * max_tokens)
    raise ValueError(f"unknown aggregation {how!r}")


def log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: Level) -> torch.Tensor:
    """log(pi_theta / pi_old) per token (B, T), or per sequence (B, 1) as GSPO's length-normalized
    log s_i = 1/|y_i| sum_t (logp_it - old_it) (Zheng et al. 2025, "Group Sequence Policy Optimization")."""
    diff = logprobs - old_logprobs
    if level == "token":
        return diff
    return ((diff * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, level: Level = "token",
                aggregation: Aggregation = "seq_mean", ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
                is_weights: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                entropy_coef: float = 0.0, num_sequences: float | None = None,
                num_tokens: float | None = None, max_tokens: int | None = None) -> LossOutput:
    """PPO-style clipped surrogate, the core shared by GRPO, DAPO, Dr.GRPO and GSPO.

    r   = exp(log_ratio(logprobs, old_logprobs))                         token (B, T) or sequence (B, 1)
    l_t = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) * w_t + beta * k3_kl(logp, ref)_t - c * H_t
    loss = aggregate(l, mask)

    where w_t are optional truncated importance-sampling weights (see `tis_weights`), applied to the
    policy term only (as in TRL), and H_t the entropy of the policy at token t (an entropy bonus,
    coefficient c = entropy_coef, aggregated like the rest, as verl's `entropy_coeff`): it pushes
    back against the entropy collapse that leaves a confident policy with groups of equal rewards
    and so no advantage to learn from. A token counts as clipped when clipping removed its gradient:
    r < 1 - clip_low with A < 0, or r > 1 + clip_high with A > 0.

    Args:
        logprobs, old_logprobs, mask: (B, T); advantages: (B,); ref_logprobs, is_weights: (B, T) or None;
        entropy: (B, T) with gradient (`token_logprobs_and_entropy(..., entropy_grad=True)`), needed
        when entropy_coef != 0. Other keywords: see `aggregate`.
    """
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(log_ratio(logprobs, old_logprobs, mask, level))
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl_sum = torch.zeros((), device=mask.device)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        kl_sum = (kl.detach() * mask).sum()
    if entropy_coef != 0.0:
        if entropy is None or not entropy.requires_grad:
            raise ValueError("entropy_coef != 0 needs the entropy with its gradient")
        per_token = per_token - entropy_coef * entropy
    loss = aggregate(per_token, mask, aggregation, num_sequences=num_sequences, num_tokens=num_tokens,
                     max_tokens=max_tokens)
    with torch.no_grad():
        was_clipped = ((ratio < 1.0 - clip_low) & (adv < 0)) | ((ratio > 1.0 + clip_high) & (adv > 0))
        clipped_sum = (was_clipped.expand_as(mask) * mask).sum()
    return LossOutput(loss, kl_sum=kl_sum, clipped_sum=clipped_sum, tokens=mask.sum().detach())


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, clip: float = 0.2, **kw) -> LossOutput:
    """GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3): symmetric clip eps, per-sequence length mean,
    then mean over the G sequences; optional beta * k3 KL to a reference.

    J = 1/G sum_i 1/|o_i| sum_t [min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i) - beta KL_it]
    """
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip, clip_high=clip,
                       aggregation="seq_mean", **kw)


def dapo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.28,
              **kw) -> LossOutput:
    """DAPO (Yu et al. 2025): clip-higher (eps_high > eps_low) and token-level normalization.

    J = 1/sum_i |o_i| sum_i sum_t min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i)
    """
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                       aggregation="token_mean", **kw)


def dr_grpo_loss(logprobs, old_logprobs, advantages, mask, *, max_tokens: int, clip: float = 0.2,
                 **kw) -> LossOutput:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no 1/|o_i| length normalization
    (a constant generation budget instead) and advantages without std normalization
    (`group_advantages(..., normalize_std=False)`).

    J = 1/(G * max_tokens) sum_i sum_t min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i),  A_i = R_i - mean(R_group)
    """
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip, clip_high=clip,
                       aggregation="constant", max_tokens=max_tokens, **kw)


def gspo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 3e-4, clip_high: float = 4e-4,
              **kw) -> LossOutput:
    """GSPO (Zheng et al. 2025): one length-normalized importance ratio per sequence.

    s_i = exp(1/|y_i| sum_t log(pi_theta(y_it) / pi_old(y_it)))
    J = 1/G sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)

    Defaults are the paper's clip range (3e-4, 4e-4). The gradient of exp(mean log ratio) equals the
    paper's s_i * 1/|y_i| sum_t grad log pi(y_it).
    """
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                       level="sequence", aggregation="seq_mean", **kw)


def tis_weights(old_logprobs: torch.Tensor, generator_logprobs: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling weights (Yao et al. 2025, "Your Efficient RL Framework Secretly
    Brings You Off-Policy RL Training"): corrects for the episode having been sampled by a policy
    other than the one the PPO ratio is taken against.

    w_t = min(pi_old(y_t) / pi_gen(y_t), cap)   (B, T), no gradient
    """
    return torch.exp(old_logprobs - generator_logprobs).clamp(max=cap).detach()


def group_advantages(rewards: torch.Tensor, group_ids: list, *, normalize_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, "outcome supervision").

    A_i = (R_i - mean_{j in g(i)} R_j) / (std_{j in g(i)} R_j + eps)   (std: unbiased, as TRL)
    A_i =  R_i - mean_{j in g(i)} R_j                                    when not normalize_std (Dr.GRPO)

    A group of one sequence gets advantage 0 (there is nothing to compare it with).

    Args:
        rewards: (N,) float. group_ids: N hashable ids; equal ids form a group.
    Returns:
        (N,) advantages.
    """
    out = torch.zeros_like(rewards)
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        idx = torch.tensor(members)
        r = rewards[idx]
        centered = r - r.mean()
        out[idx] = centered / (r.std() + eps) if normalize_std else centered
    return out


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, *, num_tokens: float | None = None) -> LossOutput:
    """Masked cross-entropy (negative log-likelihood) over response tokens.

    loss = -1/N sum_{i,t} mask_it * logp_it,  N = sum mask (or the whole batch's `num_tokens`)

    Packed sequences need no special case here: the mask already excludes what is not trained.
    """
    n = num_tokens if num_tokens is not None else mask.sum().clamp(min=1.0)
    zero = torch.zeros((), device=mask.device)
    return LossOutput(-(logprobs * mask).sum() / n, kl_sum=zero, clipped_sum=zero, tokens=mask.sum().detach())
