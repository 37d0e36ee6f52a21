"""Pieces every app shares: the service handles, phase metrics, weight publishing, greedy eval,
and the checkpoint position an app resumes from."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import statistics
import time
from typing import Callable

from opentelemetry import metrics, propagate, trace

from forgerpc.clients import ChannelSettings, GeneratorClient, ReplayBufferClient, ReplicaGroup, RewardClient, TrainerClient
from forgerpc.v1 import common_pb2, reward_pb2

log = logging.getLogger("forgerpc.apps")
tracer = trace.get_tracer("forgerpc.orchestrator")
meter = metrics.get_meter("forgerpc.orchestrator")


def current_traceparent() -> str:
    """The current span as a W3C traceparent, to carry a rollout's trace inside its episodes."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def add_group(request, group_id: str, members: list, advantages: list[float], now_ms: int, traceparent: str) -> None:
    """Appends one group's episodes, `members` = [(Completion, RewardScore)], to an
    AddEpisodesRequest. Built in place (scalars set, lists extended): an Episode made with a dict
    for its map field and then copied into the request costs twice the CPU."""
    for (c, s), a in zip(members, advantages):
        e = request.episodes.add(
            episode_id=f"{group_id}-{c.index}", group_id=group_id, group_size=len(members), reward=s.score,
            advantage=a, has_advantage=True, policy_version=c.policy_version, created_unix_ms=now_ms,
            traceparent=traceparent)
        e.prompt_token_ids.extend(c.prompt_token_ids)
        e.response_token_ids.extend(c.token_ids)
        e.response_logprobs.extend(c.logprobs)
        e.sub_scores.update(s.sub_scores)


