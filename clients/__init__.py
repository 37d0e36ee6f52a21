"""The forgerpc client SDK: typed async/sync clients, retries, replica groups.

Imports only grpc, protobuf and the generated code (never torch):

    from forgerpc.clients import RewardClient, ReplicaGroup
"""

from forgerpc.clients.base import AsyncClient
from forgerpc.clients.channel import ChannelSettings
from forgerpc.clients.errors import ForgeRPCError
from forgerpc.clients.group import ReplicaGroup, ReplicaResult
from forgerpc.clients.retry import RetryPolicy
from forgerpc.clients.services import (
    CLIENTS,
    EnvironmentClient,
    GeneratorClient,
    ReplayBufferClient,
    RewardClient,
    SandboxClient,
    TrainerClient,
    WeightStoreClient,
)
from forgerpc.clients.sync import SyncClient

__all__ = [
    "AsyncClient", "ChannelSettings", "ForgeRPCError", "ReplicaGroup", "ReplicaResult", "RetryPolicy",
    "CLIENTS", "EnvironmentClient", "GeneratorClient", "ReplayBufferClient", "RewardClient",
    "SandboxClient", "TrainerClient", "WeightStoreClient", "SyncClient",
]
