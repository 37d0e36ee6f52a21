"""The sampling window: episodes read from the stream and not yet done with, kept in GRPO groups.

Pure bookkeeping, no I/O: `buffer.py` moves entries between Redis and this window.

An item is *eligible* at policy version v when it is not in a batch, was not already sampled at v
(the same episode is never trained twice in one version) and its group allows it: when group
filtering is on, a group of size >= 2 becomes drawable only once complete and only if its rewards
are not all equal (GRPO advantages A_i = r_i - mean(r) are then all 0, so it carries no signal).

Staleness: with max age a, an item of policy version p is evicted at v when v - p > a.

Strategies, over units (whole groups, or single episodes):
    fifo         arrival order
    uniform      uniformly random without replacement
    prioritized  without replacement, P(unit) proportional to w = mean|advantage| + eps, drawn by
                 Efraimidis-Spirakis keys u^(1/w), u ~ U(0, 1): the k largest keys form the sample.
"""

from __future__ import annotations

import dataclasses
import random

from forgerpc.v1 import common_pb2


@dataclasses.dataclass(slots=True, eq=False)
class Item:
    sid: str  # Redis stream id
    episode: common_pb2.Episode
    group: "Group"
    raw: bytes = b""  # the episode exactly as the producer encoded it (served without re-encoding)
    times_trained: int = 0
    last_version: int = -1  # policy version it was last sampled at
    batch: str | None = None  # batch holding it, None when available


@dataclasses.dataclass(slots=True, eq=False)
class Group:
    gid: str
    size: int
    items: dict[str, Item] = dataclasses.field(default_factory=dict)  # sid -> item, arrival order
    arrived: int = 0
    passed: bool = False  # drawable (complete and not filtered, or no filter applies)


@dataclasses.dataclass(slots=True, eq=False)
class Batch:
    batch_id: str
    version: int
    items: list[Item]
    deadline: float  # unix seconds; after it the items go back to the window
    previous_versions: list[int]


