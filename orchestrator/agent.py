"""Multi-turn episodes: a policy (a generator) talks to an environment until the episode ends.

    episode = await agent_episode(generator, env, "calculator", seed=7, sampling=SamplingParams(...))

The transcript becomes ONE training episode whose response holds every turn after the
environment's opening, in order:

    prompt   = tokens(render(opening) + "assistant: ")
    response = a_1 o_1 a_2 o_2 ... a_k          a_i: the policy's tokens   (mask 1, their logprobs)
                                                o_i: the environment's turn (mask 0, logprob 0)

The trainer's loss then covers the agent's tokens only (`response_masks`), and each a_i is
trained in exactly the context it was sampled in: it was generated from the token ids
prompt + response so far (token ids in, token ids out; the transcript is never re-tokenized,
which could split text differently). reward = the sum of the environment's step rewards.
"""

from __future__ import annotations

import uuid

from forgerpc.v1.common_pb2 import ChatMessage, Episode, Prompt, SamplingParams


def render(messages) -> str:
    """Chat turns as plain text, one "role: content" line each (a tool turn shows its name)."""
    return "".join(f"{m.role}{f' {m.name}' if m.name else ''}: {m.content}\n" for m in messages)


async def agent_episode(generator, env, environment: str, *, sampling: SamplingParams, seed: int = 0,
                        options: dict[str, str] | None = None, max_turns: int = 16) -> Episode:
    """Plays one episode of `environment` with the generator's policy; see the module docstring.

    Args:
        generator: a GeneratorClient.
        env: an EnvironmentClient.
        sampling: sampling parameters of every agent turn (n is ignored: one sample per turn).
        seed, options: the environment's task draw (the same seed and options, the same task).
        max_turns: agent turns at most (>= 1), on top of the environment's own limit.

    Returns:
        the Episode (no group, no advantage: the caller groups episodes of one seed and sets them);
        metadata holds the environment's name, the turns taken and its last step's info.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    sampling = _one_sample(sampling)
    opened = await env.reset(environment=environment, seed=seed, options=options or {})
    try:
        # The opening as Generate tokenizes a prompt (BOS where the model has one); the environment's
        # later turns as plain text, since they go in the middle of the sequence (no special tokens).
        opening = Prompt(text=render(opened.observations) + "assistant: ")
        prompt = list((await generator.tokenize(prompts=[opening])).prompts[0].token_ids)
        response, logprobs, masks = [], [], []
        reward, versions, info = 0.0, [], {}
        for turn in range(1, max_turns + 1):
            out = (await generator.generate(prompts=[Prompt(token_ids=prompt + response)],
                                            sampling_params=sampling)).completions[0]
            response += out.token_ids
            logprobs += out.logprobs
            masks += [1] * len(out.token_ids)
            versions.append(out.policy_version)
            step = await env.step(session_id=opened.session_id, action=ChatMessage(role="assistant", content=out.text))
            reward, info = reward + step.reward, dict(step.info)
            if step.done:
                break
            turn_text = "\n" + render(step.observations) + "assistant: "
            reply = list((await generator.tokenize(texts=[turn_text])).texts[0].token_ids)
            response += reply
            logprobs += [0.0] * len(reply)
            masks += [0] * len(reply)
    finally:
        await env.close_session(session_id=opened.session_id)
    return Episode(episode_id=uuid.uuid4().hex, prompt_token_ids=prompt, response_token_ids=response,
                   response_logprobs=logprobs, response_masks=masks, reward=reward,
                   policy_version=min(versions), metadata={"environment": environment, "turns": str(turn), **info})


def _one_sample(sampling: SamplingParams) -> SamplingParams:
    """A copy of `sampling` for one sample with its logprobs (the trainer's PPO ratio needs them)."""
    out = SamplingParams()
    out.CopyFrom(sampling)
    out.n, out.logprobs = 1, True
    return out
