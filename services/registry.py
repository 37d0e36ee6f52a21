"""Which module serves each service name (`forgerpc serve <name>`)."""

from __future__ import annotations

import importlib

from forgerpc.services.common.runtime import ServiceDefinition

# name -> module exposing SERVICE. A service not built yet points at common.unbuilt, whose
# servers answer every RPC with UNIMPLEMENTED naming the issue that plans it.
MODULES = {
    "reward": "forgerpc.services.reward.server",
    "generator": "forgerpc.services.generator.server",
    "weight_store": "forgerpc.services.weight_store.server",
    "replay_buffer": "forgerpc.services.replay_buffer.server",
    "trainer": "forgerpc.services.trainer.server",
    "sandbox": "forgerpc.services.sandbox.server",
    "environment": "forgerpc.services.environment.server",
}


def load(name: str) -> ServiceDefinition:
    """The ServiceDefinition for `name`; KeyError lists the known names."""
    if name not in MODULES:
        raise KeyError(f"unknown service '{name}' (known: {', '.join(sorted(MODULES))})")
    module, _, attr = MODULES[name].partition(":")
    return getattr(importlib.import_module(module), attr or "SERVICE")
