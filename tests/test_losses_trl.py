"""Loss parity with TRL's GRPOTrainer: identical inputs, equal loss and gradients (within 1e-5).

We call TRL's own `GRPOTrainer._compute_loss` (the function its training step runs) on a stand-in
`self` that carries only the attributes the loss reads, with the model forward replaced by logprobs
computed from shared logits. Logits, completion ids and masks, advantages, old (generator) logprobs
and reference logprobs are the same tensors on both sides; gradients are taken w.r.t. the logits.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

from forgerpc.services.trainer import losses

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl is a dev dependency (pip install -e .[dev])")
trl_utils = pytest.importorskip("trl.trainer.utils")

B, T, V = 6, 7, 11


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 7])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    with torch.no_grad():
        logp, _ = losses.token_logprobs_and_entropy(logits, ids)
    old = logp + 0.3 * torch.randn(B, T, generator=g)  # generator logprobs: ratios well away from 1
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return logits, ids, mask, adv, old, ref


def _trl_loss(logits, ids, mask, adv, old, ref, *, loss_type, eps, eps_high, beta=0.0, level="token",
              is_ratio=None):
    """TRL's loss on our inputs; returns (loss, grad wrt logits)."""
    logits = logits.clone().requires_grad_(True)

    def per_token(_model, *_a, **_k):
        logp = trl_utils.selective_log_softmax(logits, ids)
        return logp, trl_utils.entropy_from_logits(logits), None

    identity = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                     reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=T, accelerator=identity, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
        "completion_ids": ids, "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), logits.grad


def _our_loss(logits, ids, fn, *args, **kw):
    logits = logits.clone().requires_grad_(True)
    logp, _ = losses.token_logprobs_and_entropy(logits, ids)
    out = fn(logp, *args, **kw)
    out.loss.backward()
    return out.loss.detach(), logits.grad


CASES = {
    "grpo": (dict(loss_type="grpo", eps=0.2, eps_high=0.2), losses.grpo_loss, dict(clip=0.2)),
    "grpo_kl": (dict(loss_type="grpo", eps=0.2, eps_high=0.2, beta=0.04), losses.grpo_loss,
                dict(clip=0.2, beta=0.04)),
    "dapo": (dict(loss_type="dapo", eps=0.2, eps_high=0.28), losses.dapo_loss, dict(clip_low=0.2, clip_high=0.28)),
    "dr_grpo": (dict(loss_type="dr_grpo", eps=0.2, eps_high=0.2), losses.dr_grpo_loss, dict(clip=0.2, max_tokens=T)),
    "gspo": (dict(loss_type="grpo", eps=3e-4, eps_high=4e-4, level="sequence"), losses.gspo_loss, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_grad_match_trl(case):
    trl_kw, fn, our_kw = CASES[case]
    logits, ids, mask, adv, old, ref = _inputs()
    trl_loss, trl_grad = _trl_loss(logits, ids, mask, adv, old, ref, **trl_kw)
    if "beta" in our_kw:
        our_kw = {**our_kw, "ref_logprobs": ref}
    our_loss, our_grad = _our_loss(logits, ids, fn, old, adv, mask, **our_kw)
    assert trl_grad.abs().max() > 1e-3  # a real gradient, not a vacuous comparison
    assert torch.allclose(our_loss, trl_loss, atol=1e-5), (our_loss, trl_loss)
    assert torch.allclose(our_grad, trl_grad, atol=1e-5), (our_grad - trl_grad).abs().max()


def test_tis_matches_trl_vllm_correction():
    """TRL multiplies the policy term by vLLM's truncated IS ratio; ours by `tis_weights`."""
    logits, ids, mask, adv, old, ref = _inputs(seed=1)
    with torch.no_grad():
        proximal, _ = losses.token_logprobs_and_entropy(logits, ids)  # the trainer's own logprobs
    weights = losses.tis_weights(proximal, old, cap=1.3)
    assert (weights == 1.3).any() and (weights < 1.0).any()  # some truncated, some not
    trl_loss, trl_grad = _trl_loss(logits, ids, mask, adv, proximal, ref, loss_type="grpo", eps=0.2,
                                   eps_high=0.2, is_ratio=weights)
    our_loss, our_grad = _our_loss(logits, ids, losses.grpo_loss, proximal, adv, mask, is_weights=weights)
    assert torch.allclose(our_loss, trl_loss, atol=1e-5)
    assert torch.allclose(our_grad, trl_grad, atol=1e-5)


def test_entropy_matches_trl():
    logits, ids, *_ = _inputs()
    _, ours = losses.token_logprobs_and_entropy(logits, ids)
    assert torch.allclose(ours, trl_utils.entropy_from_logits(logits), atol=1e-5)
