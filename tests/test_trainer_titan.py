"""The titan backend (TorchTitan's Llama / Qwen3) against the torch backend on the same tiny HF models.

On CPU (when torchtitan imports): HF <-> titan weight conversion, the same loss as the torch
backend on the same batch (forward only: FlexAttention has no CPU backward), HF-named publishing,
checkpoints. On CUDA also: train steps that match the torch backend's. Without torchtitan
(`pip install -e .[titan]` plus `pip install --no-deps triton`) everything skips with that reason;
`bench/gpu_check.sh` runs the GPU part on a lent GPU. The first forward compiles FlexAttention
(about 20 s on CPU), so the backends are built once per module.

Run as a script (under torchrun, gloo) this file is the worker of the FSDP test: titan's
parallelize_llama shards the model over 2 CPU processes; rank 0 writes the forward loss and
whether the gathered HF weights equal the checkpoint's.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import grpc
import pytest
import torch

pytest.importorskip("torchtitan",
                    reason="torchtitan not installed (pip install -e .[titan]; pip install --no-deps triton)")

from forgerpc.services.common.errors import ServiceError  # noqa: E402
from forgerpc.services.common.models import load_model, make_tiny_model  # noqa: E402
from forgerpc.services.trainer import checkpoint  # noqa: E402
from forgerpc.services.trainer.backends.titan_backend import TitanBackend, build, titan_model_config  # noqa: E402
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend  # noqa: E402
from forgerpc.services.trainer.config import TrainerConfig  # noqa: E402

def cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=2, initializer_range=0.1)


def make(kind, model_dir, device="cpu", **overrides):
    cfg = TrainerConfig(model_path=str(model_dir), device=device, **{"optim": {"lr": 1e-3}, **overrides})
    model, tok = load_model(model_dir)
    return (TitanBackend if kind == "titan" else TorchBackend)(cfg, model, tok)


@pytest.fixture(scope="module")
def pair(model_dir):
    """(torch, titan) backends over the same weights, with a KL reference (beta > 0) in both."""
    return make("torch", model_dir, loss={"beta": 0.05}), make("titan", model_dir, loss={"beta": 0.05})


def episodes(n=6, seed=0) -> list[Sample]:
    """Prompts of 2-5 and responses of 1-7 tokens, so padding and packing both have work to do."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, 90, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, 90, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        mask = [1] * len(r)
        mask[0] = 0 if len(r) > 1 else 1  # one untrained token, so the mask is exercised
        logprobs = (-4.6 + 0.3 * torch.randn(len(r), generator=g)).tolist()
        out.append(Sample(prompt=p, response=r, generator_logprobs=logprobs,
                          mask=mask, advantage=float(torch.randn(1, generator=g)), group_id=str(i // 3)))
    return out


def loss_of(backend, batch, objective):
    counts = dict(num_sequences=len(batch), num_tokens=sum(sum(s.mask) for s in batch),
                  max_tokens=max(len(s.response) for s in batch))
    with torch.no_grad():
        out, entropy = backend._micro_batch(batch, backend._advantages(batch), objective, counts)
    return out, float(entropy)


def test_config_from_hf(model_dir):
    model, _ = load_model(model_dir)
    cfg = titan_model_config(model.config)
    attn = cfg.layers[0].attention
    assert (cfg.dim, cfg.vocab_size, len(cfg.layers)) == (32, model.config.vocab_size, 2)
    assert (attn.n_heads, attn.n_kv_heads, attn.rope.theta) == (4, 2, 10000.0)
    assert cfg.enable_weight_tying and cfg.norm.eps == model.config.rms_norm_eps


def test_other_architectures_are_refused_naming_the_field(tmp_path):
    model, _ = load_model(make_tiny_model(tmp_path / "q", arch="qwen2", hidden_size=32))
    with pytest.raises(ValueError, match="model_type"):
        titan_model_config(model.config)


def test_qwen3_same_loss_and_names(tmp_path):
    """Dense Qwen3 (q/k RMSNorm, cos/sin RoPE, head_dim in the config): same loss as the torch backend,
    HF names and tensors back out unchanged."""
    path = make_tiny_model(tmp_path / "qwen3", arch="qwen3", hidden_size=32, num_layers=2, initializer_range=0.1)
    torch_b, titan_b = make("torch", path), make("titan", path)
    assert titan_b.model_config.layers[0].attention.qk_norm is not None
    hf, back = torch_b.full_state_dict(), titan_b.full_state_dict()
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    batch = episodes(seed=4)
    a, b = loss_of(torch_b, batch, "policy_gradient")[0], loss_of(titan_b, batch, "policy_gradient")[0]
    assert abs(float(a.loss)) > 1e-3 and float(b.loss) == pytest.approx(float(a.loss), abs=1e-5)


def test_hf_names_round_trip(pair):
    """HF -> titan permutes q/k rows for complex RoPE; titan -> HF gives the original tensors back."""
    torch_b, titan_b = pair
    hf = torch_b.full_state_dict()
    titan_sd = titan_b.adapter.from_hf(dict(hf))
    assert "layers.0.attention.qkv_linear.wq.weight" in titan_sd
    wq = titan_sd["layers.0.attention.qkv_linear.wq.weight"]
    assert not torch.equal(wq, hf["model.layers.0.self_attn.q_proj.weight"])
    back = titan_b.full_state_dict()
    assert set(back) == set(hf)  # lm_head.weight included, as HF lists the tied alias
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


@pytest.mark.parametrize("objective", ["policy_gradient", "sft"])
def test_same_loss_as_torch_backend(pair, objective):
    """Packed titan forward == padded HF forward: same loss, KL and entropy on the same batch."""
    torch_b, titan_b = pair
    batch = episodes()
    a, entropy_a = loss_of(torch_b, batch, objective)
    b, entropy_b = loss_of(titan_b, batch, objective)
    assert abs(float(a.loss)) > 1e-3  # a real loss, not a zero that any forward would match
    assert float(b.loss) == pytest.approx(float(a.loss), abs=1e-5)
    assert entropy_b == pytest.approx(entropy_a, rel=1e-5)
    if objective == "policy_gradient":
        assert float(a.kl_sum) == pytest.approx(0.0, abs=1e-6)  # policy == reference before any step
        assert float(b.kl_sum) == pytest.approx(float(a.kl_sum), abs=1e-5)
        assert float(b.clipped_sum) == float(a.clipped_sum)


def test_packed_sft_same_loss_as_unpacked_torch(pair):
    """SFT with sft.packing: titan's packed rows (document mask from positions) == the torch backend's
    padded SFT loss and entropy on the same episodes."""
    torch_b, titan_b = pair
    batch = episodes(seed=5)
    counts = dict(num_sequences=len(batch), num_tokens=sum(sum(s.mask) for s in batch))
    old = titan_b.cfg.sft.pack_length
    titan_b.cfg.sft.pack_length = 128  # one FlexAttention block per row: a shape already compiled
    try:
        with torch.no_grad():
            packed, entropy = titan_b._packed_micro_batch([batch[:2], batch[2:]], counts)
    finally:
        titan_b.cfg.sft.pack_length = old
    ref, ref_entropy = loss_of(torch_b, batch, "sft")
    assert float(packed.loss) == pytest.approx(float(ref.loss), abs=1e-5)
    assert float(entropy) == pytest.approx(ref_entropy, rel=1e-5)


def test_published_directory_loads_as_hf(pair, tmp_path):
    """save_pretrained writes an HF directory; HF's own loader reads it and computes the same logits."""
    torch_b, titan_b = pair
    size = titan_b.save_pretrained(tmp_path / "pub")
    assert size > 0 and (tmp_path / "pub" / "config.json").is_file()
    reloaded, tok = load_model(tmp_path / "pub")
    assert tok is not None
    ids = torch.tensor([[5, 17, 33, 2, 60, 41]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, torch_b.model(input_ids=ids).logits, atol=1e-6)


def test_checkpoint_round_trip(pair, model_dir, tmp_path):
    """A titan checkpoint (titan names) loads back into a fresh titan backend with equal weights."""
    _, titan_b = pair
    titan_b.step, titan_b.policy_version, titan_b.data_position = 3, 2, "cursor-7"
    path = titan_b.save_checkpoint(tmp_path / "ck", keep=2)
    try:
        assert path.name == f"{checkpoint.PREFIX}00000003"
        fresh = make("titan", model_dir)
        with torch.no_grad():
            for p in fresh.model.parameters():
                p.add_(1.0)  # so equality below proves the load
        meta = fresh.load_checkpoint(path)
        assert (fresh.step, fresh.policy_version, fresh.data_position, meta["backend"]) == (3, 2, "cursor-7", "titan")
        a, b = titan_b.model.state_dict(), fresh.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        titan_b.step, titan_b.policy_version, titan_b.data_position = 0, 0, ""


def test_activation_checkpointing_keeps_names_and_loss(pair, model_dir):
    """titan's FullAC wraps each block; HF names and the loss stay as without it."""
    torch_b, _ = pair
    ac = make("titan", model_dir, activation_checkpointing=True, loss={"beta": 0.05})
    assert "CheckpointWrapper" in type(ac.model.layers["0"]).__name__
    hf, got = torch_b.full_state_dict(), ac.full_state_dict()
    assert set(got) == set(hf) and all(torch.equal(got[k], hf[k]) for k in hf)
    batch = episodes(seed=3)
    assert float(loss_of(ac, batch, "policy_gradient")[0].loss) == pytest.approx(
        float(loss_of(torch_b, batch, "policy_gradient")[0].loss), abs=1e-5)


def test_train_step_needs_cuda(pair, model_dir):
    """On CPU: a step is FAILED_PRECONDITION naming `device`; the service's build refuses to start."""
    with pytest.raises(ServiceError, match="device: .*CUDA") as e:
        pair[1].train_step(episodes())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.metadata == {"field": "device"}
    with pytest.raises(ValueError, match="device: .*CUDA"):
        build(TrainerConfig(model_path=str(model_dir), backend="titan"), str(model_dir))


def fsdp_worker(model_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, tok = load_model(model_dir)
    hf = {k: v.clone() for k, v in model.state_dict().items()}
    b = TitanBackend(TrainerConfig(model_path=model_dir, loss={"beta": 0.05}), model, tok)
    gathered = b.full_state_dict()  # a collective: every rank calls it
    out_loss, entropy = loss_of(b, episodes(), "policy_gradient")
    if b.rank == 0:
        pathlib.Path(out).write_text(json.dumps({
            "world": b.world, "sharded": type(b.model).__name__.startswith("FSDP"),
            "loss": float(out_loss.loss), "entropy": entropy,
            "weights_equal": set(gathered) == set(hf) and all(torch.equal(gathered[k], hf[k]) for k in hf)}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_two_cpu_processes_same_loss_and_weights(pair, tmp_path, model_dir):
    """titan's FSDP (parallelize_llama, 2 gloo ranks): the sharded forward gives the one-process loss,
    and full_state_dict gathers the exact HF weights. Training under FSDP needs CUDA (backward)."""
    out = tmp_path / "fsdp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(model_dir), str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    single, entropy = loss_of(pair[0], episodes(), "policy_gradient")
    assert got["world"] == 2 and got["sharded"] and got["weights_equal"]
    assert got["loss"] == pytest.approx(float(single.loss), abs=1e-5)
    assert got["entropy"] == pytest.approx(entropy, rel=1e-5)


# ---- CUDA: the conformance the torch backend passes, run against titan ---------------------------
@cuda
def test_gpu_first_steps_match_torch_backend(model_dir):
    """Same weights, same batches, bf16 autocast in both: losses and grad norms agree to bf16 precision,
    and the published weights keep HF names."""
    torch_b = make("torch", model_dir, device="cuda", micro_batch_size=4, loss={"kind": "dapo"})
    titan_b = make("titan", model_dir, device="cuda", micro_batch_size=4, loss={"kind": "dapo"})
    for seed in range(3):
        a, b = torch_b.train_step(episodes(8, seed)), titan_b.train_step(episodes(8, seed))
        assert not a.skipped and not b.skipped and a.tokens == b.tokens > 0
        assert b.loss == pytest.approx(a.loss, rel=2e-2, abs=2e-3)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=5e-2)
    ha, hb = torch_b.full_state_dict(), titan_b.full_state_dict()
    assert set(ha) == set(hb)
    for k in ha:  # Adam moves each weight by about +-lr a step; a near-zero gradient may flip sign
        assert torch.allclose(ha[k].float(), hb[k].float(), atol=4 * 3 * 1e-3), k


@cuda
def test_gpu_sft_loss_decreases(model_dir):
    b = make("titan", model_dir, device="cuda", objective="sft")
    batch = episodes(8, 1)
    losses = [b.train_step(batch, "sft").loss for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] * 0.8


if __name__ == "__main__":
    fsdp_worker(sys.argv[1], sys.argv[2])
