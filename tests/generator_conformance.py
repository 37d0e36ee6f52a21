"""GeneratorService conformance: the same tests for every backend, each against a real server.

A test module runs them for one backend by defining a `backend` fixture and importing this
module's tests and fixtures (pytest collects what a test module's namespace holds):

    from generator_conformance import *  # noqa: F403

    @pytest.fixture(scope="module")
    def backend():
        return "torch"

test_generator_service.py runs them for `torch` (main venv), test_generator_vllm.py for `vllm`
(.venv-vllm, `make test-vllm`). One server process per module, started with a real weight
store process as its configured `weight_store_address`. The model is a tiny random Llama with
head_dim 32 (vLLM's CPU attention takes head sizes 32, 64, 80, ...; make_tiny_model's default
16 is refused). Two seeds of it stand for two policy versions; every completion is checked
against HF under the weights its `policy_version` names. The tests run in file order: the
weight-update tests come last and move the server's version forward.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys

import grpc
import psutil
import pytest
import torch

from conftest import ServiceProcess
from forgerpc.clients import ForgeRPCError, GeneratorClient, RetryPolicy, WeightStoreClient
from forgerpc.clients.weights import publish
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.v1 import common_pb2, generator_pb2
from forgerpc.v1.common_pb2 import ChatMessage, Prompt, SamplingParams

NO_RETRY = RetryPolicy(max_attempts=1)
TINY = dict(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256, initializer_range=0.1)
PROMPTS = ["policy test: ", "hello world", "abc"]
# |logprob - fresh forward pass| per backend: ours samples from the same fp32 logits HF computes;
# vLLM's kernels sum in another order
LOGPROB_ATOL = {"torch": 1e-4, "vllm": 1e-3}


class GeneratorProcess:
    """`forgerpc serve generator` with stderr (vLLM's logs) in a file, not a pipe nobody drains."""

    def __init__(self, log: pathlib.Path, *overrides: str):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_LOGGING_LEVEL": "WARNING"}
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forgerpc.services", "serve", "generator", "--port", "0", *overrides],
                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        line = ""
        for line in iter(self.proc.stdout.readline, ""):  # until the READY line, or EOF on a crash
            if line.startswith("FORGERPC_READY"):
                break
        if not line.startswith("FORGERPC_READY"):
            self.stop()
            raise RuntimeError(f"generator did not start: {line!r}\n{log.read_text()[-4000:]}")
        self.address = line.split()[2]
        self.children = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generator")
    return {seed: make_tiny_model(root / f"seed{seed}", seed=seed, **TINY) for seed in (0, 1)} | {
        "other_shape": make_tiny_model(root / "wide", hidden_size=64, num_heads=2, num_kv_heads=1)}


@pytest.fixture(scope="module")
def hf(dirs):
    """hf[seed] = (model, tokenizer) in float32; seed 0 is version 0."""
    return {seed: load_model(dirs[seed]) for seed in (0, 1)}


@pytest.fixture(scope="module")
def store():
    proc = ServiceProcess("weight_store")
    yield proc
    try:
        proc.terminate()  # SIGTERM: the store unlinks its segments; SIGKILL would leave them in /dev/shm
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def server(backend, dirs, store, tmp_path_factory):
    srv = GeneratorProcess(tmp_path_factory.mktemp("logs") / "generator.log", f"backend={backend}",
                           f"model_path={dirs[0]}", "dtype=float32", "max_batch_size=16", "max_queue=64",
                           "max_n=4", f"weight_store_address={store.address}")
    yield srv
    srv.stop()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """HF greedy decoding that neither stops at EOS nor suppresses it (what ignore_eos means;
    min_new_tokens would instead mask EOS out of the argmax)."""
    saved, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = saved
    return out[0, len(ids):].tolist()


def hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T)[token] at each generated position, from one fresh forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def is_greedy(model, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
    """Whether each completion is the greedy continuation of its prompt: one teacher-forced forward
    pass over prompt + completion, argmax at every position must be the next token. This is what
    HF `generate(do_sample=False)` computes, in one batched pass instead of one per token."""
    rows = [p + c for p, c in pairs]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        argmax = model(ids, attention_mask=mask).logits.argmax(-1)
    return [argmax[i, len(p) - 1: len(p) + len(c) - 1].tolist() == c for i, (p, c) in enumerate(pairs)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=True, **kw)


# -- generation ---------------------------------------------------------------------------------

async def test_model_info(server, hf, backend):
    model, tokenizer = hf[0]
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        info = await gen.get_model_info()
    assert info.backend == backend and info.max_model_len == model.config.max_position_embeddings == 512
    assert info.vocab_size == model.config.vocab_size and list(info.eos_token_ids) == [tokenizer.eos_token_id]
    assert info.policy_version == 0


async def test_greedy_matches_hf_generate_token_for_token_with_logprobs(server, hf, backend):
    model, tokenizer = hf[0]
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        out = await gen.generate(prompts=[Prompt(text=t, prompt_id=str(i)) for i, t in enumerate(PROMPTS)],
                                 sampling_params=greedy(24))
        info = await gen.get_model_info()
    assert [c.prompt_id for c in out.completions] == ["0", "1", "2"]
    for c, text in zip(out.completions, PROMPTS):
        ids = tokenizer.encode(text)
        assert list(c.prompt_token_ids) == ids
        assert list(c.token_ids) == hf_greedy(model, ids, 24), text
        assert c.finish_reason == common_pb2.FINISH_REASON_LENGTH and c.policy_version == 0
        assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
        # greedy logprobs are those of the T=1 policy
        torch.testing.assert_close(torch.tensor(list(c.logprobs)), hf_logprobs(model, ids, list(c.token_ids)),
                                   atol=LOGPROB_ATOL[backend], rtol=0)
    assert info.engine_steps > 0 and info.generated_tokens >= 72


async def test_32_concurrent_requests_batch_continuously_and_each_is_correct(server, hf):
    model, tokenizer = hf[0]
    lengths = [5 + (7 * i) % 41 for i in range(32)]  # 5..45 new tokens, all different mixes
    texts = [f"request {i}: " + "ab" * (i % 5) for i in range(32)]
    async with GeneratorClient(server.address, retry=NO_RETRY, timeout=300) as gen:
        before = (await gen.get_model_info()).engine_steps
        responses = await asyncio.gather(*(
            gen.generate(prompts=[Prompt(text=t, prompt_id=str(i))],
                         sampling_params=SamplingParams(max_tokens=n, ignore_eos=True, logprobs=True))
            for i, (t, n) in enumerate(zip(texts, lengths))))
        steps = (await gen.get_model_info()).engine_steps - before
    completions = [r.completions[0] for r in responses]
    correct = is_greedy(model, [(list(c.prompt_token_ids), list(c.token_ids)) for c in completions])
    for i, (c, text, n) in enumerate(zip(completions, texts, lengths)):
        assert c.prompt_id == str(i) and list(c.prompt_token_ids) == tokenizer.encode(text)
        assert correct[i], f"request {i} is not the greedy continuation of its prompt"
        assert c.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(c.logprobs) == n
        assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
    one_by_one = sum(lengths)  # alone, a request costs 1 prefill + (n - 1) decode steps
    assert steps < one_by_one / 3, f"{steps} engine steps for 32 concurrent requests vs {one_by_one} one by one"


async def test_n_seeded_samples_are_reproducible_and_their_logprobs_are_the_sampled_distribution(
        server, hf, backend):
    model, tokenizer = hf[0]
    params = SamplingParams(max_tokens=16, temperature=0.8, n=4, seed=7, logprobs=True, ignore_eos=True)
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        a, b = await asyncio.gather(*(gen.generate(prompts=[Prompt(text=PROMPTS[0])], sampling_params=params)
                                      for _ in range(2)))
        # greedy with n > 1: n identical samples (vLLM itself refuses n > 1 with greedy)
        pair = (await gen.generate(prompts=[Prompt(text="x")], sampling_params=greedy(3, n=2))).completions
    assert [c.index for c in a.completions] == [0, 1, 2, 3]
    samples = [list(c.token_ids) for c in a.completions]
    assert samples == [list(c.token_ids) for c in b.completions]  # same seed -> same samples
    assert len({tuple(s) for s in samples}) > 1  # seed + index: the n samples differ
    ids = tokenizer.encode(PROMPTS[0])
    for c in a.completions:
        expected = hf_logprobs(model, ids, list(c.token_ids), temperature=0.8)
        torch.testing.assert_close(torch.tensor(list(c.logprobs)), expected, atol=LOGPROB_ATOL[backend], rtol=0)
    assert [c.index for c in pair] == [0, 1] and pair[0].token_ids == pair[1].token_ids and len(pair[0].token_ids) == 3


async def test_chat_prompt_uses_the_chat_template(server, hf):
    _, tokenizer = hf[0]
    messages = [ChatMessage(role="user", content="What is 2+2?")]
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        out = await gen.generate(prompts=[Prompt(messages=messages, prompt_id="chat")],
                                 sampling_params=SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=3))
    want = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                         add_generation_prompt=True, tokenize=True)["input_ids"]
    assert [c.index for c in out.completions] == [0, 1, 2]
    for c in out.completions:
        assert list(c.prompt_token_ids) == list(want) and c.prompt_id == "chat"
        assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == 0  # logprobs only when asked


