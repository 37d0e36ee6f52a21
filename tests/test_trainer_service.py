"""The trainer as a real process: TrainStep metrics, bad input, skipped steps, publishing, and a
SIGKILL mid-run followed by a restart from the checkpoint that continues bit for bit."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
import torch
from safetensors.torch import load_file

from forgerpc.clients import ForgeRPCError, TrainerClient
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.v1 import common_pb2, trainer_pb2


def make_episodes(n: int = 8, seed: int = 0) -> list[common_pb2.Episode]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, 90, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, 90, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        out.append(common_pb2.Episode(
            episode_id=f"e{seed}-{i}", group_id=f"g{seed}-{i // 4}", group_size=4, prompt_token_ids=p,
            response_token_ids=r, response_logprobs=(-4.6 + 0.3 * torch.randn(len(r), generator=g)).tolist(),
            reward=float(i % 2)))
    return out


def trainer_args(tmp_path, *extra: str) -> list[str]:
    return ["tiny_model=true", f"publish_dir={tmp_path / 'pub'}", f"checkpoint_dir={tmp_path / 'ckpt'}",
            "optim.lr=0.001", "micro_batch_size=4", "threads=1", *extra]


async def test_train_skip_publish_and_state(serve_process, tmp_path):
    proc = serve_process("trainer", *trainer_args(tmp_path))
    async with TrainerClient(proc.address) as trainer:
        first = await trainer.train_step(episodes=make_episodes())
        assert first.step == 1 and first.tokens > 0 and not first.skipped
        assert first.grad_norm > 0 and first.learning_rate == pytest.approx(1e-3) and first.entropy > 0
        assert 0 < first.clip_fraction <= 1 and first.step_seconds > 0
        bad = make_episodes(seed=1)
        bad[2].advantage, bad[2].has_advantage = 3e38, True  # finite, but the loss overflows
        skipped = await trainer.train_step(episodes=bad)
        assert skipped.skipped and "non-finite" in skipped.skip_reason and skipped.step == 1
        sft = await trainer.train_step(episodes=make_episodes(seed=2), objective=trainer_pb2.OBJECTIVE_SFT)
        assert sft.step == 2 and sft.loss > 0
        reset = await trainer.train_step(episodes=make_episodes(seed=3), objective=trainer_pb2.OBJECTIVE_SFT,
                                          reset_optimizer=True)  # the first GRPO step after SFT sends it
        assert reset.step == 3 and not reset.skipped

        state = await trainer.get_state()
        assert (state.step, state.policy_version, state.backend) == (3, 0, "torch")
        assert "micro_batch_size: 4" in state.config_yaml

        published = await trainer.publish_weights(version=1)
        assert published.version.version == 1 and published.version.step == 3 and published.bytes > 0
        model, _ = load_model(published.location)  # a loadable HF directory (the generator's UpdateWeights)
        assert (await trainer.get_state()).policy_version == 1
        with pytest.raises(ForgeRPCError) as err:
            await trainer.publish_weights(version=1)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "version" in err.value.message
    initial, _ = load_model(make_tiny_model(tmp_path / "initial"))  # the service's start weights (seed 0)
    trained, start = model.state_dict(), initial.state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)


BAD_INPUTS = {
    "empty batch": (lambda eps: eps.clear(), "episodes"),
    "id out of vocabulary": (lambda eps: eps[3].response_token_ids.__setitem__(0, 10_000),
                             "episodes[3].response_token_ids"),
    "negative prompt id": (lambda eps: eps[1].prompt_token_ids.append(-1), "episodes[1].prompt_token_ids"),
    "logprobs length": (lambda eps: eps[3].response_logprobs.append(-1.0), "episodes[3].response_logprobs"),
    "masks length": (lambda eps: eps[0].response_masks.extend([1] * 99), "episodes[0].response_masks"),
    "nan advantage": (lambda eps: (setattr(eps[5], "advantage", float("nan")), setattr(eps[5], "has_advantage", True)),
                      "episodes[5].advantage"),
    "nan logprob": (lambda eps: eps[2].response_logprobs.__setitem__(0, float("nan")), "episodes[2].response_logprobs"),
    "empty response": (lambda eps: eps[4].ClearField("response_token_ids"), "episodes[4].response_token_ids"),
    "all masked": (lambda eps: [e.response_masks.extend([0] * len(e.response_token_ids)) for e in eps],
                   "episodes[*].response_masks"),
}


async def test_bad_input_is_invalid_argument_naming_the_field(serve_process, tmp_path):
    proc = serve_process("trainer", *trainer_args(tmp_path))
    async with TrainerClient(proc.address) as trainer:
        for name, (mutate, field) in BAD_INPUTS.items():
            eps = make_episodes()
            mutate(eps)
            with pytest.raises(ForgeRPCError) as err:
                await trainer.train_step(episodes=eps)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert err.value.message.startswith(field), (name, err.value.message)
        assert (await trainer.get_state()).step == 0  # nothing was trained, and the server is still up
        with pytest.raises(ForgeRPCError) as err:
            await trainer.load_checkpoint(path=str(tmp_path / "no-such-checkpoint"))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "path" in err.value.message
        with pytest.raises(ForgeRPCError) as err:
            await trainer.load_checkpoint()  # nothing saved yet
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_missing_model_dir_is_a_clear_startup_error(serve_process, tmp_path):
    missing = tmp_path / "no-model-here"
    with pytest.raises(RuntimeError) as err:
        serve_process("trainer", f"model_path={missing}")
    assert str(missing) in str(err.value)


@pytest.mark.slow
async def test_sigkill_and_restart_resumes_bit_identically(serve_process, tmp_path):
    """Run A: 3 steps, checkpoint, step 4, publish (reference weights), more steps, SIGKILL.
    Run B (new process): load the checkpoint, step 4 on the same batch, publish: equal bit for bit."""
    args = trainer_args(tmp_path, "loss.kind=dapo", "loss.beta=0.02")
    a = serve_process("trainer", *args)
    async with TrainerClient(a.address) as trainer:
        for s in range(3):
            await trainer.train_step(episodes=make_episodes(seed=s))
        await trainer.publish_weights(version=1)  # episodes below are now stale: TIS path too
        saved = await trainer.save_checkpoint(data_position="prompts:24")
        assert saved.step == 3
        await trainer.train_step(episodes=make_episodes(seed=3))
        reference = await trainer.publish_weights(version=2)
        want = load_file(os.path.join(reference.location, "model.safetensors"))
        await trainer.train_step(episodes=make_episodes(seed=4))
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)

    b = serve_process("trainer", *args)
    async with TrainerClient(b.address) as trainer:
        restored = await trainer.load_checkpoint()  # the latest under checkpoint_dir
        assert (restored.step, restored.policy_version, restored.data_position) == (3, 1, "prompts:24")
        step = await trainer.train_step(episodes=make_episodes(seed=3))
        assert step.step == 4
        resumed = await trainer.publish_weights(version=2)
    got = load_file(os.path.join(resumed.location, "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
