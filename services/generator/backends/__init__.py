"""Generator backends: one file per implementation, all with the `Backend` interface below.

The server validates requests and maps protos to these plain types; a backend never sees a proto.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

FINISH_STOP, FINISH_LENGTH, FINISH_ABORTED = "stop", "length", "aborted"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters of one request (see forgerpc.v1.SamplingParams)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    ignore_eos: bool = False


@dataclasses.dataclass
class Output:
    """One completed sample; `finish_reason` is one of FINISH_*."""

    prompt_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    policy_version: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    model: str
    backend: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


class Backend(Protocol):
    info: ModelInfo
    version: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict]) -> list[int]: ...

    def stats(self) -> dict[str, int]:
        """pending_requests, engine_steps, generated_tokens."""

    async def generate(self, prompts: list[tuple[str, list[int]]], sampling: Sampling) -> list[Output]:
        """Completes (prompt_id, token_ids) pairs; n outputs per prompt, in request order."""

    async def update_weights(self, version: int, local_path: str, weight_store_address: str,
                             abort: bool) -> tuple[float, int]:
        """Swaps in `version`; returns (seconds, aborted requests)."""

    async def close(self) -> None: ...
