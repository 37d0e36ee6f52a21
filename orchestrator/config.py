"""The stack config: which services to run (or reach by address) and how many replicas.

    # forgerpc up configs/stack_local.yaml
    services:
      reward: {replicas: 1, config: {functions: [{kind: exact_match}]}}
      generator: {replicas: 2}
      trainer: {address: "10.0.0.5:50051"}   # run elsewhere: use it, start nothing
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from forgerpc.clients.config import Config

SERVICE_NAMES = ("generator", "reward", "replay_buffer", "trainer", "weight_store", "sandbox", "environment")


class ServiceEntry(Config):
    replicas: int = Field(default=1, ge=1, le=64)
    # Addresses of already-running replicas (a user's own implementation, a remote cluster).
    # When set, nothing is started for this service.
    address: str | list[str] | None = None
    # The service's own config (what `forgerpc serve <name> --config` would read).
    config: dict[str, Any] = Field(default_factory=dict)

    def addresses(self) -> list[str]:
        if self.address is None:
            return []
        return [self.address] if isinstance(self.address, str) else list(self.address)


class StackConfig(Config):
    services: dict[str, ServiceEntry] = Field(default_factory=dict)
    run_dir: str = "runs/latest"
    start_timeout_seconds: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _known_services(self):
        for name in self.services:
            if name not in SERVICE_NAMES:
                raise ValueError(f"unknown service '{name}' under 'services' (allowed: {', '.join(SERVICE_NAMES)})")
        return self
