"""Checksums sent after the bytes: a Put's later headers carry (name, checksum) of finished tensors.

The SDK's shared-memory publish sends them while it is still copying (the store hashes each
reported tensor meanwhile), its gRPC publish sends them after the last chunk. The store still
reads every byte itself: a byte changed after the client hashed it, or a checksum never sent,
is DATA_LOSS and nothing is published.
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
import os
import threading

import grpc
import pytest
import torch
from conftest import ServiceProcess

from forgerpc.clients import ForgeRPCError, WeightStoreClient, weights_shm
from forgerpc.clients.weights import _plan, load_into, publish
from forgerpc.v1 import common_pb2, weight_store_pb2 as pb
from test_weight_store import flat_bytes, state_dict, zeros_like

_versions = itertools.count(1)


@pytest.fixture(scope="module")
def address():
    p = ServiceProcess("weight_store", "retain_versions=2", "spare_segments=0", f"shm_prefix=wscheck-{os.getpid()}")
    yield p.address
    p.terminate()


@pytest.fixture
async def store(address):
    async with WeightStoreClient(address, timeout=30) as client:
        yield client


def later_header(version: int, pairs: list[tuple[str, int]]) -> pb.PutWeightsRequest:
    specs = [common_pb2.TensorSpec(name=n, checksum=c) for n, c in pairs]
    manifest = common_pb2.TensorManifest(tensors=specs)
    return pb.PutWeightsRequest(header=pb.PutWeightsHeader(version=version, manifest=manifest))


async def upload(store, payload: bytes) -> str:
    """An upload segment holding `payload`; returns its upload id."""
    u = await store.allocate_upload(total_bytes=len(payload))
    with open(f"/dev/shm/{u.segment_name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[:] = payload
    return u.upload_id


async def listed(store) -> list[int]:
    return [m.version for m in (await store.list_versions()).versions]


@pytest.mark.parametrize("report_bytes", [1, weights_shm._REPORT_BYTES], ids=["per-tensor", "default"])
async def test_sdk_shm_publish_catches_a_byte_changed_after_the_client_hashed_it(store, monkeypatch, report_bytes):
    """A second writer flips one byte of a tensor between the client's hash and its report."""
    v, sd = next(_versions), state_dict(7)
    victim = "model.layers.0.mlp.up_proj.weight"
    monkeypatch.setattr(weights_shm, "_REPORT_BYTES", report_bytes)
    fill = weights_shm.fill_segment

    def corrupting(name, items, manifest, threads, report, stop):
        def report_after_corrupting(done):
            for i, _ in done:
                if manifest.tensors[i].name == victim:
                    weights_shm._UPLOAD_MAPPINGS.get(name)[manifest.tensors[i].offset + 5] ^= 0x40
            report(done)
        return fill(name, items, manifest, threads, report_after_corrupting, stop)

    monkeypatch.setattr(weights_shm, "fill_segment", corrupting)
    with pytest.raises(ForgeRPCError) as e:
        await publish(store, sd, v, transport="shm")
    assert e.value.code == grpc.StatusCode.DATA_LOSS and e.value.reason == "CHECKSUM_MISMATCH"
    assert e.value.details["tensor"] == victim
    assert v not in await listed(store)
    monkeypatch.setattr(weights_shm, "fill_segment", fill)
    await publish(store, sd, v, transport="shm")  # the number is free again; intact bytes pass
    got = zeros_like(sd)
    await load_into(store, got, v, transport="shm")
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
async def test_checksums_after_the_bytes_publish_and_land_in_the_manifest(store, transport):
    v, sd = next(_versions), state_dict(8)
    _, manifest = _plan(sd, None, None)
    payload = flat_bytes(sd, manifest)  # fills manifest checksums
    sent = [(t.name, t.checksum) for t in manifest.tensors]
    first = pb.PutWeightsHeader(version=v, manifest=manifest)
    first.manifest.ClearField("tensors")
    first.manifest.tensors.extend(manifest.tensors)
    for t in first.manifest.tensors:
        t.checksum = 0  # "comes later"
    if transport == "shm":
        first.upload_id = await upload(store, payload)
        requests = [pb.PutWeightsRequest(header=first), later_header(v, sent[:2]), later_header(v, sent[2:])]
    else:
        requests = [pb.PutWeightsRequest(header=first), later_header(v, sent[:1]),  # before its bytes: fine too
                    *(pb.PutWeightsRequest(data=payload[i:i + 512]) for i in range(0, len(payload), 512)),
                    later_header(v, sent[1:])]
    assert (await store.put_weights(requests)).version.version == v
    stored = (await store.get_manifest(version=v)).manifest
    assert [(t.name, t.checksum) for t in stored.tensors] == sent


