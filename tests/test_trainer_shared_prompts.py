"""Shared prompts (TrainerConfig.share_prompts): a GRPO micro-batch that runs each distinct prompt
once and its responses on the prompt's KV cache gives the padded path's loss, statistics and
gradients, including with a KL reference model, masked tokens and prompts of different lengths.
Both layouts: two passes (prompts, then responses; `pack_group_tokens: 0`) and one row per
distinct prompt with its responses side by side (`pack_group_tokens` large enough)."""

from __future__ import annotations

import pytest
import torch

from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.services.trainer.backends import shared_forward
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend
from forgerpc.services.trainer.config import TrainerConfig


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def model_dir(request, tmp_path_factory):
    # initializer_range 0.1: logits far from uniform, so a wrong position or mask shows in the loss
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param, initializer_range=0.1)


def backend(model_dir, **overrides) -> TorchBackend:
    model, _ = load_model(model_dir, dtype=torch.float32)
    return TorchBackend(TrainerConfig(**{"micro_batch_size": 64, **overrides}), model)


def groups(n_groups: int = 5, n: int = 6, seed: int = 0, max_response: int = 9) -> list[Sample]:
    """n episodes per prompt; prompts of 1-7 tokens, responses of 1-max_response, rewards 0/1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_groups):
        prompt = torch.randint(4, 90, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        for i in range(n):
            length = int(torch.randint(1, max_response + 1, (1,), generator=g))
            r = torch.randint(4, 90, (length,), generator=g).tolist()
            mask = [1] * len(r)
            if i == 2 and len(r) > 1:
                mask[-1] = 0  # a masked token stays out of both layouts' loss
            logprobs = (-torch.rand(len(r), generator=g)).tolist()  # off-policy: ratios != 1, some clipped
            out.append(Sample(prompt=prompt, response=r, generator_logprobs=logprobs, mask=mask,
                              reward=float(i % 2 == k % 2 or i == 0), group_id=f"g{k}"))
    return out


def step(b: TorchBackend, samples: list[Sample]):
    b.optimizer.zero_grad(set_to_none=True)
    totals = b.accumulate_gradients(samples)
    return totals, {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}


PACK = {"two_passes": 0, "packed": 1 << 20}


@pytest.mark.parametrize("pack", PACK)
@pytest.mark.parametrize("loss", [{"kind": "grpo"}, {"kind": "dapo", "beta": 0.05, "temperature": 0.7},
                                  {"kind": "gspo"}])
def test_shared_prompts_match_the_padded_batch(model_dir, loss, pack):
    samples = groups()
    # one group short of an episode (slot 5 of its row is padding), as after a dropped rollout
    samples = [s for i, s in enumerate(samples) if i != 13]
    shared = backend(model_dir, loss=loss, pack_group_tokens=PACK[pack])
    padded = backend(model_dir, loss=loss, share_prompts=False)
    if loss.get("beta"):  # a reference that differs from the policy, so the KL term is not 0
        with torch.no_grad():
            for p in shared.ref_model.parameters():
                p.mul_(0.9)
            for p in padded.ref_model.parameters():
                p.mul_(0.9)
    assert shared._shared_prompts(samples) is not None
    assert padded._shared_prompts(samples) is None
    (loss_s, kl_s, clipped_s, tokens_s, ent_s), grads_s = step(shared, samples)
    (loss_p, kl_p, clipped_p, tokens_p, ent_p), grads_p = step(padded, samples)
    assert tokens_s == tokens_p > 0
    assert loss_s == pytest.approx(loss_p, rel=1e-5, abs=1e-7)
    assert kl_s == pytest.approx(kl_p, rel=1e-4, abs=1e-7)
    assert clipped_s == clipped_p
    assert ent_s == pytest.approx(ent_p, rel=1e-5)
    if loss.get("beta"):
        assert kl_p > 0
    assert grads_s.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in grads_p.values())


@pytest.mark.parametrize("pack", PACK)
def test_one_token_responses_use_the_prompt_logits_alone(model_dir, pack):
    samples = groups(max_response=1)
    shared, padded = backend(model_dir, pack_group_tokens=PACK[pack]), backend(model_dir, share_prompts=False)
    assert shared._shared_prompts(samples).response_ids.shape[1] == 0
    (loss_s, *_), grads_s = step(shared, samples)
    (loss_p, *_), grads_p = step(padded, samples)
    assert loss_s == pytest.approx(loss_p, rel=1e-5, abs=1e-7)
    for name in grads_p:
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=1e-4, atol=1e-7, msg=name)


def test_sharing_is_used_only_where_it_saves_tokens(model_dir):
    b = backend(model_dir, pack_group_tokens=0)
    distinct = groups(n_groups=8, n=1)  # every prompt once: nothing to share
    assert b._shared_prompts(distinct) is None
    assert b._shared_prompts(groups(n_groups=2, n=8)) is not None
    assert backend(model_dir)._shared_prompts(distinct).slots == 1  # short rows: packed all the same
    assert backend(model_dir, activation_checkpointing=True)._shared_prompts(groups()) is None
    # micro-batches split a group: each micro-batch shares what it holds, and the step is unchanged
    small, whole = backend(model_dir, micro_batch_size=4), backend(model_dir, share_prompts=False)
    (loss_s, *_), grads_s = step(small, groups())
    (loss_w, *_), grads_w = step(whole, groups())
    assert loss_s == pytest.approx(loss_w, rel=1e-5, abs=1e-7)
    for name in grads_w:
        torch.testing.assert_close(grads_s[name], grads_w[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_group_is_packed_only_when_its_row_fits(model_dir, monkeypatch):
    """pack_group_tokens bounds P + slots * (R - 1), the row of the longest prompt and most episodes."""
    calls = []
    for name in ("packed_group_logits", "shared_prompt_logits"):
        real = getattr(shared_forward, name)
        monkeypatch.setattr(shared_forward, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    samples = groups(n_groups=3, n=4)
    P = max(len(s.prompt) for s in samples)
    R = max(len(s.response) for s in samples)
    row = P + 4 * (R - 1)
    backend(model_dir, pack_group_tokens=row).accumulate_gradients(samples)
    backend(model_dir, pack_group_tokens=row - 1).accumulate_gradients(samples)
    assert calls == ["packed_group_logits", "shared_prompt_logits"]


def test_a_packed_response_does_not_see_its_neighbours(model_dir):
    """Changing one episode's response leaves every other episode's logprobs in the row unchanged."""
    b = backend(model_dir, pack_group_tokens=1 << 20)
    samples = groups(n_groups=2, n=4)
    changed = [*samples]
    changed[1] = Sample(**{**samples[1].__dict__, "response": [t + 1 for t in samples[1].response]})

    def logprobs(chunk):
        sp = b._shared_prompts(chunk)
        *_, targets, _, _ = b._batch(chunk, inputs=False)
        with torch.no_grad():
            return b._shared_logprobs(b.model, sp, targets)[0]

    before, after = logprobs(samples), logprobs(changed)
    assert not torch.allclose(before[1], after[1])
    keep = [i for i in range(len(samples)) if i != 1]
    torch.testing.assert_close(before[keep], after[keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("pack", PACK)
def test_sft_through_the_lean_forward_matches_the_padded_batch(model_dir, pack):
    """SFT batches (distinct prompts) take the packed rows when they fit: same loss and gradients."""
    samples = groups(n_groups=8, n=1, max_response=9)
    lean, padded = backend(model_dir, pack_group_tokens=PACK[pack]), backend(model_dir, share_prompts=False)
    assert (lean._shared_prompts(samples) is not None) == bool(PACK[pack])

    def sft(b):
        b.optimizer.zero_grad(set_to_none=True)
        totals = b.accumulate_gradients(samples, objective="sft")
        return totals, {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}

    (loss_l, _, _, tokens_l, ent_l), grads_l = sft(lean)
    (loss_p, _, _, tokens_p, ent_p), grads_p = sft(padded)
    assert tokens_l == tokens_p > 0
    assert loss_l == pytest.approx(loss_p, rel=1e-5)
    assert ent_l == pytest.approx(ent_p, rel=1e-5)
    for name in grads_p:
        torch.testing.assert_close(grads_l[name], grads_p[name], rtol=1e-4, atol=1e-7, msg=name)