async def test_stop_strings_and_stop_token_ids(server, hf):
    model, tokenizer = hf[0]
    ids = tokenizer.encode(PROMPTS[1])
    tokens = hf_greedy(model, ids, 24)
    text = tokenizer.decode(tokens)
    cut = next(i for i in range(3, len(text)) if text[i] not in text[:i])  # first fresh char after 3
    assert len(text) == len(tokens), "the char tokenizer maps one token to one character"
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        by_string = (await gen.generate(prompts=[Prompt(text=PROMPTS[1])],
                                        sampling_params=greedy(24, stop=[text[cut]]))).completions[0]
        by_id = (await gen.generate(prompts=[Prompt(text=PROMPTS[1])],
                                    sampling_params=greedy(24, stop_token_ids=[tokens[cut]]))).completions[0]
    assert by_string.text == text[:cut] and by_string.finish_reason == common_pb2.FINISH_REASON_STOP
    # the token that spelled the stop string was generated, so ids and logprobs keep it
    assert list(by_string.token_ids) == tokens[:cut + 1] and len(by_string.logprobs) == cut + 1
    assert list(by_id.token_ids) == tokens[:cut + 1] and by_id.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_tokenize_matches_what_generate_sees(server, hf):
    _, tokenizer = hf[0]
    chat = [ChatMessage(role="user", content="hi there")]
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        out = await gen.tokenize(prompts=[Prompt(text="abc"), Prompt(messages=chat), Prompt(token_ids=[5, 6])],
                                 texts=["a target\n", ""])
        done = await gen.generate(prompts=[Prompt(messages=chat)], sampling_params=SamplingParams(max_tokens=2))
        with pytest.raises(ForgeRPCError) as err:
            await gen.tokenize(prompts=[Prompt(token_ids=[1, 10_000])])
    assert [list(p.token_ids) for p in out.prompts] == [
        tokenizer.encode("abc"),
        tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                      tokenize=True)["input_ids"],
        [5, 6]]
    assert list(out.prompts[1].token_ids) == list(done.completions[0].prompt_token_ids)
    assert [list(t.token_ids) for t in out.texts] == [tokenizer.encode("a target\n", add_special_tokens=False), []]
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details["field"] == "prompts[0].token_ids[1]"


