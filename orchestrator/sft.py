"""SFT over services: teach the policy the task format before RL (the warm start).

    forgerpc run configs/sft_tiny.yaml

    for each step:  examples -> generator.tokenize (prompt, target) -> trainer.train_step(SFT)
    every K steps:  trainer.publish_weights -> generator.update_weights -> greedy eval

Loss (trainer side): masked cross-entropy over the response tokens, target + EOS, so that the
model also learns where to stop.
"""

from __future__ import annotations

import math
import pathlib
import random
import time

from forgerpc.orchestrator.config import SFTConfig
from forgerpc.orchestrator.loop import Metrics, Services, evaluate, publish
from forgerpc.orchestrator.tasks import TaskSet
from forgerpc.v1 import common_pb2, trainer_pb2


def sft_lr(step: int, cfg: SFTConfig) -> float:
    """The SFT rate at `step` (1-based) of `cfg.steps`, with base rate r and floor m = min_lr_ratio:

        warmup (step <= W):   r * step / W
        constant:             r
        cosine:               r * (m + (1 - m) * (1 + cos(pi * f)) / 2),   f = (step - W) / (steps - W)
        linear:               r * (m + (1 - m) * (1 - f))

    A decaying rate matters on the tiny model: a rate high enough to learn the format fast stalls
    the loss later (3-digit addition at a constant 3e-3 plateaus near 1.2 nats/token).
    """
    r, w, m = cfg.learning_rate, cfg.warmup_steps, cfg.min_lr_ratio
    if w and step <= w:
        return r * step / w
    if cfg.lr_schedule == "constant":
        return r
    f = min(max((step - w) / max(cfg.steps - w, 1), 0.0), 1.0)
    decay = (1 + math.cos(math.pi * f)) / 2 if cfg.lr_schedule == "cosine" else 1 - f
    return r * (m + (1 - m) * decay)


class SFT:
    def __init__(self, services: Services, task: TaskSet, settings: SFTConfig, run_dir: pathlib.Path,
                 eval_size: int = 100, max_tokens: int = 8, stop=("\n",), seed: int = 0):
        self.s = services
        self.task = task
        self.cfg = settings
        self.metrics = Metrics(run_dir)
        self.eval_args = (task.eval_set[:eval_size], max_tokens, stop)
        self.rng = random.Random(f"sft-{seed}")
        self.version = 0

    async def batch(self, eos: int) -> list[common_pb2.Episode]:
        examples = [self.task.sample_train(self.rng) for _ in range(self.cfg.batch_size)]
        tokens = await self.s.generator.tokenize.route(
            prompts=[common_pb2.Prompt(text=e.prompt) for e in examples], texts=[e.target for e in examples])
        return [
            common_pb2.Episode(episode_id=f"sft-{i}", prompt_token_ids=p.token_ids,
                               response_token_ids=[*t.token_ids, eos])
            for i, (p, t) in enumerate(zip(tokens.prompts, tokens.texts))
        ]

    async def run(self, start_version: int = 0) -> dict:
        self.version = start_version
        info = await self.s.generator.get_model_info.route()
        eos = info.eos_token_ids[0]
        before = await evaluate(self.s, self.metrics, *self.eval_args)
        self.metrics.write({"phase": "sft", "step": 0, "eval_accuracy": before, "time": time.time()})
        for step in range(1, self.cfg.steps + 1):
            with self.metrics.phase("sft_batch"):
                episodes = await self.batch(eos)
            with self.metrics.phase("train"):
                result = await self.s.trainer.train_step.call_one(
                    episodes=episodes, objective=trainer_pb2.OBJECTIVE_SFT, learning_rate=sft_lr(step, self.cfg))
            row = {"phase": "sft", "step": step, "loss": result.loss, "learning_rate": result.learning_rate,
                   "time": time.time()}
            if step % self.cfg.eval_every == 0 or step == self.cfg.steps:
                self.version += 1
                await publish(self.s, self.metrics, self.version)
                row["eval_accuracy"] = await evaluate(self.s, self.metrics, *self.eval_args)
            self.metrics.write(row)
        after = await evaluate(self.s, self.metrics, *self.eval_args) if self.cfg.steps else before
        self.metrics.close()
        return {"sft_eval_before": before, "sft_eval_after": after, "version": self.version}