def rollout_links(episodes, limit: int = 32) -> list[trace.Link]:
    """Links from a training step's span to the (sampled) rollouts its episodes came from: the
    trace crosses Redis this way, since a step consumes many rollouts and has one parent."""
    links = []
    for tp in dict.fromkeys(e.traceparent for e in episodes if e.traceparent):
        context = trace.get_current_span(propagate.extract({"traceparent": tp})).get_span_context()
        if context.is_valid:
            links.append(trace.Link(context))
        if len(links) == limit:
            break
    return links


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
    """Phase timers and counters; one JSON line per training step in run_dir/metrics.jsonl.

    The same figures go to OpenTelemetry (exported when `forgerpc run` set up a meter provider):
    each phase's duration is the histogram `forgerpc.phase.duration` (s, attribute `phase`), each
    count the counter `forgerpc.<name>`, and each numeric field of a row the gauge
    `forgerpc.run.<field>` (attribute `phase`: sft or grpo), e.g. forgerpc.run.eval_accuracy.
    """

    phase_duration = meter.create_histogram("forgerpc.phase.duration", unit="s",
                                            description="wall time of one named phase of the loop")

    def __init__(self, run_dir: pathlib.Path, on_row: Callable[[dict], None] | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.file = open(run_dir / "metrics.jsonl", "a")  # appended: a resumed run continues the file
        self.on_row = on_row  # e.g. the live progress display
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.counters: dict[str, metrics.Counter] = {}
        self.gauges: dict[str, metrics.Gauge] = {}

    @contextlib.contextmanager
    def phase(self, name: str, links: list[trace.Link] | None = None):
        """Names a phase once: the same name is the span, the timer and the metric."""
        start = time.perf_counter()
        with tracer.start_as_current_span(name, links=links):
            yield
        seconds = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.phase_duration.record(seconds, {"phase": name})

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n
        counter = self.counters.get(name) or self.counters.setdefault(name, meter.create_counter(f"forgerpc.{name}"))
        counter.add(n)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if "event" not in row:  # resume and other event rows are not measurements
            attributes = {"phase": str(row.get("phase", ""))}
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "time":
                    gauge = self.gauges.get(key) or self.gauges.setdefault(key, meter.create_gauge(f"forgerpc.run.{key}"))
                    gauge.set(value, attributes)
        if self.on_row is not None:
            self.on_row(row)

    def close(self) -> None:
        self.file.close()


# A gRPC target ("host:port", "[::1]:port", "dns:host:port", "unix:/path"), not a directory.
_ADDRESS = re.compile(r"unix:.+|(?:(?:dns|ipv4|ipv6):(?://[^/]*/)?)?(?:\[[0-9A-Fa-f:.]+\]|[\w.-]+):\d+")
PUBLISHED_VERSION = "published_version"  # run_dir file: the highest version ever published


def is_store_address(location: str) -> bool:
    """True when PublishWeightsResponse.location names a weight store rather than a directory."""
    return bool(_ADDRESS.fullmatch(location))


def last_published(run_dir: pathlib.Path) -> int:
    path = run_dir / PUBLISHED_VERSION
    return int(path.read_text()) if path.is_file() else 0


async def publish(services: Services, metrics: Metrics, version: int) -> None:
    """trainer.publish_weights -> generator.update_weights.fanout (publish_weights, then update_generators)."""
    await update_generators(services, metrics, version, await publish_weights(services, metrics, version))


async def publish_weights(services: Services, metrics: Metrics, version: int) -> dict:
    """The trainer publishes its weights as `version`; returns where the generators find them:
    its weight store (location is the store's address) or a directory on a shared disk (the path)."""
    with metrics.phase("publish"):
        published = await services.trainer.publish_weights.call_one(version=version)
    # Remembered so that a resumed run never reuses a number for different weights.
    tmp = metrics.run_dir / f".{PUBLISHED_VERSION}.tmp"
    tmp.write_text(str(version))
    os.replace(tmp, metrics.run_dir / PUBLISHED_VERSION)
    return ({"weight_store_address": published.location} if is_store_address(published.location)
            else {"local_path": published.location})


async def update_generators(services: Services, metrics: Metrics, version: int, source: dict) -> None:
    """generator.update_weights.fanout(version) from `source`; a failed replica is counted and logged."""
    with metrics.phase("update_weights"):
        results = await services.generator.update_weights.fanout(version=version, **source)
    failed = [r for r in results if not r.ok]
    if failed:
        metrics.count("update_failures", len(failed))
        log.warning("weight update failed on %s", [(r.address, str(r.error)) for r in failed])


@dataclasses.dataclass
class Position:
    """Where an app stands; saved as the trainer checkpoint's `data_position` (JSON), so that the
    weights and the data position are always saved together.

    phase: "sft" or "grpo"; step: the phase's last completed step; version: the policy version
    published at that point; drawn: GRPO training prompts drawn so far (prompt i comes from its
    own seeded RNG); episodes: GRPO episodes generated so far; rng: the SFT sampler's
    random.getstate(); done: the phase ended early (SFT reached sft.until_accuracy),
    so a resume goes straight to the next one.
    """

    phase: str
    step: int
    version: int
    drawn: int = 0
    episodes: int = 0
    rng: list | None = None
    done: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Position":
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"the checkpoint's data_position is not an app position ({e}): {text[:200]!r}") from None


async def checkpoint(services: Services, metrics: Metrics, position: Position) -> str:
    """trainer.save_checkpoint with the app's position; returns the checkpoint's path."""
    with metrics.phase("checkpoint"):
        saved = await services.trainer.save_checkpoint.call_one(data_position=position.to_json())
    return saved.path


async def evaluate(services: Services, metrics: Metrics, examples, max_tokens: int, stop) -> float:
    """Greedy accuracy (mean reward) on held-out examples."""
    with metrics.phase("eval"):
        prompts = [common_pb2.Prompt(text=e.prompt, prompt_id=str(i)) for i, e in enumerate(examples)]
        params = common_pb2.SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop=list(stop))
        out = await services.generator.generate.route(prompts=prompts, sampling_params=params)
        items = [reward_pb2.RewardItem(prompt=e.prompt, response=c.text, target=e.target,
                                       metadata=dict(e.metadata))  # e.g. a code task's tests
                 for e, c in zip(examples, out.completions)]
        scores = (await services.reward.evaluate.route(items=items)).scores
    return statistics.fmean(s.score for s in scores)
