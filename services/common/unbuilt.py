"""Servers for services whose implementation has not landed yet.

They start, report SERVING, list their service over reflection, and answer every RPC with
UNIMPLEMENTED naming the issue that plans them, so clients fail clearly instead of getting
fake results.
"""

from forgerpc.services.common.runtime import ServiceConfig, ServiceDefinition
from forgerpc.v1 import (
    generator_pb2_grpc,
    replay_buffer_pb2_grpc,
    sandbox_pb2_grpc,
    trainer_pb2_grpc,
    weight_store_pb2_grpc,
)


class UnbuiltConfig(ServiceConfig):
    """Only the shared server settings."""


def _definition(name: str, servicer_cls: type, planned_in: str) -> ServiceDefinition:
    async def create(_cfg):
        return [servicer_cls()]

    return ServiceDefinition(name=name, config_model=UnbuiltConfig, create=create, planned_in=planned_in)


GENERATOR = _definition(
    "generator", generator_pb2_grpc.GeneratorServiceServicer,
    "issue #3, Generator service: a fast built-in PyTorch engine, a real vLLM backend, hot weight updates",
)
WEIGHT_STORE = _definition(
    "weight_store", weight_store_pb2_grpc.WeightStoreServiceServicer,
    "issue #4, Weight store service: versioned bulk weight movement at memory speed",
)
REPLAY_BUFFER = _definition(
    "replay_buffer", replay_buffer_pb2_grpc.ReplayBufferServiceServicer,
    "issue #6, Replay buffer on Redis streams: episodes are never lost",
)
TRAINER = _definition(
    "trainer", trainer_pb2_grpc.TrainerServiceServicer,
    "issue #7, Trainer service: GRPO-family losses, SFT, checkpoints, TorchTitan backend",
)
SANDBOX = _definition(
    "sandbox", sandbox_pb2_grpc.SandboxServiceServicer,
    "issue #5, Reward service and sandboxed code execution (RLVR)",
)
