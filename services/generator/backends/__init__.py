"""Generator backends: one file per implementation, all with the `Backend` interface below.

The server validates requests and maps protos to these plain types; a backend never sees a proto.
For UpdateWeights the server also serializes updates, applies the version rules and checks the
new tensors' names and shapes against `ModelInfo.shapes`, so a backend only swaps weights.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Protocol

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
    # HF name -> shape of every tensor a weight update must carry
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # names an update may carry that the model ties to another tensor (a tied lm_head.weight):
    # accepted and skipped
    tied: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where UpdateWeights reads a version from, already checked against `ModelInfo.shapes`:
    either safetensors `files` (local_path), or a `store` (a forgerpc.clients.WeightStoreClient)
    to pull the version from with `forgerpc.clients.weights.load_into`; `client` is the
    generator's ClientConfig as a dict, for a backend that opens its own store client in
    another process."""

    files: tuple[pathlib.Path, ...] = ()
    store: Any = None
    client: dict = dataclasses.field(default_factory=dict)


def safetensors_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """`path` itself if it is a file, else the *.safetensors files in the directory."""
    path = pathlib.Path(path).expanduser()
    return [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []


def read_shapes(files: list[pathlib.Path]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from safetensors headers, without reading the tensors."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


class Backend(Protocol):
    info: ModelInfo
    version: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict]) -> list[int]: ...

    def stats(self) -> dict[str, int]:
        """pending_requests, engine_steps, generated_tokens."""

    async def generate(self, prompts: list[tuple[str, list[int]]], sampling: Sampling) -> list[Output]:
        """Completes (prompt_id, token_ids) pairs; n outputs per prompt, in request order."""

    async def update_weights(self, version: int, source: WeightSource, abort: bool) -> int:
        """Pauses admission, drains (or, with `abort`, aborts) running requests, swaps in the
        weights of `source`, sets `self.version = version` and resumes; returns how many
        requests were aborted. The server calls it one update at a time, with version > self.version."""

    async def close(self) -> None: ...
