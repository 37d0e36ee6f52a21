"""Packed SFT: rows of several episodes give the same loss and gradients as one episode per row,
and no episode's tokens reach another's logprobs."""

from __future__ import annotations

import pytest
import torch

from forgerpc.services.common.errors import ServiceError
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.services.trainer import packing
from forgerpc.services.trainer.backends.torch_backend import Sample, TorchBackend
from forgerpc.services.trainer.config import TrainerConfig
from forgerpc.services.trainer.server import to_samples
from forgerpc.v1 import common_pb2, trainer_pb2


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


def backend(model_dir, **overrides) -> TorchBackend:
    model, _ = load_model(model_dir, dtype=torch.float32)
    return TorchBackend(TrainerConfig(objective="sft", micro_batch_size=2, **overrides), model)


def episodes(n: int = 7, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, 90, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, 90, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        mask = [1] * len(r)
        if i % 3 == 0 and len(r) > 1:
            mask[0] = 0  # a masked response token must stay out of the loss in both layouts
        out.append(Sample(prompt=p, response=r, generator_logprobs=[0.0] * len(r), mask=mask))
    return out


def test_pack_first_fit_decreasing_by_hand():
    # 6 -> row 0 (room 2); 5 -> row 1 (3); 4 -> row 2 (4); 3 -> row 1 (0); 2 -> row 0 (0)
    assert packing.pack([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    with pytest.raises(ValueError, match="item 1 has 9 tokens"):
        packing.pack([2, 9], 8)


def test_packed_batch_positions_and_mask_by_hand():
    ids, pos, targets, mask = packing.packed_batch([[([10, 11], [12, 13], [1, 0]), ([20], [21], [1])]], 8, pad_id=0)
    assert ids.tolist() == [[10, 11, 12, 13, 20, 21, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]]
    assert targets.tolist() == [[11, 12, 13, 20, 21, 0, 0]]
    # column 1 predicts 12 (trained), 2 predicts 13 (masked), 3 predicts the next prompt (never), 4 predicts 21
    assert mask.tolist() == [[0, 1, 0, 0, 1, 0, 0]]


def grads(b: TorchBackend) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradient_equal_unpacked(model_dir):
    samples = episodes()
    lengths = [len(s.prompt) + len(s.response) for s in samples]
    assert len(packing.pack(lengths, 24)) < len(samples) / 2  # really several episodes per row
    unpacked, packed = backend(model_dir), backend(model_dir, sft={"packing": True, "pack_length": 24})
    u = unpacked.accumulate_gradients(samples, "sft")
    p = packed.accumulate_gradients(samples, "sft")
    assert p[3] == u[3] == sum(sum(s.mask) for s in samples)  # tokens
    assert p[0] == pytest.approx(u[0], abs=1e-5) and u[0] > 1.0  # loss (ln 96 ~ 4.6 for a random model)
    assert p[4] == pytest.approx(u[4], rel=1e-5)  # entropy sum
    gu, gp = grads(unpacked), grads(packed)
    assert gu.keys() == gp.keys() and len(gu) > 5
    for name in gu:
        torch.testing.assert_close(gp[name], gu[name], atol=1e-5, rtol=1e-4, msg=name)
    # and a whole step lands on the same weights
    a, b = unpacked.train_step(samples, "sft"), packed.train_step(samples, "sft")
    assert (a.step, b.step) == (1, 1) and b.loss == pytest.approx(a.loss, abs=1e-5)
    for (name, x), y in zip(unpacked.model.state_dict().items(), packed.model.state_dict().values()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5, msg=name)


def test_no_attention_across_episodes_in_a_row(model_dir):
    """The second episode of a row has exactly the logprobs it has alone in a row, whatever the
    first episode holds (causality alone would not give that: the second comes after the first)."""
    b = backend(model_dir)
    first, changed = ([5, 6, 7], [8, 9, 10], [1] * 3), ([40, 41, 42], [43, 44, 45], [1] * 3)
    second = ([11, 12], [13, 14], [1] * 2)

    def logprobs(row):
        ids, pos, targets, _ = packing.packed_batch([row], 16, pad_id=0)
        with torch.no_grad():
            return b.packed_logprobs(ids, pos, targets)[0][0]

    alone, after_first, after_changed = logprobs([second]), logprobs([first, second]), logprobs([changed, second])
    at = len(first[0]) + len(first[1])  # the second episode's first column
    n = len(second[0]) + len(second[1]) - 1  # its targets
    torch.testing.assert_close(after_first[at:at + n], alone[:n], atol=1e-6, rtol=0)
    torch.testing.assert_close(after_changed[at:at + n], alone[:n], atol=1e-6, rtol=0)
    assert not torch.allclose(after_first[:at - 1], after_changed[:at - 1])  # the first episodes did differ


def test_episode_longer_than_a_row_is_invalid_argument():
    eps = [common_pb2.Episode(prompt_token_ids=[1, 2, 3], response_token_ids=[4] * 10) for _ in range(2)]
    eps[1].response_token_ids.extend([5] * 10)
    fits, too_long = trainer_pb2.TrainStepRequest(episodes=eps[:1]), trainer_pb2.TrainStepRequest(episodes=eps)
    assert len(to_samples(fits, 100, 512, 10, sft=True, pack_length=16)) == 1
    with pytest.raises(ServiceError) as err:
        to_samples(too_long, 100, 512, 10, sft=True, pack_length=16)
    assert err.value.message.startswith("episodes[1].response_token_ids") and "sft.pack_length=16" in err.value.message
