"""Retries with exponential backoff and full jitter, for idempotent RPCs only.

    delay_k = uniform(0, min(max_backoff, initial_backoff * multiplier**k))

Only UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried: the others would fail
the same way again. Whether an RPC is idempotent comes from the proto itself
(`option idempotency_level`), so the contract, not the caller, decides.
"""

from __future__ import annotations

import dataclasses
import random

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # including the first
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random = random._inst) -> float:
        """Seconds to sleep after failed attempt number `attempt` (0-based)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return rng.uniform(0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)
