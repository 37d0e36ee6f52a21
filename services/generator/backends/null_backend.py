"""The null backend: answers instantly with fixed tokens, so a benchmark measures only the framework.

    forgerpc serve generator backend="'null'"                   # byte-level ids (vocab 256)
    forgerpc serve generator backend="'null'" model_path=DIR    # DIR's tokenizer.json and vocab
    # in YAML: backend: "null" (quoted: a bare null is YAML's None)

No model runs. Every sample of every prompt is the same `max_tokens` ids, the cycle of
`RESPONSE_TEXT`'s tokens, with finish reason "length" (stop strings, stop ids and EOS are not
applied: nothing is sampled, so nothing could stop). Logprobs are plausible, not computed:

    logprob[j] = log(p_j),   p_j = 0.95 - 0.9 * frac(j * 0.618...)   in [0.05, 0.95)

finite, < 0, varying by position, so a trainer's importance ratios exp(new - old) stay finite.
`update_weights` only records the version (no tensor is read), which keeps the policy_version
bookkeeping of the loop real; the server still checks an update's names and shapes against the
model directory's (`ModelInfo.shapes`, read from the safetensors headers), as for any backend.
Prompts are tokenized with the model directory's tokenizer, so prompt ids are valid for a trainer
of that model. Without a model directory, ids are UTF-8 bytes and the model has no parameters.
"""

from __future__ import annotations

import json
import math

from forgerpc.services.common.models import check_model_dir
from forgerpc.services.generator.backends import (
    FINISH_LENGTH, ModelInfo, Output, Sampling, WeightSource, read_shapes, safetensors_files,
)

RESPONSE_TEXT = "0123456789"
GOLDEN = (math.sqrt(5) - 1) / 2


class NullBackend:
    """Backend "null" (see backends.Backend)."""

    def __init__(self, model_path: str = "", max_model_len: int = 0):
        self.version = 0
        self.generated_tokens = 0
        self._calls = 0
        self._cache: dict[tuple[int, bool], tuple[list[int], str, list[float]]] = {}
        if model_path:
            from tokenizers import Tokenizer  # the Rust tokenizer itself: no transformers import

            path = check_model_dir(model_path)  # ModelNotFoundError names the path
            config = json.loads((path / "config.json").read_text())
            self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            vocab = int(config["vocab_size"])
            window = max_model_len or int(config.get("max_position_embeddings", 2048))
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            self._response_ids = self._tokenizer.encode(RESPONSE_TEXT, add_special_tokens=False).ids
            shapes = read_shapes(safetensors_files(path))
            tied = frozenset({"lm_head.weight"} if config.get("tie_word_embeddings") else ())
        else:
            self._tokenizer = None
            vocab, window, eos_ids, shapes, tied = 256, max_model_len or 1 << 20, (), {}, frozenset()
            self._response_ids = list(RESPONSE_TEXT.encode())
        self.info = ModelInfo(model=str(model_path) or "null", backend="null", max_model_len=window,
                              vocab_size=vocab, eos_token_ids=eos_ids, shapes=shapes, tied=tied)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._tokenizer is None:
            return list(text.encode())
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"{m['role']}\n{m['content']}\n" for m in messages) + "assistant\n")

    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            return bytes(ids).decode(errors="replace")
        return self._tokenizer.decode(ids)

    def response(self, max_tokens: int, logprobs: bool) -> tuple[list[int], str, list[float]]:
        """(token ids, text, logprobs) of every sample of length `max_tokens`; built once per length."""
        key = (max_tokens, logprobs)
        if key not in self._cache:
            base = self._response_ids
            ids = [base[j % len(base)] for j in range(max_tokens)]
            lps = [math.log(0.95 - 0.9 * ((j * GOLDEN) % 1.0)) for j in range(max_tokens)] if logprobs else []
            self._cache[key] = (ids, self.decode(ids), lps)
        return self._cache[key]

    def stats(self) -> dict[str, int]:
        return {"pending_requests": 0, "engine_steps": self._calls, "generated_tokens": self.generated_tokens}

    def start(self) -> None:
        pass

    async def generate(self, prompts: list[tuple[str, list[int]]], sampling: Sampling) -> list[Output]:
        window = self.info.max_model_len
        out = []
        for prompt_id, prompt_ids in prompts:
            # as a real engine: never past the context window (the server leaves room for one token)
            ids, text, lps = self.response(min(sampling.max_tokens, window - len(prompt_ids)), sampling.logprobs)
            out.extend(Output(prompt_id=prompt_id, index=i, prompt_token_ids=prompt_ids, token_ids=ids, text=text,
                              logprobs=lps, finish_reason=FINISH_LENGTH, policy_version=self.version)
                       for i in range(sampling.n))
            self.generated_tokens += len(ids) * sampling.n
        self._calls += 1
        return out

    async def update_weights(self, version: int, source: WeightSource, abort: bool) -> int:
        self.version = version  # nothing runs, so nothing is in flight to drain or abort
        return 0

    async def close(self) -> None:
        pass
