"""Replay buffer benchmark: episodes/s through produce -> buffer -> sample -> ack, vs bare Redis.

    .venv/bin/python bench/replay_buffer.py                  # 40,960 episodes each side
    .venv/bin/python bench/replay_buffer.py --episodes 5000  # quick run

Episodes are realistic: 256 prompt + 256 response token ids and 256 logprobs (about 2.6 KB of
protobuf each), groups of 8. Both sides move the same pre-serialized payloads through the same
Redis server (REDIS_URL, default redis://127.0.0.1:6379/0) in batches of `--batch`:

    ours  a producer task (EpisodeStream.add, back-pressure Lua script) runs concurrently with a
          trainer loop Sample(batch) -> Ack(batch_id) over gRPC to `forgerpc serve replay_buffer`,
          a separate process that XREADGROUPs into its window and commits each Ack atomically.
    bare  one loop per batch: pipelined XADD x batch, XREADGROUP COUNT batch, XACK + XDEL.

    episodes_per_s   = episodes / seconds from the first add until the last episode is acked
    bare_redis_per_s = episodes / seconds of the bare loop
    ratio            = episodes_per_s / bare_redis_per_s              (targets: >= 5000/s, >= 0.3)

Results go to bench/results/replay_buffer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import time
import uuid

import redis.asyncio as aioredis

from forgerpc.clients import ReplayBufferClient
from forgerpc.clients.episodes import EpisodeStream
from forgerpc.v1 import common_pb2

OUT = pathlib.Path(__file__).parent / "results" / "replay_buffer.json"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def payloads(n: int, group_size: int = 8) -> list[bytes]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        e = common_pb2.Episode(
            episode_id=f"ep-{i}", group_id=f"g-{i // group_size}", group_size=group_size,
            prompt_token_ids=[rng.randrange(49_152) for _ in range(256)],
            response_token_ids=[rng.randrange(49_152) for _ in range(256)],
            response_logprobs=[-rng.random() * 5 for _ in range(256)],
            reward=float(i % 2), policy_version=0, created_unix_ms=int(time.time() * 1000))
        out.append(e.SerializeToString())
    return out


async def bare(redis: aioredis.Redis, data: list[bytes], batch: int, prefix: str) -> float:
    stream, group = f"{prefix}:bare", "g"
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        async with redis.pipeline(transaction=False) as pipe:
            for p in data[i:i + batch]:
                pipe.xadd(stream, {"ep": p})
            await pipe.execute()
        out = await redis.xreadgroup(group, "c", {stream: ">"}, count=batch)
        ids = [sid for sid, _ in out[0][1]]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, group, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()
    seconds = time.perf_counter() - start
    assert await redis.xlen(stream) == 0
    await redis.delete(stream)
    return len(data) / seconds


def start_buffer(prefix: str, window: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgerpc.services", "serve", "replay_buffer", "--port", "0",
         f"redis.url={REDIS_URL}", f"key_prefix={prefix}", "run_id=bench", f"window_size={window}",
         "max_backlog=100000", "filter_equal_reward_groups=false"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("FORGERPC_READY"):
        proc.kill()
        raise RuntimeError(f"replay buffer did not start: {line!r}")
    return proc, line.split()[2]


async def ours(data: list[bytes], batch: int, prefix: str, window: int) -> tuple[float, dict]:
    proc, address = start_buffer(prefix, window)
    try:
        async with ReplayBufferClient(address) as client, \
                EpisodeStream(REDIS_URL, run_id="bench", key_prefix=prefix, max_backlog=100_000) as stream:
            await client.get_stats()  # channel up before the clock starts
            start = time.perf_counter()

            async def produce():
                for i in range(0, len(data), batch):
                    await stream.add(data[i:i + batch])

            producer = asyncio.create_task(produce())
            trained = 0
            while trained < len(data):
                # The last batch may be short: ask for what is left, or Sample waits out wait_seconds.
                want = min(batch, len(data) - trained)
                out = await client.sample(batch_size=want, current_policy_version=0, wait_seconds=1.0)
                if out.batch_id:
                    trained += (await client.ack(batch_id=out.batch_id)).acked
            seconds = time.perf_counter() - start
            await producer
            stats = await client.get_stats()
            assert stats.stream_length == 0 and stats.acked_total == len(data)
            return len(data) / seconds, {"window_size": stats.window_size, "acked_total": stats.acked_total}
    finally:
        proc.kill()
        proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40_960)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window", type=int, default=4096)
    args = parser.parse_args()
    data = payloads(args.episodes)
    prefix = f"forgerpc-bench-{uuid.uuid4().hex[:8]}"
    redis = aioredis.from_url(REDIS_URL)
    try:
        bare_1 = await bare(redis, data, args.batch, prefix)
        ours_rate, extra = await ours(data, args.batch, prefix, args.window)
        bare_2 = await bare(redis, data, args.batch, prefix)  # before and after: machine noise
    finally:
        keys = [k async for k in redis.scan_iter(f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    bare_rate = (bare_1 + bare_2) / 2
    result = {
        "episodes_per_s": round(ours_rate, 1), "bare_redis_per_s": round(bare_rate, 1),
        "ratio": round(ours_rate / bare_rate, 3), "bare_runs_per_s": [round(bare_1, 1), round(bare_2, 1)],
        "episodes": args.episodes, "batch": args.batch, "episode_bytes": sum(map(len, data)) // len(data),
        "targets": {"episodes_per_s": 5000, "ratio": 0.3}, **extra,
        "machine": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
