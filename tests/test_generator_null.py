"""The null generator backend and the constant reward: the stand-ins bench/pipeline.py measures the
framework with. Fixed tokens, but the real tokenizer, the real server checks and a real process."""

from __future__ import annotations

import asyncio
import math

import pytest

from conftest import ServiceProcess
from forgerpc.clients import ForgeRPCError, GeneratorClient, RetryPolicy
from forgerpc.services.common.models import _load_tokenizer, make_tiny_model
from forgerpc.services.generator.backends import FINISH_LENGTH, Sampling
from forgerpc.services.generator.backends.null_backend import NullBackend
from forgerpc.v1 import common_pb2, reward_pb2, trainer_pb2
from forgerpc.v1.common_pb2 import Prompt, SamplingParams

NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("null") / "tiny", hidden_size=16, num_layers=1,
                           num_heads=2, num_kv_heads=1, intermediate_size=32)


def test_n_fixed_samples_per_prompt_with_the_models_tokenizer_and_plausible_logprobs(tiny_dir):
    backend = NullBackend(str(tiny_dir))
    hf = _load_tokenizer(tiny_dir)
    assert backend.encode("123+456=") == hf.encode("123+456=")
    assert backend.info.vocab_size == len(hf) and backend.info.max_model_len == 512
    prompts = [("a", backend.encode("1+2=")), ("b", backend.encode("30+4="))]
    outs = asyncio.run(backend.generate(prompts, Sampling(n=3, max_tokens=12, logprobs=True)))
    assert [(o.prompt_id, o.index) for o in outs] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    for o in outs:
        assert o.prompt_token_ids == dict(prompts)[o.prompt_id]
        assert o.text == "012345678901" == hf.decode(o.token_ids)  # the cycle of RESPONSE_TEXT, 12 tokens
        assert o.finish_reason == FINISH_LENGTH and o.policy_version == 0
        assert len(o.logprobs) == 12 and all(math.isfinite(x) and math.log(0.05) <= x < 0 for x in o.logprobs)
        assert len(set(o.logprobs)) == 12  # vary by position, not one constant
    assert backend.stats()["generated_tokens"] == 6 * 12
    plain = asyncio.run(backend.generate(prompts[:1], Sampling(max_tokens=3)))
    assert plain[0].logprobs == [] and plain[0].text == "012"


def test_completions_stop_at_the_context_window_and_carry_the_updated_version(tiny_dir):
    backend = NullBackend(str(tiny_dir), max_model_len=10)
    assert asyncio.run(backend.update_weights(7, None, abort=False)) == 0
    [out] = asyncio.run(backend.generate([("p", list(range(5, 12)))], Sampling(max_tokens=50)))
    assert len(out.token_ids) == 3 and out.policy_version == 7  # 7 prompt + 3 new = the 10-token window


def test_without_a_model_directory_ids_are_utf8_bytes():
    backend = NullBackend()
    assert backend.encode("é1") == [0xC3, 0xA9, 0x31] and backend.info.vocab_size == 256
    [out] = asyncio.run(backend.generate([("p", [1, 2])], Sampling(max_tokens=4)))
    assert out.token_ids == [48, 49, 50, 51] and out.text == "0123"
    assert backend.info.shapes == {}


def test_null_completions_are_valid_trainer_input(tiny_dir):
    from forgerpc.services.trainer.server import to_samples

    backend = NullBackend(str(tiny_dir))
    outs = asyncio.run(backend.generate([("g", backend.encode("12+3="))], Sampling(n=4, max_tokens=6, logprobs=True)))
    request = trainer_pb2.TrainStepRequest(episodes=[
        common_pb2.Episode(episode_id=f"g-{o.index}", group_id="g", group_size=4, prompt_token_ids=o.prompt_token_ids,
                           response_token_ids=o.token_ids, response_logprobs=o.logprobs, reward=1.0)
        for o in outs])
    samples = to_samples(request, backend.info.vocab_size, backend.info.max_model_len, 64, sft=False)
    assert len(samples) == 4 and samples[0].generator_logprobs == pytest.approx(outs[0].logprobs, rel=1e-6)


async def test_served_null_generator_generates_and_takes_weight_updates_checked_by_the_server(tiny_dir, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            intermediate_size=32)
    proc = ServiceProcess("generator", "backend='null'", f"model_path={tiny_dir}")
    try:
        async with GeneratorClient(proc.address, retry=NO_RETRY) as gen:
            params = SamplingParams(n=4, max_tokens=5, temperature=1.0, logprobs=True)
            out = await gen.generate(prompts=[Prompt(text="7+8=", prompt_id="q")], sampling_params=params)
            assert [c.text for c in out.completions] == ["01234"] * 4
            assert all(len(c.logprobs) == 5 and c.policy_version == 0 for c in out.completions)
            info = await gen.get_model_info()
            assert info.backend == "null" and info.vocab_size == 102
            # the same model's safetensors pass the server's name/shape check; the version moves on
            assert (await gen.update_weights(version=1, local_path=str(tiny_dir))).version == 1
            out = await gen.generate(prompts=[Prompt(text="7+8=", prompt_id="q")], sampling_params=params)
            assert {c.policy_version for c in out.completions} == {1}
            with pytest.raises(ForgeRPCError) as bad:  # another model's shapes are refused
                await gen.update_weights(version=2, local_path=str(other))
            assert bad.value.code.name == "INVALID_ARGUMENT" and "shape" in bad.value.message
    finally:
        proc.stop()


def test_null_generator_with_a_missing_model_directory_fails_at_start_naming_it(tmp_path):
    with pytest.raises(RuntimeError, match="nowhere"):
        ServiceProcess("generator", "backend='null'", f"model_path={tmp_path / 'nowhere'}")


async def test_constant_reward_scores_every_item_the_same():
    from forgerpc.services.reward.config import RewardConfig
    from forgerpc.services.reward.server import RewardServicer

    cfg = RewardConfig(functions=[{"kind": "constant", "options": {"value": 0.25}}])
    servicer = RewardServicer(cfg)
    items = [reward_pb2.RewardItem(response=r, target="4") for r in ("4", "5", "")]
    out = await servicer.Evaluate(reward_pb2.EvaluateRequest(items=items), None)
    assert [s.score for s in out.scores] == [0.25, 0.25, 0.25]
    assert all(s.sub_scores["constant"] == 0.25 for s in out.scores)
