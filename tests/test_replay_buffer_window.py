"""The sampling window on its own (strategies, groups) and the buffer core in-process against the
real Redis (staleness property: nothing sampled is older than current version - max_age)."""

from __future__ import annotations

import asyncio
import collections
import os
import uuid

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgerpc.services.replay_buffer.buffer import ReplayBuffer
from forgerpc.services.replay_buffer.config import ReplayBufferConfig
from forgerpc.services.replay_buffer.window import Window
from forgerpc.v1 import common_pb2

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def episode(i: int, *, group: int | None = None, size: int = 1, reward: float = 0.0, advantage: float = 0.0,
            version: int = 0) -> common_pb2.Episode:
    return common_pb2.Episode(episode_id=f"e{i}", group_id="" if group is None else f"g{group}", group_size=size,
                              reward=reward, advantage=advantage, has_advantage=True, policy_version=version)


def window(**kw) -> Window:
    defaults = dict(max_policy_age=None, max_times_sampled=1, strategy="fifo", filter_equal_rewards=True, seed=0)
    return Window(**{**defaults, **kw})


def test_fifo_draws_in_arrival_order_and_skips_batches_in_flight():
    w = window()
    for i in range(10):
        w.add(f"1-{i}", episode(i))
    first = w.draw(4, 0, False)
    assert [i.episode.episode_id for i in first] == ["e0", "e1", "e2", "e3"]
    w.hold("b1", first, 0, deadline=1e18)
    assert [i.episode.episode_id for i in w.draw(3, 0, False)] == ["e4", "e5", "e6"]
    assert w.draw(4, 0, False)[0].episode.episode_id == "e4"


def test_prioritized_prefers_large_absolute_advantage():
    w = window(strategy="prioritized")
    for i in range(100):  # even ids: |advantage| 4, odd ids: 0 (drawn only through eps = 1e-3)
        w.add(f"1-{i}", episode(i, advantage=(-4.0 if i % 4 == 0 else 4.0) if i % 2 == 0 else 0.0))
    drawn = collections.Counter()
    for _ in range(50):
        drawn.update(int(i.episode.episode_id[1:]) % 2 for i in w.draw(10, 0, False))
    assert drawn[0] >= 0.95 * 500  # P(odd beats even) per pair is about eps / 4


def test_uniform_is_not_fifo():
    w = window(strategy="uniform")
    for i in range(100):
        w.add(f"1-{i}", episode(i))
    draws = [sorted(int(i.episode.episode_id[1:]) for i in w.draw(10, 0, False)) for _ in range(20)]
    assert sum(d == list(range(10)) for d in draws) == 0
    assert max(max(d) for d in draws) > 50


