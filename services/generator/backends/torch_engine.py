"""The torch backend: continuous batching over HF causal LMs with a slot-indexed KV cache.

One asyncio task (the engine loop) owns the batch. Each iteration is one engine step:

    drop cancelled / aborted sequences -> admit waiting prompts into free slots (prefill,
    shared by the n samples of a prompt) -> one decode forward for every running sequence ->
    finished sequences leave (their slots are refilled by compaction)

so requests that arrive while a batch runs join at the next step. The forward passes run in one
worker thread, so the gRPC event loop stays responsive. Weight updates pause admission, let the
running sequences finish (or abort them), write the new tensors into the model and resume; every
completion carries the version that generated all of its tokens. The new tensors are read before
the pause, while generation goes on (safetensors files; a weight-store version of at most
`stage_weights_mb`, pulled into a side copy kept between updates), so generation stops only for
the drain and one in-memory copy. A larger store version is pulled straight into the parameters
(no second copy of the model), and generation stops for the transfer; a pull that fails midway
then leaves the weights partly written: Generate answers FAILED_PRECONDITION (WEIGHTS_INCOMPLETE)
until an update succeeds, rather than sample from a mix of two versions.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time

import grpc
import torch

from forgerpc.services.common.errors import ServiceError, failed_precondition, resource_exhausted
from forgerpc.services.common.models import load_model
from forgerpc.services.generator.backends import (
    FINISH_ABORTED, FINISH_LENGTH, FINISH_STOP, ModelInfo, Output, Sampling, WeightSource,
)
from forgerpc.services.generator.backends.torch_forward import SlotKVForward
from forgerpc.services.generator.backends.torch_sampling import BatchParams, sample

log = logging.getLogger("forgerpc.generator.torch")

# Longest run of decode steps per hop to the worker thread; bounds how late a finished request
# is returned and a cancelled one is dropped.
MAX_BURST_SECONDS = 0.02


@dataclasses.dataclass(eq=False)
class _Group:
    """One prompt of a Generate call and its n samples; `future` resolves to n Outputs."""

    request: object  # identifies the Generate call, to count aborted requests
    prompt_id: str
    prompt_ids: list[int]
    sampling: Sampling
    future: asyncio.Future
    position: int  # index of the prompt in its request, mixed into per-sample seeds
    version: int = 0
    seqs: list["_Seq"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Seq:
    group: _Group
    index: int
    slot: int
    max_new: int
    generator: torch.Generator | None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    length: int = 0  # positions in the KV cache; the last token of `tokens` is not among them
    finish: str | None = None
    text: str | None = None  # set when a stop string cut it


class TorchEngine:
    """Backend "torch" (see backends.Backend)."""

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str = "cpu",
                 max_batch_size: int = 64, max_queue: int = 4096, max_model_len: int = 0,
                 stage_weights_mb: int = 1024):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model, self.tokenizer = load_model(model_path, dtype=getattr(torch, dtype), device=device)
        config = self.model.config
        window = config.max_position_embeddings
        self.max_model_len = min(window, max_model_len) if max_model_len > 0 else window
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        # a tied lm_head is the embedding: an update may carry it or not, and it is never written
        tied = frozenset({"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else ())
        shapes = {n: tuple(t.shape) for n, t in self.model.state_dict().items() if n not in tied}
        self.info = ModelInfo(model=str(model_path), backend="torch", max_model_len=self.max_model_len,
                              vocab_size=config.vocab_size, eos_token_ids=tuple(sorted(eos)), shapes=shapes,
                              tied=tied)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        weight_bytes = sum(t.numel() * t.element_size() for n, t in self.model.state_dict().items() if n not in tied)
        self._stage = weight_bytes <= stage_weights_mb << 20
        self._staging: dict[str, torch.Tensor] | None = None  # the side copy, allocated at the first pull
        self.forward = SlotKVForward(self.model, max_batch_size, self.max_model_len)
        self.version = 0
        self.steps = 0  # forward passes (prefill or decode), for the continuous batching test
        self.generated_tokens = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torch-engine")
        self.device = torch.device(device)
        # sampling noise is drawn where the logits live; seeded rows get their own generators
        self._rng = torch.Generator(self.device).manual_seed(int(time.time_ns() % 2**62))
        self._waiting: collections.deque[_Group] = collections.deque()
        self._waiting_seqs = 0
        self._running: list[_Seq] = []  # sequence i lives in cache slot i
        self._params: BatchParams | None = None  # cached for the running batch; None = rebuild
        self._inflight = 0
        self._aborted_requests = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._paused = False
        self._abort = False
        self._torn: str | None = None  # why the weights are partly written, after a failed pull
        self._task: asyncio.Task | None = None

    # -- public interface ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def stats(self) -> dict[str, int]:
        return {"pending_requests": self._inflight, "engine_steps": self.steps,
                "generated_tokens": self.generated_tokens}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="torch-engine-loop")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def generate(self, prompts: list[tuple[str, list[int]]], sampling: Sampling) -> list[Output]:
        if self._torn is not None:
            raise self._torn_error()
        total = len(prompts) * sampling.n
        if self._waiting_seqs + total > self.max_queue:
            raise resource_exhausted("QUEUE_FULL", f"generator queue is full ({self._waiting_seqs} sequences "
                                     f"waiting, max_queue={self.max_queue}); retry later or add replicas")
        loop = asyncio.get_running_loop()
        request = object()
        groups = [_Group(request, pid, ids, sampling, loop.create_future(), i) for i, (pid, ids) in enumerate(prompts)]
        self._waiting.extend(groups)
        self._waiting_seqs += total
        self._inflight += 1
        self._wake.set()
        try:
            results = await asyncio.gather(*(g.future for g in groups))
        finally:
            self._inflight -= 1
        return [out for outs in results for out in outs]

    async def update_weights(self, version: int, source: WeightSource, abort: bool) -> int:
        # files, and a store version small enough to stage, are read before pausing (see the docstring)
        if source.files:
            state = await asyncio.to_thread(self._read_files, source.files)
        elif self._stage:
            if self._staging is None:  # the side copy: allocated once, reused by every update
                self._staging = {n: torch.empty_like(t) for n, t in self._targets().items()}
            state = await self._pull(source.store, version, self._staging)
        else:
            state = None
        aborted_before = self._aborted_requests
        self._paused, self._abort = True, abort
        self._idle.clear()
        self._wake.set()
        pulling = False
        try:
            await self._idle.wait()  # the loop sets it once no sequence runs
            if state is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._swap, state)
            else:
                pulling = True
                await self._pull(source.store, version, self._targets())
            self.version, self._torn = version, None
        except BaseException as e:  # cancellation too: the caller's deadline can cut a pull short
            if pulling:  # a pull that failed midway may have overwritten some parameters
                self._torn = f"loading version {version} failed midway ({type(e).__name__})"
                self._fail_waiting()
            raise
        finally:
            self._abort = False
            self._paused = self._torn is not None
            self._wake.set()
        return self._aborted_requests - aborted_before

    # -- weights ---------------------------------------------------------------------------

    def _targets(self) -> dict[str, torch.Tensor]:
        """The model's tensors an update writes, by HF name (state_dict shares their storage)."""
        return {n: t for n, t in self.model.state_dict().items() if n not in self.info.tied}

    async def _pull(self, store, version: int, into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pulls the version into `into` (the parameters, or the side copy of their names and shapes)."""
        from forgerpc.clients.weights import load_into

        tied = self.info.tied
        await load_into(store, into, version, name_map=lambda n: None if n in tied else n)
        return into

    def _read_files(self, files) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state

    @torch.inference_mode()
    def _swap(self, state: dict[str, torch.Tensor]) -> None:
        target = self._targets()
        for name, tensor in state.items():
            if name in target:  # the server checked the names; tied ones are skipped
                target[name].copy_(tensor)
        # nothing runs now, so the cache holds nothing live; the slots are simply reused

    def _fail_waiting(self) -> None:
        """Fails the queued requests: the weights are torn, so none of them may run."""
        error = self._torn_error()
        while self._waiting:
            group = self._waiting.popleft()
            self._waiting_seqs -= group.sampling.n
            if not group.future.done():
                group.future.set_exception(error)

    def _torn_error(self) -> ServiceError:
        return failed_precondition("WEIGHTS_INCOMPLETE", f"{self._torn}: the weights are partly written, so "
                                   "generation is stopped until an UpdateWeights succeeds")

    # -- the engine loop -------------------------------------------------------------------

    def _admissible(self) -> list[_Group]:
        """Pops waiting groups, in arrival order, while their n samples fit in free slots."""
        free = self.max_batch_size - len(self._running)
        taken = []
        while self._waiting:
            group = self._waiting[0]
            if group.future.done():  # caller went away while queued
                self._waiting.popleft()
                self._waiting_seqs -= group.sampling.n
                continue
            if group.sampling.n > free:
                break
            self._waiting.popleft()
            self._waiting_seqs -= group.sampling.n
            free -= group.sampling.n
            group.version = self.version
            taken.append(group)
        return taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            admit = [] if self._paused else self._admissible()
            abort, self._abort = self._abort, False
            drop = {s.group for s in self._running if s.group.future.done()}
            if not self._running and not admit:
                if self._paused:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                done = await loop.run_in_executor(self._executor, self._step, admit, abort, drop)
            except Exception as exc:  # noqa: BLE001 - fail this batch's callers, keep serving
                log.exception("engine step failed")
                error = ServiceError(grpc.StatusCode.INTERNAL, "ENGINE_STEP_FAILED",
                                     f"generation failed: {type(exc).__name__}")
                done = {s.group for s in self._running} | set(admit)
                self._running, self._params = [], None
                for group in done:
                    if not group.future.done():
                        group.future.set_exception(error)
                continue
            for group in done:
                if not group.future.done():
                    group.future.set_result([self._output(s) for s in group.seqs])

    def _output(self, seq: _Seq) -> Output:
        g = seq.group
        text = seq.text if seq.text is not None else self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        return Output(g.prompt_id, seq.index, g.prompt_ids, seq.tokens, text,
                      seq.logprobs if g.sampling.logprobs else [], seq.finish, g.version)

    def _step(self, admit: list[_Group], abort: bool, drop: set[_Group]) -> list[_Group]:
        """One engine step, in the worker thread. Returns the groups whose samples all finished."""
        finished: list[_Seq] = []
        if abort:
            self._aborted_requests += len({s.group.request for s in self._running})
            for seq in self._running:
                seq.finish = FINISH_ABORTED
            finished += self._running
            self._retire(self._running)
        if drop:
            self._retire([s for s in self._running if s.group in drop])
        if admit:
            new = self._prefill(admit)
            finished += self._retire([s for s in new if s.finish])
        # Decode until a waiting request could take a free slot, an update wants the batch, or
        # the burst ends: one thread hop serves several steps, and finished sequences leave the
        # batch at once (their callers hear at the end of the burst).
        deadline = time.perf_counter() + MAX_BURST_SECONDS
        while self._running:
            self._decode()
            leaving = [s for s in self._running if s.finish]
            if leaving:
                finished += self._retire(leaving)
            free = len(self._running) < self.max_batch_size
            if (self._waiting and free) or self._paused or self._abort or time.perf_counter() > deadline:
                break
        groups = {s.group for s in finished}
        return [g for g in groups if all(s.finish for s in g.seqs)]

    def _retire(self, leaving: list[_Seq]) -> list[_Seq]:
        """Removes sequences from the batch, moving tail sequences into the freed slots."""
        if not leaving:
            return leaving
        gone = set(leaving)
        keep = [s for s in self._running if s not in gone]
        holes = sorted(s.slot for s in leaving if s.slot < len(keep))
        movers = [s for s in keep if s.slot >= len(keep)]
        if movers:
            self.forward.move_slots([s.slot for s in movers], holes, max(s.length for s in movers))
        for hole, seq in zip(holes, movers):
            seq.slot = hole
        self._running = sorted(keep, key=lambda s: s.slot)
        self._params = None
        return list(leaving)

    def _prefill(self, groups: list[_Group]) -> list[_Seq]:
        """Prefills each prompt once, writing its K/V into the slots of all its n samples,
        and samples every sequence's first token from the shared last-position logits."""
        slot = len(self._running)
        first_slots, new = [], []
        for g in groups:
            p = g.sampling
            first_slots.append(slot)
            max_new = min(p.max_tokens, self.max_model_len - len(g.prompt_ids))
            for i in range(p.n):
                # seeded samples: one generator per (seed, prompt position, sample index), so the
                # prompts of a request and the n samples of a prompt all draw different noise
                gen = None if p.seed is None else torch.Generator(self.device).manual_seed(
                    (p.seed * 1_000_003 + g.position * 1_009 + i) % 2**63)
                g.seqs.append(_Seq(g, i, slot, max_new, gen, length=len(g.prompt_ids)))
                slot += 1
            new += g.seqs
        self.forward.ensure_capacity(max(len(g.prompt_ids) + s.max_new for g in groups for s in g.seqs))
        logits = self.forward.prefill([g.prompt_ids for g in groups], first_slots, [g.sampling.n for g in groups])
        self.steps += 1
        logits = logits.repeat_interleave(torch.tensor([g.sampling.n for g in groups], device=self.device), dim=0)
        tokens, logprobs = sample(logits, self._batch_params(new), self._rng)
        self._running += new
        self._params = None
        self._accept(new, tokens.tolist(), logprobs.tolist())
        return new

    def _decode(self) -> None:
        running = self._running
        positions = [s.length for s in running]
        tokens = torch.tensor([s.tokens[-1] for s in running], device=self.device)
        longest = max(positions)
        logits = self.forward.decode(tokens, torch.tensor(positions, device=self.device), longest + 1,
                                     uniform=min(positions) == longest)
        self.steps += 1
        for s in running:
            s.length += 1
        if self._params is None:
            self._params = self._batch_params(running)
        next_tokens, logprobs = sample(logits, self._params, self._rng)
        self._accept(running, next_tokens.tolist(), logprobs.tolist())

    def _batch_params(self, seqs: list[_Seq]) -> BatchParams:
        return BatchParams.build([(s.group.sampling.temperature, s.group.sampling.top_k,
                                   s.group.sampling.top_p, s.generator) for s in seqs], self.device)

    def _accept(self, seqs: list[_Seq], tokens: list[int], logprobs: list[float]) -> None:
        """Appends each sequence's new token and decides whether it is done."""
        eos = self.info.eos_token_ids
        self.generated_tokens += len(seqs)
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            p = seq.group.sampling
            if token in p.stop_token_ids or (not p.ignore_eos and token in eos):
                seq.finish = FINISH_STOP
            elif p.stop and self._hit_stop_string(seq):
                seq.finish = FINISH_STOP
            elif len(seq.tokens) >= seq.max_new:
                seq.finish = FINISH_LENGTH

    def _hit_stop_string(self, seq: _Seq) -> bool:
        """Checks the decoded tail for a stop string; on a hit, cuts the text before it.

        Token ids and logprobs keep the tokens that spelled the stop string: the policy did
        generate them, and the trainer needs ids and logprobs aligned.
        """
        stops = seq.group.sampling.stop
        window = max(len(s) for s in stops) + 2
        tail = self.tokenizer.decode(seq.tokens[-window:], skip_special_tokens=True)
        if not any(s in tail for s in stops):
            return False
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        seq.text = text[: min(cuts)] if cuts else text
        return True
