"""The GeneratorService servicer: validates requests at the edge and maps them to a backend.

    Generate       prompts (text | token ids | chat messages) x SamplingParams -> completions
    UpdateWeights  pause admission, drain (or abort) running sequences, swap weights, resume
    Tokenize       prompt ids exactly as Generate sees them; plain texts without special tokens
    GetModelInfo   model, version, context window, load, engine step counter

Every field a caller can get wrong is checked here, so a backend only sees valid input and the
caller gets INVALID_ARGUMENT naming the field (e.g. "prompts[2].token_ids[5]").

Completion semantics (all backends): token_ids include a stop/EOS token that ended the sample,
text does not (and is cut before a stop string); logprobs are those of the distribution the
token was drawn from, log_softmax(logits / T) after top-k/top-p, or log_softmax(logits) when
greedy (details in backends/torch_sampling.py); policy_version is the version of the weights
that generated every token of the completion.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile

from forgerpc.services.common.errors import invalid_argument, require
from forgerpc.services.common.models import check_model_dir, make_tiny_model
from forgerpc.services.common.runtime import ServiceDefinition
from forgerpc.services.generator.backends import FINISH_ABORTED, FINISH_LENGTH, FINISH_STOP, Backend, Sampling
from forgerpc.services.generator.config import GeneratorConfig
from forgerpc.v1 import common_pb2, generator_pb2, generator_pb2_grpc

log = logging.getLogger("forgerpc.generator")

FINISH = {
    FINISH_STOP: common_pb2.FINISH_REASON_STOP,
    FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FINISH_ABORTED: common_pb2.FINISH_REASON_ABORTED,
}


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, cfg: GeneratorConfig, backend: Backend):
        self.cfg = cfg
        self.backend = backend

    async def Generate(self, request: generator_pb2.GenerateRequest, context) -> generator_pb2.GenerateResponse:
        require(len(request.prompts) > 0, "prompts", "must hold at least one prompt")
        sampling = self._sampling(request.sampling_params)
        total = len(request.prompts) * sampling.n
        require(total <= self.cfg.max_queue, "prompts",
                f"{len(request.prompts)} prompts x n={sampling.n} = {total} sequences exceeds max_queue "
                f"({self.cfg.max_queue}); split the request")
        prompts = [(p.prompt_id, self._prompt_ids(i, p)) for i, p in enumerate(request.prompts)]
        outputs = await self.backend.generate(prompts, sampling)
        return generator_pb2.GenerateResponse(completions=[
            common_pb2.Completion(
                prompt_id=o.prompt_id, index=o.index, prompt_token_ids=o.prompt_token_ids, token_ids=o.token_ids,
                text=o.text, logprobs=o.logprobs, finish_reason=FINISH[o.finish_reason],
                policy_version=o.policy_version,
            )
            for o in outputs
        ])

    def _sampling(self, p: common_pb2.SamplingParams) -> Sampling:
        field = "sampling_params."
        require(math.isfinite(p.temperature) and p.temperature >= 0, field + "temperature",
                f"must be a finite number >= 0 (0 = greedy), got {p.temperature}")
        require(math.isfinite(p.top_p) and 0 <= p.top_p <= 1, field + "top_p", f"must be in [0, 1], got {p.top_p}")
        require(p.top_k >= 0, field + "top_k", f"must be >= 0 (0 = off), got {p.top_k}")
        require(p.max_tokens > 0, field + "max_tokens", f"must be positive, got {p.max_tokens}")
        require(0 <= p.n <= self.cfg.max_n, field + "n", f"must be in [0, {self.cfg.max_n}] (max_n), got {p.n}")
        vocab = self.backend.info.vocab_size
        for i, s in enumerate(p.stop):
            require(len(s) > 0, f"{field}stop[{i}]", "must not be empty")
        for i, t in enumerate(p.stop_token_ids):
            require(0 <= t < vocab, f"{field}stop_token_ids[{i}]", f"{t} is not a token id (vocab size {vocab})")
        return Sampling(
            # below 1e-5, logits / T overflows float32: such a temperature means greedy
            temperature=p.temperature if p.temperature >= 1e-5 else 0.0,
            top_p=p.top_p if 0 < p.top_p < 1 else 1.0, top_k=p.top_k,
            max_tokens=p.max_tokens, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
            seed=p.seed if p.HasField("seed") else None, n=p.n or 1, logprobs=p.logprobs, ignore_eos=p.ignore_eos,
        )

    def _prompt_ids(self, i: int, prompt: common_pb2.Prompt) -> list[int]:
        """Token ids of one prompt: token_ids, else chat messages, else text."""
        field = f"prompts[{i}]"
        vocab = self.backend.info.vocab_size
        if prompt.token_ids:
            for j, t in enumerate(prompt.token_ids):
                require(0 <= t < vocab, f"{field}.token_ids[{j}]", f"{t} is not a token id (vocab size {vocab})")
            ids = list(prompt.token_ids)
        elif prompt.messages:
            for j, m in enumerate(prompt.messages):
                require(bool(m.role), f"{field}.messages[{j}].role", "must not be empty")
            messages = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                        for m in prompt.messages]
            try:
                ids = self.backend.encode_chat(messages)
            except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is the caller's input
                raise invalid_argument(f"{field}.messages",
                                       f"the chat template rejected them: {type(e).__name__}: {e}"[:300]) from None
        else:
            require(bool(prompt.text), field, "is empty: set text, token_ids or messages")
            ids = self.backend.encode(prompt.text)
        window = self.backend.info.max_model_len
        require(0 < len(ids) < window, field,
                f"has {len(ids)} tokens; the context window is {window} tokens, which must leave room for "
                "at least one new token")
        return ids

    async def UpdateWeights(self, request: generator_pb2.UpdateWeightsRequest, context):
        require(request.version >= 0, "version", f"must be >= 0, got {request.version}")
        abort = request.in_flight_policy == generator_pb2.IN_FLIGHT_POLICY_ABORT
        seconds, aborted = await self.backend.update_weights(
            request.version, request.local_path, request.weight_store_address, abort)
        return generator_pb2.UpdateWeightsResponse(version=self.backend.version, seconds=seconds,
                                                   aborted_requests=aborted)

    async def Tokenize(self, request: generator_pb2.TokenizeRequest, context) -> generator_pb2.TokenizeResponse:
        require(len(request.prompts) + len(request.texts) > 0, "prompts", "set at least one prompt or text")
        prompts = [self._prompt_ids(i, p) for i, p in enumerate(request.prompts)]
        texts = [self.backend.encode(t, add_special_tokens=False) if t else [] for t in request.texts]
        return generator_pb2.TokenizeResponse(prompts=[generator_pb2.TokenIds(token_ids=ids) for ids in prompts],
                                              texts=[generator_pb2.TokenIds(token_ids=ids) for ids in texts])

    async def GetModelInfo(self, request, context) -> generator_pb2.GetModelInfoResponse:
        info, stats = self.backend.info, self.backend.stats()
        return generator_pb2.GetModelInfoResponse(
            model=info.model, backend=info.backend, policy_version=self.backend.version,
            max_model_len=info.max_model_len, vocab_size=info.vocab_size,
            pending_requests=stats["pending_requests"], eos_token_ids=info.eos_token_ids,
            engine_steps=stats["engine_steps"], generated_tokens=stats["generated_tokens"],
        )


_OPEN: list[tuple[Backend, str | None]] = []  # backends to close, with the tiny model's temp dir


def build_backend(cfg: GeneratorConfig) -> tuple[Backend, str | None]:
    """Loads the model named by `cfg` (or builds the tiny one) into the configured backend.

    Raises:
        ModelNotFoundError: model_path does not exist or lacks config.json (names the path).
    """
    tmp = None
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if cfg.tiny_model:
        tmp = tempfile.mkdtemp(prefix="forgerpc-tiny-model-")
        path = str(make_tiny_model(tmp, arch=cfg.tiny_arch, initializer_range=0.1))  # varied text, see models.py
    else:
        path = str(check_model_dir(cfg.model_path))
    if cfg.backend == "vllm":
        from forgerpc.services.generator.backends.vllm_backend import VLLMBackend

        return VLLMBackend(path, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
                           max_model_len=cfg.max_model_len), tmp
    from forgerpc.services.generator.backends.torch_engine import TorchEngine

    backend = TorchEngine(path, dtype=cfg.dtype, device=cfg.device, max_batch_size=cfg.max_batch_size,
                          max_queue=cfg.max_queue, max_model_len=cfg.max_model_len)
    return backend, tmp


async def create(cfg: GeneratorConfig):
    backend, tmp = build_backend(cfg)
    backend.start()
    _OPEN.append((backend, tmp))
    log.info("generator: %s backend on %s (context %d, batch %d)", cfg.backend, backend.info.model,
             backend.info.max_model_len, cfg.max_batch_size)
    return [GeneratorServicer(cfg, backend)]


async def close():
    while _OPEN:
        backend, tmp = _OPEN.pop()
        await backend.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


SERVICE = ServiceDefinition(name="generator", config_model=GeneratorConfig, create=create, close=close)
