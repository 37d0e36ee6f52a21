"""The WeightStoreService servicer: validates requests and moves version bytes.

Put over gRPC:   header -> raw chunks kept as they arrived (Pieces: views into the received
                 messages, no copy) while their checksums are computed -> (checksums, if the
                 header left them 0) -> publish.
Put over shm:    AllocateUpload -> header with upload_id -> the client fills the segment and
                 sends each tensor's checksum (later headers) as it goes -> each tensor is
                 hashed in a thread meanwhile -> the segment itself becomes the version.
Get over gRPC:   header (manifest with offsets into the bytes that follow) -> raw chunks; a
                 received Put message that fits a chunk goes back out as its own bytes.
Get over shm:    header naming the version's segment + a lease; the client copies, then
                 ReleaseLease. Chosen when the client's host id (boot id) equals the store's;
                 a version that came over gRPC is copied into a segment first (once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math

from google.protobuf.message import DecodeError

from forgerpc.clients.weights import data_message, data_view, host_id, tune_allocator
from forgerpc.services.common.errors import ServiceError, failed_precondition, invalid_argument, not_found, require
from forgerpc.services.common.runtime import ServiceDefinition
from forgerpc.services.weight_store import heap
from forgerpc.services.weight_store.backends import Pieces, make_backend
from forgerpc.services.weight_store.config import WeightStoreConfig
from forgerpc.services.weight_store.store import CHECKSUM_ALGORITHM, Catalog, Receiver, UploadVerifier, Version
from forgerpc.v1 import common_pb2, weight_store_pb2 as pb, weight_store_pb2_grpc

ITEMSIZE = {
    common_pb2.D_TYPE_FLOAT32: 4, common_pb2.D_TYPE_FLOAT16: 2, common_pb2.D_TYPE_BFLOAT16: 2,
    common_pb2.D_TYPE_FLOAT64: 8, common_pb2.D_TYPE_INT8: 1, common_pb2.D_TYPE_UINT8: 1,
    common_pb2.D_TYPE_INT16: 2, common_pb2.D_TYPE_INT32: 4, common_pb2.D_TYPE_INT64: 8,
    common_pb2.D_TYPE_BOOL: 1,
}


class _Message:
    """A received PutWeights message that holds only `data` (#2): byte for byte a GetWeights
    data message too, so it goes back out as it is (the runtime's serializer calls this)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes):
        self.raw = raw

    def SerializeToString(self) -> bytes:  # noqa: N802
        return self.raw


def whole_message(view: memoryview) -> bytes | None:
    """The received message whose whole `data` field `view` is (see parse_put), else None."""
    raw = view.obj
    if isinstance(raw, bytes) and len(raw) > len(view):  # a view of a message, not of plain data
        data = data_view(raw)
        if data is not None and len(data) == len(view):
            return raw
    return None


def messages(pieces: Pieces, ranges: list[tuple[int, int]], chunk: int):
    """GetWeights data messages for the byte ranges (offset, size) of the stored version.

    A whole piece that is a received message and fits a chunk goes out as that message (no
    copy here); anything else in slices of at most `chunk` bytes (one copy each, _RawData).
    """
    for start, size in ranges:
        for view, whole in pieces.span(start, start + size):
            raw = whole_message(view) if whole and len(view) <= chunk else None
            if raw is not None:
                yield _Message(raw)
                continue
            for lo in range(0, len(view), chunk):
                yield _RawData(view[lo:lo + chunk])


class _RawData:
    """A GetWeightsResponse whose only field is `data`, encoded by hand from a memoryview.

    protobuf would copy the chunk twice (into a bytes field, then into the wire string); this
    writes tag 2 (length-delimited, 0x12), the varint length and the bytes in one join.
    """

    __slots__ = ("view",)

    def __init__(self, view: memoryview):
        self.view = view

    def SerializeToString(self) -> bytes:  # noqa: N802 - the runtime's serializer calls this name
        return data_message([self.view], len(self.view))


def validate_manifest(m: common_pb2.TensorManifest, max_bytes: int, field: str = "header.manifest") -> None:
    require(m.checksum_algorithm == CHECKSUM_ALGORITHM, f"{field}.checksum_algorithm",
            f"must be '{CHECKSUM_ALGORITHM}' (per-tensor checksums of the raw bytes)")
    require(len(m.tensors) > 0, f"{field}.tensors", "must list at least one tensor")
    require(0 < m.total_bytes <= max_bytes, f"{field}.total_bytes", f"must be in (0, {max_bytes}]")
    end, names = 0, set()
    for i, t in enumerate(m.tensors):
        f = f"{field}.tensors[{i}]"
        require(bool(t.name) and t.name not in names, f"{f}.name", "must be non-empty and unique")
        names.add(t.name)
        require(t.dtype in ITEMSIZE, f"{f}.dtype", "must be set")
        require(all(d >= 0 for d in t.shape), f"{f}.shape", "dimensions must not be negative")
        expected = math.prod(t.shape) * ITEMSIZE[t.dtype]
        require(t.byte_size == expected, f"{f}.byte_size", f"must be {expected} for this shape and dtype")
        require(t.offset >= end, f"{f}.offset", "tensors must be in buffer order and must not overlap")
        end = t.offset + t.byte_size
    require(end <= m.total_bytes, f"{field}.total_bytes", f"must cover the last tensor's end ({end})")


async def parse_put(raw_stream):
    """PutWeights messages from raw bytes: a data-only chunk comes out as a memoryview of the
    received bytes (no copy); anything else is parsed by protobuf (malformed -> INVALID_ARGUMENT)."""
    async for raw in raw_stream:
        view = data_view(raw)
        if view is not None:
            yield view
            continue
        try:
            message = pb.PutWeightsRequest.FromString(raw)
        except DecodeError as e:
            raise invalid_argument("(request body)", f"not a valid {pb.PutWeightsRequest.DESCRIPTOR.full_name}: {e}") from None
        yield memoryview(message.data) if message.HasField("data") else message


class WeightStoreServicer(weight_store_pb2_grpc.WeightStoreServiceServicer):
    # Put chunks reach PutWeights as raw bytes (see parse_put): protobuf would copy each 4 MiB
    # `data` field into a new bytes object; the store keeps the received bytes themselves.
    RAW_REQUESTS = frozenset({"PutWeights"})

    def __init__(self, cfg: WeightStoreConfig, catalog: Catalog):
        self.cfg = cfg
        self.catalog = catalog
        self.host_id = host_id()

    # -- Put --------------------------------------------------------------------------------------
    async def PutWeights(self, request_iterator, context) -> pb.PutWeightsResponse:
        stream = parse_put(request_iterator)
        try:
            return await self._put(stream)
        except ServiceError:
            # A grpc.aio client still writing when the call ends reports INTERNAL instead of this
            # status (grpc/grpc#36066): read the rest of its stream first, then fail.
            await self._drain(stream)
            raise

    async def _drain(self, stream) -> None:
        limit = self.cfg.max_version_bytes + (64 << 20)
        with contextlib.suppress(Exception):
            async for message in stream:
                limit -= len(message) if isinstance(message, memoryview) else 0
                if limit < 0:
                    return

    async def _put(self, stream) -> pb.PutWeightsResponse:
        first = await anext(stream, None)
        require(isinstance(first, pb.PutWeightsRequest) and first.HasField("header"), "header",
                "the first message must be the header")
        h = first.header
        require(h.version >= 0, "header.version", "must not be negative")
        validate_manifest(h.manifest, self.cfg.max_version_bytes)
        total = h.manifest.total_bytes
        self.catalog.reserve(h.version)
        blob, published = None, False
        try:
            if h.upload_id:
                blob = self.catalog.take_upload(h.upload_id)
                require(blob.size == total, "header.manifest.total_bytes",
                        f"must equal the upload's size {blob.size}")
                await self._verify_upload(stream, blob, h.manifest)
            else:
                await self._grow_heap(total)
                blob = await self._receive(stream, h.manifest)
            meta = common_pb2.WeightVersion(version=h.version, producer=h.producer, step=h.step)
            version = await self.catalog.publish(meta, h.manifest, blob)
            published = True
            return pb.PutWeightsResponse(version=version.meta, bytes=total)
        finally:  # broken stream, bad data, cancellation: nothing visible, nothing leaked
            if not published:
                self.catalog.unreserve(h.version)
                if blob is not None:
                    blob.free()

    async def _verify_upload(self, stream, blob, manifest: common_pb2.TensorManifest) -> None:
        """Checks the segment's tensors as later headers bring their checksums, then the rest."""
        verifier = UploadVerifier(blob.view, manifest, self.catalog.pool)
        try:
            async for message in stream:
                require(isinstance(message, pb.PutWeightsRequest) and message.HasField("header"), "data",
                        "no data chunks may follow a header with upload_id (later headers carry checksums)")
                verifier.expect(message.header)
            await verifier.finish(self.cfg.verify_threads)
        finally:
            verifier.settle()  # no thread may still read the segment once it can be freed

    async def _grow_heap(self, nbytes: int) -> None:
        """Has the heap hold nbytes of free, populated memory before a Put's messages arrive.

        A store's first versions grow its heap: grpcio's thread faulted in the pages of each new
        message, one by one (the first two 1.7B publishes took 7.2 s where later ones take 1.5;
        4.3-5.9 s with this, which populates 3.4 GB in 2.6-3.9 s on a 2-core VM, 2026-11-28).
        The missing memory is taken in blocks on the loop's thread (whose heap grpcio's messages
        come from), populated in `verify_threads` threads, and freed for them to reuse.
        """
        missing = heap.shortfall(nbytes)
        if missing < 64 << 20:  # not worth it for a small version
            return
        blocks = heap.take(missing)
        populating = self.catalog.receive_pool.submit(heap.populate, blocks, self.cfg.verify_threads)
        try:
            await asyncio.wrap_future(populating)
        finally:
            concurrent.futures.wait([populating])  # when cancelled: no thread may touch freed blocks
            heap.give_back(blocks)

    async def _receive(self, stream, manifest: common_pb2.TensorManifest) -> Pieces:
        total = manifest.total_bytes
        receiver = Receiver(manifest, self.catalog.receive_pool)
        async for data in stream:
            if not isinstance(data, memoryview):  # a later header: checksums sent after the bytes
                require(data.HasField("header"), "data", "a message after the header needs data or a header")
                await receiver.drain()  # the worker owns the verifier while it hashes a chunk
                receiver.verifier.expect(data.header)
                continue
            require(receiver.pieces.size + len(data) <= total, "data",
                    f"more bytes than header.manifest.total_bytes ({total})")
            await receiver.write(data)
        await receiver.drain()
        require(receiver.pieces.size == total, "data", f"stream ended after {receiver.pieces.size} of {total} bytes")
        receiver.verifier.checksums.finish()
        return receiver.pieces

    async def AllocateUpload(self, request, context) -> pb.AllocateUploadResponse:
        if not self.catalog.backend.shared_memory:
            raise failed_precondition("SHARED_MEMORY_DISABLED",
                                      f"backend '{self.cfg.backend}' has no shared memory; upload over gRPC")
        require(0 < request.total_bytes <= self.cfg.max_version_bytes, "total_bytes",
                f"must be in (0, {self.cfg.max_version_bytes}]")
        upload = await self.catalog.allocate_upload(request.total_bytes)
        return pb.AllocateUploadResponse(upload_id=upload.id, segment_name=upload.blob.segment_name)

    # -- Get --------------------------------------------------------------------------------------
    async def GetWeights(self, request, context):
        chunk = min(request.chunk_bytes or self.cfg.chunk_bytes, 64 << 20)
        require(chunk >= 4096, "chunk_bytes", "must be 0 (server default) or at least 4096")
        version = self.catalog.acquire(self.catalog.find(request.version, request.latest))
        try:
            specs = self._select(version, request.tensor_names)
            if self._use_shared_memory(request):
                await self.catalog.shared(version)
                lease = self.catalog.lease(version)
                manifest = common_pb2.TensorManifest(tensors=specs, total_bytes=version.blob.size,
                                                     checksum_algorithm=version.manifest.checksum_algorithm)
                yield pb.GetWeightsResponse(header=pb.GetWeightsHeader(
                    version=version.meta, manifest=manifest, segment_name=version.blob.segment_name,
                    lease_id=lease.id, transport=pb.TRANSPORT_SHARED_MEMORY))
                return
            manifest, ranges = self._repack(version, specs)
            yield pb.GetWeightsResponse(header=pb.GetWeightsHeader(
                version=version.meta, manifest=manifest, transport=pb.TRANSPORT_GRPC))
            pieces = await self.catalog.backend.readable(version.blob)
            for message in messages(pieces, ranges, chunk):
                yield message
        finally:
            self.catalog.release(version)

    async def ReleaseLease(self, request, context) -> pb.ReleaseLeaseResponse:
        require(bool(request.lease_id), "lease_id", "must be set")
        return pb.ReleaseLeaseResponse(released=self.catalog.release_lease(request.lease_id))

    # -- catalog ----------------------------------------------------------------------------------
    async def GetManifest(self, request, context) -> pb.GetManifestResponse:
        version = self.catalog.find(request.version)
        return pb.GetManifestResponse(version=version.meta, manifest=version.manifest)

    async def ListVersions(self, request, context) -> pb.ListVersionsResponse:
        return pb.ListVersionsResponse(versions=[self.catalog.versions[n].meta for n in sorted(self.catalog.versions)])

    async def GetLatestVersion(self, request, context) -> pb.GetLatestVersionResponse:
        latest = self.catalog.latest()
        return pb.GetLatestVersionResponse(version=latest.meta if latest else None)

    async def DeleteVersion(self, request, context) -> pb.DeleteVersionResponse:
        version = self.catalog.versions.get(request.version)
        if version is not None:
            self.catalog.retire(version)  # readers already streaming finish first
        return pb.DeleteVersionResponse(deleted=version is not None)

    async def WatchVersions(self, request, context):
        """Sends the stored versions newer than after_version, then each new one as it completes."""
        catalog, seen = self.catalog, self.catalog.seq
        for number in sorted(n for n in catalog.versions if n > request.after_version):
            yield pb.WatchVersionsResponse(version=catalog.versions[number].meta)
        while True:
            async with catalog.changed:
                await catalog.changed.wait_for(lambda: catalog.seq > seen)
            for seq, meta in list(catalog.events):
                if seq > seen and meta.version > request.after_version:
                    yield pb.WatchVersionsResponse(version=meta)
            seen = catalog.seq

    def _select(self, version: Version, names) -> list[common_pb2.TensorSpec]:
        if not names:
            return list(version.manifest.tensors)
        for i, name in enumerate(names):
            if name not in version.by_name:
                raise not_found("tensor", f"tensor_names[{i}]: '{name}' is not in version {version.meta.version}")
        wanted = set(names)
        return [t for t in version.manifest.tensors if t.name in wanted]  # buffer order

    def _use_shared_memory(self, request) -> bool:
        reachable = (self.catalog.backend.shared_memory and bool(self.host_id)
                     and request.client_host_id == self.host_id)
        if request.transport == pb.TRANSPORT_SHARED_MEMORY and not reachable:
            raise failed_precondition("SHARED_MEMORY_UNREACHABLE",
                                      "shared memory needs backend=shm and a client on the store's host "
                                      "(client_host_id == boot id); use TRANSPORT_GRPC")
        return reachable and request.transport != pb.TRANSPORT_GRPC

    @staticmethod
    def _repack(version: Version, specs):
        """Manifest with offsets into the streamed bytes, and the (offset, size) source ranges.

        The streamed bytes are the ranges concatenated. Tensors separated by less than 64 bytes
        (padding) share a range, so a full Get is one sweep over the buffer with the original
        offsets; a partial Get skips the tensors not asked for.
        """
        out, ranges, pos = [], [], 0
        for t in specs:
            gap = t.offset - (ranges[-1][0] + ranges[-1][1]) if ranges else None
            if gap is not None and gap < 64:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + gap + t.byte_size)
                pos += gap
            else:
                ranges.append((t.offset, t.byte_size))
            spec = common_pb2.TensorSpec()
            spec.CopyFrom(t)
            spec.offset = pos
            out.append(spec)
            pos += t.byte_size
        manifest = common_pb2.TensorManifest(tensors=out, total_bytes=pos,
                                             checksum_algorithm=version.manifest.checksum_algorithm)
        return manifest, ranges


_CATALOGS: list[Catalog] = []


async def _reap_forever(catalog: Catalog) -> None:
    """Reclaims uploads and leases of clients that vanished (TTL-based)."""
    period = min(catalog.cfg.lease_ttl_seconds, catalog.cfg.upload_ttl_seconds, 5.0) / 2
    while True:
        await asyncio.sleep(period)
        catalog.reap()


async def create(cfg: WeightStoreConfig):
    tune_allocator()  # every chunk is a fresh multi-MiB bytes object: keep their pages warm
    heap.keep_freed_memory()
    backend = make_backend(cfg)
    await backend.start()
    catalog = Catalog(cfg, backend)
    catalog.reaper = asyncio.get_running_loop().create_task(_reap_forever(catalog))
    _CATALOGS.append(catalog)
    return [WeightStoreServicer(cfg, catalog)]


async def close() -> None:
    """After the drain: free every segment so a clean stop leaves nothing in /dev/shm."""
    while _CATALOGS:
        catalog = _CATALOGS.pop()
        catalog.reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await catalog.reaper
        await catalog.close()


SERVICE = ServiceDefinition(name="weight_store", config_model=WeightStoreConfig, create=create, close=close)