# -- bad input and limits -----------------------------------------------------------------------

BAD = [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=0)), "sampling_params.max_tokens"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=-3)), "sampling_params.max_tokens"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, n=5)), "sampling_params.n"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, temperature=-1)),
     "sampling_params.temperature"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, top_p=1.5)),
     "sampling_params.top_p"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, stop_token_ids=[5, 10**6])),
     "sampling_params.stop_token_ids[1]"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, stop=[""])),
     "sampling_params.stop[0]"),
    (dict(prompts=[Prompt(text="ok"), Prompt(token_ids=[4, -1])], sampling_params=SamplingParams(max_tokens=4)),
     "prompts[1].token_ids[1]"),
    (dict(prompts=[Prompt(text="x" * 600)], sampling_params=SamplingParams(max_tokens=4)), "prompts[0]"),
    (dict(prompts=[Prompt(prompt_id="empty")], sampling_params=SamplingParams(max_tokens=4)), "prompts[0]"),
    (dict(prompts=[Prompt(messages=[ChatMessage(content="no role")])], sampling_params=SamplingParams(max_tokens=4)),
     "prompts[0].messages[0].role"),
    (dict(prompts=[Prompt(text="a")] * 17, sampling_params=SamplingParams(max_tokens=4, n=4)), "prompts"),
]


