"""A replay buffer on a shared Redis (compose, k8s, `make test`) leaves nothing behind for a run
nobody used: its stream and consumer group appear with the first episode, not at start.

Before: every start ran XGROUP CREATE ... MKSTREAM, so a health check or `forgerpc up` of the
deploy config (run_id `default`) left an empty `forgerpc:{default}:episodes` stream for good.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import redis
from conftest import REDIS_URL

from forgerpc.clients import ReplayBufferClient
from forgerpc.v1 import common_pb2


def _keys(prefix: str) -> list[bytes]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        return list(r.scan_iter(f"{prefix}:*"))
    finally:
        r.close()


def _group(n: int, tag: str) -> list[common_pb2.Episode]:
    return [common_pb2.Episode(episode_id=f"{tag}{i}", group_id=f"{tag}g", group_size=n,
                               prompt_token_ids=[1, 2], response_token_ids=[3], response_logprobs=[-0.5],
                               reward=float(i % 2)) for i in range(n)]


async def test_idle_buffer_leaves_no_keys_and_creates_its_stream_on_the_first_episode(serve_process):
    prefix = f"forgerpc-test-{uuid.uuid4().hex[:10]}"
    try:
        idle = serve_process("replay_buffer", f"redis.url={REDIS_URL}", f"key_prefix={prefix}")
        async with ReplayBufferClient(idle.address) as client:
            stats = await client.get_stats()  # works before any stream exists
            assert stats.stream_length == 0 and stats.pending == 0 and stats.window_size == 0
        idle.terminate()
        assert _keys(prefix) == [], "an unused buffer left keys in the shared Redis"

        # The same default run, used this time: the group is created once a producer made the
        # stream, at id 0, so the first episodes are read too.
        used = serve_process("replay_buffer", f"redis.url={REDIS_URL}", f"key_prefix={prefix}")
        async with ReplayBufferClient(used.address) as client:
            await client.add_episodes(episodes=_group(4, "a"))
            deadline = time.monotonic() + 10
            while (await client.get_stats()).window_size != 4:
                assert time.monotonic() < deadline, "the buffer never read the new stream"
                await asyncio.sleep(0.05)
            out = await client.sample(batch_size=4, current_policy_version=0, wait_seconds=2.0)
            assert sorted(e.episode_id for e in out.episodes) == ["a0", "a1", "a2", "a3"]
            assert (await client.ack(batch_id=out.batch_id)).acked == 4
        assert f"{prefix}:{{default}}:episodes".encode() in _keys(prefix)  # a used run keeps its state
    finally:
        keys = _keys(prefix)
        if keys:
            r = redis.Redis.from_url(REDIS_URL)
            r.delete(*keys)
            r.close()
