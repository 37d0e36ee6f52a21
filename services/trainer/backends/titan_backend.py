"""The titan backend: TorchTitan's Llama / dense Qwen3 (`torchtitan` 0.3, the `[titan]` extra) over
HF checkpoints.

Weights come in and go out with Hugging Face names, so generators and the weight store never see
titan's:

    HF state dict --titan's StateDictAdapter.from_hf--> titan state dict   (Llama: q/k rows
    re-permuted for complex RoPE)  ...train...  --to_hf--> HF state dict (full_state_dict, save_pretrained)

One `train_step` is the torch backend's (same advantages, loss functions, accumulation, skip rules,
schedule: the class inherits them); only the forward differs. The b episodes of a micro-batch are
packed into one row instead of padded:

    tokens    (1, T)   prompt_1 response_1 prompt_2 response_2 ... [filler]
    positions (1, T)   0 1 ... L_1-1      0 1 ... L_2-1      ...    positions restart per episode
    logits    (1, T, V) -> rows p_i-1 .. p_i+r_i-2 of episode i -> (b, R, V), R = longest response

Titan's block-causal FlexAttention mask starts a new document wherever positions return to 0, so
an episode never attends to another; its logprobs equal the padded HF forward's (test on CPU).
T is rounded up to a multiple of 128 (FlexAttention's block) with a filler document, which also
keeps torch.compile to few distinct shapes.

Parallelism: one process trains with bf16 autocast, like the torch backend. Under `torchrun`
(torch.distributed initialized) titan's own `parallelize_llama` / `_qwen3` applies FSDP over all ranks
(dp_shard = world size, bf16 params, fp32 reduce) with its activation checkpointing; TP/PP/CP are
titan settings we do not expose yet. Tested on 2 CPU processes (gloo): the sharded forward and the
gathered HF weights; training under FSDP has not run yet (it needs CUDA and more than one GPU).

CPU: construction, HF<->titan conversion, publishing and the forward all work (tests); backward does
not (FlexAttention has no CPU backward, titan refuses sdpa for language models), so `train_step`
needs CUDA. `bench/gpu_check.sh` runs the training steps on a lent GPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import pathlib

import torch
import torch.distributed as dist
from torch import nn

from forgerpc.services.common.errors import failed_precondition
from forgerpc.services.trainer import checkpoint, losses
from forgerpc.services.trainer.backends.torch_backend import Sample, StepResult, TorchBackend, lr_lambda
from forgerpc.services.trainer.config import TrainerConfig

CUDA_ONLY = ("device: the titan backend trains on CUDA only (FlexAttention has no CPU backward); "
             "set device=cuda, or backend=torch")
FLEX_BLOCK = 128  # FlexAttention's default sparse block: packed rows are padded to a multiple of it


def titan_arch(model_type: str):
    """HF model_type -> titan's (model class, block class, RoPE class, state-dict adapter, parallelize
    function, q/k norm?). Llama: complex RoPE (the adapter permutes q/k rows); Qwen3 (dense): cos/sin
    RoPE and RMSNorm on q and k."""
    if model_type == "llama":
        from torchtitan.models.common import ComplexRoPE
        from torchtitan.models.llama3 import Llama3Model, Llama3StateDictAdapter, parallelize_llama
        from torchtitan.models.llama3.model import Llama3TransformerBlock
        return Llama3Model, Llama3TransformerBlock, ComplexRoPE, Llama3StateDictAdapter, parallelize_llama, False
    if model_type == "qwen3":
        from torchtitan.models.common import CosSinRoPE
        from torchtitan.models.qwen3 import Qwen3Model, Qwen3StateDictAdapter, parallelize_qwen3
        from torchtitan.models.qwen3.model import Qwen3TransformerBlock
        return Qwen3Model, Qwen3TransformerBlock, CosSinRoPE, Qwen3StateDictAdapter, parallelize_qwen3, True
    raise ValueError(f"model_type: the titan backend trains llama and qwen3 checkpoints, got {model_type!r}")


def titan_model_config(hf_config, attn_backend: str = "flex"):
    """A titan model config with the shapes, norms and RoPE of an HF Llama or dense Qwen3 config.

    Raises ValueError naming the HF field for what titan's models cannot express (other model
    types, biases, sliding windows, RoPE scalings other than none and Llama's llama3).
    """
    from torchtitan.models.common import Embedding, Linear, RMSNorm
    from torchtitan.models.common.config_utils import get_attention_config, make_ffn_config, make_gqa_config

    c = hf_config
    model_cls, block_cls, rope_cls, _, _, qk_norm = titan_arch(c.model_type)
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if getattr(c, flag, False):
            raise ValueError(f"{flag}: not supported by titan's {c.model_type} (must be false)")
    rope_params = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope_params.get("rope_type", "default")
    scaling = {}
    if rope_type == "llama3" and c.model_type == "llama":
        scaling = dict(scaling="llama", scaling_factor=rope_params["factor"],
                       low_freq_factor=rope_params["low_freq_factor"],
                       high_freq_factor=rope_params["high_freq_factor"],
                       original_max_position_embeddings=rope_params["original_max_position_embeddings"])
    elif rope_type != "default":
        raise ValueError(f"rope_parameters.rope_type: {rope_type!r} is not supported for {c.model_type}")
    theta = rope_params.get("rope_theta", getattr(c, "rope_theta", 10000.0))

    dim, n_heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or dim // n_heads
    # Every parameter is overwritten by the checkpoint; these inits only make `init_weights` legal.
    normal = {"weight": functools.partial(nn.init.normal_, std=0.02)}
    ones = {"weight": nn.init.ones_}
    rope = rope_cls.Config(dim=head_dim, max_seq_len=c.max_position_embeddings, theta=theta, **scaling)

    def norm(width=dim):
        return RMSNorm.Config(normalized_shape=width, eps=c.rms_norm_eps, param_init=ones)

    layers = [block_cls.Config(
        attention_norm=norm(), ffn_norm=norm(),
        attention=make_gqa_config(dim=dim, n_heads=n_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
                                  wqkv_param_init=normal, wo_param_init=normal, rope=rope, fuse_qkv=True,
                                  qk_norm=norm(head_dim) if qk_norm else None,
                                  inner_attention=get_attention_config(attn_backend)),
        feed_forward=make_ffn_config(dim=dim, hidden_dim=c.intermediate_size, w1_param_init=normal,
                                     w2w3_param_init=normal),
    ) for _ in range(c.num_hidden_layers)]
    return model_cls.Config(
        dim=dim, vocab_size=c.vocab_size, enable_weight_tying=bool(c.tie_word_embeddings), layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=c.vocab_size, embedding_dim=dim, param_init=normal),
        norm=norm(), lm_head=Linear.Config(in_features=dim, out_features=c.vocab_size, param_init=normal))


def compile_flex_without_autotune() -> None:
    """Recompiles titan's shared FlexAttention kernel without max-autotune / coordinate descent.

    Titan tunes every new sequence shape (minutes on a GPU); RL batches pack to a new length most
    steps, so the tuning would never pay off. Same kernel, default configs; idempotent.
    """
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common.attention import FlexAttention

    if getattr(FlexAttention, "_forgerpc_plain", False):
        return
    options = {k: v for k, v in FlexAttention.inductor_configs.items()
               if k not in ("max_autotune", "coordinate_descent_tuning")}
    FlexAttention._compiled_flex_attn = torch.compile(flex_attention, options=options)
    FlexAttention._forgerpc_plain = True


class TitanBackend(TorchBackend):
    """Same constructor and interface as TorchBackend: `model` is the loaded HF model (read once,
    converted to titan, then dropped)."""

    name = "titan"

    def __init__(self, cfg: TrainerConfig, model, tokenizer=None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.world > 1 and self.device.type == "cuda" and self.device.index is None:
            # one GPU per rank; the model is materialized before titan's mesh would pick it
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.seed)
        self.tokenizer = tokenizer
        self.hf_config = model.config
        self.vocab_size = model.config.vocab_size
        self.max_positions = model.config.max_position_embeddings
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        self.model_config = titan_model_config(model.config)
        compile_flex_without_autotune()
        self.adapter = titan_arch(model.config.model_type)[3](self.model_config, None)
        titan_sd = self.adapter.from_hf({k: v.float() for k, v in model.state_dict().items()})
        del model
        self.model = self._build(titan_sd)
        self.ref_model = None
        if cfg.loss.beta > 0:  # the KL reference: the initial weights, frozen, unsharded
            self.ref_model = self._build(titan_sd, parallel=False).eval().requires_grad_(False)
        self._init_training_state(cfg)

    def _build(self, titan_sd: dict[str, torch.Tensor], parallel: bool = True) -> nn.Module:
        """Build on meta -> materialize -> load the weights -> (under torchrun) shard them.

        Loading before sharding means each rank briefly holds the whole model, which is fine for
        what fits one GPU; titan's own order (shard on meta, then load) would need the fused-qkv
        load hook to handle DTensors, which it does not in 0.3.0 (mixed Tensor/DTensor copy_).
        """
        from torchtitan.distributed.activation_checkpoint import FullAC

        with torch.device("meta"):
            model = copy.deepcopy(self.model_config).build()
        model.to_empty(device=self.device)
        with torch.no_grad():
            model.init_weights(buffer_device=None)  # RoPE caches (non-persistent buffers)
        model.load_state_dict(titan_sd, strict=True)
        if parallel and self.world > 1:
            self._parallelize(model)
        elif parallel and self.cfg.activation_checkpointing:
            FullAC(FullAC.Config()).apply(model)
        return model.train()

    def _parallelize(self, model: nn.Module) -> None:
        """FSDP over every rank with titan's parallelize function (bf16 params, fp32 gradient reduce)."""
        import tempfile

        from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
        from torchtitan.distributed import ParallelDims, parallel_dims
        from torchtitan.distributed import utils as dist_utils
        from torchtitan.distributed.activation_checkpoint import FullAC

        parallelism = ParallelismConfig(data_parallel_shard_degree=self.world, spmd_backend="partial_dtensor")
        dist_utils.set_spmd_backend(parallelism.spmd_backend)
        # titan fixes its mesh's device type at import ("cuda" even without one); ours is the config's.
        parallel_dims.device_type = self.device.type
        dims = ParallelDims.from_config(parallelism, self.world)
        dims.build_mesh()
        training = TrainingConfig(mixed_precision_param="bfloat16" if self.device.type == "cuda" else "float32")
        parallelize = titan_arch(self.hf_config.model_type)[4]
        parallelize(model, parallel_dims=dims, training=training, parallelism=parallelism,
                          compile_config=CompileConfig(enable=False),
                          ac_config=FullAC.Config() if self.cfg.activation_checkpointing else None,
                          dump_folder=tempfile.gettempdir())

    # ---- the forward: packed episodes instead of padded ones -------------------------------------
    def train_step(self, samples: list[Sample], objective: str = "policy_gradient",
                   learning_rate: float = 0.0) -> StepResult:
        if self.device.type != "cuda":
            raise failed_precondition("CUDA_REQUIRED", CUDA_ONLY, field="device")
        return super().train_step(samples, objective, learning_rate)

    def _batch(self, chunk: list[Sample]):
        """Packs a micro-batch into one row (see the module docstring).

        Returns tokens, rows, positions (1, T) / (b, R) / (1, T); targets, gen_logprobs, mask (b, R).
        `rows[i, j]` is the packed column whose logits predict response token j of episode i
        (0 past the end of a response: masked out by `mask`).
        """
        R = max(len(s.response) for s in chunk)
        b = len(chunk)
        lengths = [len(s.prompt) + len(s.response) for s in chunk]
        T = -(-sum(lengths) // FLEX_BLOCK) * FLEX_BLOCK
        tokens = torch.full((1, T), self.pad_id, dtype=torch.long)
        positions = torch.zeros((1, T), dtype=torch.long)
        rows = torch.zeros((b, R), dtype=torch.long)
        targets = torch.full((b, R), self.pad_id, dtype=torch.long)
        gen = torch.zeros((b, R))
        mask = torch.zeros((b, R))
        start = 0
        for i, (s, n) in enumerate(zip(chunk, lengths)):
            p, r = len(s.prompt), len(s.response)
            tokens[0, start:start + n] = torch.tensor(s.prompt + s.response)
            positions[0, start:start + n] = torch.arange(n)
            rows[i, :r] = torch.arange(start + p - 1, start + p + r - 1)
            targets[i, :r] = torch.tensor(s.response)
            gen[i, :r] = torch.tensor(s.generator_logprobs)
            mask[i, :r] = torch.tensor(s.mask, dtype=torch.float32)
            start += n
        positions[0, start:] = torch.arange(T - start)  # the filler is one more document
        d = self.device
        return tokens.to(d), rows.to(d), positions.to(d), targets.to(d), gen.to(d), mask.to(d)

    def _shared_prompts(self, chunk: list[Sample]) -> None:
        """Never: episodes are packed, not padded, and titan's forward takes no KV cache."""
        return None

    def _logprobs(self, model, tokens, rows, positions, targets, temperature: float = 1.0,
                  entropy_grad: bool = False):
        """Per-token logprobs and entropies (b, R) of `targets` from one packed forward, at `temperature`."""
        with self._autocast():
            logits = model(tokens, positions, attention_masks=model.get_attention_masks(positions))
        return losses.token_logprobs_and_entropy(logits[0][rows], targets, temperature, entropy_grad)

    def packed_logprobs(self, ids, positions, targets):
        """(logprobs, entropy) (rows, L - 1) of SFT's packed rows (packing.py): titan's document mask
        reads the positions that restart per episode."""
        with self._autocast():
            logits = self.model(ids, positions, attention_masks=self.model.get_attention_masks(positions))
        return losses.token_logprobs_and_entropy(logits[:, :-1], targets)

    def _autocast(self):
        """bf16 autocast on one CUDA device; under FSDP its mixed-precision policy casts instead."""
        if self.device.type == "cuda" and self.world == 1:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- weights and checkpoints: HF names outside ----------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded weights under HF names (same keys as the torch backend's, tied lm_head included);
        under FSDP every rank must call it (it gathers)."""
        from torch.distributed.tensor import DTensor

        # Not get_model_state_dict: it cannot follow the fused-qkv state-dict hooks (wqkv -> wq/wk/wv).
        sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach()
              for k, v in self.model.state_dict().items()}
        hf = self.adapter.to_hf(sd)
        if self.model_config.enable_weight_tying:
            hf["lm_head.weight"] = hf["model.embed_tokens.weight"]  # HF's state_dict lists the tied alias too
        return hf

    def save_pretrained(self, directory: pathlib.Path) -> int:
        """Writes an HF directory (config.json, model.safetensors, tokenizer) a generator can load."""
        from safetensors.torch import save_file

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sd = self.full_state_dict()
        if self.model_config.enable_weight_tying:
            sd.pop("lm_head.weight")  # stored once, as HF does
        self.hf_config.save_pretrained(str(directory))
        save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        return sum(f.stat().st_size for f in directory.glob("*.safetensors"))

    def save_checkpoint(self, root: pathlib.Path, keep: int) -> pathlib.Path:
        """Titan-named weights + optimizer + schedule + RNG (checkpoint.py); resumes in this backend."""
        meta = {"step": self.step, "policy_version": self.policy_version, "data_position": self.data_position,
                "config": self.cfg.model_dump(mode="json"), "backend": self.name}
        return checkpoint.save(root, self.model, self.optimizer, self.scheduler, meta, keep=keep)


def build(cfg: TrainerConfig, model_path: str) -> TitanBackend:
    """The backend over the HF model directory `model_path` (read in fp32, converted to titan).

    A titan trainer on CPU could never take a step, so the service refuses to start with one.
    """
    from forgerpc.services.common.models import load_model

    if not cfg.device.startswith("cuda"):
        raise ValueError(CUDA_ONLY)
    try:
        import torchtitan  # noqa: F401
    except ImportError as e:
        raise ValueError("backend: titan needs torchtitan: pip install -e '.[titan]' "
                         "(and pip install --no-deps triton where CUDA's triton is absent)") from e

    model, tokenizer = load_model(model_path, dtype=torch.float32)
    return TitanBackend(cfg, model, tokenizer)