@pytest.mark.parametrize("fields, field", BAD, ids=[f for _, f in BAD])
async def test_bad_input_is_invalid_argument_naming_the_field(server, fields, field):
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        with pytest.raises(ForgeRPCError) as err:
            await gen.generate(**fields)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.get("field") == field, err.value.message


async def test_non_utf8_text_is_invalid_argument(server):
    # GenerateRequest{prompts: [Prompt{text: b"\xff"}]} written by hand: protobuf strings must be UTF-8
    body = b"\x0a\x03" + b"\x0a\x01\xff"
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/forgerpc.v1.GeneratorService/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(body, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_full_queue_is_resource_exhausted_and_the_server_recovers(server):
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    async with GeneratorClient(server.address, retry=NO_RETRY, timeout=300) as gen:
        # 64 sequences: 16 run, 48 wait; the queue (max_queue=64) cannot take 33 more
        first = asyncio.create_task(gen.generate(prompts=[Prompt(text=f"q{i}") for i in range(64)],
                                                 sampling_params=long))
        for _ in range(500):
            if (await gen.get_model_info()).pending_requests >= 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ForgeRPCError) as err:
            await gen.generate(prompts=[Prompt(text=f"r{i}") for i in range(33)], sampling_params=long)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "QUEUE_FULL"
        assert len((await first).completions) == 64
        ok = await gen.generate(prompts=[Prompt(text="after")], sampling_params=SamplingParams(max_tokens=3))
        assert len(ok.completions[0].token_ids) >= 1


# -- weight updates (these move the version forward: keep them last) ---------------------------

@pytest.fixture(scope="module")
def refs(hf):
    """refs[seed](tokens): whether `tokens` is the greedy continuation of PROMPTS[0] under the
    seed's weights (teacher-forced: argmax at each position must be the next token)."""
    ids = hf[0][1].encode(PROMPTS[0])
    checks = {seed: (lambda tokens, model=hf[seed][0]: is_greedy(model, [(ids, list(tokens))])[0]) for seed in (0, 1)}
    first = hf_greedy(hf[0][0], ids, 10)  # the tests mean something only if the two disagree early
    assert checks[0](first) and not checks[1](first)
    return checks


def request(max_tokens: int) -> dict:
    return dict(prompts=[Prompt(text=PROMPTS[0])], sampling_params=SamplingParams(max_tokens=max_tokens,
                                                                                   ignore_eos=True))


async def test_update_mid_stream_every_completion_matches_its_version(server, dirs, refs):
    """Greedy completions stream from 4 callers before, during and after UpdateWeights(1) (version
    1 = the seed-1 weights); each must be the greedy continuation under its version's weights."""
    results: list[common_pb2.Completion] = []
    updated = asyncio.Event()
    async with GeneratorClient(server.address, retry=NO_RETRY, timeout=300) as gen:
        async def stream(worker: int):
            after = 0
            while after < 3:
                results.append((await gen.generate(**request(20 + 5 * worker))).completions[0])
                after += updated.is_set()

        workers = [asyncio.create_task(stream(w)) for w in range(4)]
        while len(results) < 6:
            await asyncio.sleep(0.01)
        reply = await gen.update_weights(version=1, local_path=str(dirs[1]))
        updated.set()
        await asyncio.gather(*workers)
        assert reply.version == 1 and reply.seconds > 0 and (await gen.get_model_info()).policy_version == 1
    assert {c.policy_version for c in results} == {0, 1}
    for c in results:
        assert refs[c.policy_version](c.token_ids), (
            f"completion tagged version {c.policy_version} was not generated by those weights")


