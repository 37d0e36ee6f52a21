"""The torch backend in-process on a tiny Llama: accumulation, skipping bad steps, schedule, TIS, KL,
checkpoints that resume bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.services.trainer import checkpoint
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend, lr_lambda
from forgerpc.services.trainer.config import TrainerConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=2)


def backend(model_dir, **overrides) -> TorchBackend:
    cfg = TrainerConfig(model_path=str(model_dir), **{"optim": {"lr": 1e-3}, **overrides})
    model, tok = load_model(model_dir)
    return TorchBackend(cfg, model, tok)


def episodes(n=8, seed=0, version=0, advantage=True) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, 90, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, 90, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        lp = (-4.6 + 0.3 * torch.randn(len(r), generator=g)).tolist()
        out.append(Sample(prompt=p, response=r, generator_logprobs=lp, mask=[1] * len(r), reward=float(i % 2),
                          advantage=(float(torch.randn(1, generator=g)) if advantage else None),
                          group_id=str(i // 4), policy_version=version))
    return out


def weights(b: TorchBackend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in b.model.state_dict().items()}


def test_gradient_accumulation_equals_one_batch(model_dir):
    """Micro-batches of 3 give the same loss and update as one batch of 8 (up to padding round-off)."""
    results, finals = [], []
    for mb in (8, 3):
        b = backend(model_dir, micro_batch_size=mb, loss={"kind": "dapo"})
        results.append(b.train_step(episodes()))
        finals.append(weights(b))
    one, acc = results
    assert one.tokens == acc.tokens > 0
    assert acc.loss == pytest.approx(one.loss, abs=1e-5)
    assert acc.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], atol=1e-6), k


def test_ratio_uses_generator_logprobs(model_dir):
    """Generator logprobs far from the model's make ratios leave the clip range: clip_fraction > 0."""
    r = backend(model_dir).train_step(episodes())
    assert 0 < r.clip_fraction <= 1 and r.entropy > 0 and math.isfinite(r.loss)
    assert r.step == 1 and r.learning_rate == pytest.approx(1e-3)


def test_policy_logprobs_are_taken_at_the_sampling_temperature(model_dir):
    """Episodes whose generator logprobs are the model's own at T = 0.5 (what a generator sampling at
    0.5 reports): with loss.temperature 0.5 the PPO ratio is 1 and nothing is clipped; read at T = 1
    the same episodes look off-policy and the clip bites."""
    b = backend(model_dir)
    batch = episodes()
    ids, attn, positions, targets, _, _ = b._batch(batch)
    with torch.no_grad():
        logp, _ = b._logprobs(b.model, ids, attn, positions, targets, 0.5)
    for sample, row in zip(batch, logp):
        sample.generator_logprobs = row[:len(sample.response)].tolist()
    assert backend(model_dir, loss={"temperature": 0.5}).train_step(batch).clip_fraction == 0
    assert backend(model_dir).train_step(batch).clip_fraction > 0


def test_non_finite_loss_skips_step_and_keeps_weights(model_dir):
    b = backend(model_dir)
    before = weights(b)
    batch = episodes()
    batch[3].advantage = 3e38  # finite input, but clip(r)*A overflows to inf
    r = b.train_step(batch)
    assert r.skipped and "non-finite" in r.skip_reason and r.step == 0
    assert all(torch.equal(before[k], v) for k, v in weights(b).items())
    assert not b.optimizer.state  # AdamW moments untouched
    assert not b.train_step(episodes()).skipped  # the next good batch trains normally


def test_warmup_then_cosine():
    f = lr_lambda(warmup=2, total=12, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(7) == pytest.approx(0.55) and f(12) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)