class Window:
    """Groups of items in arrival order, the batches in flight, and the draw strategies."""

    def __init__(self, *, max_policy_age: int | None, max_times_sampled: int, strategy: str,
                 filter_equal_rewards: bool, priority_epsilon: float = 1e-3, seed: int | None = None):
        self.max_age = max_policy_age
        self.max_times = max_times_sampled
        self.strategy = strategy
        self.filter = filter_equal_rewards
        self.eps = priority_epsilon
        self.rng = random.Random(seed)
        self.groups: dict[str, Group] = {}
        self.by_episode: dict[str, Item] = {}
        self.batches: dict[str, Batch] = {}
        self._min_version: int | None = None  # lower bound on versions held, to skip stale scans
        self._versions: dict[int, int] = {}  # policy_version -> items held (for age_histogram)

    def __len__(self) -> int:
        return len(self.by_episode)

    # -- arrivals -------------------------------------------------------------------------------
    def add(self, sid: str, episode: common_pb2.Episode, times_trained: int = 0,
            last_version: int = -1, raw: bytes = b"") -> tuple[Item | None, list[Item]]:
        """Adds one episode. Returns (item, filtered): item is None for a duplicate episode_id;
        filtered lists the members of a group dropped by this arrival (all rewards equal)."""
        if episode.episode_id in self.by_episode:
            return None, []
        gid = episode.group_id or f"episode:{episode.episode_id}"
        size = max(episode.group_size, 1) if episode.group_id else 1
        group = self.groups.get(gid)
        if group is None:
            group = self.groups[gid] = Group(gid, size)
        item = Item(sid, episode, group, raw or episode.SerializeToString(), times_trained, last_version)
        group.items[sid] = item
        group.arrived += 1
        self.by_episode[episode.episode_id] = item
        v = episode.policy_version
        self._versions[v] = self._versions.get(v, 0) + 1
        self._min_version = v if self._min_version is None else min(self._min_version, v)
        filtered: list[Item] = []
        if not group.passed and group.arrived >= group.size:
            rewards = [i.episode.reward for i in group.items.values()]
            if self.filter and group.size >= 2 and max(rewards) - min(rewards) <= 1e-12:
                filtered = list(group.items.values())
                for i in filtered:
                    self.remove(i)
            else:
                group.passed = True
        return item, filtered

    def remove(self, item: Item) -> None:
        group = item.group
        group.items.pop(item.sid, None)
        if self.by_episode.pop(item.episode.episode_id, None) is not None:
            v = item.episode.policy_version
            if self._versions[v] == 1:
                del self._versions[v]
            else:
                self._versions[v] -= 1
        if not group.items:
            self.groups.pop(group.gid, None)

    # -- staleness ------------------------------------------------------------------------------
    def evict_stale(self, version: int) -> list[Item]:
        """Removes and returns available items with version - policy_version > max_age."""
        if self.max_age is None or self._min_version is None or version - self._min_version <= self.max_age:
            return []
        stale, low = [], None
        for group in list(self.groups.values()):
            for item in list(group.items.values()):
                v = item.episode.policy_version
                if item.batch is None and version - v > self.max_age:
                    stale.append(item)
                    self.remove(item)
                else:
                    low = v if low is None else min(low, v)
        self._min_version = low
        return stale

    # -- drawing --------------------------------------------------------------------------------
    def _eligible(self, item: Item, version: int) -> bool:
        return item.batch is None and item.last_version != version and (item.group.passed or not self.filter)

    def _units(self, version: int, whole_groups: bool) -> list[list[Item]]:
        units = []
        for group in self.groups.values():
            if whole_groups:
                members = list(group.items.values())
                if len(members) >= group.size and group.passed and all(self._eligible(i, version) for i in members):
                    units.append(members)
            else:
                units.extend([i] for i in group.items.values() if self._eligible(i, version))
        return units

    def _fifo_single(self, n: int, version: int) -> list[Item]:
        # The common case, without building every unit: stop once n are found.
        out = []
        for group in self.groups.values():
            for item in group.items.values():
                if self._eligible(item, version):
                    out.append(item)
                    if len(out) == n:
                        return out
        return out

    def _fifo_groups(self, n: int, version: int) -> list[Item]:
        # draw's loop over _units for fifo, without building a unit per group held: stop at n.
        out: list[Item] = []
        for group in self.groups.values():
            size = len(group.items)
            if not group.passed or size < group.size or (out and len(out) + size > n):
                continue  # not drawable yet, or does not fit beside what is drawn
            members = list(group.items.values())
            if all(self._eligible(i, version) for i in members):
                out.extend(members)
                if len(out) >= n:
                    break
        return out

    def draw(self, n: int, version: int, whole_groups: bool) -> list[Item]:
        """Up to n eligible items. With whole_groups, complete groups only: as many as fit in n,
        and at least one (so a batch_size below the group size still returns one group)."""
        if self.strategy == "fifo":
            return self._fifo_groups(n, version) if whole_groups else self._fifo_single(n, version)
        units = self._units(version, whole_groups)
        if self.strategy == "uniform":
            self.rng.shuffle(units)
        elif self.strategy == "prioritized":
            def key(unit: list[Item]) -> float:
                w = sum(abs(i.episode.advantage) for i in unit) / len(unit) + self.eps
                return self.rng.random() ** (1.0 / w)
            units.sort(key=key, reverse=True)
        out: list[Item] = []
        for unit in units:
            if len(out) + len(unit) <= n or not out:
                out.extend(unit)
            if len(out) >= n:
                break
        return out

    # -- batches --------------------------------------------------------------------------------
    def hold(self, batch_id: str, items: list[Item], version: int, deadline: float) -> Batch:
        batch = Batch(batch_id, version, items, deadline, [i.last_version for i in items])
        for item in items:
            item.batch = batch_id
            item.last_version = version
        self.batches[batch_id] = batch
        return batch

    def release(self, batch: Batch) -> None:
        """Puts a batch's items back (visibility timeout, or a failed write): it did not train."""
        self.batches.pop(batch.batch_id, None)
        for item, previous in zip(batch.items, batch.previous_versions):
            if item.batch == batch.batch_id:
                item.batch = None
                item.last_version = previous
                v = item.episode.policy_version
                self._min_version = v if self._min_version is None else min(self._min_version, v)

    def expired(self, now: float) -> list[Batch]:
        return [b for b in self.batches.values() if b.deadline <= now]

    def finish(self, batch: Batch) -> tuple[list[Item], list[Item]]:
        """The batch trained. Returns (done, reusable): done items (sampled max_times) leave the
        window; reusable ones stay, drawable again at a later policy version."""
        self.batches.pop(batch.batch_id, None)
        done, reusable = [], []
        for item in batch.items:
            item.batch = None
            item.times_trained += 1
            if item.times_trained >= self.max_times:
                self.remove(item)
                done.append(item)
            else:
                reusable.append(item)
        return done, reusable

    def age_histogram(self, version: int) -> list[int]:
        """Count of held items by policy age (index = version - policy_version, negatives at 0)."""
        counts: list[int] = []
        for v, held in self._versions.items():  # per version, not per item: GetStats runs every step
            age = max(version - v, 0)
            if age >= len(counts):
                counts.extend([0] * (age + 1 - len(counts)))
            counts[age] += held
        return counts
