"""Move policy weights through the weight store: `publish` a state dict, `load_into` a model.

    store = WeightStoreClient(address)
    await publish(store, trainer_model.state_dict(), version=7, dtype=torch.bfloat16)
    await load_into(store, generator_model, version=7)      # writes into the existing parameters

Layout of a version: tensors back to back in one flat buffer, each at a 64-byte aligned offset,
with a per-tensor xxh3_64 checksum that the store verifies before it publishes. The SDK hashes
each tensor while it copies it and sends the checksums after the bytes (later PutWeights
headers; services/weight_store/README.md): per ~32 MiB copied into a shared-memory segment, so
the store re-hashes those tensors meanwhile, or once after the last gRPC message.

Transport is chosen per call ("auto"): shared memory when the store's segments are visible on
this host (one memcpy per side), else raw bytes over gRPC in ~4 MiB messages. Loading copies
straight from the segment or from each received message into the target tensors, casting on the
fly (e.g. fp32 store -> bf16 model); the extra memory is one received message (gRPC; grpcio
briefly needs two while it assembles one, see `_receive`) or none (shm).

The shared-memory work (segment mappings kept per process, filling an upload, copying a version
out) is in clients/weights_shm.py; this module runs the protocol for both transports.

torch and xxhash are imported inside the functions, so `import forgerpc.clients` stays light.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping

import grpc

from forgerpc.clients import weights_shm
from forgerpc.clients.errors import ForgeRPCError
from forgerpc.clients.weights_shm import SHM_DIR, buffer_address, forget_segments  # noqa: F401 (public here)
from forgerpc.v1 import common_pb2, weight_store_pb2 as pb

CHUNK_BYTES = 4 << 20  # gRPC message size: 1-4 MiB is the loopback sweet spot (ENVIRONMENT.md)
ALIGN = 64
CHECKSUM_ALGORITHM = "xxh3_64"
NameMap = Callable[[str], "str | None"]  # returns the new name, or None to skip the tensor

_DTYPE_NAMES = {
    "float32": common_pb2.D_TYPE_FLOAT32, "float16": common_pb2.D_TYPE_FLOAT16,
    "bfloat16": common_pb2.D_TYPE_BFLOAT16, "float64": common_pb2.D_TYPE_FLOAT64,
    "int8": common_pb2.D_TYPE_INT8, "uint8": common_pb2.D_TYPE_UINT8, "int16": common_pb2.D_TYPE_INT16,
    "int32": common_pb2.D_TYPE_INT32, "int64": common_pb2.D_TYPE_INT64, "bool": common_pb2.D_TYPE_BOOL,
}


def host_id() -> str:
    """This machine's boot id (sent as GetWeightsRequest.client_host_id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_TUNED = False


def tune_allocator() -> None:
    """Lets glibc keep freed multi-MiB buffers instead of returning them to the OS (once per process).

    Every gRPC message is a fresh 4 MiB bytes object; by default glibc serves it with mmap or
    trims it off the heap when freed, so each message pays ~1000 page faults plus zeroing, which
    halved streaming throughput here. Raising the mmap and trim thresholds reuses warm pages
    (cost: up to a few freed messages stay in the heap). No-op off glibc.
    """
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 64 << 20)  # messages are <= 64 MiB: from the heap, not mmap
    mallopt(M_TRIM_THRESHOLD, 512 << 20)
    mallopt(M_TOP_PAD, 16 << 20)


def _torch_dtype(code: int):
    import torch
    for name, value in _DTYPE_NAMES.items():
        if value == code:
            return getattr(torch, name)
    raise ValueError(f"unsupported dtype code {code}")


def _dtype_code(dtype) -> int:
    return _DTYPE_NAMES[str(dtype).removeprefix("torch.")]


