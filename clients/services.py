"""Typed async clients, one per service. Each method maps 1:1 to an RPC of forgerpc.v1.

Pass a request message or its fields as keywords:

    reward = RewardClient("127.0.0.1:50051")
    scores = await reward.evaluate(items=[RewardItem(response="4", target="4")])

A test fails if an RPC in the protos has no method here.
"""

from __future__ import annotations

from typing import AsyncIterable, AsyncIterator, Iterable

from forgerpc.clients.base import AsyncClient
from forgerpc.v1 import (
    environment_pb2 as env_pb,
    generator_pb2 as gen_pb,
    replay_buffer_pb2 as rb_pb,
    reward_pb2 as rw_pb,
    sandbox_pb2 as sb_pb,
    trainer_pb2 as tr_pb,
    weight_store_pb2 as ws_pb,
)


class GeneratorClient(AsyncClient):
    SERVICE = gen_pb.DESCRIPTOR.services_by_name["GeneratorService"]

    async def generate(self, request=None, /, *, timeout=None, **fields) -> gen_pb.GenerateResponse:
        return await self._unary("Generate", request, fields, timeout)

    async def update_weights(self, request=None, /, *, timeout=None, **fields) -> gen_pb.UpdateWeightsResponse:
        return await self._unary("UpdateWeights", request, fields, timeout)

    async def tokenize(self, request=None, /, *, timeout=None, **fields) -> gen_pb.TokenizeResponse:
        return await self._unary("Tokenize", request, fields, timeout)

    async def get_model_info(self, request=None, /, *, timeout=None, **fields) -> gen_pb.GetModelInfoResponse:
        return await self._unary("GetModelInfo", request, fields, timeout)


class RewardClient(AsyncClient):
    SERVICE = rw_pb.DESCRIPTOR.services_by_name["RewardService"]

    async def evaluate(self, request=None, /, *, timeout=None, **fields) -> rw_pb.EvaluateResponse:
        return await self._unary("Evaluate", request, fields, timeout)

    async def list_reward_functions(self, request=None, /, *, timeout=None, **fields) -> rw_pb.ListRewardFunctionsResponse:
        return await self._unary("ListRewardFunctions", request, fields, timeout)


class ReplayBufferClient(AsyncClient):
    SERVICE = rb_pb.DESCRIPTOR.services_by_name["ReplayBufferService"]

    async def add_episodes(self, request=None, /, *, timeout=None, **fields) -> rb_pb.AddEpisodesResponse:
        return await self._unary("AddEpisodes", request, fields, timeout)

    async def sample(self, request=None, /, *, timeout=None, **fields) -> rb_pb.SampleResponse:
        # The server may hold the call for wait_seconds before it answers: the deadline starts after that.
        wait = request.wait_seconds if request is not None else fields.get("wait_seconds", 0.0)
        return await self._unary("Sample", request, fields, timeout or self.timeout + wait)

    async def ack(self, request=None, /, *, timeout=None, **fields) -> rb_pb.AckResponse:
        return await self._unary("Ack", request, fields, timeout)

    async def get_stats(self, request=None, /, *, timeout=None, **fields) -> rb_pb.GetStatsResponse:
        return await self._unary("GetStats", request, fields, timeout)


class TrainerClient(AsyncClient):
    SERVICE = tr_pb.DESCRIPTOR.services_by_name["TrainerService"]

    async def train_step(self, request=None, /, *, timeout=None, **fields) -> tr_pb.TrainStepResponse:
        return await self._unary("TrainStep", request, fields, timeout)

    async def publish_weights(self, request=None, /, *, timeout=None, **fields) -> tr_pb.PublishWeightsResponse:
        return await self._unary("PublishWeights", request, fields, timeout)

    async def save_checkpoint(self, request=None, /, *, timeout=None, **fields) -> tr_pb.SaveCheckpointResponse:
        return await self._unary("SaveCheckpoint", request, fields, timeout)

    async def load_checkpoint(self, request=None, /, *, timeout=None, **fields) -> tr_pb.LoadCheckpointResponse:
        return await self._unary("LoadCheckpoint", request, fields, timeout)

    async def get_state(self, request=None, /, *, timeout=None, **fields) -> tr_pb.GetStateResponse:
        return await self._unary("GetState", request, fields, timeout)


class WeightStoreClient(AsyncClient):
    SERVICE = ws_pb.DESCRIPTOR.services_by_name["WeightStoreService"]

    async def put_weights(self, requests: AsyncIterable[ws_pb.PutWeightsRequest] | Iterable[ws_pb.PutWeightsRequest],
                          /, *, timeout=None) -> ws_pb.PutWeightsResponse:
        return await self._client_stream("PutWeights", requests, timeout)

    def get_weights(self, request=None, /, *, timeout=None, **fields) -> AsyncIterator[ws_pb.GetWeightsResponse]:
        return self._server_stream("GetWeights", request, fields, timeout)

    async def get_manifest(self, request=None, /, *, timeout=None, **fields) -> ws_pb.GetManifestResponse:
        return await self._unary("GetManifest", request, fields, timeout)

    async def list_versions(self, request=None, /, *, timeout=None, **fields) -> ws_pb.ListVersionsResponse:
        return await self._unary("ListVersions", request, fields, timeout)

    async def get_latest_version(self, request=None, /, *, timeout=None, **fields) -> ws_pb.GetLatestVersionResponse:
        return await self._unary("GetLatestVersion", request, fields, timeout)

    async def delete_version(self, request=None, /, *, timeout=None, **fields) -> ws_pb.DeleteVersionResponse:
        return await self._unary("DeleteVersion", request, fields, timeout)

    def watch_versions(self, request=None, /, *, timeout=None, **fields) -> AsyncIterator[ws_pb.WatchVersionsResponse]:
        return self._server_stream("WatchVersions", request, fields, timeout)

    async def allocate_upload(self, request=None, /, *, timeout=None, **fields) -> ws_pb.AllocateUploadResponse:
        return await self._unary("AllocateUpload", request, fields, timeout)

    async def release_lease(self, request=None, /, *, timeout=None, **fields) -> ws_pb.ReleaseLeaseResponse:
        return await self._unary("ReleaseLease", request, fields, timeout)


class SandboxClient(AsyncClient):
    SERVICE = sb_pb.DESCRIPTOR.services_by_name["SandboxService"]

    async def execute(self, request=None, /, *, timeout=None, **fields) -> sb_pb.ExecuteResponse:
        return await self._unary("Execute", request, fields, timeout)


class EnvironmentClient(AsyncClient):
    SERVICE = env_pb.DESCRIPTOR.services_by_name["EnvironmentService"]

    async def reset(self, request=None, /, *, timeout=None, **fields) -> env_pb.ResetResponse:
        return await self._unary("Reset", request, fields, timeout)

    async def step(self, request=None, /, *, timeout=None, **fields) -> env_pb.StepResponse:
        return await self._unary("Step", request, fields, timeout)

    async def close_session(self, request=None, /, *, timeout=None, **fields) -> env_pb.CloseResponse:
        # Named close_session: `close()` closes the client's channel.
        return await self._unary("Close", request, fields, timeout)


CLIENTS: dict[str, type[AsyncClient]] = {
    "generator": GeneratorClient,
    "reward": RewardClient,
    "replay_buffer": ReplayBufferClient,
    "trainer": TrainerClient,
    "weight_store": WeightStoreClient,
    "sandbox": SandboxClient,
    "environment": EnvironmentClient,
}
