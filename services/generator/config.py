"""Generator service config.

    forgerpc serve generator model_path=~/.cache/forgerpc/SmolLM2-135M-Instruct dtype=bfloat16
    forgerpc serve generator tiny_model=true          # random tiny Llama built at start (tests, demo)
    forgerpc serve generator tiny_model=true weight_store_address=127.0.0.1:50061

UpdateWeights pulls the version from `weight_store_address` (or the address the request names),
with `client` (token / TLS) for that call; a request's `local_path` loads a safetensors directory.

An empty `model_path` means `tiny_model: true`, so `generator: {}` in a stack config starts.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from forgerpc.services.common.runtime import ServiceConfig


class GeneratorConfig(ServiceConfig):
    # "vllm": vLLM's engine (needs the vllm package: the [vllm] extra, or .venv-vllm on CPU)
    backend: Literal["torch", "vllm", "null"] = "torch"  # "null": fixed tokens, no model (benchmarks)
    # HF-format directory (config.json, safetensors, tokenizer files) on local disk
    model_path: str = ""
    # build a random-initialized tiny model of `tiny_arch` into a temp dir at start
    tiny_model: bool = False
    tiny_arch: Literal["llama", "qwen2", "qwen3"] = "llama"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    # sequences decoded together in one step (KV cache slots)
    max_batch_size: int = Field(default=64, gt=0)
    # sequences (prompts x n) waiting for a slot; beyond it Generate answers RESOURCE_EXHAUSTED
    max_queue: int = Field(default=4096, gt=0)
    # samples per prompt a request may ask for
    max_n: int = Field(default=16, gt=0)
    # context window; 0 = the model's max_position_embeddings
    max_model_len: int = Field(default=0, ge=0)
    # weight store ("host:port") UpdateWeights pulls from when the request names none; "" = none
    weight_store_address: str = ""
    # intra-op threads for torch; 0 = torch's default. On a CPU shared with other processes, 1 can
    # be faster: multi-threaded GEMMs stall when a sibling thread is descheduled
    torch_threads: int = Field(default=0, ge=0)
    # torch backend: a weight-store version of a model of at most this many MiB is pulled into a
    # side copy while generation goes on, then swapped in (generation stops for the drain and one
    # memcpy; the copy costs the model's size once more in memory); a larger one is pulled straight
    # into the parameters, and generation stops for the transfer. 0: always in place
    stage_weights_mb: int = Field(default=1024, ge=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> "GeneratorConfig":
        if self.model_path and self.tiny_model:
            raise ValueError("set model_path or tiny_model, not both")
        if not self.model_path:
            self.__dict__["tiny_model"] = True  # bypass validate_assignment recursion
        if "max_n" not in self.model_fields_set:  # the default follows a small max_batch_size
            self.__dict__["max_n"] = min(self.max_n, self.max_batch_size)
        if self.max_n > self.max_batch_size:
            raise ValueError(f"max_n ({self.max_n}) must not exceed max_batch_size ({self.max_batch_size}): "
                             "the n samples of a prompt run together")
        return self