async def test_abort_in_flight_then_version_rules(server, dirs, refs):
    async with GeneratorClient(server.address, retry=NO_RETRY, timeout=300) as gen:
        info = await gen.get_model_info()
        assert info.policy_version == 1, "runs after the mid-stream update test"
        running = asyncio.create_task(gen.generate(**request(400)))
        while (await gen.get_model_info()).engine_steps < info.engine_steps + 5:
            await asyncio.sleep(0.01)
        reply = await gen.update_weights(version=2, local_path=str(dirs[0]),
                                         in_flight_policy=generator_pb2.IN_FLIGHT_POLICY_ABORT)
        assert reply.version == 2 and reply.aborted_requests == 1
        (cut,) = (await running).completions
        assert cut.finish_reason == common_pb2.FINISH_REASON_ABORTED and cut.policy_version == 1
        assert len(cut.token_ids) < 400 and refs[1](cut.token_ids)
        (fresh,) = (await gen.generate(**request(20))).completions
        assert fresh.policy_version == 2 and refs[0](fresh.token_ids) and not refs[1](fresh.token_ids)

        with pytest.raises(ForgeRPCError) as err:
            await gen.update_weights(version=1, local_path=str(dirs[1]))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == "VERSION_TOO_OLD"
        same = await gen.update_weights(version=2, local_path=str(dirs[1]))  # no-op: nothing is read
        assert same.version == 2 and same.seconds == 0
        for path, problem in [(dirs[0] / "missing", "no *.safetensors"), (dirs["other_shape"], "shape")]:
            with pytest.raises(ForgeRPCError) as err:
                await gen.update_weights(version=3, local_path=str(path))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.details["field"] == "local_path"
            assert problem in err.value.message
        (still,) = (await gen.generate(**request(20))).completions
        assert still.policy_version == 2 and refs[0](still.token_ids)


async def test_concurrent_updates_are_serialized(server, dirs, refs):
    async with GeneratorClient(server.address, retry=NO_RETRY, timeout=300) as gen:
        traffic = [asyncio.create_task(gen.generate(**request(30))) for _ in range(6)]
        results = await asyncio.gather(gen.update_weights(version=3, local_path=str(dirs[1])),
                                       gen.update_weights(version=4, local_path=str(dirs[0])),
                                       return_exceptions=True)
        for r in results:  # 3 either lands first or, arriving after 4, is refused as older
            assert not isinstance(r, Exception) or r.code == grpc.StatusCode.FAILED_PRECONDITION, r
        assert (await gen.get_model_info()).policy_version == 4
        for done in await asyncio.gather(*traffic):
            c = done.completions[0]
            assert refs[1 if c.policy_version in (1, 3) else 0](c.token_ids)
        (after,) = (await gen.generate(**request(20))).completions
        assert after.policy_version == 4 and refs[0](after.token_ids)


async def test_update_pulls_the_version_from_the_weight_store(server, store, hf, dirs, refs):
    """The trainer's side: publish HF-named float32 tensors to the store process; UpdateWeights
    without local_path pulls them from the generator's configured store."""
    state = {n: t.float() for n, t in hf[1][0].state_dict().items()}  # the seed-1 weights
    wide, _ = load_model(dirs["other_shape"])
    async with WeightStoreClient(store.address) as ws:
        await publish(ws, state, 10, producer="test-trainer")
        await publish(ws, wide.state_dict(), 12, producer="test-trainer")
    async with GeneratorClient(server.address, retry=NO_RETRY, timeout=300) as gen:
        running = asyncio.create_task(gen.generate(**request(30)))
        reply = await gen.update_weights(version=10)
        assert reply.version == 10 and reply.seconds > 0
        (before,) = (await running).completions
        assert refs[{4: 0, 10: 1}[before.policy_version]](before.token_ids)
        (after,) = (await gen.generate(**request(20))).completions
        assert after.policy_version == 10 and refs[1](after.token_ids) and not refs[0](after.token_ids)

        with pytest.raises(ForgeRPCError) as missing:  # never published: the store's NOT_FOUND
            await gen.update_weights(version=11)
        with pytest.raises(ForgeRPCError) as wrong_shape:
            await gen.update_weights(version=12)
        with pytest.raises(ForgeRPCError) as nobody:  # the request's address wins over the config's
            await gen.update_weights(version=11, weight_store_address="127.0.0.1:1")
        (still,) = (await gen.generate(**request(20))).completions
    assert missing.value.code == grpc.StatusCode.NOT_FOUND, missing.value
    assert wrong_shape.value.code == grpc.StatusCode.INVALID_ARGUMENT and wrong_shape.value.details["field"] == "version"
    assert "shape" in wrong_shape.value.message
    assert nobody.value.code == grpc.StatusCode.UNAVAILABLE and "127.0.0.1:1" in nobody.value.message
    assert still.policy_version == 10 and refs[1](still.token_ids)
