"""Replay buffer config: where the episode stream lives and how batches are drawn from it.

    redis_url: redis://:PASSWORD@127.0.0.1:6379/0    # rediss://user:pw@host:6380/0 for TLS + ACL user
    run_id: grpo-42                                  # keys: forgerpc:{grpo-42}:episodes, ...
    max_policy_age: 1                                # 0 = strictly on-policy; null = no limit
    strategy: fifo                                   # fifo | uniform | prioritized (by |advantage|)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from forgerpc.clients.config import Config
from forgerpc.services.common.runtime import ServiceConfig

Strategy = Literal["fifo", "uniform", "prioritized"]


class RedisConfig(Config):
    """The connection. Password, ACL user and TLS go in the URL (`rediss://user:pw@host:port/db`);
    TLS certificate files, when the server's CA is not the system one, go here."""

    url: str = "redis://127.0.0.1:6379/0"
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    # Retries of one command on a dropped connection (exponential backoff, capped at 1 s).
    retries: int = Field(default=5, ge=0)


class ReplayBufferConfig(ServiceConfig):
    redis: RedisConfig = RedisConfig()
    key_prefix: str = Field(default="forgerpc", min_length=1)
    run_id: str = Field(default="default", min_length=1, pattern=r"^[^{}\s]+$")
    consumer_group: str = Field(default="replay_buffer", min_length=1)
    consumer_name: str = Field(default="buffer-0", min_length=1)
    # Entries pending longer than this (ms idle) are taken over at start. 0 claims every pending
    # entry: right for one buffer per run, whose replacement inherits a dead one's work.
    reclaim_min_idle_seconds: float = Field(default=0.0, ge=0)

    # Producers wait while the stream (unread + pending) holds more than this many episodes.
    max_backlog: int = Field(default=50_000, gt=0)
    # Default back-pressure wait of AddEpisodes before RESOURCE_EXHAUSTED.
    add_max_wait_seconds: float = Field(default=30.0, gt=0)
    # Episodes held in memory (available + in flight; ~6 KB each at 256 + 256 tokens); the reader
    # stops at this bound.
    window_size: int = Field(default=8192, gt=0)
    read_count: int = Field(default=512, gt=0)  # entries per XREADGROUP
    read_block_ms: int = Field(default=50, gt=0)

    max_policy_age: int | None = Field(default=None, ge=0)
    max_times_sampled: int = Field(default=1, gt=0)
    strategy: Strategy = "fifo"
    priority_epsilon: float = Field(default=1e-3, gt=0)  # keeps |advantage| = 0 episodes drawable
    filter_equal_reward_groups: bool = True
    # A batch not acked within this time goes back to the window and is served again.
    visibility_timeout_seconds: float = Field(default=300.0, gt=0)
    max_batch_size: int = Field(default=16_384, gt=0)
    max_wait_seconds: float = Field(default=300.0, gt=0)  # cap on Sample.wait_seconds
    # How many acked episode ids (and batch ids) are remembered to drop re-delivered duplicates.
    dedupe_history: int = Field(default=1_000_000, gt=0)
    seed: int | None = None

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window_size > self.max_backlog:
            raise ValueError(
                f"window_size ({self.window_size}) must not exceed max_backlog ({self.max_backlog}):"
                " the window is part of the backlog"
            )
        return self