def test_group_advantages_when_missing(model_dir):
    """Without advantages each group of 4 is centered: rewards 0,1,0,1 -> +-1/std."""
    b = backend(model_dir)
    adv = b._advantages(episodes(advantage=False))
    assert adv[:4].sum().abs() < 1e-5 and adv[0] < 0 < adv[1]


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo"])
def test_zero_advantage_episodes_are_skipped_with_the_same_gradient(model_dir, kind):
    """Half the batch has advantage 0 (two groups whose rewards were all equal): the step leaves those
    episodes out, and its gradient equals the full batch's computed micro-batch by micro-batch with
    the whole batch's counts. Normalizing by the kept episodes only would scale it by 2 (grpo) or
    by the token ratio (dapo) and fail this."""
    batch = episodes(8)
    for s in batch[4:]:
        s.advantage = 0.0
    b = backend(model_dir, micro_batch_size=2, loss={"kind": kind})
    b.accumulate_gradients(batch)
    skipped = {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}
    b.optimizer.zero_grad(set_to_none=True)
    counts = dict(num_sequences=8, num_tokens=sum(sum(s.mask) for s in batch),
                  max_tokens=max(len(s.response) for s in batch))
    out, _ = b._micro_batch(batch, torch.tensor([s.advantage for s in batch]), "policy_gradient", counts)
    out.loss.backward()
    assert skipped
    for n, p in b.model.named_parameters():
        if n in skipped:
            assert torch.allclose(skipped[n], p.grad, atol=1e-6), n
    result = backend(model_dir, loss={"kind": kind}).train_step(batch)
    assert result.tokens == sum(len(s.response) for s in batch[:4])  # only the kept episodes ran


def test_all_zero_advantages_leave_the_weights(model_dir):
    """A batch whose every group had equal rewards carries no gradient: AdamW moves nothing (no weight
    decay), but the step still counts, as any policy-gradient step with zero gradient would."""
    b = backend(model_dir)
    before = weights(b)
    batch = episodes(8)
    for s in batch:
        s.advantage = 0.0
    result = b.train_step(batch)
    assert (result.step, result.tokens, result.loss, result.skipped) == (1, 0, 0.0, False)
    for k, v in weights(b).items():
        assert torch.equal(v, before[k]), k


def test_entropy_bonus_trains_every_episode_and_raises_entropy(model_dir):
    """With entropy_coef an episode of advantage 0 still has a gradient (-c * H): no episode is skipped,
    and on a batch of zero advantages the steps only raise the policy's entropy. Its gradient is the
    same whether the responses run on a shared prompt, packed or padded."""
    batch = episodes(8)
    for i, s in enumerate(batch):
        s.advantage, s.prompt = 0.0, batch[i // 4 * 4].prompt  # two groups of 4 samples of one prompt
    b = backend(model_dir, loss={"entropy_coef": 0.5})
    before = weights(b)
    first = b.train_step(batch)
    assert first.tokens == sum(len(s.response) for s in batch) and first.loss < 0
    assert any(not torch.equal(v, before[k]) for k, v in weights(b).items())
    for _ in range(3):
        last = b.train_step(batch)
    assert last.entropy > first.entropy
    grads = []
    for share, pack in ((True, 128), (True, 0), (False, 0)):
        b = backend(model_dir, share_prompts=share, pack_group_tokens=pack, loss={"entropy_coef": 0.5})
        assert (b._shared_prompts(batch) is not None) == share
        b.accumulate_gradients(batch)
        grads.append({n: p.grad for n, p in b.model.named_parameters() if p.grad is not None})
    assert grads[0]
    for other in grads[1:]:
        for n, g in grads[0].items():
            assert torch.allclose(g, other[n], atol=1e-5), n


def test_stale_episodes_use_tis(model_dir):
    """Stale episodes (policy_version behind the trainer's) get a proximal ratio (never clipped) + TIS."""
    b = backend(model_dir, loss={"tis": "auto"})
    b.policy_version = 5
    stale = b.train_step(episodes(version=1))
    assert stale.clip_fraction == 0.0
    fresh = backend(model_dir, loss={"tis": "off"})
    fresh.policy_version = 5
    assert fresh.train_step(episodes(version=1)).clip_fraction > 0


def test_kl_to_reference(model_dir):
    b = backend(model_dir, loss={"beta": 0.1})
    assert b.train_step(episodes()).kl == pytest.approx(0.0, abs=1e-7)  # policy == reference at step 0
    assert b.train_step(episodes()).kl > 0


def test_sft_loss_decreases(model_dir):
    b = backend(model_dir, objective="sft")
    batch = episodes(4)
    losses = [b.train_step(batch, "sft").loss for _ in range(5)]
    assert losses[-1] < losses[0] - 0.05, losses


def test_activation_checkpointing_same_step(model_dir):
    plain = backend(model_dir).train_step(episodes())
    ckpt = backend(model_dir, activation_checkpointing=True).train_step(episodes())
    assert ckpt.loss == pytest.approx(plain.loss, abs=1e-6)
    assert ckpt.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)