def test_whole_groups_round_down_to_complete_groups_but_return_at_least_one():
    w = window()
    for i in range(12):  # three groups of four, rewards 0,1,0,1
        w.add(f"1-{i}", episode(i, group=i // 4, size=4, reward=float(i % 2)))
    w.add("1-99", episode(99, group=7, size=4, reward=1.0))  # incomplete
    assert len(w.draw(10, 0, True)) == 8
    assert [i.episode.group_id for i in w.draw(3, 0, True)] == ["g0"] * 4
    assert all(i.episode.group_id != "g7" for i in w.draw(100, 0, True))


def test_fifo_whole_groups_skip_held_and_too_big_groups_and_take_later_ones_that_fit():
    # The fifo draw stops scanning at n; it must still pass over a group in flight and a group too
    # big for what is left, and take a later group that fits.
    w = window()
    n = 0
    for g, size in enumerate([2, 2, 4, 2]):  # g0 (2), g1 (2, held below), g2 (4), g3 (2)
        for _ in range(size):
            w.add(f"1-{n}", episode(n, group=g, size=size, reward=float(n % 2)))
            n += 1
    w.hold("b1", [i for i in w.by_episode.values() if i.episode.group_id == "g1"], 0, deadline=1e18)
    assert [i.episode.group_id for i in w.draw(5, 0, True)] == ["g0", "g0", "g3", "g3"]  # 2 + 4 > 5
    assert [i.episode.group_id for i in w.draw(6, 0, True)] == ["g0"] * 2 + ["g2"] * 4
    assert [i.episode.group_id for i in w.draw(1, 0, True)] == ["g0", "g0"]  # at least one group


def test_age_histogram_counts_items_held_by_age_after_removals():
    w = window(max_policy_age=10)
    for i in range(6):  # versions 0, 0, 1, 1, 2, 2
        w.add(f"1-{i}", episode(i, version=i // 2))
    assert w.age_histogram(3) == [0, 2, 2, 2]
    w.finish(w.hold("b1", w.draw(3, 3, False), 3, deadline=1e18))  # e0, e1, e2 done
    assert w.age_histogram(3) == [0, 2, 1]
    assert w.age_histogram(0) == [3]  # negative ages count at 0
    w.finish(w.hold("b2", w.draw(10, 3, False), 3, deadline=1e18))
    assert w.age_histogram(3) == [] and len(w) == 0


def test_equal_reward_group_is_filtered_when_complete():
    w = window()
    filtered = []
    for i in range(4):
        _, dropped = w.add(f"1-{i}", episode(i, group=0, size=4, reward=1.0))
        assert w.draw(4, 0, False) == [] or i == 3  # not drawable while incomplete
        filtered += dropped
    assert sorted(i.episode.episode_id for i in filtered) == ["e0", "e1", "e2", "e3"] and len(w) == 0
    unfiltered = window(filter_equal_rewards=False)
    for i in range(4):
        assert unfiltered.add(f"1-{i}", episode(i, group=0, size=4, reward=1.0))[1] == []
    assert len(unfiltered.draw(4, 0, True)) == 4


def test_duplicate_episode_id_is_refused():
    w = window()
    assert w.add("1-0", episode(0))[0] is not None
    assert w.add("1-1", episode(0))[0] is None and len(w) == 1


step = st.tuples(
    st.integers(0, 2),  # policy version bump before this step
    st.lists(st.integers(0, 4), max_size=8),  # per new episode: how many versions behind it is
    st.integers(1, 8),  # batch size
    st.booleans(),  # ack the batch
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_age=st.integers(0, 2), strategy=st.sampled_from(["fifo", "uniform", "prioritized"]),
       whole=st.booleans(), steps=st.lists(step, min_size=1, max_size=5))
def test_no_sampled_episode_is_older_than_max_age(max_age, strategy, whole, steps):
    """Property: every sampled episode has current_version - policy_version <= max_age, and every
    added episode is either trained, evicted as stale, or still held (none vanishes)."""
    asyncio.run(asyncio.wait_for(_staleness_run(max_age, strategy, whole, steps), 30))


async def _staleness_run(max_age, strategy, whole, steps):
    prefix = f"forgerpc-test-{uuid.uuid4().hex[:10]}"
    cfg = ReplayBufferConfig(redis={"url": REDIS_URL}, key_prefix=prefix, run_id="p", max_policy_age=max_age,
                             strategy=strategy, seed=0, read_block_ms=5, filter_equal_reward_groups=False)
    buffer = ReplayBuffer(cfg)
    await buffer.start()
    try:
        version, added, trained = 0, 0, 0
        for bump, lags, batch_size, ack in steps:
            version += bump
            new = [episode(added + k, group=(added + k) // 2, size=2, version=max(version - lag, 0))
                   for k, lag in enumerate(lags)]
            await buffer.producer.add(new)
            added += len(new)
            batch_id, items = await buffer.sample(batch_size, version, whole, wait=0.05)
            for item in items:
                assert version - item.episode.policy_version <= max_age, (version, item.episode)
            if ack and batch_id:
                trained += await buffer.ack(batch_id)
        await asyncio.sleep(0.05)  # let the reader take in the last entries
        stats = await buffer.stats()
        assert stats["acked_total"] == trained
        assert trained + stats["evicted_stale_total"] + stats["stream_length"] == added
    finally:
        await buffer.close()
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()
