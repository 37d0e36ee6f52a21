"""The replay buffer as a real process over the real Redis: validation, groups, staleness,
visibility timeout, back-pressure, and no episode lost or trained twice across a SIGKILL of the
buffer or a restart of Redis (its own redis-server with AOF)."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import socket
import subprocess
import sys
import time

import grpc
import pytest
import redis

from forgerpc.clients import ForgeRPCError, ReplayBufferClient, RetryPolicy
from forgerpc.clients.episodes import BackpressureTimeout, EpisodeStream
from forgerpc.v1 import common_pb2

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PATIENT = RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.5)


def episodes(n: int, *, start: int = 0, group_size: int = 4, version: int = 0, tag: str = "e",
             reward=lambda i: float(i % 2)) -> list[common_pb2.Episode]:
    """n episodes in groups of `group_size`, rewards alternating 0/1 unless `reward` says otherwise."""
    return [common_pb2.Episode(
        episode_id=f"{tag}{i}", group_id=f"{tag}g{i // group_size}", group_size=group_size,
        prompt_token_ids=[1, 2, 3], response_token_ids=[4, 5], response_logprobs=[-0.5, -0.25],
        reward=reward(i), policy_version=version) for i in range(start, start + n)]


def buffer_args(prefix: str, *extra: str, url: str = REDIS_URL) -> list[str]:
    return [f"redis.url={url}", f"key_prefix={prefix}", "run_id=t", *extra]


async def ingested(client, window_size: int, timeout: float = 10.0):
    """Waits until the buffer has read the stream into its window (it reads in the background)."""
    deadline = time.monotonic() + timeout
    while (stats := await client.get_stats()).window_size != window_size or stats.stream_length != stats.pending:
        assert time.monotonic() < deadline, f"window never reached {window_size}: {stats}"
        await asyncio.sleep(0.02)
    return stats


async def sample_ids(client, n, version=0, whole=False, wait=2.0):
    out = await client.sample(batch_size=n, current_policy_version=version, whole_groups=whole, wait_seconds=wait)
    return out.batch_id, [e.episode_id for e in out.episodes]


async def test_bad_input_is_invalid_argument_naming_the_field(serve_process, prefix):
    proc = serve_process("replay_buffer", *buffer_args(prefix))
    ok = episodes(1)[0]
    cases = [
        ("sample", dict(batch_size=0), "batch_size"),
        ("sample", dict(batch_size=4, current_policy_version=-1), "current_policy_version"),
        ("sample", dict(batch_size=4, wait_seconds=-1.0), "wait_seconds"),
        ("add_episodes", dict(episodes=[]), "episodes"),
        ("add_episodes", dict(episodes=[ok, common_pb2.Episode(group_id="g")]), "episodes[1].episode_id"),
        ("add_episodes", dict(episodes=[common_pb2.Episode(episode_id="x", response_token_ids=[1, 2],
                                                           response_logprobs=[0.0])]), "episodes[0].response_logprobs"),
        ("add_episodes", dict(episodes=[ok], max_wait_seconds=-2.0), "max_wait_seconds"),
        ("ack", dict(batch_id=""), "batch_id"),
    ]
    async with ReplayBufferClient(proc.address) as client:
        for method, fields, field in cases:
            with pytest.raises(ForgeRPCError) as err:
                await getattr(client, method)(**fields)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (method, fields)
            assert err.value.details.get("field") == field and field in err.value.message
        with pytest.raises(ForgeRPCError) as err:
            await client.ack(batch_id="no-such-batch")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert (await client.get_stats()).stream_length == 0  # nothing was written


def test_unreachable_redis_is_a_clear_start_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    out = subprocess.run([sys.executable, "-m", "forgerpc.services", "serve", "replay_buffer", "--port", "0",
                          f"redis.url={url}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"127.0.0.1:{port}" in out.stderr and "redis.url" in out.stderr
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr
    assert "FORGERPC_READY" not in out.stdout


async def test_whole_groups_filtering_staleness_and_stats(serve_process, prefix):
    proc = serve_process("replay_buffer", *buffer_args(prefix, "max_policy_age=1"))
    async with ReplayBufferClient(proc.address) as client:
        # g0, g1: mixed rewards; g2: all rewards 1.0 -> filtered; g3: version 0, goes stale at 2.
        await client.add_episodes(episodes=episodes(8, version=2) + episodes(4, start=8, version=2, reward=lambda i: 1.0)
                                  + episodes(4, start=12, version=0))
        await client.add_episodes(episodes=episodes(2, start=16, version=2))  # g4 incomplete (2 of 4)
        await ingested(client, 4 + 4 + 4 + 2)  # g2 filtered on arrival
        batch_id, ids = await sample_ids(client, 10, version=2, whole=True)
        assert sorted(ids) == [f"e{i}" for i in range(8)]  # g0 + g1: two whole groups fit in 10
        stats = await client.get_stats()
        assert stats.filtered_groups_total == 1 and stats.evicted_stale_total == 4
        assert stats.window_size == 8 + 2 and stats.stream_length == 10 and stats.pending == 10
        assert list(stats.age_histogram_counts) == [10]
        assert (await client.ack(batch_id=batch_id)).acked == 8
        assert (await client.ack(batch_id=batch_id)).acked == 0  # a repeated Ack is a no-op
        _, ids = await sample_ids(client, 8, version=2, whole=True, wait=0.2)
        assert ids == []  # only the incomplete group is left
        await client.add_episodes(episodes=episodes(2, start=18, version=2))
        _, ids = await sample_ids(client, 6, version=2, whole=True)  # one group of 4 is all that fits
        assert sorted(ids) == ["e16", "e17", "e18", "e19"]
        stats = await client.get_stats()
        assert stats.acked_total == 8 and stats.stream_length == 4


async def test_sample_wait_longer_than_the_client_timeout_is_not_a_deadline(serve_process, prefix):
    """The SDK's deadline for Sample starts after wait_seconds: an empty buffer answers after the
    wait with an empty batch, not DEADLINE_EXCEEDED from a client whose timeout is shorter."""
    proc = serve_process("replay_buffer", *buffer_args(prefix))
    async with ReplayBufferClient(proc.address, timeout=0.5) as client:
        start = time.monotonic()
        out = await client.sample(batch_size=4, wait_seconds=1.0)
        assert list(out.episodes) == [] and time.monotonic() - start >= 1.0


async def test_unacked_batch_is_served_again_after_visibility_timeout(serve_process, prefix):
    proc = serve_process("replay_buffer", *buffer_args(prefix, "visibility_timeout_seconds=1"))
    async with ReplayBufferClient(proc.address) as client:
        await client.add_episodes(episodes=episodes(8))
        first, ids = await sample_ids(client, 8)
        assert len(ids) == 8
        assert (await sample_ids(client, 8, wait=0.0))[1] == []  # in flight: not served twice
        start = time.monotonic()
        second, again = await sample_ids(client, 8, wait=5.0)
        assert sorted(again) == sorted(ids) and time.monotonic() - start > 0.5
        with pytest.raises(ForgeRPCError) as err:
            await client.ack(batch_id=first)
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "visibility" in err.value.message
        assert (await client.ack(batch_id=second)).acked == 8
        assert (await client.get_stats()).stream_length == 0


async def test_backpressure_waits_then_times_out(serve_process, prefix):
    proc = serve_process("replay_buffer", *buffer_args(prefix, "max_backlog=8", "window_size=8"))
    async with ReplayBufferClient(proc.address) as client, \
            EpisodeStream(REDIS_URL, run_id="t", key_prefix=prefix, max_backlog=8) as stream:
        await stream.add(episodes(8))
        with pytest.raises(BackpressureTimeout):
            await stream.add(episodes(1, start=8), max_wait_seconds=0.3)
        with pytest.raises(ForgeRPCError) as err:
            await client.add_episodes(episodes=episodes(1, start=8), max_wait_seconds=0.3)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        async def train_one_batch_later():
            await asyncio.sleep(0.3)
            batch_id, ids = await sample_ids(client, 4)
            await client.ack(batch_id=batch_id)

        trainer = asyncio.create_task(train_one_batch_later())
        result = await stream.add(episodes(4, start=8), max_wait_seconds=10)
        await trainer
        assert result.waited_seconds >= 0.2 and await stream.backlog() == 8
        assert (await client.get_stats()).backpressure_wait_seconds >= 0.8  # 0.3 + 0.3 + this wait


async def test_reuse_up_to_max_times_never_twice_in_one_version(serve_process, prefix):
    proc = serve_process("replay_buffer", *buffer_args(prefix, "max_times_sampled=2", "filter_equal_reward_groups=false"))
    trained = collections.Counter()
    async with ReplayBufferClient(proc.address) as client:
        await client.add_episodes(episodes=episodes(6))
        await ingested(client, 6)
        for version in range(4):
            while True:
                batch_id, ids = await sample_ids(client, 4, version=version, wait=0.0)
                if not ids:
                    break
                assert not {(i, version) for i in ids} & set(trained)  # once per version at most
                trained.update((i, version) for i in ids)
                await client.ack(batch_id=batch_id)
        per_episode = collections.Counter(i for i, _ in trained)
        assert per_episode == {f"e{i}": 2 for i in range(6)}
        assert (await client.get_stats()).stream_length == 0


async def drain(client, ledger: collections.Counter, total: int, timeout: float, batch: int = 64) -> None:
    """Trains (records in the ledger) and acks batches until `total` episodes were trained."""
    deadline = time.monotonic() + timeout
    while sum(ledger.values()) < total and time.monotonic() < deadline:
        batch_id, ids = await sample_ids(client, batch, wait=0.5)
        if ids:
            ledger.update(ids)
            assert (await client.ack(batch_id=batch_id)).acked == len(ids)


async def test_sigkill_of_the_buffer_loses_nothing_and_trains_each_episode_once(serve_process, prefix):
    """1,000 episodes in the stream, more arriving, a batch trained but not acked and another
    sampled but never seen by the trainer (response lost) when the buffer is SIGKILLed."""
    args = buffer_args(prefix, "visibility_timeout_seconds=2", "filter_equal_reward_groups=false")
    total = 1500
    all_episodes = episodes(total)
    ledger: collections.Counter = collections.Counter()
    stream = EpisodeStream(REDIS_URL, run_id="t", key_prefix=prefix)
    await stream.add(all_episodes[:1000])

    async def produce_rest():  # the rollout workers go on regardless of the buffer's fate
        for i in range(1000, total, 50):
            await stream.add(all_episodes[i:i + 50])
            await asyncio.sleep(0.02)

    producer = asyncio.create_task(produce_rest())
    first = serve_process("replay_buffer", *args)
    async with ReplayBufferClient(first.address) as client:
        for _ in range(4):
            batch_id, ids = await sample_ids(client, 64)
            ledger.update(ids)
            await client.ack(batch_id=batch_id)
        trained_not_acked, ids = await sample_ids(client, 64)
        ledger.update(ids)  # the optimizer step ran; the Ack has not been sent yet
        lost, lost_ids = await sample_ids(client, 64)  # this response never reaches the trainer
        assert len(ids) == len(lost_ids) == 64
        assert (await client.get_stats()).pending >= 1000 - 4 * 64
    first.proc.kill()  # SIGKILL: no drain, no cleanup
    first.proc.wait(10)

    second = serve_process("replay_buffer", *args)
    async with ReplayBufferClient(second.address, retry=PATIENT) as client:
        assert (await client.ack(batch_id=trained_not_acked)).acked == 64  # the batch record survived
        await drain(client, ledger, total, timeout=60)
        await producer
        await drain(client, ledger, total, timeout=30)
        stats = await client.get_stats()
    await stream.close()
    assert set(ledger) == {e.episode_id for e in all_episodes}  # none lost
    assert max(ledger.values()) == 1  # none trained twice
    assert set(lost_ids) <= set(ledger)  # the lost batch was served again after its timeout
    assert stats.stream_length == 0 and stats.pending == 0 and stats.acked_total == total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, directory) -> subprocess.Popen:
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                             "--requirepass", "s3cret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="s3cret")
    for _ in range(100):
        try:
            client.ping()
            client.close()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not start")


@pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="needs the redis-server binary")
async def test_redis_restart_with_aof_loses_no_unacknowledged_episode(serve_process, tmp_path):
    port = _free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"  # the password travels in the URL
    server = _start_redis(port, tmp_path)
    try:
        proc = serve_process("replay_buffer", *buffer_args("forgerpc-test", "filter_equal_reward_groups=false", url=url))
        ledger: collections.Counter = collections.Counter()
        stream = EpisodeStream(url, run_id="t", key_prefix="forgerpc-test")
        await stream.add(episodes(300))
        async with ReplayBufferClient(proc.address, retry=PATIENT) as client:
            await drain(client, ledger, 128, timeout=20)
            in_flight, ids = await sample_ids(client, 50)
            ledger.update(ids)
            server.kill()  # a crash, not a clean shutdown: only the AOF (fsync always) remains
            server.wait(10)
            server = _start_redis(port, tmp_path)
            assert (await client.ack(batch_id=in_flight)).acked == 50  # retried until Redis is back
            await stream.add(episodes(100, start=300))
            await drain(client, ledger, 400, timeout=40)
            stats = await client.get_stats()
        await stream.close()
        assert set(ledger) == {f"e{i}" for i in range(400)} and max(ledger.values()) == 1
        assert stats.stream_length == 0 and stats.acked_total == 400
    finally:
        server.kill()
        server.wait(10)


async def test_redelivered_duplicate_is_never_trained_twice(serve_process, prefix):
    """A producer retrying an XADD writes the same episode twice: before and after training."""
    proc = serve_process("replay_buffer", *buffer_args(prefix, "filter_equal_reward_groups=false"))
    async with ReplayBufferClient(proc.address) as client, \
            EpisodeStream(REDIS_URL, run_id="t", key_prefix=prefix) as stream:
        await stream.add(episodes(4) + episodes(2))  # e0, e1 twice while held
        await ingested(client, 4)
        batch_id, ids = await sample_ids(client, 8, wait=0.0)
        assert sorted(ids) == ["e0", "e1", "e2", "e3"]
        await client.ack(batch_id=batch_id)
        await stream.add(episodes(1))  # e0 again, after it trained
        await ingested(client, 0)
        assert (await sample_ids(client, 8, wait=0.3))[1] == []
        stats = await client.get_stats()
        assert stats.stream_length == 0 and stats.pending == 0 and stats.acked_total == 4