def test_checkpoint_resume_is_bit_identical(model_dir, tmp_path):
    a = backend(model_dir, loss={"beta": 0.05})
    for s in range(2):
        a.train_step(episodes(seed=s))
    a.policy_version, a.data_position = 3, "offset=16"
    path = a.save_checkpoint(tmp_path, keep=2)
    torch.rand(3)  # RNG moves on after the save; the restored state must not see this
    a.train_step(episodes(seed=2))
    b = backend(model_dir, loss={"beta": 0.05})
    meta = b.load_checkpoint(path)
    assert (b.step, b.policy_version, meta["data_position"]) == (2, 3, "offset=16")
    b.train_step(episodes(seed=2))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.norm.weight"], weights(backend(model_dir))["model.norm.weight"])


def test_checkpoints_keep_last_k_and_leave_no_temporaries(model_dir, tmp_path):
    b = backend(model_dir)
    for _ in range(4):
        b.train_step(episodes())
        b.save_checkpoint(tmp_path, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000003", "step-00000004"]
    assert checkpoint.latest(tmp_path).name == "step-00000004"
    b.save_checkpoint(tmp_path, keep=2)  # same step again: replaced in place
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nope", b.model, b.optimizer, b.scheduler)


def test_learning_rate_override_moves_weights_but_not_the_schedule(model_dir):
    """An explicit per-step rate (SFT warm start) is used for that step only; the RL schedule's
    warmup is untouched afterwards."""
    b = backend(model_dir, optim={"lr": 1e-3, "warmup_steps": 10, "total_steps": 100})
    before = b.scheduler.get_last_lr()[0]
    w0 = weights(b)
    r = b.train_step(episodes(), "sft", learning_rate=5e-2)
    assert r.learning_rate == 5e-2 and b.step == 1
    assert b.scheduler.get_last_lr()[0] == before  # schedule did not advance
    assert all(g["lr"] == before for g in b.optimizer.param_groups)
    assert any(not torch.equal(w0[k], v) for k, v in weights(b).items())
    r = b.train_step(episodes(seed=1))
    assert r.learning_rate == before and b.scheduler.get_last_lr()[0] > before  # warmup goes on from step 0


def test_reset_optimizer_equals_a_fresh_trainer_on_the_same_weights(model_dir):
    """After SFT steps, reset_optimizer() forgets AdamW's moments and restarts the warmup: the next
    RL step equals that of a new trainer loaded with the same weights; the step counter goes on."""
    cfg = {"optim": {"lr": 1e-3, "warmup_steps": 4, "total_steps": 100}}
    b = backend(model_dir, **cfg)
    for seed in range(3):
        b.train_step(episodes(seed=seed), "sft", learning_rate=5e-2)
    b.train_step(episodes(seed=3))  # one RL step: the schedule has moved too
    assert b.optimizer.state and b.scheduler.get_last_lr()[0] > 1e-3 / 4
    fresh = backend(model_dir, **cfg)
    fresh.model.load_state_dict(b.model.state_dict())
    b.reset_optimizer()
    assert not b.optimizer.state and b.step == 4
    r, rf = b.train_step(episodes(seed=9)), fresh.train_step(episodes(seed=9))
    assert r.learning_rate == rf.learning_rate and b.step == 5
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in weights(b).items())
