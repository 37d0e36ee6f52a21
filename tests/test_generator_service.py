"""GeneratorService, torch backend, as a real process: the shared conformance tests
(tests/generator_conformance.py) plus what only this backend or the server's start-up has."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from forgerpc.clients import ForgeRPCError, GeneratorClient
from forgerpc.v1.common_pb2 import Prompt, SamplingParams
from generator_conformance import *  # noqa: F403 - the conformance tests and their fixtures
from generator_conformance import NO_RETRY, GeneratorProcess


@pytest.fixture(scope="module")
def backend():
    return "torch"


def test_missing_model_directory_fails_at_start_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    out = subprocess.run([sys.executable, "-m", "forgerpc.services", "serve", "generator", "--port", "0",
                          f"model_path={missing}"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert str(missing) in out.stderr and "Traceback" not in out.stderr


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


async def test_update_without_a_source_names_weight_store_address(dirs, tmp_path):
    srv = GeneratorProcess(tmp_path / "generator.log", f"model_path={dirs[0]}")  # no weight_store_address
    try:
        async with GeneratorClient(srv.address, retry=NO_RETRY) as gen:
            with pytest.raises(ForgeRPCError) as err:
                await gen.update_weights(version=1)
            assert (await gen.get_model_info()).policy_version == 0
    finally:
        srv.stop()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details["field"] == "weight_store_address"


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
