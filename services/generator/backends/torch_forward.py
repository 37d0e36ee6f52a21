"""A lean forward pass over a slot-indexed KV cache for HF Llama / Qwen2 / Qwen3 models.

It reuses the HF model's own modules and parameters (embeddings, norms, projections, MLPs,
rotary embedding), so a weight update that copies into the HF model is seen here at once; only
attention and the cache are ours. Why not `model(input_ids, past_key_values=DynamicCache())`:
HF rebuilds masks and cache objects every call, which dominates a decode step of a small model
on CPU, and its cache cannot drop one finished sequence out of a running batch.

Cache layout, one pair per layer:

    k[layer], v[layer]: (slots, kv_heads, capacity, head_dim)

A running sequence owns one slot. The engine keeps running sequences in slots 0..B-1
(compacting on exit with `move_slots`), so a decode step attends over the view
k[layer][:B, :, :max_len] without gathering.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CAPACITY_STEP = 128  # the cache grows in whole steps of positions, reallocating rarely


class SlotKVForward:
    """Prefill and decode for one HF causal LM over `slots` cache rows.

    Args:
        model: an HF `LlamaForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM` in eval mode.
        slots: the most sequences that can run at once.
        max_model_len: context window; the cache never grows past it.
    """

    def __init__(self, model, slots: int, max_model_len: int):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"the torch engine runs {', '.join(SUPPORTED)} models, not {config.model_type!r}")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the torch engine")
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {config.hidden_act!r} is not supported by the torch engine")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.has_qk_norm = hasattr(attn, "q_norm")  # Qwen3 normalizes q and k per head before RoPE
        self.act = ACTIVATIONS[config.hidden_act]
        # Parameters by reference (a weight update copies into them in place, so these stay
        # valid), q/k/v and gate/up fused (see _fuse). Calling F.linear on them skips
        # nn.Module.__call__, a fixed cost per call that dominates a decode step of a small model.
        self.w = [_layer_weights(layer) for layer in self.layers]
        self.norm_w, self.norm_eps = self.inner.norm.weight, self.inner.norm.variance_epsilon
        self.embed_w = self.inner.embed_tokens.weight
        self.head_w = model.lm_head.weight
        self.slots = slots
        self.max_model_len = max_model_len
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        # cos/sin for every position, computed once by the model's own rotary module (which knows
        # the rope type and scaling): (max_model_len, head_dim) each.
        positions = torch.arange(max_model_len, device=self.device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]

    # -- cache management -------------------------------------------------------------------

    def ensure_capacity(self, length: int) -> None:
        """Grows every layer's cache to hold `length` positions, keeping its contents."""
        if length <= self.capacity:
            return
        new = min(self.max_model_len, -(-length // CAPACITY_STEP) * CAPACITY_STEP)
        shape = (self.slots, self.n_kv, new, self.head_dim)
        for cache in (self.k, self.v):
            for i in range(len(self.layers)):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if cache and self.capacity:
                    grown[:, :, : self.capacity].copy_(cache[i])
                if len(cache) > i:
                    cache[i] = grown
                else:
                    cache.append(grown)
        self.capacity = new

    def move_slots(self, src: list[int], dst: list[int], length: int) -> None:
        """Copies the first `length` cached positions of each slot src[j] into slot dst[j].

        One gather and one scatter per layer and cache, whatever the number of slots: a copy_
        per slot and layer (the old way, with the prefill's copies to the n - 1 other samples)
        was a fifth of the generator's CPU in a grpo_tiny run (bench/README.md). Positions past a
        slot's own length carry junk either way (decode masks them). The sources are gathered
        before anything is written, so src and dst may overlap.
        """
        if not src:
            return
        src_t, dst_t = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for cache in (self.k, self.v):
            for layer in cache:
                layer[dst_t, :, :length] = layer[src_t, :, :length]

    # -- forward passes ---------------------------------------------------------------------

    def _qkv(self, w: dict, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projects h (N, S, hidden) to rotated q (N, H, S, D), k and v (N, KV, S, D)."""
        n, s, _ = h.shape
        heads, kv = self.n_heads, self.n_kv
        qkv = F.linear(h, w["qkv"], w["qkv_b"]).view(n, s, heads + 2 * kv, self.head_dim)
        if self.has_qk_norm:
            qk = torch.cat((_rms_norm(qkv[:, :, :heads], *w["q_norm"]),
                            _rms_norm(qkv[:, :, heads: heads + kv], *w["k_norm"])), dim=2)
        else:
            qk = qkv[:, :, : heads + kv]
        # RoPE on q and k heads at once: x * cos + rotate_half(x) * sin, cos/sin (N, 1, S, D)
        qk = qk.transpose(1, 2)
        qk = qk * cos + _rotate_half(qk) * sin
        return qk[:, :heads], qk[:, heads:], qkv[:, :, heads + kv:].transpose(1, 2)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(h, self.norm_w, self.norm_eps), self.head_w).float()

    def _mlp(self, w: dict, h: torch.Tensor) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) of the post-attention-normalized residual stream."""
        gate, up = F.linear(_rms_norm(h, *w["ln2"]), w["gate_up"], w["gate_up_b"]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, w["down"], w["down_b"])

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], copies: list[int] | None = None) -> torch.Tensor:
        """Runs whole prompts (right-padded into one batch), writing their K/V into `slots`.

        With `copies`, prompt i's K/V fills the copies[i] consecutive slots from slots[i] (the n
        samples of a prompt share its prefix): each prompt is computed once and written to all
        its slots in the same indexed write.

        Returns:
            logits of each prompt's last position, (len(prompts), vocab), float32.
        """
        lengths = [len(p) for p in prompts]
        n, s = len(prompts), max(lengths)
        ids = torch.zeros((n, s), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        copies = copies or [1] * n
        slot_idx = torch.tensor([s + j for s, c in zip(slots, copies) for j in range(c)], device=self.device)
        # row of k/v (one per prompt) that each slot receives: (sum(copies),)
        source = torch.repeat_interleave(torch.arange(n, device=self.device),
                                         torch.tensor(copies, device=self.device))
        length_t = torch.tensor(lengths, device=self.device)
        # causal and key-not-padding: (N, 1, S, S); padded query rows still see key 0, so no NaN.
        pos = torch.arange(s, device=self.device)
        mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < length_t[:, None, None])
        mask = mask[:, None]
        cos, sin = self.cos[:s][None, None], self.sin[:s][None, None]
        h = F.embedding(ids, self.embed_w)
        for i, w in enumerate(self.w):
            q, k, v = self._qkv(w, _rms_norm(h, *w["ln1"]), cos, sin)
            self.k[i][slot_idx, :, :s] = k[source]  # positions >= length hold padding junk, masked later
            self.v[i][slot_idx, :, :s] = v[source]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            h = h + F.linear(o.transpose(1, 2).reshape(n, s, -1), w["o"], w["o_b"])
            h = h + self._mlp(w, h)
        last = h[torch.arange(n, device=self.device), length_t - 1]
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, max_len: int,
               uniform: bool = False) -> torch.Tensor:
        """One token for each running sequence; sequence b lives in slot b.

        Args:
            tokens: (B,) the last sampled token of each sequence, not yet in the cache.
            positions: (B,) where that token goes (= the sequence's cached length).
            max_len: max(positions) + 1, the cache span attended to.
            uniform: every position equals max_len - 1 (lets attention skip the mask).

        Returns:
            next-token logits, (B, vocab), float32.
        """
        b = tokens.shape[0]
        rows = torch.arange(b, device=self.device)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]
        # all sequences at the same position (e.g. the n samples of one prompt): the whole span
        # is valid for every row and SDPA needs no mask
        mask = None
        if not uniform:
            mask = (torch.arange(max_len, device=self.device)[None] <= positions[:, None])[:, None, None]
        h = F.embedding(tokens[:, None], self.embed_w)
        for i, w in enumerate(self.w):
            q, k, v = self._qkv(w, _rms_norm(h, *w["ln1"]), cos, sin)
            self.k[i][rows, :, positions] = k[:, :, 0]
            self.v[i][rows, :, positions] = v[:, :, 0]
            keys, values = self.k[i][:b, :, :max_len], self.v[i][:b, :, :max_len]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            h = h + F.linear(o.transpose(1, 2).reshape(b, 1, -1), w["o"], w["o_b"])
            h = h + self._mlp(w, h)
        return self._logits(h[:, 0])


