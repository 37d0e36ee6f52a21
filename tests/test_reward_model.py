"""Reward-model scoring with small models made here (random init, real architectures).

Expected scores are recomputed independently in the test from the formulas in
services/reward/model.py (sigmoid of the classifier logit; softmax over the yes/no logits)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from forgerpc.clients import RewardClient  # noqa: E402
from forgerpc.services.common.models import make_tiny_model, make_tokenizer  # noqa: E402
from forgerpc.services.reward.model import RewardModel  # noqa: E402
from forgerpc.v1.reward_pb2 import RewardItem  # noqa: E402

ITEMS = [RewardItem(prompt="2+2?", response="4", target="4"),
         RewardItem(prompt="2+2?", response="five, I think", target="4")]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tok = make_tokenizer(path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(str(path))
    return path


def test_classifier_scores(classifier_dir):
    rm = RewardModel(str(classifier_dir), mode="classifier")
    tok = transformers.AutoTokenizer.from_pretrained(str(classifier_dir))
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)).eval()
    scores = []
    for item in ITEMS:
        ids = tok(f"{item.prompt}\n{item.response}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            z = ref(input_ids=ids).logits[0, 0].item()
        want = 1 / (1 + math.exp(-z))
        got, reason = rm(item)
        assert got == pytest.approx(want, abs=1e-5) and "reward_model" in reason
        scores.append(got)
    assert scores[0] != scores[1]  # the score depends on the response


def test_judge_scores(tmp_path):
    path = make_tiny_model(tmp_path / "judge", num_layers=1, hidden_size=32, intermediate_size=64)
    rm = RewardModel(str(path), mode="judge", yes="Y", no="N")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    y, n = tok.convert_tokens_to_ids("Y"), tok.convert_tokens_to_ids("N")
    for item in ITEMS:
        ids = tok(rm.text(item), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            z = ref(input_ids=ids).logits[0, -1]
        want = math.exp(z[y]) / (math.exp(z[y]) + math.exp(z[n]))
        assert rm(item)[0] == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="different tokens"):
        RewardModel(str(path), mode="judge", yes="Yes", no="Yo")
    with pytest.raises(ValueError, match="not found"):
        RewardModel(str(tmp_path / "missing"))


@pytest.mark.slow
async def test_reward_model_in_a_real_process(serve_process, classifier_dir):
    rm = RewardModel(str(classifier_dir))
    want = [rm(i)[0] for i in ITEMS]
    proc = serve_process("reward", f"functions=[{{kind: reward_model, options: {{path: '{classifier_dir}'}}}}]")
    async with RewardClient(proc.address) as reward:
        out = await reward.evaluate(items=ITEMS)
    assert [s.score for s in out.scores] == pytest.approx(want, abs=1e-5)
    assert out.scores[0].sub_scores["reward_model"] == pytest.approx(want[0], abs=1e-5)
