"""Multi-turn episodes (orchestrator/agent.py) through real processes: a generator and an environment
play an episode, and a trainer on the same weights trains it with the environment's turns masked."""

from __future__ import annotations

import pytest
import torch

from forgerpc.clients import EnvironmentClient, GeneratorClient, TrainerClient
from forgerpc.orchestrator.agent import agent_episode, render
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.v1.common_pb2 import ChatMessage, Prompt, SamplingParams


def _logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) under `model`, (len(response),)."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + response])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def _runs(masks: list[int]) -> list[tuple[int, int]]:
    """[(value, length)] of the runs of equal values."""
    out: list[list[int]] = []
    for m in masks:
        if out and out[-1][0] == m:
            out[-1][1] += 1
        else:
            out.append([m, 1])
    return [tuple(r) for r in out]


@pytest.mark.slow
async def test_episode_masks_environment_turns_and_trains_on_policy(serve_process, tmp_path):
    model = make_tiny_model(tmp_path / "model", bos=True, initializer_range=0.1)  # BOS: only at the start
    gen = serve_process("generator", f"model_path={model}")
    env = serve_process("environment")
    trainer = serve_process("trainer", f"model_path={model}", f"publish_dir={tmp_path / 'pub'}",
                            f"checkpoint_dir={tmp_path / 'ckpt'}", "threads=1")
    async with GeneratorClient(gen.address) as g, EnvironmentClient(env.address) as e, TrainerClient(trainer.address) as t:
        sampling = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=1)
        episode = await agent_episode(g, e, "guess_number", sampling=sampling, seed=3, options={"max_turns": "3"})

        # Three agent turns of 8 tokens, the environment's two replies between them, then the limit.
        assert episode.metadata["turns"] == "3" and episode.metadata["truncated"] == "true"
        assert episode.reward == 0.0
        reply = "\n" + render([ChatMessage(role="user", content="Reply <answer>N</answer> with an integer N.")]) \
            + "assistant: "
        reply_ids = list((await g.tokenize(texts=[reply])).texts[0].token_ids)
        masks, response = list(episode.response_masks), list(episode.response_token_ids)
        assert _runs(masks) == [(1, 8), (0, len(reply_ids)), (1, 8), (0, len(reply_ids)), (1, 8)]
        assert response[8:8 + len(reply_ids)] == reply_ids
        assert len(episode.response_logprobs) == len(response)
        assert all((lp < 0) if m else (lp == 0) for lp, m in zip(episode.response_logprobs, masks))
        opening = (await e.reset(environment="guess_number", seed=3, options={"max_turns": "3"})).observations
        prompt_ids = (await g.tokenize(prompts=[Prompt(text=render(opening) + "assistant: ")])).prompts[0].token_ids
        assert list(episode.prompt_token_ids) == list(prompt_ids)
        bos = prompt_ids[0]
        assert bos not in reply_ids and bos not in prompt_ids[1:]

        # Each agent token was sampled in the context it is trained in: the model's logprobs over
        # prompt + response (the trainer's forward) are the generator's at every agent position,
        # and an altered environment turn (the reply's tokens reversed) moves the later ones.
        policy, _ = load_model(model)
        on = torch.tensor(masks).bool()
        sampled = torch.tensor(list(episode.response_logprobs))[on]
        assert torch.allclose(_logprobs(policy, prompt_ids, response)[on], sampled, atol=1e-4)
        altered = response[:8] + list(reversed(reply_ids)) + response[8 + len(reply_ids):]
        moved = (_logprobs(policy, prompt_ids, altered)[on] - sampled).abs()
        assert moved[:8].max() < 1e-4 and moved[8:].max() > 1e-3

        # The trainer scores only the agent's 24 tokens; same weights, same contexts: ratio 1, nothing clipped.
        episode.advantage, episode.has_advantage = 1.0, True
        step = await t.train_step(episodes=[episode])
        assert not step.skipped and step.tokens == 24
        assert step.clip_fraction == 0.0


async def test_max_turns_below_one_is_refused_before_any_call():
    with pytest.raises(ValueError, match="max_turns"):
        await agent_episode(None, None, "calculator", sampling=SamplingParams(), max_turns=0)
