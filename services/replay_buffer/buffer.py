"""The replay buffer's core: a consumer of the Redis episode stream feeding a sampling `Window`.

Life of an episode (every step that changes what survives a crash is one Redis transaction):

    XADD (producer) -> XREADGROUP into the window (pending) -> Sample: batch record in `batches`
    -> Ack: XACK + XDEL + record removed + episode id remembered in `trained` (one Lua script)

An entry leaves Redis only after an Ack, a staleness eviction, or a group filter decision; a
re-delivered duplicate (same episode_id) is dropped. Everything needed to carry on lives in Redis,
so a replacement buffer `start()`s by claiming the pending entries (XAUTOCLAIM) and re-reading the
batch records: batches in flight stay in flight (the trainer may still Ack them), the rest is
drawable again. A batch not acked before its visibility deadline is served again.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid

import grpc
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from forgerpc.clients.config import ConfigError
from forgerpc.clients.episodes import EpisodeStream, StreamKeys, redact
from forgerpc.services.common.errors import ServiceError
from forgerpc.services.replay_buffer import scripts
from forgerpc.services.replay_buffer.config import ReplayBufferConfig
from forgerpc.services.replay_buffer.window import Batch, Item, Window
from forgerpc.v1 import common_pb2

log = logging.getLogger("forgerpc.replay_buffer")


def connect(cfg: ReplayBufferConfig) -> aioredis.Redis:
    """A client that retries a command over a dropped connection with exponential backoff."""
    tls = {k: v for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if (v := getattr(cfg.redis, k))}
    if tls and not cfg.redis.url.startswith("rediss://"):
        raise ConfigError(f"key 'redis.{next(iter(tls))}': TLS files need a rediss:// URL, got {redact(cfg.redis.url)}")
    return aioredis.from_url(
        cfg.redis.url, socket_connect_timeout=cfg.redis.connect_timeout_seconds,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), cfg.redis.retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError], **tls,
    )


def unavailable(url: str, e: Exception) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE",
                        f"Redis at {redact(url)} failed: {type(e).__name__}: {e}", url=redact(url))


def _sid(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class ReplayBuffer:
    """One run's buffer: `start()`, then `sample` / `ack` / `stats`; `close()` at the end.

    Assumes one buffer per run: a replacement claims every pending entry of the consumer group
    (reclaim_min_idle_seconds = 0), including a live twin's.
    """

    def __init__(self, cfg: ReplayBufferConfig):
        self.cfg = cfg
        self.keys = StreamKeys(cfg.key_prefix, cfg.run_id)
        self.redis = connect(cfg)
        self.producer = EpisodeStream(cfg.redis.url, run_id=cfg.run_id, key_prefix=cfg.key_prefix,
                                      max_backlog=cfg.max_backlog, max_wait_seconds=cfg.add_max_wait_seconds,
                                      client=self.redis)
        self.window = Window(max_policy_age=cfg.max_policy_age, max_times_sampled=cfg.max_times_sampled,
                             strategy=cfg.strategy, filter_equal_rewards=cfg.filter_equal_reward_groups,
                             priority_epsilon=cfg.priority_epsilon, seed=cfg.seed)
        self.current_version = 0  # highest version a trainer has sampled at (for the age histogram)
        self._arrived = asyncio.Event()
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (time, episodes read)
        self._rate_sum = 0  # episodes in _rate
        self._acking: dict[str, asyncio.Future] = {}
        self._retry_drops: list[tuple] = []
        self._started = time.monotonic()
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._ack_script = self.redis.register_script(scripts.ACK)

    # -- start / stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Checks Redis, creates the consumer group, rebuilds the window, starts reading."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            await self.redis.aclose()
            raise ConfigError(f"cannot reach Redis at {redact(self.cfg.redis.url)} (key 'redis.url'): {e}") from None
        if await self._ensure_group():  # no stream yet: nothing pending to take over
            await self._rebuild()
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._expire_loop())]

    async def _ensure_group(self) -> bool:
        """Creates the consumer group at id 0, so entries added before it existed are read too.

        Only once the stream exists (the first XADD makes it): no MKSTREAM, so a buffer that is
        started and stopped without episodes (health checks, `forgerpc up`) leaves no key behind in
        a shared Redis. Returns whether the group exists now.
        """
        try:
            await self.redis.xgroup_create(self.keys.stream, self.cfg.consumer_group, id="0")
        except ResponseError as e:
            if "requires the key to exist" in str(e):
                return False
            if "BUSYGROUP" not in str(e):
                raise
        return True

    async def close(self) -> None:
        # Loops stop at their next turn (a blocked XREADGROUP returns within read_block_ms);
        # cancelling a blocked redis-py read can hang, so cancel only what did not stop in time.
        self._stopping.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=self.cfg.read_block_ms / 1000 + 2.0)
            for task in late:
                task.cancel()
        await self.redis.aclose()

    async def _rebuild(self) -> None:
        """Takes over pending entries and re-creates the in-flight batches from their records."""
        cfg, keys = self.cfg, self.keys
        reuse = {_sid(k): v.decode().split(":") for k, v in (await self.redis.hgetall(keys.reuse)).items()}
        entries: dict[str, dict] = {}
        start = "0-0"
        while True:  # XAUTOCLAIM hands over a dead buffer's entries (any consumer name)
            nxt, claimed, *_ = await self.redis.xautoclaim(
                keys.stream, cfg.consumer_group, cfg.consumer_name,
                int(cfg.reclaim_min_idle_seconds * 1000), start_id=start, count=1000)
            entries.update((_sid(sid), fields) for sid, fields in claimed if fields)
            start = _sid(nxt)
            if start == "0-0":
                break
        start = "0-0"
        while True:  # and our own pending list, in case entries were not idle long enough to claim
            out = await self.redis.xreadgroup(cfg.consumer_group, cfg.consumer_name, {keys.stream: start}, count=1000)
            got = out[0][1] if out else []
            entries.update((_sid(sid), fields) for sid, fields in got)  # deleted ones: acked by _ingest
            if len(got) < 1000:
                break
            start = _sid(got[-1][0])
        order = sorted(entries, key=lambda s: tuple(map(int, s.split("-"))))
        await self._ingest([(sid, entries[sid]) for sid in order], reuse, count_rate=False)
        by_sid = {i.sid: i for i in self.window.by_episode.values()}
        held = 0
        for batch_id, raw in (await self.redis.hgetall(keys.batches)).items():
            record = json.loads(raw)
            batch_id = _sid(batch_id)
            pairs = [(by_sid.get(s), p) for s, p in zip(record["s"], record["p"])]
            pairs = [(i, p) for i, p in pairs if i is not None]
            if not pairs:
                await self.redis.hdel(keys.batches, batch_id)
                continue
            batch = self.window.hold(batch_id, [i for i, _ in pairs], record["v"], record["d"])
            batch.previous_versions = [p for _, p in pairs]
            held += len(pairs)
        log.info("replay buffer %s: rebuilt %d pending episodes (%d in %d batches in flight)",
                 keys.stream, len(entries), held, len(self.window.batches))

    # -- reading --------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        """XREADGROUP new entries while the window has room. After a Redis error, first re-reads
        our own pending list (id 0 onwards): entries delivered to us but never ingested."""
        cfg, pause, position, need_group = self.cfg, 0.05, ">", True
        while not self._stopping.is_set():
            space = cfg.window_size - len(self.window)
            if space <= 0 and position == ">":
                await asyncio.sleep(0.005)  # full: the stream (and so the producers) back up
                continue
            try:
                if need_group:  # no stream yet, or it was deleted under us (e.g. FLUSHALL)
                    if not await self._ensure_group():
                        await asyncio.sleep(cfg.read_block_ms / 1000)  # until a producer's XADD
                        continue
                    need_group = False
                count = min(cfg.read_count, space) if position == ">" else 1000
                out = await self.redis.xreadgroup(cfg.consumer_group, cfg.consumer_name, {self.keys.stream: position},
                                                  count=max(count, 1), block=cfg.read_block_ms)
                got = [(_sid(s), f) for s, f in out[0][1]] if out else []
                if got:
                    await self._ingest(got)
                if position != ">":
                    position = got[-1][0] if len(got) == 1000 else ">"
                pause = 0.05
            except (RedisError, OSError) as e:
                # Redis restarting or unreachable: keep trying, backing off up to 2 s.
                log.warning("reading %s failed (%s); retrying in %.2fs", self.keys.stream, e, pause)
                await asyncio.sleep(pause)
                pause, position = min(pause * 2, 2.0), "0"
                need_group = isinstance(e, ResponseError) and "NOGROUP" in str(e)
            except Exception:  # noqa: BLE001 - the reader must outlive any one bad turn
                log.exception("reading %s", self.keys.stream)
                await asyncio.sleep(pause)

    async def _ingest(self, entries: list[tuple[str, dict]], reuse: dict | None = None,
                      count_rate: bool = True) -> None:
        """Parses entries into the window; drops malformed ones, duplicates and filtered groups.
        `reuse`: stream id -> (times trained, last version) of episodes drawn again after a restart."""
        parsed, malformed = [], []
        for sid, fields in entries:
            if not fields:  # deleted, yet still pending: nothing to train
                malformed.append(sid)
                continue
            try:
                raw = fields[b"ep"]
                parsed.append((sid, common_pb2.Episode.FromString(raw), raw))
            except (DecodeError, KeyError):
                malformed.append(sid)
        if malformed:
            log.warning("dropping %d malformed entries from %s", len(malformed), self.keys.stream)
            await self._drop(malformed, [], "malformed_total")
        seen = await self.redis.zmscore(self.keys.trained, [e.episode_id for _, e, _ in parsed]) if parsed else []
        duplicates, filtered = [], []
        for (sid, episode, raw), score in zip(parsed, seen):
            held = self.window.by_episode.get(episode.episode_id)
            if held is not None and held.sid == sid:
                continue  # re-read of an entry we hold (after a Redis error)
            times, version = (reuse or {}).get(sid, (0, -1))
            item, dropped = (None, []) if score is not None else self.window.add(sid, episode, int(times), int(version), raw)
            if item is None:
                duplicates.append(sid)
            filtered.extend(dropped)
        if duplicates:
            await self._drop(duplicates, [], "duplicates_total")
        if filtered:
            groups = len({i.group.gid for i in filtered})
            await self._drop([i.sid for i in filtered], [i.episode.episode_id for i in filtered],
                             "filtered_groups_total", groups)
        if count_rate:
            self._rate.append((time.monotonic(), len(entries)))
            self._rate_sum += len(entries)
        self._arrived.set()

    async def _drop(self, sids: list[str], episode_ids: list[str], counter: str, count: int | None = None) -> None:
        """Acknowledges and deletes entries that will never train, counting them. If Redis fails,
        the drop is retried by the expiry loop (the entries stay pending, never lost)."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.keys.stream, self.cfg.consumer_group, *sids)
                pipe.xdel(self.keys.stream, *sids)
                pipe.hdel(self.keys.reuse, *sids)
                pipe.hincrby(self.keys.stats, counter, len(sids) if count is None else count)
                if episode_ids:
                    self._remember(pipe, episode_ids)
                await pipe.execute()
        except (RedisError, OSError) as e:
            log.warning("dropping %d entries (%s) failed: %s; will retry", len(sids), counter, e)
            self._retry_drops.append((sids, episode_ids, counter, count))

    def _remember(self, pipe, episode_ids: list[str]) -> None:
        now = time.time()
        pipe.zadd(self.keys.trained, {e: now for e in episode_ids})
        pipe.zremrangebyrank(self.keys.trained, 0, -self.cfg.dedupe_history - 1)

    # -- batches --------------------------------------------------------------------------------
    async def _expire_loop(self) -> None:
        period = min(1.0, self.cfg.visibility_timeout_seconds / 4)
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), period)
            except asyncio.TimeoutError:
                pass
            try:
                await self._expire()
            except Exception:  # noqa: BLE001 - keep expiring; the next turn retries
                log.exception("expiring batches of %s", self.keys.stream)

    async def _expire(self) -> None:
        retry, self._retry_drops = self._retry_drops, []
        for args in retry:
            await self._drop(*args)
        expired = self.window.expired(time.time())
        for batch in expired:
            log.info("batch %s (%d episodes) not acked within %.1fs: serving its episodes again",
                     batch.batch_id, len(batch.items), self.cfg.visibility_timeout_seconds)
            self.window.release(batch)
        if expired:
            self._arrived.set()
            try:  # a record left behind is harmless: its deadline has passed, a restart releases it
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hdel(self.keys.batches, *[b.batch_id for b in expired])
                    pipe.hincrby(self.keys.stats, "redelivered_total", sum(len(b.items) for b in expired))
                    await pipe.execute()
            except (RedisError, OSError) as e:
                log.warning("removing %d expired batch records failed: %s", len(expired), e)

    async def sample(self, n: int, version: int, whole_groups: bool, wait: float) -> tuple[str, list[Item]]:
        """Draws a batch and records it in Redis before returning it. An empty list (and id "")
        when nothing is eligible after `wait` seconds."""
        self.current_version = max(self.current_version, version)
        deadline = time.monotonic() + wait
        while True:
            self._arrived.clear()
            await self._expire()
            # Evict, draw and hold with no await in between: the reader must not slip a stale
            # entry into the window between the staleness check and the draw.
            stale = self.window.evict_stale(version)
            items = self.window.draw(n, version, whole_groups)
            enough = len(items) >= n or (whole_groups and items and len(items) + items[-1].group.size > n)
            left = deadline - time.monotonic()
            if enough or left <= 0:
                batch = self.window.hold(uuid.uuid4().hex, items, version,
                                         time.time() + self.cfg.visibility_timeout_seconds) if items else None
            if stale:
                await self._drop([i.sid for i in stale], [i.episode.episode_id for i in stale], "evicted_stale_total")
            if enough or left <= 0:
                break
            try:
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.1))
            except asyncio.TimeoutError:
                pass
        if batch is None:
            return "", []
        record = {"v": version, "d": batch.deadline, "s": [i.sid for i in items],
                  "e": [i.episode.episode_id for i in items], "p": batch.previous_versions}
        try:
            await self.redis.hset(self.keys.batches, batch.batch_id, json.dumps(record))
        except (RedisError, OSError) as e:
            self.window.release(batch)
            raise unavailable(self.cfg.redis.url, e) from None
        return batch.batch_id, items

    async def ack(self, batch_id: str) -> int | None:
        """Acknowledges a trained batch: returns episodes removed, 0 for a batch already acked,
        None for an unknown (or expired and re-served) batch."""
        if batch_id in self._acking:
            return await asyncio.shield(self._acking[batch_id])
        batch = self.window.batches.pop(batch_id, None)  # out of reach of expiry while we write
        if batch is None:
            try:
                acked = await self.redis.zscore(self.keys.acked_batches, batch_id)
            except (RedisError, OSError) as e:
                raise unavailable(self.cfg.redis.url, e) from None
            return 0 if acked is not None else None
        future = self._acking[batch_id] = asyncio.get_running_loop().create_future()
        try:
            done = await self._commit(batch)
            future.set_result(done)
            return done
        except BaseException as e:
            self.window.batches[batch_id] = batch
            future.set_exception(e)
            future.exception()  # a lone Ack has no waiter: mark the exception retrieved
            if isinstance(e, (RedisError, OSError)):
                raise unavailable(self.cfg.redis.url, e) from None
            raise
        finally:
            del self._acking[batch_id]

    async def _commit(self, batch: Batch) -> int:
        keys = self.keys
        done = await self._ack_script(
            keys=[keys.stream, keys.batches, keys.trained, keys.acked_batches, keys.reuse, keys.stats],
            args=[self.cfg.consumer_group, batch.batch_id, time.time(), self.cfg.dedupe_history,
                  self.cfg.max_times_sampled])
        if done < 0:  # no record: cannot happen with one buffer per run; train the items again
            log.error("batch %s has no record in Redis; serving its episodes again", batch.batch_id)
            self.window.release(batch)
            return 0
        finished, _ = self.window.finish(batch)
        if len(finished) != done:  # memory mirrors the counts in Redis; say so loudly if it does not
            log.error("batch %s: %d episodes done in Redis, %d in memory", batch.batch_id, done, len(finished))
        if finished:
            self._arrived.set()  # room in the window for the reader
        return done

    # -- stats ----------------------------------------------------------------------------------
    async def stats(self) -> dict:
        keys = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.stream)
            pipe.xpending(keys.stream, self.cfg.consumer_group)
            pipe.hgetall(keys.stats)
            length, pending, counters = await pipe.execute(raise_on_error=False)
        if isinstance(pending, ResponseError) and "NOGROUP" in str(pending):
            pending = {"pending": 0}  # no episode yet, so no stream and no group
        for reply in (length, pending, counters):
            if isinstance(reply, Exception):
                raise reply
        counters = {k.decode(): float(v) for k, v in counters.items()}
        oldest = 0.0
        if pending["pending"]:
            oldest = max(time.time() - int(_sid(pending["min"]).split("-")[0]) / 1000, 0.0)
        now = time.monotonic()
        while self._rate and self._rate[0][0] < now - 60:
            self._rate_sum -= self._rate.popleft()[1]
        rate = self._rate_sum / max(min(60.0, now - self._started), 1e-3)
        return dict(
            window_size=len(self.window), stream_length=length, pending=pending["pending"],
            acked_total=int(counters.get("acked_total", 0)),
            evicted_stale_total=int(counters.get("evicted_stale_total", 0)),
            filtered_groups_total=int(counters.get("filtered_groups_total", 0)),
            backpressure_wait_seconds=counters.get("backpressure_wait_seconds", 0.0),
            oldest_pending_age_seconds=oldest,
            age_histogram_counts=self.window.age_histogram(self.current_version),
            add_rate_per_second=rate,
        )