SUPPORTED = ("llama", "qwen2", "qwen3")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears on the same input: their rows concatenated.

    Each module's parameters become views of its rows of the fused tensor, so there is no second
    copy: the HF model, its state_dict and a weight update (copy_ into those parameters) all
    write straight into what the fused matmul reads.

    Returns:
        weight (sum of out_features, in_features) and bias (sum of out_features,) or None.
    """
    biased = [lin.bias is not None for lin in linears]
    if any(biased) and not all(biased):
        raise ValueError("cannot fuse linears where only some have a bias")
    weight = torch.cat([lin.weight.data for lin in linears])
    bias = torch.cat([lin.bias.data for lin in linears]) if all(biased) else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(weight[start: start + rows], requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias[start: start + rows], requires_grad=False)
        start += rows
    return weight, bias


def _layer_weights(layer) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    w = {
        "ln1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
        "ln2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
        "o": attn.o_proj.weight, "o_b": attn.o_proj.bias,
        "down": mlp.down_proj.weight, "down_b": mlp.down_proj.bias,
    }
    w["qkv"], w["qkv_b"] = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    w["gate_up"], w["gate_up_b"] = _fuse([mlp.gate_proj, mlp.up_proj])
    if hasattr(attn, "q_norm"):
        w["q_norm"] = (attn.q_norm.weight, attn.q_norm.variance_epsilon)
        w["k_norm"] = (attn.k_norm.weight, attn.k_norm.variance_epsilon)
    return w


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), computed in float32 like the HF Llama/Qwen RMSNorm."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