def _byte_view(t) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (shape ())."""
    return memoryview(t.detach().reshape(-1).view(__import__("torch").uint8).numpy())


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def data_message(pieces: list, size: int) -> bytes:
    """A serialized {Put,Get}WeightsRequest/Response whose only field is `data` (#2): one copy."""
    return b"".join([b"\x12", _varint(size), *pieces])


def data_view(raw: bytes) -> memoryview | None:
    """The `data` field (#2) of a serialized message holding only that field, without copying it.

    None when `raw` is anything else (a header, unknown fields, a truncated length): the caller
    then parses it with protobuf, which also reports malformed bytes.
    """
    if raw[:1] != b"\x12":
        return None
    pos, shift, size = 1, 0, 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        size |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return memoryview(raw)[pos:] if pos + size == len(raw) else None
    return None


def _data_of(raw: bytes) -> memoryview:
    """The `data` field of a serialized GetWeightsResponse."""
    view = data_view(raw)
    return view if view is not None else memoryview(pb.GetWeightsResponse.FromString(raw).data)


def _rpc(client, name: str, kind: str):
    """A raw-bytes callable on the client's channel (skips protobuf for the bulk messages)."""
    factory = getattr(client._channel, kind)
    return factory(f"/{client.SERVICE.full_name}/{name}", request_serializer=lambda r: r,
                   response_deserializer=lambda r: r)


def _error(client, name: str, e: grpc.RpcError) -> ForgeRPCError:
    return ForgeRPCError.from_rpc_error(e, f"/{client.SERVICE.full_name}/{name}", client.address)


# -- publish --------------------------------------------------------------------------------------
def _plan(state_dict: Mapping[str, Any], name_map: NameMap | None, dtype) -> tuple[list, common_pb2.TensorManifest]:
    """(name, tensor, out_dtype) per tensor and the manifest (checksums still 0)."""
    items, specs, offset = [], [], 0
    for name, tensor in state_dict.items():
        name = name_map(name) if name_map else name
        if name is None:
            continue
        out = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        size = tensor.numel() * out.itemsize
        specs.append(common_pb2.TensorSpec(name=name, dtype=_dtype_code(out), shape=list(tensor.shape),
                                           byte_size=size, offset=offset))
        items.append((name, tensor, out))
        offset = -(-(offset + size) // ALIGN) * ALIGN
    return items, common_pb2.TensorManifest(tensors=specs, total_bytes=max(offset, 1),
                                            checksum_algorithm=CHECKSUM_ALGORITHM)


def _cast(tensor, dtype):
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def _checksum_header(version: int, names: list[str], digests: list[int]) -> bytes:
    """A later PutWeights header: only the checksums of tensors whose bytes went out already."""
    specs = [common_pb2.TensorSpec(name=n, checksum=d) for n, d in zip(names, digests)]
    return pb.PutWeightsRequest(header=pb.PutWeightsHeader(
        version=version, manifest=common_pb2.TensorManifest(tensors=specs))).SerializeToString()


async def _publish_shm(client, header: pb.PutWeightsHeader, items, threads: int,
                       timeout) -> pb.PutWeightsResponse | None:
    """Shared-memory upload; None when the store's segments are not visible from here.

    The PutWeights stream opens before the copy: the header (checksums 0, "sent later"), then
    one header per ~_REPORT_BYTES copied with the checksums of the tensors finished, which the
    store verifies while the rest is being copied. A failed check ends the call early and stops
    the copy; the copy always stops before the call is let go, so no thread of ours writes into
    a segment the store may already have handed to someone else.
    """
    try:
        upload = await client.allocate_upload(total_bytes=header.manifest.total_bytes)
    except ForgeRPCError as e:
        if e.code == grpc.StatusCode.FAILED_PRECONDITION:
            return None
        raise
    if not os.path.exists(os.path.join(SHM_DIR, upload.segment_name)):
        return None  # store on another host (or in another /dev/shm); the upload expires
    header.upload_id = upload.upload_id
    first = pb.PutWeightsRequest(header=header).SerializeToString()  # checksums 0: "sent later"
    names, loop = [t.name for t in header.manifest.tensors], asyncio.get_running_loop()
    finished: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    async def messages():
        yield first
        while (done := await finished.get()) is not None:
            yield _checksum_header(header.version, [names[i] for i, _ in done], [d for _, d in done])

    def report(done: list[tuple[int, int]]) -> None:  # from the copy threads
        loop.call_soon_threadsafe(finished.put_nowait, done)

    call = asyncio.ensure_future(_rpc(client, "PutWeights", "stream_unary")(
        messages(), timeout=timeout or client.timeout, metadata=client._metadata))
    fill = asyncio.ensure_future(asyncio.to_thread(weights_shm.fill_segment, upload.segment_name, items,
                                                   header.manifest, threads, report, stop))
    try:
        await asyncio.wait([call, fill], return_when=asyncio.FIRST_COMPLETED)
        if fill.done():
            fill.result()  # a failed copy: the finally below cancels the call
            finished.put_nowait(None)
        raw = await call
        return pb.PutWeightsResponse.FromString(raw)
    except grpc.aio.AioRpcError as e:
        raise _error(client, "PutWeights", e) from None
    finally:
        stop.set()
        await asyncio.wait([fill])
        call.cancel()  # no-op when finished; otherwise the store frees the upload
        weights_shm.prune_uploads()  # the publish may have retired (and unlinked) older segments


async def _publish_grpc(client, header: pb.PutWeightsHeader, items, chunk_bytes: int, timeout) -> pb.PutWeightsResponse:
    """Raw `data` messages, then one header with every tensor's checksum.

    The checksums go last so that each tensor is hashed while its message is built (the hash
    reads a <= chunk_bytes slice, the join that follows finds it in cache) instead of in a pass
    of its own before the first byte can leave.
    """
    import xxhash
    try:  # a taken number fails the Put only after all bytes went over: ask first (one round trip)
        await client.get_manifest(version=header.version)
        raise ForgeRPCError(grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS",
                            f"version {header.version} exists; publish a new number")
    except ForgeRPCError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
    specs, digests = header.manifest.tensors, []

    def batches() -> Iterable[bytes]:
        batch, size = [], 0

        def add(piece: memoryview, hasher):
            nonlocal batch, size
            while len(piece):
                take = min(len(piece), chunk_bytes - size)
                if hasher is not None:
                    hasher.update(piece[:take])
                batch.append(piece[:take])
                size, piece = size + take, piece[take:]
                if size == chunk_bytes:
                    yield data_message(batch, size)
                    batch, size = [], 0

        pos = 0
        for spec, (_, tensor, out) in zip(specs, items):
            if spec.offset > pos:
                yield from add(memoryview(bytes(spec.offset - pos)), None)  # alignment padding
            hasher = xxhash.xxh3_64()
            yield from add(_byte_view(_cast(tensor, out)), hasher)
            digests.append(hasher.intdigest())
            pos = spec.offset + spec.byte_size
        if header.manifest.total_bytes > pos:
            yield from add(memoryview(bytes(header.manifest.total_bytes - pos)), None)
        if size:
            yield data_message(batch, size)

    async def messages():
        """Builds message k+1 in a thread (bytes.join drops the GIL) while gRPC sends message k."""
        yield pb.PutWeightsRequest(header=header).SerializeToString()  # checksums 0: sent last
        loop, built = asyncio.get_running_loop(), batches()
        with ThreadPoolExecutor(1, thread_name_prefix="publish") as pool:
            upcoming = loop.run_in_executor(pool, next, built, None)
            while (message := await upcoming) is not None:
                upcoming = loop.run_in_executor(pool, next, built, None)
                yield message
        yield _checksum_header(header.version, [t.name for t in specs], digests)

    try:
        raw = await _rpc(client, "PutWeights", "stream_unary")(messages(), timeout=timeout or client.timeout,
                                                                  metadata=client._metadata)
    except grpc.aio.AioRpcError as e:
        raise _error(client, "PutWeights", e) from None
    return pb.PutWeightsResponse.FromString(raw)


async def publish(client, state_dict: Mapping[str, Any], version: int, *, producer: str = "", step: int = 0,
                  transport: str = "auto", dtype=None, name_map: NameMap | None = None,
                  chunk_bytes: int = CHUNK_BYTES, threads: int = 2,
                  timeout: float | None = None) -> pb.PutWeightsResponse:
    """Publishes `state_dict` as `version`; it becomes visible only when complete and verified.

    Args:
        client: a WeightStoreClient.
        state_dict: name -> tensor, CPU or CUDA (read, never modified).
        version: new version number (ALREADY_EXISTS if taken).
        transport: "auto" (shared memory if reachable, else gRPC), "shm" or "grpc".
        dtype: cast floating-point tensors to this dtype while publishing (e.g. torch.bfloat16).
        name_map: renames tensors (trainer naming -> store naming); None drops one.
        threads: threads that copy and checksum into a shared-memory segment (memmove, copy_ and
            xxhash release the GIL).
    Raises:
        ForgeRPCError: DATA_LOSS on a checksum mismatch, ALREADY_EXISTS, INVALID_ARGUMENT, ...
    """
    tune_allocator()
    items, manifest = _plan(state_dict, name_map, dtype)
    header = pb.PutWeightsHeader(version=version, manifest=manifest, producer=producer, step=step)
    if transport in ("auto", "shm"):
        response = await _publish_shm(client, header, items, threads, timeout)
        if response is not None:
            return response
        if transport == "shm":
            raise ForgeRPCError(grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_UNREACHABLE",
                                "the store's shared memory is not reachable from this process")
    return await _publish_grpc(client, header, items, chunk_bytes, timeout)


# -- load -----------------------------------------------------------------------------------------
class _Writer:
    """Writes one tensor's bytes, arriving in pieces, into its target (casting if needed).

    Same dtype on the CPU: a memmove into the target's bytes (one thread, no OpenMP fan-out).
    Same dtype elsewhere (CUDA): copy_ into a uint8 view. Different dtype: whole elements are
    cast with copy_; an element split across two messages waits in `carry` (< 8 bytes).
    """

    def __init__(self, spec: common_pb2.TensorSpec, target):
        import torch
        self.spec, self.target = spec, target
        src = _torch_dtype(spec.dtype)
        same = src == target.dtype
        self.staging = None if target.is_contiguous() else torch.empty(target.shape, dtype=target.dtype)
        flat = (self.staging if self.staging is not None else target).view(-1)
        self.flat = flat.view(torch.uint8) if same else flat
        self.src = torch.uint8 if same else src
        self.itemsize = 1 if same else spec.byte_size // max(target.numel(), 1)
        self.carry = bytearray()
        self.address = flat.data_ptr() if same and flat.device.type == "cpu" else None

    def write(self, rel: int, piece: memoryview, source: int) -> None:
        """Writes `piece` (whose first byte is at address `source`) at byte `rel` of the tensor."""
        import torch
        if self.address is not None:
            ctypes.memmove(self.address + rel, source, len(piece))
            return
        isz = self.itemsize
        if self.carry:
            need = isz - len(self.carry)
            self.carry += piece[:need]
            if len(self.carry) < isz:
                return
            idx = (rel + need) // isz - 1
            self.flat[idx:idx + 1].copy_(torch.frombuffer(bytes(self.carry), dtype=self.src))
            self.carry.clear()
            piece, rel = piece[need:], rel + need
        n = len(piece) // isz
        if n:
            self.flat[rel // isz:rel // isz + n].copy_(torch.frombuffer(piece, dtype=self.src, count=n))
        if len(piece) % isz:
            self.carry += piece[n * isz:]

    def finish(self) -> None:
        if self.staging is not None:
            self.target.copy_(self.staging)


def _targets(target) -> dict:
    return target.state_dict() if hasattr(target, "state_dict") else dict(target)


def _match(manifest, targets: dict, name_map: NameMap | None, strict: bool, partial: bool) -> list:
    """[(spec, target tensor)] for the received tensors; checks names and shapes."""
    pairs, used = [], set()
    for spec in manifest.tensors:
        name = name_map(spec.name) if name_map else spec.name
        if name is None:
            continue
        if name not in targets:
            if strict:
                raise KeyError(f"store tensor '{spec.name}' (-> '{name}') has no target; pass name_map or strict=False")
            continue
        if tuple(targets[name].shape) != tuple(spec.shape):
            raise ValueError(f"'{name}': target shape {tuple(targets[name].shape)} != stored {tuple(spec.shape)}")
        pairs.append((spec, targets[name]))
        used.add(name)
    missing = set(targets) - used
    if strict and not partial and missing:
        raise KeyError(f"targets not in the version: {sorted(missing)[:5]} ({len(missing)} in all)")
    return pairs


async def load_into(client, target, version: int | None = None, *, names: list[str] | None = None,
                    transport: str = "auto", name_map: NameMap | None = None, strict: bool = True,
                    chunk_bytes: int = 0, threads: int = 2, timeout: float | None = None) -> common_pb2.WeightVersion:
    """Copies a stored version into existing tensors, in place; returns the version loaded.

    Args:
        client: a WeightStoreClient.
        target: an nn.Module (its state_dict tensors share the parameters' storage) or a dict
            name -> tensor. Dtypes may differ from the stored ones: values are cast on the fly.
        version: version number; None loads the newest.
        names: store tensor names to load (a partial Get); None loads all.
        transport: "auto", "shm" or "grpc".
        name_map: store name -> target name (None skips the tensor), e.g. trainer -> HF naming.
        strict: every loaded tensor needs a target, and (full loads) every target a tensor.
        threads: threads that copy out of a shared-memory segment.
    """
    tune_allocator()
    targets = _targets(target)
    request = pb.GetWeightsRequest(version=version or 0, latest=version is None, tensor_names=names or [],
                                   transport={"auto": pb.TRANSPORT_UNSPECIFIED, "shm": pb.TRANSPORT_SHARED_MEMORY,
                                              "grpc": pb.TRANSPORT_GRPC}[transport],
                                   chunk_bytes=chunk_bytes, client_host_id=host_id())
    call = _rpc(client, "GetWeights", "unary_stream")(request.SerializeToString(), timeout=timeout or client.timeout,
                                                       metadata=client._metadata)
    try:
        first = await call.read()
        if first is grpc.aio.EOF:
            raise ForgeRPCError(grpc.StatusCode.DATA_LOSS, "SHORT_STREAM", "GetWeights ended before its header")
        header = pb.GetWeightsResponse.FromString(first).header
        if header.transport == pb.TRANSPORT_SHARED_MEMORY:
            try:
                pairs = _match(header.manifest, targets, name_map, strict, bool(names))
                if os.path.exists(os.path.join(SHM_DIR, header.segment_name)):
                    parts = [(spec.offset, spec.byte_size, _torch_dtype(spec.dtype), t) for spec, t in pairs]
                    await asyncio.to_thread(weights_shm.copy_from_segment, header.segment_name, parts, threads)
                    return header.version
            finally:
                await client.release_lease(lease_id=header.lease_id)
            if transport == "shm":
                raise ForgeRPCError(grpc.StatusCode.FAILED_PRECONDITION, "SHARED_MEMORY_UNREACHABLE",
                                    f"segment {header.segment_name} is not visible from this process")
            return await load_into(client, target, header.version.version, names=names, transport="grpc",
                                   name_map=name_map, strict=strict, chunk_bytes=chunk_bytes, threads=threads,
                                   timeout=timeout)
        pairs = _match(header.manifest, targets, name_map, strict, bool(names))
        await _receive(call, pairs, header.manifest.total_bytes)
        return header.version
    except grpc.aio.AioRpcError as e:
        raise _error(client, "GetWeights", e) from None
    finally:
        call.cancel()  # no-op when finished; stops the server stream if we bailed out early


class _Router:
    """Sends each received message's bytes to the tensors it overlaps, in buffer order."""

    def __init__(self, pairs):
        self.writers = [_Writer(spec, t) for spec, t in pairs]
        self.i = 0

    def feed(self, pos: int, data: memoryview) -> None:
        end, base = pos + len(data), buffer_address(data) if len(data) else 0  # one address per message
        with warnings.catch_warnings():  # torch.frombuffer of the read-only message (casts, CUDA)
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            while self.i < len(self.writers):
                writer = self.writers[self.i]
                spec = writer.spec
                lo, hi = max(pos, spec.offset), min(end, spec.offset + spec.byte_size)
                if lo < hi:
                    writer.write(lo - spec.offset, data[lo - pos:hi - pos], base + lo - pos)
                if spec.offset + spec.byte_size > end:
                    return
                writer.finish()
                self.i += 1


async def _receive(call, pairs, total: int) -> None:
    """Copies each message into the targets before taking the next one off the call.

    At most one received message is alive here: `call.read()` rather than `async for`, whose
    generator would hold message k while message k+1 is being built. gRPC's core keeps reading
    the socket into its own buffers (within HTTP/2 flow control) while this copies, so the wire
    does not wait for the copy (a memmove of 4 MiB: ~0.3 ms). grpcio itself assembles each
    message in a bytearray and then copies it into bytes, so the Python peak of a load is about
    2 messages (ReceiveMessageOperation.un_c), not 1.
    """
    router, pos = _Router(pairs), 0
    while (raw := await call.read()) is not grpc.aio.EOF:
        data = _data_of(raw)
        router.feed(pos, data)
        pos += len(data)
        del raw, data  # freed before the next message is built
    if pos != total or router.i != len(router.writers):
        raise ForgeRPCError(grpc.StatusCode.DATA_LOSS, "SHORT_STREAM", f"received {pos} of {total} bytes")
