"""Pieces every app shares: the service handles, phase metrics, weight publishing, greedy eval."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import statistics
import time

from opentelemetry import trace

from forgerpc.clients import ChannelSettings, GeneratorClient, ReplayBufferClient, ReplicaGroup, RewardClient, TrainerClient
from forgerpc.v1 import common_pb2, reward_pb2

log = logging.getLogger("forgerpc.apps")
tracer = trace.get_tracer("forgerpc.orchestrator")


@dataclasses.dataclass
class Services:
    generator: ReplicaGroup
    reward: ReplicaGroup
    buffer: ReplicaGroup | None  # SFT needs no replay buffer
    trainer: ReplicaGroup

    @classmethod
    def connect(cls, addresses: dict[str, list[str]], settings: ChannelSettings = ChannelSettings()) -> "Services":
        return cls(
            generator=ReplicaGroup(GeneratorClient, addresses["generator"], strategy="least_loaded", settings=settings),
            reward=ReplicaGroup(RewardClient, addresses["reward"], settings=settings),
            buffer=(ReplicaGroup(ReplayBufferClient, addresses["replay_buffer"], settings=settings)
                    if addresses.get("replay_buffer") else None),
            trainer=ReplicaGroup(TrainerClient, addresses["trainer"], settings=settings),
        )

    async def close(self) -> None:
        for group in (self.generator, self.reward, self.buffer, self.trainer):
            if group is not None:
                await group.close()


class Metrics:
    """Phase timers and counters; one JSON line per training step in run_dir/metrics.jsonl."""

    def __init__(self, run_dir: pathlib.Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        """Names a phase once: the same name is the span, the timer and the metric."""
        start = time.perf_counter()
        with tracer.start_as_current_span(name):
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


async def publish(services: Services, metrics: Metrics, version: int) -> None:
    """trainer.publish_weights -> generator.update_weights.fanout; a failed replica is counted."""
    with metrics.phase("publish"):
        published = await services.trainer.publish_weights.call_one(version=version)
    with metrics.phase("update_weights"):
        results = await services.generator.update_weights.fanout(version=version, local_path=published.location)
    failed = [r for r in results if not r.ok]
    if failed:
        metrics.count("update_failures", len(failed))
        log.warning("weight update failed on %s", [(r.address, str(r.error)) for r in failed])


async def evaluate(services: Services, metrics: Metrics, examples, max_tokens: int, stop) -> float:
    """Greedy accuracy (mean reward) on held-out examples."""
    with metrics.phase("eval"):
        prompts = [common_pb2.Prompt(text=e.prompt, prompt_id=str(i)) for i, e in enumerate(examples)]
        params = common_pb2.SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop=list(stop))
        out = await services.generator.generate.route(prompts=prompts, sampling_params=params)
        items = [reward_pb2.RewardItem(prompt=e.prompt, response=c.text, target=e.target)
                 for e, c in zip(examples, out.completions)]
        scores = (await services.reward.evaluate.route(items=items)).scores
    return statistics.fmean(s.score for s in scores)
