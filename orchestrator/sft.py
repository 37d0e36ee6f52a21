"""SFT over services: teach the policy the task format before RL (the warm start).

    forgerpc run configs/sft_tiny.yaml

    for each step:  examples -> generator.tokenize (prompt, target) -> trainer.train_step(SFT)
    every K steps:  trainer.publish_weights -> generator.update_weights -> greedy eval
                    -> trainer.save_checkpoint (with the sampler's RNG state: resumable)
                    -> stop early once training-prompt accuracy >= sft.until_accuracy (if set)

Loss (trainer side): masked cross-entropy over the response tokens, target + EOS, so that the
model also learns where to stop.
"""

from __future__ import annotations

import logging
import math
import pathlib
import random
import time

from forgerpc.orchestrator.config import SFTConfig
from forgerpc.orchestrator.loop import Metrics, Position, Services, checkpoint, evaluate, publish
from forgerpc.orchestrator.tasks import TaskSet
from forgerpc.v1 import common_pb2, trainer_pb2

log = logging.getLogger("forgerpc.sft")


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
                 eval_size: int = 100, max_tokens: int = 8, stop=("\n",), seed: int = 0,
                 resume: Position | None = None, on_row=None):
        self.s = services
        self.task = task
        self.cfg = settings
        self.metrics = Metrics(run_dir, on_row)
        self.eval_args = (task.eval_set[:eval_size], max_tokens, stop)
        # The early-stop check runs on training prompts: the held-out split only measures.
        check_rng = random.Random(f"sft-check-{seed}")
        self.check_args = ([task.sample_train(check_rng) for _ in range(settings.check_size)], max_tokens, stop)
        self.rng = random.Random(f"sft-{seed}")
        self.start = resume or Position("sft", step=0, version=0)
        if self.start.rng is not None:  # JSON turned random.getstate()'s tuples into lists
            version, internal, gauss = self.start.rng
            self.rng.setstate((version, tuple(internal), gauss))
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
        if not self.start.step:
            self.metrics.write({"phase": "sft", "step": 0, "version": self.version, "eval_accuracy": before,
                                "time": time.time()})
        for step in range(self.start.step + 1, self.cfg.steps + 1):
            with self.metrics.phase("sft_batch"):
                episodes = await self.batch(eos)
            with self.metrics.phase("train"):
                result = await self.s.trainer.train_step.call_one(
                    episodes=episodes, objective=trainer_pb2.OBJECTIVE_SFT, learning_rate=sft_lr(step, self.cfg))
            row = {"phase": "sft", "step": step, "version": self.version, "trainer_step": result.step,
                   "loss": result.loss, "learning_rate": result.learning_rate, "time": time.time()}
            boundary = step % self.cfg.eval_every == 0 or step == self.cfg.steps
            if boundary:
                self.version += 1
                await publish(self.s, self.metrics, self.version)
                row["eval_accuracy"] = await evaluate(self.s, self.metrics, *self.eval_args)
                if self.cfg.until_accuracy:
                    row["train_accuracy"] = await evaluate(self.s, self.metrics, *self.check_args)
            self.metrics.write(row)
            warm = row.get("train_accuracy", 0.0) >= self.cfg.until_accuracy > 0
            if boundary:  # the row first: a resumed run never misses the row of its checkpoint step
                await checkpoint(self.s, self.metrics, Position("sft", step, self.version, rng=list(self.rng.getstate()),
                                                                done=warm))
            if warm:
                break  # warm enough: RL takes it from here
        else:
            if self.cfg.until_accuracy and self.start.step < self.cfg.steps:
                # Not an error (the run goes on), but GRPO from here may see almost no reward signal.
                log.warning("SFT ran all sft.steps=%d without reaching sft.until_accuracy=%.2f (training-prompt "
                            "accuracy %.3f): GRPO starts from a weaker policy; raise sft.steps to give it longer",
                            self.cfg.steps, self.cfg.until_accuracy, row.get("train_accuracy", 0.0))
        after = await evaluate(self.s, self.metrics, *self.eval_args) if self.cfg.steps else before
        self.metrics.close()
        return {"sft_eval_before": before, "sft_eval_after": after, "version": self.version}
