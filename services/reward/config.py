"""Reward service config: which reward functions, their weights and options.

    functions:
      - {kind: exact_match, weight: 1.0}
      - {kind: format_tags, weight: 0.1, options: {tag: answer}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from forgerpc.clients.config import Config
from forgerpc.services.common.runtime import ServiceConfig

Kind = Literal["exact_match", "normalized_match", "numeric_match", "format_tags"]


class FunctionConfig(Config):
    kind: Kind
    name: str = ""  # sub-score key; defaults to kind
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


class RewardConfig(ServiceConfig):
    functions: list[FunctionConfig] = Field(
        default_factory=lambda: [FunctionConfig(kind="exact_match")], min_length=1
    )
    item_timeout_seconds: float = Field(default=10.0, gt=0)
    max_batch_items: int = Field(default=4096, gt=0)
