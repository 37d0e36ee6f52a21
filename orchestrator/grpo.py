"""GRPO over services: the RL loop a researcher reads and edits.

    forgerpc run configs/grpo_tiny.yaml

Rollouts (N concurrent workers):   k prompts -> generator.generate.route (n = group_size each)
                                   -> reward.evaluate.route -> group advantages -> buffer.add_episodes
                                   (k = groups_per_rollout: one call of each for k groups)
Training (one loop):               buffer.sample -> trainer.train_step -> buffer.ack
                                   -> every K steps: trainer.publish_weights -> generator.update_weights.fanout
                                      (the next sample overlaps the ack and the publish; the fanout
                                      overlaps the next step's train)

Group-relative advantage (GRPO, Shao et al. 2024), computed here because only the rollout has
the whole group at hand:  A_i = (r_i - mean(r)) / (std(r) + eps)   (std off for Dr.GRPO).

`max_staleness` bounds how far rollouts run ahead of training: at most
prompts_per_step * (max_staleness + 1) groups may be generated but not yet trained on, and
permits come back only after the step that used them has published its weights. With 0 the
loop is synchronous and on-policy; with N, episodes are at most N versions old.
No retry, transport or serialization code lives here: the SDK retries and fails over, and a
rollout that still fails is logged, counted and dropped.

Every `checkpoint_every` steps the trainer saves a checkpoint together with the loop's Position
(step, version, prompts drawn), which `forgerpc run CONFIG --resume RUN_DIR` continues from.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import random
import statistics
import time
import uuid

from forgerpc.clients import ForgeRPCError
from forgerpc.orchestrator.config import GRPOConfig
from forgerpc.orchestrator.loop import (Metrics, Position, Services, add_group, checkpoint, current_traceparent,
                                       evaluate, publish_weights, rollout_links, update_generators)
from forgerpc.orchestrator.tasks import TaskSet
from forgerpc.v1 import common_pb2, replay_buffer_pb2, reward_pb2

log = logging.getLogger("forgerpc.grpo")


def group_advantages(rewards: list[float], std_normalize: bool = True, eps: float = 1e-6) -> list[float]:
    """A_i = r_i - mean(r), divided by std(r) + eps when std_normalize (population std)."""
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards) if std_normalize else 1.0
    return [(r - mean) / (std + eps) if std_normalize else r - mean for r in rewards]


class GRPO:
    def __init__(self, services: Services, task: TaskSet, settings: GRPOConfig, run_dir: pathlib.Path,
                 resume: Position | None = None, on_row=None):
        self.s = services
        self.task = task
        self.cfg = settings
        self.metrics = Metrics(run_dir, on_row)
        self.version = 0
        self.started = time.time()
        self.budget_start = self.started  # reset after the baseline eval (see run)
        self.start = resume or Position("grpo", step=0, version=0)
        self.drawn = self.start.drawn  # data position: prompts drawn so far
        self.reset_pending = settings.reset_optimizer and not self.start.step  # see GRPOConfig.reset_optimizer
        self._dropped_seen = 0
        self.buffer_size = 0  # episodes in the stream (unread + pending), from the last GetStats
        self.debt = 0  # groups in the buffer that no permit of this run was taken for (resume)
        self.stop = asyncio.Event()
        self.groups_in_flight = asyncio.Semaphore(settings.prompts_per_step * (settings.max_staleness + 1))
        self.taking_permits = asyncio.Lock()
        self.landing: asyncio.Task | None = None  # the newest version's update_weights fanout (see land)
        self.next_batch: asyncio.Task | None = None  # the next step's batch, sampled during this step's publish

    def sampling(self, n: int, temperature: float) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(n=n, temperature=temperature, max_tokens=self.cfg.max_tokens,
                                         stop=list(self.cfg.stop), logprobs=True)

    # -- rollouts ---------------------------------------------------------------------------
    async def rollout_worker(self, worker: int) -> None:
        k = self.cfg.groups_per_rollout
        while not self.stop.is_set():
            async with self.taking_permits:  # k at once: workers each holding a few could starve all
                for _ in range(k):
                    await self.groups_in_flight.acquire()  # released when the trainer consumes a group
            # Prompt i comes from its own seeded RNG, whichever worker draws it: the data position
            # is one number, and a resumed run draws exactly the prompts an unbroken one would.
            examples = []
            for _ in range(k):
                index, self.drawn = self.drawn, self.drawn + 1
                examples.append(self.task.sample_train(random.Random(f"{self.cfg.seed}-{index}")))
            try:
                with self.metrics.phase("rollout"):  # the root span of these groups' trace
                    await self.rollout(examples)
            except ForgeRPCError as e:
                for _ in range(k):
                    self.groups_in_flight.release()
                self.metrics.count("rollouts_dropped", k)
                log.warning("rollout dropped after retries: %s", e)

    async def rollout(self, examples: list) -> None:
        """One group (group_size completions) per example, with one call to each service for all."""
        prompts = [common_pb2.Prompt(text=ex.prompt, prompt_id=uuid.uuid4().hex) for ex in examples]
        example_of = {p.prompt_id: ex for p, ex in zip(prompts, examples)}
        with self.metrics.phase("generate"):
            out = await self.s.generator.generate.route(
                prompts=prompts, sampling_params=self.sampling(self.cfg.group_size, self.cfg.temperature))
        with self.metrics.phase("reward"):  # the request built in place: half the CPU of RewardItem(metadata=dict)
            request = reward_pb2.EvaluateRequest()
            for c in out.completions:
                ex = example_of[c.prompt_id]
                request.items.add(prompt=ex.prompt, response=c.text, target=ex.target).metadata.update(
                    ex.metadata)  # e.g. a code task's tests
            scores = (await self.s.reward.evaluate.route(request)).scores
        self.metrics.count("episodes", len(scores))
        self.metrics.count("tokens", sum(len(c.token_ids) for c in out.completions))
        groups: dict[str, list] = {}  # prompt_id -> [(completion, score)], in the generator's order
        for c, s in zip(out.completions, scores):
            groups.setdefault(c.prompt_id, []).append((c, s))
        traceparent, now_ms = current_traceparent(), int(time.time() * 1000)
        request = replay_buffer_pb2.AddEpisodesRequest()
        for group_id, members in groups.items():
            rewards = [s.score for _, s in members]
            if self.cfg.drop_equal_reward_groups and len(set(rewards)) == 1:
                self.metrics.count("groups_dropped")
                self.groups_in_flight.release()  # no gradient in it: sample another prompt instead
                continue
            add_group(request, group_id, members, group_advantages(rewards, self.cfg.std_normalize), now_ms, traceparent)
        if request.episodes:
            with self.metrics.phase("enqueue"):
                await self.s.buffer.add_episodes.route(request)

    def release(self, groups: int) -> None:
        """Gives rollout permits back, first paying off groups that predate this run."""
        paid = min(groups, self.debt)
        self.debt -= paid
        for _ in range(groups - paid):
            self.groups_in_flight.release()

    # -- training ---------------------------------------------------------------------------
    async def sample(self) -> replay_buffer_pb2.SampleResponse:
        """The next training batch: whole groups, at most max_policy_age versions behind self.version."""
        while not (batch := await self.s.buffer.sample.call_one(
                batch_size=self.cfg.prompts_per_step * self.cfg.group_size, whole_groups=True,
                current_policy_version=self.version, wait_seconds=60)).episodes:
            self.release(await self.dropped_groups())  # what was there was filtered or evicted
        return batch

    async def train(self) -> None:
        for step in range(self.start.step + 1, self.cfg.steps + 1):
            with self.metrics.phase("sample"):
                batch = await (self.next_batch or self.sample())
            with self.metrics.phase("train", links=rollout_links(batch.episodes)):
                for _ in range(self.cfg.ppo_epochs):
                    result = await self.s.trainer.train_step.call_one(episodes=batch.episodes,
                                                                      reset_optimizer=self.reset_pending)
                    self.reset_pending = False
            acked = asyncio.create_task(self.s.buffer.ack.call_one(batch_id=batch.batch_id))
            elapsed = time.time() - self.started
            row = {"phase": "grpo", "step": step, "version": self.version, "trainer_step": result.step,
                   "loss": result.loss, "kl": result.kl, "train_seconds": result.step_seconds,
                   "reward_mean": statistics.fmean(e.reward for e in batch.episodes),
                   # Episodes of groups with all-equal rewards: no gradient (the trainer skips them).
                   "zero_advantage": statistics.fmean(e.advantage == 0 for e in batch.episodes),
                   "staleness": self.version - min(e.policy_version for e in batch.episodes),
                   "episodes": self.start.episodes + self.metrics.counts.get("episodes", 0),
                   "groups_dropped": self.metrics.counts.get("groups_dropped", 0),
                   "episodes_per_s": self.metrics.counts.get("episodes", 0) / elapsed,
                   "tokens_per_s": self.metrics.counts.get("tokens", 0) / elapsed,
                   "time": time.time()}
            if result.tokens:  # over the episodes that carried a gradient; none when all had advantage 0
                row |= {"entropy": result.entropy, "clip_fraction": result.clip_fraction}
            groups = len({e.group_id for e in batch.episodes})
            # The budget runs from the baseline eval (the step-0 row), like bench/learning.py's clock.
            last = step == self.cfg.steps or 0 < self.cfg.max_seconds <= row["time"] - self.budget_start
            publishing = step % self.cfg.publish_every == 0
            if publishing:
                await self.landed()  # versions reach the generators in order
                self.version += 1
            # The next batch is sampled (for the version the trainer now holds) while this one's
            # ack and the weights' upload run: the three are independent, and the step waits on all.
            self.next_batch = None if last else asyncio.create_task(self.sample())
            try:
                if publishing:
                    source = await publish_weights(self.s, self.metrics, self.version)
                    # The generators load it while the next step trains; this batch's rollout permits
                    # come back once they hold it, so new rollouts use the new weights.
                    self.landing = asyncio.create_task(self.land(self.version, source, groups))
                else:
                    self.release(groups + await self.dropped_groups())
            finally:
                await acked  # also when the publish failed: a resumed run must not train this batch again
            row["buffer_size"] = self.buffer_size
            if step % self.cfg.eval_every == 0 or last:
                row["eval_accuracy"] = await self.evaluate()
            self.metrics.write(row)
            log.info("step %d %s", step, row)
            every = self.cfg.checkpoint_every
            if (every and step % every == 0) or last:
                await self.landed()  # the checkpoint's version is on the generators
                await checkpoint(self.s, self.metrics, Position("grpo", step, self.version, drawn=self.drawn,
                                                                episodes=row["episodes"]))
            if last:
                break

    async def land(self, version: int, source: dict, groups: int) -> None:
        """generator.update_weights.fanout(version), then the trained batch's permits come back."""
        await update_generators(self.s, self.metrics, version, source)
        self.release(groups + await self.dropped_groups())

    async def landed(self) -> None:
        """Waits until the last published version is on the generators (its errors surface here)."""
        if self.landing is not None:
            landing, self.landing = self.landing, None
            await landing

    async def dropped_groups(self) -> int:
        """Groups the buffer filtered (all rewards equal) or evicted as stale since the last call:
        they will never be trained on, so their rollout permits come back here."""
        stats = await self.s.buffer.get_stats.call_one()
        self.buffer_size = stats.stream_length
        dropped = stats.filtered_groups_total + stats.evicted_stale_total // self.cfg.group_size
        # max: calls overlap (the landing task's and the sampler's), and the counters only grow
        new, self._dropped_seen = dropped - self._dropped_seen, max(dropped, self._dropped_seen)
        return max(new, 0)

    async def evaluate(self) -> float:
        await self.landed()  # the eval is of the newest version
        return await evaluate(self.s, self.metrics, self.task.eval_set[: self.cfg.eval_size],
                              self.cfg.max_tokens, self.cfg.stop)

    async def run(self, start_version: int = 0) -> dict:
        self.version = start_version  # after an SFT warm start, or the version a resume published
        await self.dropped_groups()  # the buffer's counters may predate this run (shared Redis, resume)
        # Groups already in the stream (left by the interrupted run being resumed) are trained or
        # dropped like new ones, but took no permit: their releases must not widen the bound.
        self.debt = self.buffer_size // self.cfg.group_size
        workers = [asyncio.create_task(self.rollout_worker(i)) for i in range(self.cfg.rollout_workers)]
        try:
            baseline = await self.evaluate()
            self.budget_start = time.time()
            if not self.start.step:
                self.metrics.write({"phase": "grpo", "step": 0, "version": self.version, "eval_accuracy": baseline,
                                    "time": self.budget_start})
            await self.train()
            final = await self.evaluate()
        finally:
            self.stop.set()
            # A batch sampled but never trained is not acked: the buffer serves it again after its
            # visibility timeout (e.g. to the run that resumes this one).
            tasks = [t for t in (*workers, self.landing, self.next_batch) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.close()
        return {"eval_before": baseline, "eval_after": final, "version": self.version,
                "episodes": self.start.episodes + self.metrics.counts.get("episodes", 0),
                "phase_seconds": self.metrics.seconds}
