"""Environment service config: how many sessions it holds and for how long.

    forgerpc serve environment max_sessions=4096 session_ttl_seconds=300
"""

from __future__ import annotations

from pydantic import Field

from forgerpc.services.common.runtime import ServiceConfig


class EnvironmentConfig(ServiceConfig):
    # Open sessions at most; a Reset beyond it (after expired ones are dropped) is RESOURCE_EXHAUSTED,
    # so rollouts that never Close cannot grow the server without bound.
    max_sessions: int = Field(default=4096, gt=0)
    # A session untouched (no Reset or Step) for this long is dropped; Step on it is NOT_FOUND.
    session_ttl_seconds: float = Field(default=600.0, gt=0)
    # Longest action text accepted (characters); a longer one is INVALID_ARGUMENT on action.content.
    max_action_chars: int = Field(default=65536, gt=0)
