"""GeneratorService as a real process: continuous batching over gRPC, bad input, queue limits,
start-up errors. Weight updates are in test_generator_weights.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
import torch

from conftest import ServiceProcess
from forgerpc.clients import ForgeRPCError, GeneratorClient, RetryPolicy
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.v1 import common_pb2
from forgerpc.v1.common_pb2 import ChatMessage, Prompt, SamplingParams

NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("generator") / "tiny", initializer_range=0.1)


@pytest.fixture(scope="module")
def server(tiny_dir):
    proc = ServiceProcess("generator", f"model_path={tiny_dir}", "max_batch_size=32", "max_queue=64", "max_n=4")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def hf(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    return model, tokenizer


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


async def test_32_concurrent_requests_batch_continuously_and_each_is_correct(server, hf):
    model, tokenizer = hf
    lengths = [5 + (7 * i) % 41 for i in range(32)]  # 5..45 new tokens, all different mixes
    texts = [f"request {i}: " + "ab" * (i % 5) for i in range(32)]
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        before = (await gen.get_model_info()).engine_steps
        responses = await asyncio.gather(*(
            gen.generate(prompts=[Prompt(text=t, prompt_id=str(i))],
                         sampling_params=SamplingParams(max_tokens=n, ignore_eos=True, logprobs=True))
            for i, (t, n) in enumerate(zip(texts, lengths))))
        steps = (await gen.get_model_info()).engine_steps - before
    completions = [r.completions[0] for r in responses]
    greedy = is_greedy(model, [(list(c.prompt_token_ids), list(c.token_ids)) for c in completions])
    for i, (c, text, n) in enumerate(zip(completions, texts, lengths)):
        assert c.prompt_id == str(i) and list(c.prompt_token_ids) == tokenizer.encode(text)
        assert greedy[i], f"request {i} is not the greedy continuation of its prompt"
        assert c.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(c.logprobs) == n
        assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
    one_by_one = sum(lengths)  # alone, a request costs 1 prefill + (n - 1) decode steps
    assert steps < one_by_one / 4, f"{steps} engine steps for 32 concurrent requests vs {one_by_one} one by one"


async def test_chat_prompt_uses_the_chat_template_and_n_samples(server, hf):
    _, tokenizer = hf
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


BAD = [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=0)), "sampling_params.max_tokens"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=-3)), "sampling_params.max_tokens"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, n=5)), "sampling_params.n"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, temperature=-1)),
     "sampling_params.temperature"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, top_p=1.5)),
     "sampling_params.top_p"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, stop_token_ids=[5, 102])),
     "sampling_params.stop_token_ids[1]"),
    (dict(prompts=[Prompt(text="a")], sampling_params=SamplingParams(max_tokens=4, stop=[""])),
     "sampling_params.stop[0]"),
    (dict(prompts=[Prompt(text="ok"), Prompt(token_ids=[4, -1])], sampling_params=SamplingParams(max_tokens=4)),
     "prompts[1].token_ids[1]"),
    (dict(prompts=[Prompt(text="x" * 512)], sampling_params=SamplingParams(max_tokens=4)), "prompts[0]"),
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
    long = SamplingParams(max_tokens=60, ignore_eos=True)
    async with GeneratorClient(server.address, retry=NO_RETRY, timeout=120) as gen:
        # 64 sequences: 32 run, 32 wait; the queue (max_queue=64) cannot take 33 more
        first = asyncio.create_task(gen.generate(prompts=[Prompt(text=f"q{i}") for i in range(64)],
                                                 sampling_params=long))
        for _ in range(200):
            if (await gen.get_model_info()).pending_requests >= 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ForgeRPCError) as err:
            await gen.generate(prompts=[Prompt(text=f"r{i}") for i in range(33)], sampling_params=long)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "QUEUE_FULL"
        assert len((await first).completions) == 64
        ok = await gen.generate(prompts=[Prompt(text="after")], sampling_params=SamplingParams(max_tokens=3))
        assert len(ok.completions[0].token_ids) >= 1


async def test_model_info(server, hf):
    model, tokenizer = hf
    async with GeneratorClient(server.address) as gen:
        info = await gen.get_model_info()
    assert info.backend == "torch" and info.max_model_len == model.config.max_position_embeddings
    assert info.vocab_size == model.config.vocab_size and list(info.eos_token_ids) == [tokenizer.eos_token_id]
    assert info.policy_version == 0


def test_missing_model_directory_fails_at_start_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    out = subprocess.run([sys.executable, "-m", "forgerpc.services", "serve", "generator", "--port", "0",
                          f"model_path={missing}"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert str(missing) in out.stderr and "Traceback" not in out.stderr


async def test_a_caller_that_gives_up_frees_its_slots(server):
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        with pytest.raises(ForgeRPCError) as err:
            await gen.generate(prompts=[Prompt(text=f"slow {i}") for i in range(8)],
                               sampling_params=SamplingParams(max_tokens=500, ignore_eos=True), timeout=0.3)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):  # the engine drops the abandoned sequences at its next step
            if (await gen.get_model_info()).pending_requests == 0:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the abandoned request is still pending on the server")
        await asyncio.sleep(0.1)  # the decode burst that was running when the caller left (<= 20 ms)
        before = (await gen.get_model_info()).generated_tokens
        await asyncio.sleep(0.3)
        after = await gen.get_model_info()
        assert after.generated_tokens == before, f"abandoned sequences still decoding: {after}"
        ok = await gen.generate(prompts=[Prompt(text="next")], sampling_params=SamplingParams(max_tokens=3))
        assert len(ok.completions) == 1


def test_config_rules():
    from forgerpc.clients.config import ConfigError, load_config
    from forgerpc.services.generator.config import GeneratorConfig

    assert load_config(GeneratorConfig).tiny_model, "no model_path means the tiny model"
    assert not load_config(GeneratorConfig, overrides=["model_path=/m"]).tiny_model
    assert load_config(GeneratorConfig, overrides=["max_batch_size=4"]).max_n == 4  # default follows
    with pytest.raises(ConfigError, match="model_path or tiny_model"):
        load_config(GeneratorConfig, overrides=["model_path=/m", "tiny_model=true"])
    with pytest.raises(ConfigError, match="max_n"):
        load_config(GeneratorConfig, overrides=["max_batch_size=4", "max_n=8"])


async def test_tokenize_matches_what_generate_sees(server, hf):
    _, tokenizer = hf
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
