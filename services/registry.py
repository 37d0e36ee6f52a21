"""Which module serves each service name (`forgerpc serve <name>`)."""

from __future__ import annotations

import importlib

from forgerpc.services.common.runtime import ServiceDefinition

# name -> module exposing SERVICE. A service not built yet points at common.unbuilt, whose
# servers answer every RPC with UNIMPLEMENTED naming the issue that plans it.
MODULES = {
    "reward": "forgerpc.services.reward.server",
    "generator": "forgerpc.services.common.unbuilt:GENERATOR",
    "weight_store": "forgerpc.services.common.unbuilt:WEIGHT_STORE",
    "replay_buffer": "forgerpc.services.common.unbuilt:REPLAY_BUFFER",
    "trainer": "forgerpc.services.common.unbuilt:TRAINER",
    "sandbox": "forgerpc.services.common.unbuilt:SANDBOX",
    "environment": "forgerpc.services.common.unbuilt:ENVIRONMENT",
}


def load(name: str) -> ServiceDefinition:
    """The ServiceDefinition for `name`; KeyError lists the known names."""
    if name not in MODULES:
        raise KeyError(f"unknown service '{name}' (known: {', '.join(sorted(MODULES))})")
    module, _, attr = MODULES[name].partition(":")
    return getattr(importlib.import_module(module), attr or "SERVICE")
