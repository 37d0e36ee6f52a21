"""Reward service config: which reward functions, their weights and options.

    functions:
      - {kind: exact_match, weight: 1.0}
      - {kind: char_match, options: {align: right}}                 # partial credit per character
      - {kind: format_tags, weight: 0.1, options: {tag: answer}}
      - {kind: math_equiv}
      - {kind: regex_match, options: {pattern: "<answer>(.*?)</answer>", compare_target: true}}
      - {kind: length_penalty, weight: 0.2, options: {max_length: 2000}}
      - {kind: code_tests, options: {timeout_seconds: 5}}      # needs sandbox_address
      - {kind: python, options: {path: "mypkg.rewards:score"}}  # see reward/user.py
      - {kind: reward_model, options: {path: /models/rm}}       # see reward/model.py
    sandbox_address: 127.0.0.1:50061
    # How code_tests reaches that sandbox when it requires a token / (m)TLS (ServiceConfig.client):
    client: {token_env: FORGERPC_TOKEN, tls_ca: certs/ca.pem, tls_cert: certs/reward.pem, tls_key: certs/reward.key}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from forgerpc.clients.config import Config
from forgerpc.services.common.runtime import ServiceConfig

Kind = Literal["exact_match", "normalized_match", "numeric_match", "char_match", "format_tags", "regex_match",
               "length_penalty", "math_equiv", "code_tests", "python", "reward_model", "constant"]


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
    # The SandboxService that code_tests runs code in (host:port), called with `client` (token, TLS).
    sandbox_address: str = ""
    # Threads for synchronous reward functions; one that overruns its deadline keeps its thread
    # until it returns, so keep headroom above the number of items scored at once.
    threads: int = Field(default=32, gt=0)
