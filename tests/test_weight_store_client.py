"""SDK side of the weight store: kept segment mappings, memory of a gRPC load, odd targets.

One store per test (its own segment prefix, retain_versions=1), as in an RL loop that publishes
every step: the store hands the segment of the version before last out again for the next one.
"""

from __future__ import annotations

import os
import tracemalloc

import pytest
import torch
from conftest import ServiceProcess

from forgerpc.clients import WeightStoreClient
from forgerpc.clients import weights
from forgerpc.clients.weights import host_id, load_into, publish
from forgerpc.services.weight_store.backends.shm import reclaim_orphans
from forgerpc.v1 import weight_store_pb2 as pb


@pytest.fixture
def store():
    prefixes, started = [], []

    def start(*extra: str) -> str:
        prefix = f"wsclient-{os.getpid()}-{len(started)}"
        prefixes.append(prefix)
        started.append(ServiceProcess("weight_store", "retain_versions=1", f"shm_prefix={prefix}", *extra))
        return started[-1].address

    weights.forget_segments()
    yield start
    weights.forget_segments()
    for p in started:
        p.terminate()
    for prefix in prefixes:
        reclaim_orphans(prefix)


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(1000, 100, generator=g), "b": torch.randn(77, generator=g).bfloat16()}


async def segment_of(client, version: int) -> str:
    """The segment a shared-memory Get of `version` names (its lease released at once)."""
    stream = client.get_weights(version=version, transport=pb.TRANSPORT_SHARED_MEMORY, client_host_id=host_id())
    header = (await anext(stream)).header
    await client.release_lease(lease_id=header.lease_id)
    return header.segment_name


async def test_a_kept_mapping_of_a_recycled_segment_shows_the_new_version(store):
    async with WeightStoreClient(store("spare_segments=2")) as client:
        got = {k: torch.zeros_like(v) for k, v in state(0).items()}
        await publish(client, state(1), 1)
        await load_into(client, got, 1)
        first = await segment_of(client, 1)
        kept = weights._READ_MAPPINGS.entries[first][1]
        await publish(client, state(2), 2)  # retires version 1: its segment becomes a spare
        await publish(client, state(3), 3)  # ...and is refilled with version 3
        assert await segment_of(client, 3) == first
        assert first in weights._UPLOAD_MAPPINGS.entries  # the publisher refilled its kept mapping too
        await load_into(client, got, 3)
        assert weights._READ_MAPPINGS.entries[first][1] is kept  # the same mapping, not a new one
        assert all(torch.equal(got[k], v) for k, v in state(3).items())  # version 3's bytes, not 1's


async def test_a_mapping_whose_segment_was_unlinked_is_dropped(store):
    async with WeightStoreClient(store("spare_segments=0")) as client:
        got = {k: torch.zeros_like(v) for k, v in state(0).items()}
        await publish(client, state(1), 1)
        await load_into(client, got, 1)
        first = await segment_of(client, 1)
        await publish(client, state(2), 2)  # version 1 retired, its segment unlinked (no spares)
        assert not os.path.exists(f"/dev/shm/{first}")
        await load_into(client, got, 2)
        second = await segment_of(client, 2)
        assert list(weights._READ_MAPPINGS.entries) == [second]  # no mapping pins the dead segment
        assert first not in weights._UPLOAD_MAPPINGS.entries
        assert all(torch.equal(got[k], v) for k, v in state(2).items())


@pytest.mark.parametrize("transport", ["shm", "grpc"])
async def test_non_contiguous_and_cast_targets(store, transport):
    async with WeightStoreClient(store()) as client:
        src = {"w": torch.randn(64, 48), "v": torch.randn(300)}
        await publish(client, src, 1, transport=transport)
        got = {"w": torch.zeros(48, 64).t(), "v": torch.zeros(300, dtype=torch.bfloat16)}  # transposed view, cast
        await load_into(client, got, 1, transport=transport, chunk_bytes=4099 if transport == "grpc" else 0)
        assert torch.equal(got["w"], src["w"]) and torch.equal(got["v"], src["v"].bfloat16())


async def test_a_grpc_load_holds_one_message_at_a_time(store):
    """Python memory of a 40 MB load in 1 MiB messages stays near 2 messages: the one being
    copied is freed before grpcio builds the next (which takes 2 x its size: a bytearray, then bytes)."""
    async with WeightStoreClient(store()) as client:
        src = {f"w{i}": torch.randn(1 << 20) for i in range(10)}
        await publish(client, src, 1, transport="grpc")
        got = {k: torch.zeros_like(v) for k, v in src.items()}
        await load_into(client, got, 1, transport="grpc", chunk_bytes=1 << 20)  # warm: channel, pools
        tracemalloc.start()
        try:
            await load_into(client, got, 1, transport="grpc", chunk_bytes=1 << 20)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2.5 * (1 << 20), f"{peak / 2**20:.2f} MiB"  # a second held message makes it ~3
        assert all(torch.equal(got[k], v) for k, v in src.items())
