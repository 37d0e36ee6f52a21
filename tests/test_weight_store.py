"""Weight store conformance: every backend that runs here x every transport it offers.

Each case talks to a real `forgerpc serve weight_store` process over loopback gRPC and, for the
shm backend, through /dev/shm segments. The torchstore backend is included whenever
`import torchstore` and `initialize()` work; it is skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import mmap
import os

import grpc
import pytest
import torch
import xxhash
from conftest import ServiceProcess

from forgerpc.clients import ForgeRPCError, WeightStoreClient
from forgerpc.clients.weights import _data_of, _plan, data_message, load_into, publish
from forgerpc.v1 import weight_store_pb2 as pb

RETAIN = 3
TORCHSTORE_SKIP = ("torchstore is not importable here: PyPI's torchstore 0.1.2 pins torch 2.9.0 and "
                   "torchmonarch 0.1.2 (needs libcuda); see ENVIRONMENT.md")
# (backend, transport, wire). The memory and torchstore backends have no shared memory. gRPC goes
# over the SDK's own HTTP/2 streams (clients/h2stream.py) on channels the SDK opened, over grpcio
# on a caller's channel: "grpcio" runs a client that cannot bypass its channel.
CASES = [("shm", "shm", "auto"), ("shm", "grpc", "auto"), ("shm", "grpc", "grpcio"), ("memory", "grpc", "auto"),
         ("torchstore", "grpc", "auto")]
_versions = itertools.count(100)  # one store per backend is shared by the module's tests


def next_versions(n: int = 1) -> list[int]:
    return [next(_versions) for _ in range(n)]


@pytest.fixture(scope="module")
def stores():
    started: dict[str, ServiceProcess] = {}

    def get(backend: str) -> str:
        if backend == "torchstore" and importlib.util.find_spec("torchstore") is None:
            pytest.skip(TORCHSTORE_SKIP)
        if backend not in started:
            try:
                started[backend] = ServiceProcess("weight_store", f"backend={backend}", f"retain_versions={RETAIN}",
                                                  f"shm_prefix=wstest-{backend}-{os.getpid()}")
            except RuntimeError as e:
                if backend == "torchstore":
                    pytest.skip(f"torchstore did not initialize: {e}")
                raise
        return started[backend].address

    yield get
    for p in started.values():
        p.terminate()


@pytest.fixture(params=CASES, ids=[f"{b}-{t}" + (f"-{w}" if w != "auto" else "") for b, t, w in CASES])
async def store(request, stores):
    backend, transport, wire = request.param
    client = WeightStoreClient(stores(backend), timeout=30)
    client.transport = transport
    if wire == "grpcio":
        client._settings = None  # as for a channel passed in: publish and load_into stay on grpcio
    yield client
    await client.close()


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(300, 64, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(63, generator=g),  # odd size: padding follows
        "model.rotary.inv_freq": torch.arange(17, dtype=torch.int64),
        "lm_head.scale": torch.tensor(3.5),
    }


def zeros_like(sd: dict, dtype=None) -> dict:
    return {k: torch.zeros(v.shape, dtype=v.dtype if dtype is None or not v.is_floating_point() else dtype)
            for k, v in sd.items()}


def digest(t: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(t.contiguous().view(-1).view(torch.uint8).numpy())


async def code_of(awaitable) -> grpc.StatusCode:
    with pytest.raises(ForgeRPCError) as e:
        await awaitable
    return e.value.code


async def test_publish_then_load_is_bit_identical(store):
    (v,) = next_versions()
    sd = state_dict(v)
    put = await publish(store, sd, v, producer="trainer-0", step=7, transport=store.transport)
    assert put.version.version == v and put.version.producer == "trainer-0" and put.version.step == 7
    got = zeros_like(sd)
    loaded = await load_into(store, got, v, transport=store.transport)
    assert loaded.version == v
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    manifest = (await store.get_manifest(version=v)).manifest
    assert [t.name for t in manifest.tensors] == list(sd)
    assert [tuple(t.shape) for t in manifest.tensors] == [tuple(x.shape) for x in sd.values()]
    assert [t.byte_size for t in manifest.tensors] == [x.nbytes for x in sd.values()]
    assert [t.checksum for t in manifest.tensors] == [digest(x) for x in sd.values()]
    assert all(t.offset % 64 == 0 for t in manifest.tensors)
    assert (await store.get_latest_version()).version.version >= v
    assert v in [m.version for m in (await store.list_versions()).versions]


async def test_unknown_version_is_not_found(store):
    assert await code_of(store.get_manifest(version=10**9)) == grpc.StatusCode.NOT_FOUND
    assert await code_of(load_into(store, {}, 10**9, transport=store.transport)) == grpc.StatusCode.NOT_FOUND
    assert (await store.delete_version(version=10**9)).deleted is False
    (v,) = next_versions()
    await publish(store, state_dict(v), v, transport=store.transport)
    e = await code_of(load_into(store, {}, v, names=["no.such.tensor"], transport=store.transport))
    assert e == grpc.StatusCode.NOT_FOUND


async def test_existing_version_and_bad_manifest_are_refused(store):
    (v,) = next_versions()
    await publish(store, state_dict(v), v, transport=store.transport)
    assert await code_of(publish(store, state_dict(v), v, transport=store.transport)) == grpc.StatusCode.ALREADY_EXISTS
    _, manifest = _plan(state_dict(v), None, None)
    manifest.tensors[1].byte_size += 2
    header = pb.PutWeightsHeader(version=next_versions()[0], manifest=manifest)
    with pytest.raises(ForgeRPCError) as e:
        await store.put_weights([pb.PutWeightsRequest(header=header)])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.details["field"] == "header.manifest.tensors[1].byte_size"


async def test_retention_keeps_the_newest_k(store):
    versions = next_versions(RETAIN + 2)
    for v in versions:
        await publish(store, state_dict(v), v, transport=store.transport)
    listed = [m.version for m in (await store.list_versions()).versions]
    assert listed == versions[-RETAIN:]
    assert await code_of(store.get_manifest(version=versions[0])) == grpc.StatusCode.NOT_FOUND
    assert (await store.delete_version(version=versions[-1])).deleted is True
    assert [m.version for m in (await store.list_versions()).versions] == versions[-RETAIN:-1]


async def _gated_put(store, header: pb.PutWeightsHeader, payload: bytes, gate: asyncio.Event):
    """A gRPC Put that sends half the bytes, waits for `gate`, then sends the rest."""
    half = len(payload) // 2

    async def messages():
        yield pb.PutWeightsRequest(header=header)
        yield pb.PutWeightsRequest(data=payload[:half])
        await gate.wait()
        yield pb.PutWeightsRequest(data=payload[half:])

    return await store.put_weights(messages())


def flat_bytes(sd: dict, manifest) -> bytes:
    buf = bytearray(manifest.total_bytes)
    for spec, t in zip(manifest.tensors, sd.values()):
        buf[spec.offset:spec.offset + spec.byte_size] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    for spec in manifest.tensors:
        spec.checksum = xxhash.xxh3_64_intdigest(memoryview(buf)[spec.offset:spec.offset + spec.byte_size])
    return bytes(buf)


async def test_publish_is_atomic(store):
    """A version is invisible (list, latest, manifest, get) until its last byte arrived."""
    (v,) = next_versions()
    sd = state_dict(v)
    _, manifest = _plan(sd, None, None)
    payload = flat_bytes(sd, manifest)
    gate = asyncio.Event()
    if store.transport == "shm":
        upload = await store.allocate_upload(total_bytes=manifest.total_bytes)
        with open(f"/dev/shm/{upload.segment_name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            mm[:len(payload) // 2] = payload[:len(payload) // 2]
            assert await code_of(store.get_manifest(version=v)) == grpc.StatusCode.NOT_FOUND
            mm[len(payload) // 2:] = payload[len(payload) // 2:]
        header = pb.PutWeightsHeader(version=v, manifest=manifest, upload_id=upload.upload_id)
        put = asyncio.create_task(store.put_weights([pb.PutWeightsRequest(header=header)]))
    else:
        put = asyncio.create_task(_gated_put(store, pb.PutWeightsHeader(version=v, manifest=manifest), payload, gate))
        await asyncio.sleep(0.3)  # the first half has arrived by now
        assert await code_of(store.get_manifest(version=v)) == grpc.StatusCode.NOT_FOUND
        assert v not in [m.version for m in (await store.list_versions()).versions]
        assert (await store.get_latest_version()).version.version < v
        assert await code_of(load_into(store, {}, v, transport=store.transport)) == grpc.StatusCode.NOT_FOUND
        gate.set()
    assert (await put).version.version == v
    got = zeros_like(sd)
    await load_into(store, got, v, transport=store.transport)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


async def test_checksum_mismatch_is_data_loss_and_not_published(store):
    (v,) = next_versions()
    sd = state_dict(v)
    _, manifest = _plan(sd, None, None)
    payload = flat_bytes(sd, manifest)
    manifest.tensors[2].checksum ^= 1
    if store.transport == "shm":
        upload = await store.allocate_upload(total_bytes=manifest.total_bytes)
        with open(f"/dev/shm/{upload.segment_name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            mm[:] = payload
        requests = [pb.PutWeightsRequest(header=pb.PutWeightsHeader(version=v, manifest=manifest,
                                                                     upload_id=upload.upload_id))]
    else:  # small messages: the bad tensor is found while the client is still sending
        requests = [pb.PutWeightsRequest(header=pb.PutWeightsHeader(version=v, manifest=manifest)),
                    *(pb.PutWeightsRequest(data=payload[i:i + 4096]) for i in range(0, len(payload), 4096))]
    with pytest.raises(ForgeRPCError) as e:
        await store.put_weights(requests)
    assert e.value.code == grpc.StatusCode.DATA_LOSS and e.value.reason == "CHECKSUM_MISMATCH"
    assert e.value.details["tensor"] == manifest.tensors[2].name
    assert await code_of(store.get_manifest(version=v)) == grpc.StatusCode.NOT_FOUND
    await publish(store, sd, v, transport=store.transport)  # the number was released


async def test_readers_keep_their_version_while_newer_ones_retire_it(store):
    """Two readers mid-stream (or holding a lease) on v0 while RETAIN newer versions are put."""
    v0, *newer = next_versions(RETAIN + 1)
    sd = state_dict(v0)
    await publish(store, sd, v0, transport=store.transport)
    transport = pb.TRANSPORT_SHARED_MEMORY if store.transport == "shm" else pb.TRANSPORT_GRPC
    from forgerpc.clients.weights import host_id
    streams = [store.get_weights(version=v0, transport=transport, chunk_bytes=4096, client_host_id=host_id())
               for _ in range(2)]
    headers = [(await anext(s)).header for s in streams]
    for v in newer:  # retires v0 from the catalog while both readers hold it
        await publish(store, state_dict(v), v, transport=store.transport)
    assert v0 not in [m.version for m in (await store.list_versions()).versions]
    expected = flat_bytes(sd, _plan(sd, None, None)[1])
    for stream, header in zip(streams, headers):
        if transport == pb.TRANSPORT_SHARED_MEMORY:
            with open(f"/dev/shm/{header.segment_name}", "rb") as f:
                assert f.read(len(expected)) == expected  # not freed, not reused
            assert (await store.release_lease(lease_id=header.lease_id)).released is True
        else:
            data = b"".join([m.data async for m in stream])
            assert data == expected[:len(data)] and len(data) == header.manifest.total_bytes


async def test_dtype_casting_on_load_and_on_publish(store):
    v1, v2 = next_versions(2)
    sd = state_dict(v1)
    await publish(store, sd, v1, transport=store.transport)
    got = zeros_like(sd, dtype=torch.bfloat16)  # fp32 store -> bf16 generator
    # 4099-byte messages split fp32 elements across messages (grpc); shm copies whole tensors.
    await load_into(store, got, v1, transport=store.transport, chunk_bytes=4099)
    for k, t in sd.items():
        assert got[k].dtype == (torch.bfloat16 if t.is_floating_point() else t.dtype)
        assert torch.equal(got[k], t.to(got[k].dtype)), k
    await publish(store, sd, v2, transport=store.transport, dtype=torch.bfloat16)  # cast while publishing
    manifest = (await store.get_manifest(version=v2)).manifest
    assert manifest.tensors[0].byte_size == sd["model.embed_tokens.weight"].numel() * 2
    got = zeros_like(sd, dtype=torch.float32)
    await load_into(store, got, v2, transport=store.transport)
    assert torch.equal(got["model.embed_tokens.weight"], sd["model.embed_tokens.weight"].bfloat16().float())


async def test_partial_get_and_name_mapping(store):
    (v,) = next_versions()
    sd = state_dict(v)
    trainer_names = {k.removeprefix("model."): t for k, t in sd.items()}
    await publish(store, trainer_names, v, transport=store.transport, name_map=lambda n: "hf." + n)
    wanted = ["hf.layers.0.input_layernorm.weight", "hf.rotary.inv_freq"]
    got = {"model.layers.0.input_layernorm.weight": torch.zeros(63), "model.rotary.inv_freq": torch.zeros(17, dtype=torch.int64)}
    await load_into(store, got, v, names=wanted, transport=store.transport,
                    name_map=lambda n: "model." + n.removeprefix("hf."))
    assert torch.equal(got["model.layers.0.input_layernorm.weight"], sd["model.layers.0.input_layernorm.weight"])
    assert torch.equal(got["model.rotary.inv_freq"], sd["model.rotary.inv_freq"])
    with pytest.raises(KeyError):  # strict: a full load needs a target for every stored tensor
        await load_into(store, got, v, transport=store.transport)


async def test_load_into_module_writes_the_existing_parameters(store):
    (v,) = next_versions()
    torch.manual_seed(v)
    src, dst = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32).to(torch.bfloat16)
    pointers = [p.data_ptr() for p in dst.parameters()]
    await publish(store, src.state_dict(), v, transport=store.transport)
    await load_into(store, dst, v, transport=store.transport)
    assert [p.data_ptr() for p in dst.parameters()] == pointers
    assert torch.equal(dst.weight, src.weight.detach().bfloat16())


async def test_watch_reports_new_versions_in_order(store):
    after = (await store.get_latest_version()).version.version
    new = next_versions(2)
    seen = []

    async def watch():
        async for event in store.watch_versions(after_version=after, timeout=30):
            seen.append(event.version.version)
            if len(seen) == 2:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    for v in new:
        await publish(store, state_dict(v), v, transport=store.transport)
    await asyncio.wait_for(watcher, 20)
    assert seen == new


async def test_auto_transport_falls_back_to_grpc_without_shared_memory(stores):
    async with WeightStoreClient(stores("memory")) as client:
        (v,) = next_versions()
        sd = state_dict(v)
        assert await code_of(publish(client, sd, v, transport="shm")) == grpc.StatusCode.FAILED_PRECONDITION
        await publish(client, sd, v)  # auto: AllocateUpload is refused, the bytes go over gRPC
        got = zeros_like(sd)
        assert (await load_into(client, got)).version == v  # auto + newest
        assert all(torch.equal(got[k], sd[k]) for k in sd)
        assert await code_of(load_into(client, got, v, transport="shm")) == grpc.StatusCode.FAILED_PRECONDITION
        assert await code_of(load_into(client, got, v, chunk_bytes=100)) == grpc.StatusCode.INVALID_ARGUMENT


def test_hand_encoded_data_messages_are_valid_protobuf():
    for n in (0, 1, 127, 128, 300, 1 << 20):
        payload = (bytes(range(256)) * (n // 256 + 1))[:n]
        raw = data_message([memoryview(payload[:n // 2]), memoryview(payload[n // 2:])], n)
        assert raw == pb.GetWeightsResponse(data=payload).SerializeToString()
        assert pb.PutWeightsRequest.FromString(raw).data == payload
        assert bytes(_data_of(raw)) == payload


@pytest.mark.parametrize("threads", [1, 2, 3])
async def test_a_new_segment_has_all_its_pages_before_the_first_upload(threads):
    from forgerpc.services.weight_store.backends.shm import SharedMemoryBackend
    backend = SharedMemoryBackend(f"wstest-populate-{os.getpid()}", spare_segments=0, populate_threads=threads)
    size = (24 << 20) + 12345  # not a multiple of the slices or of a page
    blob = await backend.allocate(size, "put")
    try:
        assert os.stat(blob.path).st_blocks * 512 >= size  # tmpfs counts the pages it allocated
        blob.view[-1:] = b"\x07"
        assert blob.view[0] == 0 and blob.view[size - 1] == 7
    finally:
        blob.free()
    assert not os.path.exists(blob.path)


async def test_a_full_dev_shm_is_resource_exhausted_not_a_crash(tmp_path, monkeypatch):
    """A full tmpfs makes MADV_POPULATE_WRITE fail (MAP_POPULATE used to succeed silently, and the
    first write then killed the writer with SIGBUS): populate raises, allocate says RESOURCE_EXHAUSTED."""
    import subprocess

    from forgerpc.services.common.errors import ServiceError
    from forgerpc.services.weight_store.backends import shm
    small = tmp_path / "tmpfs"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setattr(shm, "SHM_DIR", str(small))
        backend = shm.SharedMemoryBackend(f"wstest-full-{os.getpid()}", spare_segments=0)
        with pytest.raises(ServiceError) as e:
            await backend.allocate(32 << 20, "put")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "32" in str(e.value)
        assert os.listdir(small) == []  # the half-made segment is gone
        ok = await backend.allocate(4 << 20, "put")  # what fits still works
        ok.free()
        await backend.close()
    finally:
        subprocess.run(["umount", "--lazy", str(small)])  # lazy: gone even if a mapping lingers
