"""The forward pass of a shared-prompt micro-batch (TrainerConfig.share_prompts), over an HF model's modules.

    prompts (u, P) -> every layer's K/V (u, kv_heads, P, d), picked per episode with `index` (b, ...)
    responses (b, R - 1) -> attend to [their prompt's K/V | their own causal K/V]
    logits (b, R, V): column 0 from the prompt's last position, column k from response input k - 1

It calls the model's own modules (embedding, norms, projections, Qwen3's q/k norms, MLP, rotary
embedding), so it computes what the HF forward computes; only attention and the cache are written
out here. Why not the HF forward with a KV cache (what it replaced): at the sizes of an RL step on
CPU, HF's per-layer glue (argument decorators, cache objects, repeat_kv) made the whole trainer
step ~25 % slower (bench/trainer_step.py: 48.4 vs 38.5 ms, fused AdamW included; bench/README.md).
The gather of the prompt's K/V is an index_select, so the gradients of all n responses of a group
sum into their prompt's activations.
`packed_group_logits` computes the same logits in one pass, each prompt and its responses as one row
under a block mask (for short rows, see its docstring).
tests/test_trainer_shared_prompts.py checks loss and gradients of both against the padded HF forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Qwen2 / Qwen3 use the same

SUPPORTED = ("llama", "qwen2", "qwen3")


def supports(model) -> bool:
    """Llama / Qwen2 / Qwen3 without attention dropout or sliding windows (else: the padded HF forward)."""
    c = model.config
    return (c.model_type in SUPPORTED and not getattr(c, "attention_dropout", 0.0)
            and not getattr(c, "use_sliding_window", False))


def shared_prompt_logits(model, prompt_ids, prompt_attn, prompt_positions, index, response_ids,
                         response_positions) -> torch.Tensor:
    """Logits (b, R, V) of b episodes over u distinct prompts; shapes as in torch_backend.SharedPrompts."""
    inner = model.model
    P = prompt_ids.shape[1]
    b, R1 = response_ids.shape
    device = prompt_ids.device
    real = prompt_attn.bool()
    # causal, and no padding key; each position also sees itself, so a padding row (left of a short
    # prompt) is never fully masked (its output is unused, but NaN would reach the backward)
    pos = torch.arange(P, device=device)
    causal = pos[None, :] <= pos[:, None]
    mask = (causal[None] & (real[:, None, :] | torch.eye(P, dtype=torch.bool, device=device)))[:, None]
    h = inner.embed_tokens(prompt_ids)
    cos, sin = inner.rotary_emb(h, prompt_positions)
    past = []
    for layer in inner.layers:
        h, k, v = _layer(layer, h, cos, sin, mask)
        past.append((k[index], v[index]))
    first = model.lm_head(inner.norm(h[:, -1:]))[index]
    if not R1:
        return first
    r = torch.arange(R1, device=device)
    mask = torch.cat([real[index][:, None, :].expand(b, R1, P),
                      (r[None, :] <= r[:, None])[None].expand(b, R1, R1)], dim=-1)[:, None]
    h = inner.embed_tokens(response_ids)
    cos, sin = inner.rotary_emb(h, response_positions)
    for layer, kv in zip(inner.layers, past):
        h, _, _ = _layer(layer, h, cos, sin, mask, kv)
    return torch.cat([first, model.lm_head(inner.norm(h))], dim=1)


def _layer(layer, h, cos, sin, mask, past=None):
    """One decoder layer: h (n, s, hidden) -> (h, k, v), k and v (n, kv_heads, s, d) of these positions."""
    attn = layer.self_attn
    n, s, _ = h.shape
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(n, s, -1, attn.head_dim)
    k = attn.k_proj(x).view(n, s, -1, attn.head_dim)
    v = attn.v_proj(x).view(n, s, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # cos, sin (n, s, d)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                       enable_gqa=q.shape[1] != keys.shape[1])
    h = h + attn.o_proj(o.transpose(1, 2).reshape(n, s, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), k, v


def packed_group_logits(model, prompt_ids, prompt_attn, prompt_positions, index, slot, slots,
                        response_ids, response_positions) -> torch.Tensor:
    """`shared_prompt_logits` computed in one pass: each distinct prompt and its responses as one row.

    Row r of (u, L), L = P + slots * (R - 1): [prompt r | slot 0 | slot 1 | ...], episode j's
    response inputs in row index[j], slot slot[j]. The block mask lets a prompt column see its own
    real causal past and a response column see its prompt's real tokens and its own slot causally,
    exactly the keys of the two-pass forward. Half the layer calls and one attention call per layer
    instead of two: at a GRPO group of short episodes (grpo_tiny: 9 + 8 x 5 tokens) the per-call
    overhead dominates on CPU; at long responses the (L, L) attention grows with the square of the
    group's tokens, so the backend uses this only for short rows (TrainerConfig.pack_group_tokens).
    Slots a row does not fill hold padding that attends to itself and its prompt; nothing reads them.
    """
    inner = model.model
    u, P = prompt_ids.shape
    b, R1 = response_ids.shape
    device = prompt_ids.device
    L = P + slots * R1
    cols = P + slot[:, None] * R1 + torch.arange(R1, device=device)  # (b, R - 1): the episode's columns
    ids = torch.zeros((u, L), dtype=prompt_ids.dtype, device=device)
    ids[:, :P] = prompt_ids
    ids[index[:, None], cols] = response_ids
    positions = torch.zeros((u, L), dtype=prompt_positions.dtype, device=device)
    positions[:, :P] = prompt_positions
    positions[index[:, None], cols] = response_positions
    # segment of each column: -1 the prompt, s slot s; a key is visible when causal and either a
    # real prompt token or in the query's own slot (every column sees itself: no row is all-masked)
    c = torch.arange(L, device=device)
    segment = torch.where(c < P, -1, (c - P).div(max(R1, 1), rounding_mode="floor"))
    real = torch.cat([prompt_attn.bool(), torch.zeros((u, L - P), dtype=torch.bool, device=device)], dim=1)
    same = (segment[None, :] == segment[:, None]) & (segment[None, :] >= 0)
    mask = (c[None, :] <= c[:, None])[None] & (real[:, None, :] | same[None]) | torch.eye(L, dtype=torch.bool,
                                                                                           device=device)[None]
    h = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(h, positions)
    for layer in inner.layers:
        h, _, _ = _layer(layer, h, cos, sin, mask[:, None])
    # (b, R, hidden): column 0 from the prompt's last position, then the episode's response inputs
    picked = torch.cat([h[:, P - 1][index][:, None], h[index[:, None], cols]], dim=1)
    return model.lm_head(inner.norm(picked))
