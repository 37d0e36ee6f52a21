"""The episode stream producer: rollout workers append finished episodes to Redis.

    async with EpisodeStream("redis://127.0.0.1:6379/0", run_id="grpo-42") as stream:
        result = await stream.add(episodes)          # waits under back-pressure
        result.stream_ids, result.waited_seconds

Each entry is one field, `ep` = the bytes of a `forgerpc.v1.Episode`. Memory is bounded by
back-pressure, never by trimming: `add` waits while unread + pending entries (= XLEN, because the
buffer deletes an entry only once it is acknowledged) would exceed `max_backlog`. The length check
and the XADDs run as one Lua script, so concurrent producers cannot overshoot the bound together.

Imports redis and the generated code only (never torch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.parse
from typing import Iterable

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.asyncio.retry import Retry

from forgerpc.v1 import common_pb2

# KEYS[1] = stream, KEYS[2] = stats hash; ARGV[1] = max backlog, ARGV[2..] = payloads.
# Returns the new ids, or {-1, XLEN} when the batch does not fit under the bound yet.
_ADD_LUA = """
local n = #ARGV - 1
local backlog = redis.call('XLEN', KEYS[1])
if backlog + n > tonumber(ARGV[1]) then return {-1, backlog} end
local ids = {}
for i = 2, #ARGV do ids[i - 1] = redis.call('XADD', KEYS[1], '*', 'ep', ARGV[i]) end
redis.call('HINCRBY', KEYS[2], 'added_total', n)
return ids
"""


class BackpressureTimeout(TimeoutError):
    """The backlog stayed above the bound for longer than the caller was willing to wait."""

    def __init__(self, waited: float, backlog: int, max_backlog: int, batch: int):
        super().__init__(
            f"episode stream backlog {backlog} + {batch} new stays above max_backlog={max_backlog}"
            f" after waiting {waited:.1f}s: is the replay buffer consuming, and the trainer acking?"
        )
        self.waited = waited
        self.backlog = backlog


@dataclasses.dataclass(frozen=True)
class StreamKeys:
    """The Redis keys of one run. `{run_id}` is a Redis Cluster hash tag: every key of a run
    lives in one slot, so multi-key transactions stay valid on a cluster."""

    prefix: str
    run_id: str

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{{{self.run_id}}}:{name}"

    @property
    def stream(self) -> str:  # the episodes themselves
        return self._key("episodes")

    @property
    def stats(self) -> str:  # hash of counters shared by producers and the buffer
        return self._key("stats")

    @property
    def batches(self) -> str:  # hash batch_id -> in-flight batch record
        return self._key("batches")

    @property
    def trained(self) -> str:  # zset of acked episode ids (score = ack time), for dedupe
        return self._key("trained")

    @property
    def acked_batches(self) -> str:  # zset of acked batch ids, so a repeated Ack is answered
        return self._key("acked_batches")

    @property
    def reuse(self) -> str:  # hash stream id -> "times_trained:last_version" (max_times_sampled > 1)
        return self._key("reuse")

    def all(self) -> list[str]:
        return [self.stream, self.stats, self.batches, self.trained, self.acked_batches, self.reuse]


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclasses.dataclass
class AddResult:
    stream_ids: list[str]
    waited_seconds: float


class EpisodeStream:
    """Producer side of `{prefix}:{run_id}:episodes`.

    Args:
        url: Redis URL (password, ACL user and TLS via `rediss://` go here).
        run_id: the run whose stream to append to.
        key_prefix: first part of every key.
        max_backlog: bound on unread + pending entries; must match the buffer's.
        max_wait_seconds: default wait under back-pressure before BackpressureTimeout.
        client: an existing redis.asyncio client to use instead of opening one.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, run_id: str, key_prefix: str = "forgerpc",
                 max_backlog: int = 50_000, max_wait_seconds: float = 30.0,
                 client: aioredis.Redis | None = None):
        self.url = url
        self.keys = StreamKeys(key_prefix, run_id)
        self.max_backlog = max_backlog
        self.max_wait_seconds = max_wait_seconds
        self._own = client is None
        # A dropped connection (Redis restarting) is retried with backoff: about 3 s in all.
        self.redis = client or aioredis.from_url(
            url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
            retry_on_error=[RedisConnectionError, RedisTimeoutError])
        self._add = self.redis.register_script(_ADD_LUA)
        self.waited_seconds_total = 0.0  # this producer's back-pressure waits (also in the stats hash)

    async def __aenter__(self) -> "EpisodeStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own:
            await self.redis.aclose()

    async def backlog(self) -> int:
        """Unread + pending entries (XLEN: acknowledged entries are deleted)."""
        return int(await self.redis.xlen(self.keys.stream))

    async def add(self, episodes: Iterable[common_pb2.Episode | bytes],
                  max_wait_seconds: float | None = None) -> AddResult:
        """Appends episodes in order, waiting while the backlog is full.

        Raises:
            ValueError: more episodes in one call than max_backlog (they could never fit).
            BackpressureTimeout: the backlog did not drain within max_wait_seconds.
        """
        payloads = [e if isinstance(e, bytes) else e.SerializeToString() for e in episodes]
        if not payloads:
            return AddResult([], 0.0)
        if len(payloads) > self.max_backlog:
            raise ValueError(f"{len(payloads)} episodes in one add exceed max_backlog={self.max_backlog}")
        budget = self.max_wait_seconds if max_wait_seconds is None else max_wait_seconds
        start = time.monotonic()
        pause, blocked = 0.002, False
        while True:
            out = await self._add(keys=[self.keys.stream, self.keys.stats], args=[self.max_backlog, *payloads])
            if out and out[0] != -1:
                waited = time.monotonic() - start if blocked else 0.0
                if blocked:
                    await self._record_wait(waited)
                return AddResult([i.decode() if isinstance(i, bytes) else str(i) for i in out], waited)
            blocked, waited = True, time.monotonic() - start
            if waited >= budget:
                await self._record_wait(waited)
                raise BackpressureTimeout(waited, int(out[1]), self.max_backlog, len(payloads))
            # Back off up to 50 ms: short enough to notice a freed backlog quickly, long enough
            # not to hammer Redis with scripts while the trainer catches up.
            await asyncio.sleep(min(pause, max(budget - waited, 0.0)))
            pause = min(pause * 2, 0.05)

    async def _record_wait(self, waited: float) -> None:
        self.waited_seconds_total += waited
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrbyfloat(self.keys.stats, "backpressure_wait_seconds", waited)
            pipe.hincrby(self.keys.stats, "backpressure_waits", 1)
            await pipe.execute()
