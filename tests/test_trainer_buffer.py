"""TrainStep(from_buffer): real Redis, a real replay buffer process and a real trainer process.

The trainer samples, trains and acks; a batch it cannot train (bad episodes) or never finishes
(SIGKILL mid-step) stays un-acked and the buffer serves it again after its visibility timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import redis

from forgerpc.clients import ForgeRPCError, ReplayBufferClient, TrainerClient
from forgerpc.clients.episodes import StreamKeys
from forgerpc.v1 import common_pb2, trainer_pb2
from test_trainer_service import make_episodes, trainer_args

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
VISIBILITY = 2.0  # seconds before an un-acked batch is served again


def start(serve_process, tmp_path, prefix: str, *trainer_extra: str):
    buffer = serve_process("replay_buffer", f"redis.url={REDIS_URL}", f"key_prefix={prefix}", "run_id=t",
                           f"visibility_timeout_seconds={VISIBILITY}")
    trainer = serve_process("trainer", *trainer_args(tmp_path, f"replay_buffer_address={buffer.address}",
                                                     *trainer_extra))
    return buffer, trainer


def pull(batch_size: int, wait: float = 10.0) -> dict:
    return dict(from_buffer=trainer_pb2.BufferSample(batch_size=batch_size, whole_groups=True, wait_seconds=wait))


async def settled(buffer: ReplayBufferClient, window: int, acked: int, timeout: float = 15.0):
    """Waits until the buffer's window holds `window` episodes and `acked` were acked in all."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await buffer.get_stats()
        if stats.window_size == window and stats.acked_total == acked:
            return stats
        assert time.monotonic() < deadline, f"expected window={window} acked={acked}: {stats}"
        await asyncio.sleep(0.05)


async def test_trainer_samples_trains_and_acks(serve_process, tmp_path, prefix):
    b, t = start(serve_process, tmp_path, prefix)
    async with ReplayBufferClient(b.address) as buffer, TrainerClient(t.address) as trainer:
        await buffer.add_episodes(episodes=make_episodes(8))  # 2 groups of 4, rewards 0/1
        await settled(buffer, window=8, acked=0)
        r = await trainer.train_step(**pull(8))
        assert r.batch_id and (r.episodes, r.groups, r.step) == (8, 2, 1) and not r.skipped
        assert r.tokens == sum(len(e.response_token_ids) for e in make_episodes(8)) and r.grad_norm > 0
        stats = await settled(buffer, window=0, acked=8)
        assert stats.pending == 0  # gone from the stream: acked, not just sampled

        empty = await trainer.train_step(**pull(8, wait=0.2))
        assert empty.skipped and not empty.batch_id and empty.step == 1 and "no eligible episodes" in empty.skip_reason

        # A batch the trainer cannot train: FAILED_PRECONDITION naming batch and field, not acked.
        bad = make_episodes(4, seed=7)
        bad[2].response_token_ids[0] = 10_000  # outside the tiny model's vocabulary
        await buffer.add_episodes(episodes=bad)
        await settled(buffer, window=4, acked=8)
        with pytest.raises(ForgeRPCError) as err:
            await trainer.train_step(**pull(4))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == "INVALID_BUFFER_EPISODE"
        assert "episodes[2].response_token_ids" in err.value.message and err.value.details["batch_id"]
        assert (await trainer.get_state()).step == 1
        # Served again once the visibility timeout passes: the buffer still owns those episodes.
        again = await buffer.sample(batch_size=4, whole_groups=True, wait_seconds=VISIBILITY + 5)
        assert sorted(e.episode_id for e in again.episodes) == sorted(e.episode_id for e in bad)
        assert (await buffer.ack(batch_id=again.batch_id)).acked == 4


async def test_sigkill_mid_step_loses_no_episode(serve_process, tmp_path, prefix):
    """SIGKILL the trainer while it trains a sampled batch (the buffer's in-flight record exists):
    nothing is acked, and a new trainer trains the same episodes once the batch is served again."""
    long = [common_pb2.Episode(episode_id=f"long-{i}", group_id=f"g{i // 4}", group_size=4,
                               prompt_token_ids=[5 + i % 80] * 40, response_token_ids=[7 + (i * 3) % 80] * 200,
                               response_logprobs=[-4.6] * 200, reward=float(i % 2)) for i in range(48)]
    # One episode per micro-batch with a reference model: a step of seconds, far longer than the poll.
    slow = ("micro_batch_size=1", "loss.beta=0.1")
    b, t = start(serve_process, tmp_path, prefix, *slow)
    in_flight = StreamKeys(prefix, "t").batches
    r = redis.Redis.from_url(REDIS_URL)
    try:
        async with ReplayBufferClient(b.address) as buffer:
            await buffer.add_episodes(episodes=long)
            await settled(buffer, window=48, acked=0)
            async with TrainerClient(t.address) as trainer:
                step = asyncio.create_task(trainer.train_step(**pull(48)))
                deadline = time.monotonic() + 30
                while not r.hlen(in_flight):  # sampled: the trainer holds the batch and is training
                    assert time.monotonic() < deadline and not step.done(), "the trainer never sampled"
                    await asyncio.sleep(0.005)
                os.kill(t.proc.pid, signal.SIGKILL)
                t.proc.wait(10)
                with pytest.raises(ForgeRPCError) as err:
                    await step
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
            stats = await buffer.get_stats()
            assert stats.acked_total == 0 and stats.pending == 48  # not lost, not acked

            t2 = serve_process("trainer", *trainer_args(tmp_path / "again", f"replay_buffer_address={b.address}"))
            async with TrainerClient(t2.address) as trainer:
                done = await trainer.train_step(**pull(48, wait=VISIBILITY + 10))
            assert (done.episodes, done.groups, done.step) == (48, 12, 1) and not done.skipped
            stats = await settled(buffer, window=0, acked=48)
            assert stats.pending == 0 and stats.stream_length == 0
    finally:
        r.close()
