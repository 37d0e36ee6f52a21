"""Batched sampling with per-row temperature, top-k, top-p and seeds.

Which distribution the logprobs refer to (the RL trainer relies on this):

    sampled rows (temperature T > 0):
        z = logits / T
        z[i] = -inf for tokens outside the top-k and outside the top-p nucleus
        logprob(token) = log_softmax(z)[token]          # exactly the distribution sampled from
    greedy rows (T == 0): top-k / top-p are ignored and
        logprob(token) = log_softmax(logits)[token]      # the T = 1 policy, not a point mass

With top_k = 0 and top_p = 1 (the usual RL setting) a sampled row's logprob is
log_softmax(logits / T), which is what a trainer recomputes from a fresh forward pass.

Sampling uses the exponential race: argmax_i(z_i - log E_i) with E_i ~ Exp(1) draws token i
with probability softmax(z)_i, and lets every row take its noise from its own generator.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class BatchParams:
    """Per-row sampling parameters of the running batch, as tensors (rebuilt when it changes).

    Attributes:
        temperature: (B,) float, 0 for greedy rows.
        top_k: (B,) long, 0 = off.
        top_p: (B,) float, 1 = off.
        generators: per row, a seeded torch.Generator or None (shared engine generator).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_filter: bool

    @classmethod
    def build(cls, rows: list[tuple[float, int, float, torch.Generator | None]],
              device: torch.device | str = "cpu") -> "BatchParams":
        """rows: (temperature, top_k, top_p, generator) per running sequence; tensors on `device`."""
        temps = [r[0] for r in rows]
        # greedy rows never filter: their logprob is the unfiltered T=1 one (see module doc)
        ks = [r[1] if r[0] > 0 else 0 for r in rows]
        ps = [r[2] if r[0] > 0 and 0 < r[2] < 1 else 1.0 for r in rows]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(ks, dtype=torch.long, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            generators=[r[3] for r in rows],
            all_greedy=all(t == 0 for t in temps),
            any_filter=any(k > 0 for k in ks) or any(p < 1 for p in ps),
        )


def filter_top_k_top_p(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sets logits outside each row's top-k and top-p nucleus to -inf.

    Args:
        z: (B, V) temperature-scaled logits.
        top_k: (B,) 0 = keep all.  top_p: (B,) 1 = keep all.
    Returns:
        (B, V) filtered logits; the most likely token of each row is always kept.
    """
    sorted_z, order = z.sort(dim=-1, descending=True)
    rank = torch.arange(z.shape[-1], device=z.device)[None]
    k = torch.where(top_k > 0, top_k, z.shape[-1])[:, None]
    drop = rank >= k
    probs = sorted_z.softmax(dim=-1)
    # drop a token when the mass strictly before it already reaches top_p
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_z = sorted_z.masked_fill(drop, float("-inf"))
    return torch.empty_like(z).scatter_(-1, order, sorted_z)


def sample(logits: torch.Tensor, params: BatchParams, rng: torch.Generator | None = None):
    """Draws one token per row.

    Args:
        logits: (B, V) float32 next-token logits.
        params: the batch's sampling parameters.
        rng: generator for rows without their own seed.
    Returns:
        tokens (B,) long and their logprobs (B,) float32, as defined in the module docstring.
    """
    if params.all_greedy:
        logp = logits.log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    temp = params.temperature
    greedy = temp == 0
    z = logits / torch.where(greedy, 1.0, temp)[:, None]
    if params.any_filter:
        z = filter_top_k_top_p(z, params.top_k, params.top_p)
    logp = z.log_softmax(dim=-1)
    noise = torch.empty_like(logp).exponential_(generator=rng)
    for row, gen in enumerate(params.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    drawn = (logp - noise.log()).argmax(dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]
