"""Weight store faults: broken streams, crashed clients, expired leases, store stop and crash.

Every store here runs with spare_segments=0 (freed segments are unlinked, not pooled) and its
own segment prefix, so the set of files in /dev/shm shows exactly what the store holds in shared
memory; a version Put over gRPC lives in the store's heap, checked through its RssAnon.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from conftest import ServiceProcess

from forgerpc.clients import ForgeRPCError, WeightStoreClient
from forgerpc.clients.weights import _plan, host_id, load_into, publish
from forgerpc.services.weight_store.backends.shm import reclaim_orphans
from forgerpc.v1 import weight_store_pb2 as pb


def segments(prefix: str) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix + ".")}


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def store_process():
    started, prefixes = [], set()

    def start(prefix: str, *extra: str) -> ServiceProcess:
        p = ServiceProcess("weight_store", "spare_segments=0", f"shm_prefix={prefix}", "upload_ttl_seconds=1",
                           "lease_ttl_seconds=1", *extra)
        started.append(p)
        prefixes.add(prefix)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.terminate()  # SIGTERM: the store frees its segments
    for prefix in prefixes:  # what a store killed on purpose left behind
        reclaim_orphans(prefix)


def sd(n: int = 50_000) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(n, dtype=torch.float32), "b": torch.ones(10)}


def rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))


async def test_broken_put_stream_leaves_nothing_visible_and_nothing_leaked(store_process):
    """A gRPC Put keeps the received messages (no segment): a broken one must drop them all."""
    prefix = f"wsfault-broken-{os.getpid()}"
    store = store_process(prefix)
    big = {"w": torch.zeros(16 << 20)}  # a 64 MiB version
    _, manifest = _plan(big, None, None)
    async with WeightStoreClient(store.address) as client:
        await publish(client, sd(), 1, transport="grpc")
        assert segments(prefix) == set()  # a gRPC Put's version is the received pieces
        sent = asyncio.Event()

        async def messages(version: int):
            yield pb.PutWeightsRequest(header=pb.PutWeightsHeader(version=version, manifest=manifest))
            for _ in range(15):  # 60 of its 64 MiB
                yield pb.PutWeightsRequest(data=bytes(4 << 20))
            sent.set()
            await asyncio.sleep(60)  # the "trainer" hangs; the caller cancels the call

        async def break_one() -> int:
            """RssAnon of the store while it holds a half-received version."""
            sent.clear()
            put = asyncio.create_task(client.put_weights(messages(2)))
            await sent.wait()
            await asyncio.sleep(0.5)
            held = rss_anon(store.proc.pid)
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put
            return held

        before = rss_anon(store.proc.pid)
        first = await break_one()
        assert first - before > 48 << 20  # the half-received version is held while it streams...
        for _ in range(2):  # the heap's layout settles (+8-28 MiB over the first three, then ~flat)
            first = await break_one()
        for _ in range(6):
            last = await break_one()
        # ...and dropped after the break: the store reuses the freed messages' memory for the next
        # Put (it keeps it, see heap.py), so RSS stays; a leak would add ~60 MiB per broken Put.
        assert last - first < 60 << 20, (before, first, last)
        assert [v.version for v in (await client.list_versions()).versions] == [1]
        assert segments(prefix) == set()
        # Short and long streams are refused and leave nothing either.
        _, manifest = _plan(sd(), None, None)
        header = pb.PutWeightsRequest(header=pb.PutWeightsHeader(version=2, manifest=manifest))
        for data, problem in [(bytes(100), "stream ended after 100"), (bytes(manifest.total_bytes + 1), "more bytes")]:
            with pytest.raises(ForgeRPCError) as e:
                await client.put_weights([header, pb.PutWeightsRequest(data=data)])
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and problem in e.value.message
        await publish(client, sd(), 2, transport="grpc")  # the number is free again


async def test_upload_of_a_crashed_client_is_reclaimed(store_process):
    prefix = f"wsfault-crash-{os.getpid()}"
    store = store_process(prefix)
    script = (
        "import asyncio, mmap, os, sys\n"
        "from forgerpc.clients import WeightStoreClient\n"
        "async def main():\n"
        "    c = WeightStoreClient(sys.argv[1])\n"
        "    u = await c.allocate_upload(total_bytes=1 << 20)\n"
        "    with open('/dev/shm/' + u.segment_name, 'r+b') as f, mmap.mmap(f.fileno(), 0) as mm:\n"
        "        mm[:1000] = b'x' * 1000\n"
        "        print(u.segment_name, flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    client = subprocess.Popen([sys.executable, "-c", script, store.address], stdout=subprocess.PIPE, text=True)
    try:
        name = client.stdout.readline().strip()
        assert name in segments(prefix)
        client.send_signal(signal.SIGKILL)  # dies between AllocateUpload and PutWeights
        client.wait(10)
    finally:
        client.kill()
    assert wait_until(lambda: name not in segments(prefix))  # upload_ttl_seconds=1
    async with WeightStoreClient(store.address) as c:
        assert (await c.list_versions()).versions == []
        e = pb.PutWeightsHeader(version=1, manifest=_plan(sd(), None, None)[1], upload_id="nope")
        with pytest.raises(ForgeRPCError) as err:
            await c.put_weights([pb.PutWeightsRequest(header=e)])
        assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_unreleased_lease_expires_and_frees_a_retired_version(store_process):
    prefix = f"wsfault-lease-{os.getpid()}"
    store = store_process(prefix)
    async with WeightStoreClient(store.address) as c:
        await publish(c, sd(), 1, transport="shm")
        stream = c.get_weights(version=1, transport=pb.TRANSPORT_SHARED_MEMORY, client_host_id=host_id())
        header = (await anext(stream)).header
        assert header.lease_id and header.segment_name in segments(prefix)
        assert (await c.delete_version(version=1)).deleted is True
        assert header.segment_name in segments(prefix)  # the lease holds it
        assert wait_until(lambda: header.segment_name not in segments(prefix))  # lease_ttl_seconds=1
        assert (await c.release_lease(lease_id=header.lease_id)).released is False
        with pytest.raises(ForgeRPCError) as e:  # explicit shm from "another host"
            await anext(c.get_weights(version=1, transport=pb.TRANSPORT_SHARED_MEMORY, client_host_id="elsewhere"))
        assert e.value.code == grpc.StatusCode.NOT_FOUND  # deleted first; unknown beats unreachable


async def test_shm_to_another_host_is_refused_and_auto_falls_back(store_process):
    prefix = f"wsfault-host-{os.getpid()}"
    store = store_process(prefix)
    async with WeightStoreClient(store.address) as c:
        await publish(c, sd(), 1)
        with pytest.raises(ForgeRPCError) as e:
            await anext(c.get_weights(version=1, transport=pb.TRANSPORT_SHARED_MEMORY, client_host_id="elsewhere"))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        header = (await anext(c.get_weights(version=1, client_host_id="elsewhere"))).header
        assert header.transport == pb.TRANSPORT_GRPC and not header.lease_id


async def test_a_big_put_has_its_memory_in_place_before_its_bytes_arrive(store_process):
    """The store populates the heap a gRPC Put will need at its header (server._grow_heap), and
    the messages that arrive then reuse that memory instead of growing the heap further."""
    store = store_process(f"wsfault-grow-{os.getpid()}")
    src = {"w": torch.randn(64 << 20)}  # 256 MiB
    _, manifest = _plan(src, None, None)
    sent = asyncio.Event()

    async def header_only():
        yield pb.PutWeightsRequest(header=pb.PutWeightsHeader(version=1, manifest=manifest))
        sent.set()
        await asyncio.sleep(60)

    async with WeightStoreClient(store.address, timeout=60) as c:
        before = rss_anon(store.proc.pid)
        put = asyncio.create_task(c.put_weights(header_only()))
        await sent.wait()
        # No byte sent yet; what the heap lacked (256 MiB less its free memory) is in place.
        assert wait_until(lambda: rss_anon(store.proc.pid) - before > 160 << 20)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        grown = rss_anon(store.proc.pid)
        await publish(c, src, 1, transport="grpc")
        # The version went into that memory: RSS grew by gRPC's own first-use buffers (~90 MiB
        # here), not by the version's 256 MiB once more.
        assert rss_anon(store.proc.pid) - grown < 160 << 20
        target = {"w": torch.zeros_like(src["w"])}
        await load_into(c, target, 1, transport="grpc")
        assert torch.equal(target["w"], src["w"])


async def test_a_version_put_over_grpc_gets_one_segment_for_its_same_host_readers(store_process):
    prefix = f"wsfault-share-{os.getpid()}"
    store = store_process(prefix)
    src = {"w": torch.randn(1 << 20), "b": torch.randn(10)}
    async with WeightStoreClient(store.address) as c:
        await publish(c, src, 1, transport="grpc")
        assert segments(prefix) == set()  # kept as received until a same-host reader comes
        targets = [{k: torch.zeros_like(v) for k, v in src.items()} for _ in range(4)]
        await asyncio.gather(*(load_into(c, t, 1, transport="shm") for t in targets[:3]))
        (segment,) = segments(prefix)  # one copy, shared by the three
        await load_into(c, targets[3], 1, transport="grpc")  # now streamed from the segment
        for t in targets:
            assert all(torch.equal(t[k], src[k]) for k in src)
        assert segments(prefix) == {segment}
        assert (await c.delete_version(version=1)).deleted is True
        assert wait_until(lambda: segments(prefix) == set())


async def test_stop_removes_segments_and_a_new_store_reclaims_a_crashed_ones(store_process):
    prefix = f"wsfault-stop-{os.getpid()}"
    store = store_process(prefix)
    async with WeightStoreClient(store.address) as c:
        await publish(c, sd(), 1, transport="shm")
        await c.allocate_upload(total_bytes=4096)
    assert len(segments(prefix)) == 2
    store.terminate()  # SIGTERM: drain, then free everything
    assert segments(prefix) == set()

    crashed = store_process(prefix)
    async with WeightStoreClient(crashed.address) as c:
        await publish(c, sd(), 1, transport="shm")
    orphans = segments(prefix)
    assert len(orphans) == 1
    crashed.proc.send_signal(signal.SIGKILL)
    crashed.proc.wait(10)
    assert segments(prefix) == orphans  # nobody cleaned up
    bystander = f"{prefix}.{os.getpid()}.put-live"  # a segment of a live process: left alone
    open(f"/dev/shm/{bystander}", "wb").close()
    try:
        store_process(prefix)
        assert segments(prefix) == {bystander}
    finally:
        os.unlink(f"/dev/shm/{bystander}")


async def test_a_reader_that_hangs_up_mid_stream_releases_its_version(store_process):
    prefix = f"wsfault-hangup-{os.getpid()}"
    store = store_process(prefix)
    async with WeightStoreClient(store.address) as c:
        await publish(c, sd(), 1, transport="shm")
        (segment,) = segments(prefix)
        call = c.get_weights(version=1, transport=pb.TRANSPORT_GRPC, chunk_bytes=4096)
        await anext(call)  # header
        await anext(call)  # first chunk; then the reader goes away
        await call.aclose()
        assert (await c.delete_version(version=1)).deleted is True
        assert wait_until(lambda: segment not in segments(prefix))  # no reader holds it any more


async def test_the_store_answers_while_it_allocates_a_segment_and_frees_one_nobody_waits_for(store_process):
    """Populating a multi-GB segment takes seconds: it runs off the event loop, so other calls are
    answered meanwhile; a caller that leaves before it is ready leaves no segment behind."""
    prefix = f"wsfault-alloc-{os.getpid()}"
    store = store_process(prefix)
    async with WeightStoreClient(store.address, timeout=60) as c:
        await publish(c, sd(), 1, transport="shm")
        held = segments(prefix)  # version 1's
        allocation = asyncio.create_task(c.allocate_upload(total_bytes=2 << 30))
        await asyncio.sleep(0.05)
        assert [v.version for v in (await c.list_versions()).versions] == [1]
        assert not allocation.done()  # answered while the 2 GiB segment was still being populated
        upload = await allocation
        assert segments(prefix) == held | {upload.segment_name}  # never used: reaped after upload_ttl_seconds

        left = asyncio.create_task(c.allocate_upload(total_bytes=2 << 30))
        await asyncio.sleep(0.05)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        assert wait_until(lambda: segments(prefix) == held, timeout=60)
