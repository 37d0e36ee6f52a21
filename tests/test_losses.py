"""Each loss on a tiny batch whose value and gradient were worked out by hand (numbers in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from forgerpc.services.trainer import losses

L = math.log


def batch():
    """Two sequences of two response tokens; the second has its last token masked out.

    ratios pi/pi_gen: seq0 = [2, 1], seq1 = [2, -]; advantages +1, -1.
    """
    logprobs = torch.tensor([[L(0.5), L(0.5)], [L(0.5), L(0.9)]], requires_grad=True)
    old = torch.tensor([[L(0.25), L(0.5)], [L(0.25), L(0.1)]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    return logprobs, old, adv, mask


def test_grpo_hand_computed():
    logprobs, old, adv, mask = batch()
    out = losses.grpo_loss(logprobs, old, adv, mask, clip=0.2)
    # seq0: -min(2*1, 1.2*1) = -1.2 ; -min(1, 1) = -1 ; mean -1.1.  seq1: -min(-2, -1.2) = 2.
    assert out.loss.item() == pytest.approx((-1.1 + 2.0) / 2, abs=1e-6)
    assert float(out.clipped_sum) == 1 and float(out.tokens) == 3  # only seq0 token0 (r > 1.2 with A > 0)
    out.loss.backward()
    # d/dlogp of -r*A/(|o|*G): seq0 tok0 clipped -> 0; tok1 -> -1*1/(2*2); seq1 tok0 -> -2*-1/(1*2); masked -> 0
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.25], [1.0, 0.0]]), atol=1e-6)


def test_grpo_ratio_is_not_identically_one():
    logprobs, old, adv, mask = batch()
    on_policy = losses.grpo_loss(logprobs, logprobs.detach(), adv, mask).loss.item()
    assert on_policy != pytest.approx(losses.grpo_loss(logprobs, old, adv, mask).loss.item())


def test_dapo_hand_computed():
    logprobs, old, adv, mask = batch()
    out = losses.dapo_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # token-level mean over 3 tokens: (-1.28 - 1 + 2) / 3
    assert out.loss.item() == pytest.approx(-0.28 / 3, abs=1e-6)
    out.loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -1 / 3], [2 / 3, 0.0]]), atol=1e-6)


def test_dr_grpo_hand_computed():
    logprobs, old, adv, mask = batch()
    out = losses.dr_grpo_loss(logprobs, old, adv, mask, max_tokens=4, clip=0.2)
    assert out.loss.item() == pytest.approx((-1.2 - 1 + 2) / (2 * 4), abs=1e-6)  # -0.025


def test_gspo_hand_computed():
    logprobs, old, adv, mask = batch()
    out = losses.gspo_loss(logprobs, old, adv, mask)
    # seq0: s = exp((ln2 + 0)/2) = sqrt2 > 1.0004 with A>0 -> clipped: -1.0004. seq1: s = 2, A<0 -> +2.
    assert out.loss.item() == pytest.approx((-1.0004 + 2.0) / 2, abs=1e-6)
    assert float(out.clipped_sum) == 2  # both tokens of seq0 share the clipped sequence ratio
    out.loss.backward()
    # seq1: d/dlogp(-s*A/G) = -(s/|y|)*A/G = 2*1/2 = 1 on its one token; seq0 clipped -> 0
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, 0.0], [1.0, 0.0]]), atol=1e-6)


def test_k3_kl_and_beta():
    logp, ref = torch.tensor([[L(0.5)]]), torch.tensor([[L(0.25)]])
    # exp(ln .5) - ln .5 - 1 = 0.5 + 0.693147 - 1
    assert losses.k3_kl(logp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    assert losses.k3_kl(logp, logp).item() == 0.0
    out = losses.grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, beta=0.1)
    assert out.loss.item() == pytest.approx(0.0193147, abs=1e-6) and float(out.kl_sum) == pytest.approx(0.193147, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)


def test_tis_weights_truncate():
    old = torch.tensor([[L(0.5), L(0.5), L(0.1)]])
    gen = torch.tensor([[L(0.25), L(0.1), L(0.5)]])
    assert torch.allclose(losses.tis_weights(old, gen, cap=2.0), torch.tensor([[2.0, 2.0, 0.2]]), atol=1e-6)
    # weights scale the policy term: on-policy (ratio 1) loss -A * w
    logp = old.clone().requires_grad_(True)
    out = losses.grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3),
                           is_weights=losses.tis_weights(old, gen, cap=2.0))
    assert out.loss.item() == pytest.approx(-(2 + 2 + 0.2) / 3, abs=1e-6)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0])
    ids = ["a", "a", "a", "a", "b"]
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expect = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0]) / (std + 1e-4)
    expect[4] = 0.0  # a group of one has nothing to compare with
    assert torch.allclose(losses.group_advantages(rewards, ids), expect, atol=1e-6)
    plain = losses.group_advantages(rewards, ids, normalize_std=False)
    assert plain.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0]


def test_sft_loss():
    logprobs = torch.tensor([[L(0.5), L(0.25)], [L(0.5), L(0.01)]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert losses.sft_loss(logprobs, mask).loss.item() == pytest.approx((2 * L(2) + L(4)) / 3, abs=1e-6)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [0.0, L(3.0)]]])
    logp, ent = losses.token_logprobs_and_entropy(logits, torch.tensor([[0, 1]]))
    assert torch.allclose(logp, torch.tensor([[L(0.5), L(0.75)]]), atol=1e-6)
    assert torch.allclose(ent, torch.tensor([[L(2.0), -(0.25 * L(0.25) + 0.75 * L(0.75))]]), atol=1e-6)
    # at T = 0.5 the logits double: [0, 2 ln 3] -> probabilities 1/10, 9/10
    logp, ent = losses.token_logprobs_and_entropy(logits, torch.tensor([[0, 1]]), temperature=0.5)
    assert torch.allclose(logp, torch.tensor([[L(0.5), L(0.9)]]), atol=1e-6)
    assert torch.allclose(ent[0, 1], torch.tensor(-(0.1 * L(0.1) + 0.9 * L(0.9))), atol=1e-6)


def test_entropy_bonus_hand_computed():
    """l_t - c * H_t, aggregated like the policy term: seq0 mean H = (1 + 3) / 2, seq1 = 2 (token 2 masked)."""
    logprobs, old, adv, mask = batch()
    entropy = torch.tensor([[1.0, 3.0], [2.0, 7.0]], requires_grad=True)
    base = losses.grpo_loss(logprobs, old, adv, mask).loss.item()
    out = losses.grpo_loss(logprobs, old, adv, mask, entropy=entropy, entropy_coef=0.1)
    assert out.loss.item() == pytest.approx(base - 0.1 * (2.0 + 2.0) / 2, abs=1e-6)
    out.loss.backward()
    # d/dH of -c * H / (|o_i| * G): seq0 -0.1 / 4 per token, seq1 -0.1 / 2, the masked token 0
    assert torch.allclose(entropy.grad, torch.tensor([[-0.025, -0.025], [-0.05, 0.0]]), atol=1e-7)
    with pytest.raises(ValueError, match="entropy_coef"):
        losses.grpo_loss(logprobs, old, adv, mask, entropy=entropy.detach(), entropy_coef=0.1)


def test_entropy_gradient_only_when_asked():
    """The entropy is a detached metric by default; with entropy_grad its gradient w.r.t. the logits is
    dH/dz_v = -p_v (z_v - sum_u p_u z_u), which flattens the distribution."""
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], requires_grad=True)
    _, ent = losses.token_logprobs_and_entropy(logits, torch.tensor([[0]]))
    assert not ent.requires_grad
    _, ent = losses.token_logprobs_and_entropy(logits, torch.tensor([[0]]), entropy_grad=True)
    ent.sum().backward()
    p = torch.softmax(logits.detach(), -1)
    expected = -p * (logits.detach() - (p * logits.detach()).sum(-1, keepdim=True))
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 2]  # ascent lowers the top logit, raises the lowest


@pytest.mark.parametrize("fn", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_micro_batches_sum_to_full_batch(fn):
    """Global counts make the sum of micro-batch losses equal the full-batch loss (gradient accumulation)."""
    torch.manual_seed(0)
    logprobs = torch.randn(6, 5) * 0.1 - 1
    old = logprobs + torch.randn(6, 5) * 0.3
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    kw = {"max_tokens": 5} if fn == "dr_grpo" else {}
    loss_fn = getattr(losses, f"{fn}_loss")
    full = loss_fn(logprobs, old, adv, mask, **kw).loss
    parts = sum(loss_fn(logprobs[s], old[s], adv[s], mask[s], num_sequences=6, num_tokens=mask.sum(), **kw).loss
                for s in (slice(0, 2), slice(2, 6)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)
