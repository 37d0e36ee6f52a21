"""Issue #4's done-when, with the real services: one trainer and two generators on loopback.

Four OS processes: `forgerpc serve weight_store`, `forgerpc serve trainer` (publishing to the
store) and two `forgerpc serve generator` (pulling from it in UpdateWeights). The trainer takes
5 steps and publishes after each; both generators are updated to every version. At the end both
generators hold version 5 and produce bit-identical greedy tokens and logprobs, which match a
fresh forward pass of the weights read back from the store, and those weights equal the
trainer's own (from its checkpoint) bit for bit.
"""

from __future__ import annotations

import asyncio

import torch
from safetensors.torch import load_file
from test_trainer_service import make_episodes

from forgerpc.clients import GeneratorClient, TrainerClient, WeightStoreClient
from forgerpc.clients.weights import load_into
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.v1 import common_pb2

PROMPTS = ["12+34=", "hello", "7*8="]


async def greedy(gen: GeneratorClient, tokenizer) -> list[common_pb2.Completion]:
    response = await gen.generate(
        prompts=[common_pb2.Prompt(text=p, prompt_id=str(i)) for i, p in enumerate(PROMPTS)],
        sampling_params=common_pb2.SamplingParams(temperature=0.0, max_tokens=8, logprobs=True, ignore_eos=True))
    return sorted(response.completions, key=lambda c: c.prompt_id)


def forward_logprobs(model, completion: common_pb2.Completion) -> torch.Tensor:
    """log p(token_t | prefix) of the completion's tokens under `model`, shape [len(token_ids)]."""
    ids = torch.tensor([list(completion.prompt_token_ids) + list(completion.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(completion.prompt_token_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(list(completion.token_ids))[:, None])[:, 0]


async def test_trainer_publishes_five_versions_two_generators_follow(serve_process, tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", arch="llama", seed=3, initializer_range=0.1)
    store = serve_process("weight_store")
    trainer_proc = serve_process(
        "trainer", f"model_path={model_dir}", f"weight_store_address={store.address}", "publish_dtype=float32",
        f"checkpoint_dir={tmp_path / 'ckpt'}", "optim.lr=0.01", "micro_batch_size=8", "threads=1")
    gen_procs = [serve_process("generator", f"model_path={model_dir}", f"weight_store_address={store.address}",
                               "torch_threads=1") for _ in range(2)]
    _, tokenizer = load_model(model_dir)
    async with TrainerClient(trainer_proc.address) as trainer, \
            GeneratorClient(gen_procs[0].address) as gen_a, GeneratorClient(gen_procs[1].address) as gen_b:
        before = await greedy(gen_a, tokenizer)
        for version in range(1, 6):
            step = await trainer.train_step(episodes=make_episodes(8, seed=version))
            assert not step.skipped, step.skip_reason
            published = await trainer.publish_weights(version=version)
            assert published.location == store.address  # the generators are told where, not what
            updates = await asyncio.gather(*(g.update_weights(version=version) for g in (gen_a, gen_b)))
            assert [u.version for u in updates] == [version, version]
        infos = await asyncio.gather(gen_a.get_model_info(), gen_b.get_model_info())
        assert [i.policy_version for i in infos] == [5, 5]
        out_a, out_b = await greedy(gen_a, tokenizer), await greedy(gen_b, tokenizer)
        saved = await trainer.save_checkpoint()

    # Both generators: same weights -> same tokens and bitwise-equal logprobs, stamped version 5.
    for a, b in zip(out_a, out_b):
        assert list(a.token_ids) == list(b.token_ids)
        assert list(a.logprobs) == list(b.logprobs)
        assert a.policy_version == b.policy_version == 5
    # ...and they are the weights of version 5: a fresh model loaded from the store agrees.
    fresh, _ = load_model(model_dir)
    async with WeightStoreClient(store.address) as client:
        loaded = await load_into(client, fresh, 5)
    assert loaded.version == 5
    for c in out_a:
        assert torch.allclose(torch.tensor(list(c.logprobs)), forward_logprobs(fresh, c), atol=1e-4)
    # The weights did move: version 0's logprobs differ (the test would pass vacuously otherwise).
    assert any(list(x.logprobs) != list(y.logprobs) for x, y in zip(before, out_a))
    # The store's version 5 is the trainer's model after 5 steps, bit for bit (fp32 published).
    trained = load_file(f"{saved.path}/model.safetensors")
    state = fresh.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
