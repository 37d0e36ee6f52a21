"""PublishWeights to a real weight store process: a real trainer process publishes two versions, a
fresh model loads each back (shared memory and gRPC) and equals the trainer's weights after the
cast to publish_dtype; store and buffer failures come back as clear statuses naming the address."""

from __future__ import annotations

import socket

import grpc
import pytest
import torch
from safetensors.torch import load_file

from forgerpc.clients import ForgeRPCError, RetryPolicy, TrainerClient, WeightStoreClient
from forgerpc.clients.weights import load_into
from forgerpc.services.common.models import load_model, make_tiny_model
from forgerpc.v1 import trainer_pb2
from test_trainer_service import make_episodes, trainer_args


def dead_address() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_publish_two_versions_to_the_store_and_load_them_back(serve_process, tmp_path):
    store = serve_process("weight_store", "retain_versions=3")
    trainer = serve_process("trainer", *trainer_args(tmp_path, f"weight_store_address={store.address}",
                                                     "publish_dtype=bfloat16"))
    fresh, _ = load_model(make_tiny_model(tmp_path / "fresh", seed=1))  # other weights than the trainer's seed 0
    async with TrainerClient(trainer.address) as client, WeightStoreClient(store.address) as ws:
        expected = {}
        for version, transport in ((1, "grpc"), (2, "shm")):
            await client.train_step(episodes=make_episodes(seed=version))
            published = await client.publish_weights(version=version)
            assert published.location == store.address and published.version.version == version
            assert published.version.step == version and published.bytes > 0
            saved = await client.save_checkpoint()  # the trainer's exact fp32 weights, to compare with
            expected[version] = load_file(f"{saved.path}/model.safetensors")
            loaded = await load_into(ws, fresh, version, transport=transport)
            assert (loaded.version, loaded.producer, loaded.step) == (version, "trainer-0", version)
            got = fresh.state_dict()
            for name, want in expected[version].items():
                assert torch.equal(got[name], want.to(torch.bfloat16).float()), (version, name)
                assert not torch.equal(got[name], want)  # the cast really happened (fp32 weights differ)
        assert (await client.get_state()).policy_version == 2
        assert [v.version for v in (await ws.list_versions()).versions] == [1, 2]
        manifest = (await ws.get_manifest(version=2)).manifest
        assert {t.name for t in manifest.tensors} >= set(expected[2])  # HF names, every weight
        name = "model.layers.0.mlp.down_proj.weight"
        assert not torch.equal(expected[1][name], expected[2][name])  # two different versions


async def test_store_and_buffer_failures_are_clear_statuses(serve_process, tmp_path):
    store_address, buffer_address = dead_address(), dead_address()
    trainer = serve_process("trainer", *trainer_args(tmp_path, f"weight_store_address={store_address}",
                                                     f"replay_buffer_address={buffer_address}"))
    async with TrainerClient(trainer.address, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(ForgeRPCError) as err:
            await client.publish_weights(version=1)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "WEIGHT_STORE_UNAVAILABLE"
        assert err.value.message.startswith("weight_store_address:") and store_address in err.value.message
        assert "Traceback" not in err.value.message
        assert (await client.get_state()).policy_version == 0  # a failed publish takes no version

        with pytest.raises(ForgeRPCError) as err:
            await client.train_step(from_buffer=trainer_pb2.BufferSample(batch_size=4))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "REPLAY_BUFFER_UNAVAILABLE"
        assert err.value.message.startswith("replay_buffer_address:") and buffer_address in err.value.message

        bad = {"from_buffer.batch_size": dict(from_buffer=trainer_pb2.BufferSample(batch_size=0)),
               "from_buffer.wait_seconds": dict(from_buffer=trainer_pb2.BufferSample(batch_size=4, wait_seconds=-1)),
               "from_buffer": dict(from_buffer=trainer_pb2.BufferSample(batch_size=4), episodes=make_episodes(2))}
        for field, fields in bad.items():
            with pytest.raises(ForgeRPCError) as err:
                await client.train_step(**fields)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message.startswith(field + ":")
        assert (await client.get_state()).step == 0


async def test_existing_version_in_the_store_and_no_buffer_configured(serve_process, tmp_path):
    """A restarted trainer that publishes a number the store holds gets ALREADY_EXISTS naming the
    store; from_buffer on a trainer without replay_buffer_address is FAILED_PRECONDITION."""
    store = serve_process("weight_store")
    first = serve_process("trainer", *trainer_args(tmp_path, f"weight_store_address={store.address}"))
    async with TrainerClient(first.address) as client:
        assert (await client.publish_weights(version=1)).bytes > 0
    first.stop()
    second = serve_process("trainer", *trainer_args(tmp_path, f"weight_store_address={store.address}"))
    async with TrainerClient(second.address) as client:
        with pytest.raises(ForgeRPCError) as err:
            await client.publish_weights(version=1)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and store.address in err.value.message
        assert (await client.publish_weights(version=2)).version.version == 2
        with pytest.raises(ForgeRPCError) as err:
            await client.train_step(from_buffer=trainer_pb2.BufferSample(batch_size=4))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.reason == "REPLAY_BUFFER_NOT_CONFIGURED" and "replay_buffer_address" in err.value.message