@pytest.mark.parametrize("transport", ["shm", "grpc"])
@pytest.mark.parametrize("fault", ["wrong", "missing"])
async def test_a_wrong_or_missing_later_checksum_is_data_loss(store, transport, fault):
    v, sd = next(_versions), state_dict(9)
    _, manifest = _plan(sd, None, None)
    payload = flat_bytes(sd, manifest)
    sent = [(t.name, t.checksum) for t in manifest.tensors]
    bad = sent[3][0]
    later = [(n, c ^ 1 if n == bad else c) for n, c in sent] if fault == "wrong" else [p for p in sent if p[0] != bad]
    for t in manifest.tensors:
        t.checksum = 0
    header = pb.PutWeightsHeader(version=v, manifest=manifest)
    if transport == "shm":
        header.upload_id = await upload(store, payload)
        requests = [pb.PutWeightsRequest(header=header), later_header(v, later)]
    else:
        requests = [pb.PutWeightsRequest(header=header), pb.PutWeightsRequest(data=payload), later_header(v, later)]
    with pytest.raises(ForgeRPCError) as e:
        await store.put_weights(requests)
    assert e.value.code == grpc.StatusCode.DATA_LOSS and e.value.details["tensor"] == bad
    assert v not in await listed(store)


async def test_a_later_header_must_name_known_tensors_once(store):
    sd = state_dict(10)
    _, manifest = _plan(sd, None, None)
    payload = flat_bytes(sd, manifest)
    name, checksum = manifest.tensors[0].name, manifest.tensors[0].checksum
    cases = [([("no.such.tensor", 1)], "header.manifest.tensors[0].name"),
             ([(name, checksum), (name, checksum)], "header.manifest.tensors[1].checksum")]
    for pairs, field in cases:
        v = next(_versions)
        header = pb.PutWeightsHeader(version=v, manifest=manifest, upload_id=await upload(store, payload))
        with pytest.raises(ForgeRPCError) as e:
            await store.put_weights([pb.PutWeightsRequest(header=header), later_header(v, pairs)])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.details["field"] == field
        assert v not in await listed(store)


async def test_a_cancelled_shm_publish_stops_its_copy_and_leaves_nothing(store, monkeypatch):
    """The copy thread has quit when publish returns, and the store freed the upload."""
    v, sd = next(_versions), state_dict(11)
    prefix = f"wscheck-{os.getpid()}."
    before = {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
    started, quit_ = threading.Event(), threading.Event()

    def endless_copy(name, items, manifest, threads, report, stop):
        started.set()
        stop.wait(30)  # a copy that only ends when told to
        quit_.set()

    monkeypatch.setattr(weights_shm, "fill_segment", endless_copy)
    task = asyncio.create_task(publish(store, sd, v, transport="shm"))
    assert await asyncio.to_thread(started.wait, 10)
    await asyncio.sleep(0.3)  # the store holds the upload by now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert quit_.is_set()
    deadline = asyncio.get_running_loop().time() + 10
    while {n for n in os.listdir("/dev/shm") if n.startswith(prefix)} != before:
        assert asyncio.get_running_loop().time() < deadline, "the upload segment was not freed"
        await asyncio.sleep(0.05)
    assert v not in await listed(store)
