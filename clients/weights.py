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
this host (one memcpy per side), else raw bytes over gRPC in ~4 MiB messages. Over gRPC the SDK
speaks to the store through its own HTTP/2 streams where it can (clients/h2stream.py, `wire`):
a publish hands the kernel the tensors' memory, a load receives straight into the target
tensors. Loading casts on the fly (e.g. fp32 store -> bf16 model); the extra memory is a 1 MiB
buffer (direct gRPC), none (shm), or one received message (through grpcio, which briefly needs
two while it assembles one, see `_GrpcioGet`).

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
from forgerpc.clients.channel import ssl_context
from forgerpc.clients.errors import ForgeRPCError
from forgerpc.clients.h2stream import H2Stream, split_address
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


def _data_pieces(specs, items, total: int, chunk_bytes: int, digests: list) -> Iterable[tuple[list, int]]:
    """The version's flat buffer cut into `data` messages of chunk_bytes: ([views], size) each.

    The views are the (cast) tensors' own bytes and zero padding, uncopied; each tensor is hashed
    (xxh3_64, appended to `digests`) as its pieces are taken, so the hash reads a <= chunk_bytes
    slice right before the message's send or join finds it in cache.
    """
    import xxhash
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
                yield batch, size
                batch, size = [], 0

    pos = 0
    for spec, (_, tensor, out) in zip(specs, items):
        if spec.offset > pos:
            yield from add(memoryview(bytes(spec.offset - pos)), None)  # alignment padding
        hasher = xxhash.xxh3_64()
        yield from add(_byte_view(_cast(tensor, out)), hasher)
        digests.append(hasher.intdigest())
        pos = spec.offset + spec.byte_size
    if total > pos:
        yield from add(memoryview(bytes(total - pos)), None)
    if size:
        yield batch, size


async def _publish_grpc(client, header: pb.PutWeightsHeader, items, chunk_bytes: int, timeout,
                        wire: str) -> pb.PutWeightsResponse:
    """Raw `data` messages, then one header with every tensor's checksum.

    The checksums go last so that each tensor is hashed right before its bytes leave instead of
    in a pass of its own before the first byte can. Through H2Stream (`wire`, see load_into) the
    messages are the tensors' own memory, gathered by the kernel; through grpcio each is first
    joined into one `bytes`.
    """
    try:  # a taken number fails the Put only after all bytes went over: ask first (one round trip)
        await client.get_manifest(version=header.version)
        raise ForgeRPCError(grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS",
                            f"version {header.version} exists; publish a new number")
    except ForgeRPCError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
    specs, digests = header.manifest.tensors, []
    first = pb.PutWeightsRequest(header=header).SerializeToString()  # checksums 0: sent last
    pieces = _data_pieces(specs, items, header.manifest.total_bytes, chunk_bytes, digests)
    last = lambda: _checksum_header(header.version, [t.name for t in specs], digests)  # noqa: E731
    direct = _direct(client, "grpc", wire, upload=True)
    if direct is not None:
        stream = await asyncio.to_thread(direct, "PutWeights", timeout or client.timeout)

        def put() -> bytes:
            stream.send_message([first])
            for batch, size in pieces:
                stream.send_message([b"\x12", _varint(size), *batch])
            stream.send_message([last()], end=True)
            if (n := stream.next_message()) is None:
                raise ForgeRPCError(grpc.StatusCode.INTERNAL, "INTERNAL", "PutWeights ended without a response")
            raw = stream.read_bytes(n)
            if stream.next_message() is not None:
                raise ForgeRPCError(grpc.StatusCode.INTERNAL, "INTERNAL", "PutWeights sent two responses")
            return raw
        try:
            return pb.PutWeightsResponse.FromString(await asyncio.to_thread(put))
        finally:
            stream.close()

    async def messages():
        """Builds message k+1 in a thread (bytes.join drops the GIL) while gRPC sends message k."""
        yield first
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="publish") as pool:
            upcoming = loop.run_in_executor(pool, next, pieces, None)
            while (batch := await upcoming) is not None:
                upcoming = loop.run_in_executor(pool, next, pieces, None)
                yield data_message(*batch)
        yield last()

    try:
        raw = await _rpc(client, "PutWeights", "stream_unary")(messages(), timeout=timeout or client.timeout,
                                                                  metadata=client._metadata)
    except grpc.aio.AioRpcError as e:
        raise _error(client, "PutWeights", e) from None
    return pb.PutWeightsResponse.FromString(raw)


async def publish(client, state_dict: Mapping[str, Any], version: int, *, producer: str = "", step: int = 0,
                  transport: str = "auto", dtype=None, name_map: NameMap | None = None,
                  chunk_bytes: int = CHUNK_BYTES, threads: int = 2,
                  timeout: float | None = None, wire: str = "auto") -> pb.PutWeightsResponse:
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
        wire: how a gRPC upload is sent: "direct" (the SDK's HTTP/2 writer, clients/h2stream.py:
            the kernel gathers the tensors' own bytes), "grpcio", or "auto" (direct on a plaintext
            channel the SDK opened, without a proxy variable; else grpcio).
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
    return await _publish_grpc(client, header, items, chunk_bytes, timeout, wire)


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
                    chunk_bytes: int = 0, threads: int = 2, timeout: float | None = None,
                    wire: str = "auto") -> common_pb2.WeightVersion:
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
        wire: how a gRPC stream is read. "direct": the SDK's own HTTP/2 reader (clients/h2stream.py),
            which receives the bytes straight into the targets; "grpcio": grpcio's channel;
            "auto": direct once the store is known to send over gRPC (transport "grpc", or an
            earlier "auto" load answered that way) on a channel the SDK opened (plaintext or
            TLS) and no proxy variable set (grpc_proxy, https_proxy, http_proxy), else grpcio.
    """
    tune_allocator()
    targets = _targets(target)
    request = pb.GetWeightsRequest(version=version or 0, latest=version is None, tensor_names=names or [],
                                   transport={"auto": pb.TRANSPORT_UNSPECIFIED, "shm": pb.TRANSPORT_SHARED_MEMORY,
                                              "grpc": pb.TRANSPORT_GRPC}[transport],
                                   chunk_bytes=chunk_bytes, client_host_id=host_id()).SerializeToString()
    direct = _direct(client, transport, wire)
    stream = (_GrpcioGet(client, request, timeout) if direct is None
              else await _DirectGet.open(direct, request, timeout or client.timeout))
    try:
        first = await stream.first()
        if first is None:
            raise ForgeRPCError(grpc.StatusCode.DATA_LOSS, "SHORT_STREAM", "GetWeights ended before its header")
        header = pb.GetWeightsResponse.FromString(first).header
        if transport == "auto":  # remembered for `wire="auto"`: the next load reads this store directly
            client._weights_over_grpc = header.transport == pb.TRANSPORT_GRPC
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
                                   timeout=timeout, wire=wire)
        pairs = _match(header.manifest, targets, name_map, strict, bool(names))
        await stream.receive(pairs, header.manifest.total_bytes)
        return header.version
    except grpc.aio.AioRpcError as e:
        raise _error(client, "GetWeights", e) from None
    finally:
        stream.close()  # no-op when finished; stops the server stream if we bailed out early


def _direct(client, transport: str, wire: str, upload: bool = False) -> Callable[[str, float], H2Stream] | None:
    """open(method, timeout) -> an H2Stream to the store (blocking), or None to stay on grpcio
    (see load_into's `wire`): the SDK must have opened the channel itself (it then knows its TLS
    settings) to a plain host:port address.

    Under TLS, "auto" sends uploads through grpcio: encryption bounds both ways there, and
    Python's ssl writes a 16 KiB record per call where gRPC core batches them (135M publish
    276-298 ms direct vs 246-286 through grpcio, 2026-11-28), while a direct load is as fast and
    holds no message (190-214 vs 201-229 ms)."""
    if wire not in ("auto", "direct", "grpcio"):
        raise ValueError(f"wire: {wire!r} is not one of 'auto', 'direct', 'grpcio'")
    settings = getattr(client, "_settings", None)
    endpoint = split_address(client.address) if settings is not None else None
    over_grpc = transport == "grpc" or (transport == "auto" and getattr(client, "_weights_over_grpc", False))
    if wire == "direct" and endpoint is None:
        raise ValueError(f"wire='direct' needs a channel the SDK opened to a host:port address, not {client.address!r}")
    if endpoint is None or wire == "grpcio" or (wire == "auto" and (not over_grpc or _proxied())):
        return None
    if wire == "auto" and upload and settings.tls_ca:
        return None
    if not hasattr(client, "_ssl_context"):  # the CA and certificate files, read once per client
        client._ssl_context = ssl_context(settings)

    def open_stream(method: str, timeout: float) -> H2Stream:
        return H2Stream(endpoint, f"/{client.SERVICE.full_name}/{method}", client._metadata, timeout,
                        client.address, tls=client._ssl_context, server_name=settings.server_name)
    return open_stream


def _proxied() -> bool:
    """grpcio sends channels through an HTTP CONNECT proxy named by these variables; the SDK's
    own streams don't, so with one set `wire="auto"` leaves the transfer to grpcio."""
    return any(os.environ.get(v) for v in ("grpc_proxy", "https_proxy", "http_proxy"))


class _GrpcioGet:
    """GetWeights through grpcio: one `bytes` per message, routed into the targets."""

    def __init__(self, client, request: bytes, timeout):
        self.call = _rpc(client, "GetWeights", "unary_stream")(request, timeout=timeout or client.timeout,
                                                              metadata=client._metadata)

    async def first(self) -> bytes | None:
        first = await self.call.read()
        return None if first is grpc.aio.EOF else first

    async def receive(self, pairs, total: int) -> None:
        """Copies each message into the targets before taking the next one off the call.

        At most one received message is alive here: `call.read()` rather than `async for`,
        whose generator would hold message k while message k+1 is being built. grpcio itself
        assembles each message in a bytearray and then copies it into bytes, so the Python peak
        of a load is about 2 messages (ReceiveMessageOperation.un_c), not 1.
        """
        router, pos = _Router(pairs), 0
        while (raw := await self.call.read()) is not grpc.aio.EOF:
            data = _data_of(raw)
            router.feed(pos, data)
            pos += len(data)
            del raw, data  # freed before the next message is built
        router.check(pos, total)

    def close(self) -> None:
        self.call.cancel()


class _DirectGet:
    """GetWeights read off the socket by H2Stream, in a thread: the kernel writes into the targets."""

    def __init__(self, stream: H2Stream):
        self.stream = stream

    @classmethod
    async def open(cls, direct, request: bytes, timeout: float) -> "_DirectGet":
        def start() -> H2Stream:
            stream = direct("GetWeights", timeout)
            try:
                stream.send_message([request], end=True)
            except BaseException:
                stream.close()
                raise
            return stream
        return cls(await asyncio.to_thread(start))

    async def first(self) -> bytes | None:
        def read():
            n = self.stream.next_message()
            return None if n is None else self.stream.read_bytes(n)
        return await asyncio.to_thread(read)

    async def receive(self, pairs, total: int) -> None:
        job = asyncio.ensure_future(asyncio.to_thread(_receive_direct, self.stream, pairs, total))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread writes into the caller's tensors: it must be gone before we return, or a
            # retried load could see a late write. Closing the socket makes its next read fail.
            self.stream.close()
            await asyncio.wait([job])
            if not job.cancelled():
                job.exception()  # retrieved: the closed socket's error is expected here
            raise

    def close(self) -> None:
        self.stream.close()


class _Router:
    """Sends the stream's bytes, in buffer order, to the tensors they belong to."""

    def __init__(self, pairs):
        self.writers = [_Writer(spec, t) for spec, t in pairs]
        self.i = 0

    def route(self, pos: int, size: int, fill: Callable[["_Writer", int, int, int], None]) -> None:
        """fill(writer, rel, start, n) for each piece of the stream's bytes [pos, pos + size) that a
        target owns (rel: offset in its tensor, start: offset from pos), in increasing `start`;
        finishes every tensor whose last byte is in the range."""
        end = pos + size
        while self.i < len(self.writers):
            writer = self.writers[self.i]
            spec = writer.spec
            lo, hi = max(pos, spec.offset), min(end, spec.offset + spec.byte_size)
            if lo < hi:
                fill(writer, lo - spec.offset, lo - pos, hi - lo)
            if spec.offset + spec.byte_size > end:
                return
            writer.finish()
            self.i += 1

    def feed(self, pos: int, data: memoryview) -> None:
        """Routes a received message's bytes (the grpcio path, or a message that was not data-only)."""
        base = buffer_address(data) if len(data) else 0  # one address per message
        with warnings.catch_warnings():  # torch.frombuffer of the read-only message (casts, CUDA)
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self.route(pos, len(data), lambda w, rel, start, n: w.write(rel, data[start:start + n], base + start))

    def check(self, pos: int, total: int) -> None:
        if pos != total or self.i != len(self.writers):
            raise ForgeRPCError(grpc.StatusCode.DATA_LOSS, "SHORT_STREAM", f"received {pos} of {total} bytes")


def _memory_at(address: int, n: int) -> memoryview:
    """A writable view of n bytes at `address` (a target tensor's storage, kept alive by the caller)."""
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


def _receive_direct(stream: H2Stream, pairs, total: int) -> None:
    """Reads every data message of a GetWeights stream into the targets (runs in a thread).

    A same-dtype CPU target receives its bytes straight from the socket (`recv_into` its
    storage: the kernel's copy is the only one); casts and other devices go through a 1 MiB
    bounce buffer, as do the bytes no target wants (alignment gaps, tensors a name_map skips).
    So the extra memory of a load is at most that buffer, whatever the chunk size.
    """
    router, pos, bounce = _Router(pairs), 0, bytearray(1 << 20)
    cursor = 0  # bytes of the current message's data read so far

    def drop(n: int) -> None:
        while n > 0:
            k = min(n, len(bounce))
            stream.read_into(memoryview(bounce)[:k])
            n -= k

    def fill(writer, rel: int, start: int, count: int) -> None:
        nonlocal cursor
        drop(start - cursor)
        if writer.address is not None:
            stream.read_into(_memory_at(writer.address + rel, count))
        else:
            done = 0
            while done < count:
                view = memoryview(bounce)[:min(count - done, len(bounce))]
                stream.read_into(view)
                writer.write(rel + done, view, buffer_address(view))
                done += len(view)
        cursor = start + count

    while (n := stream.next_message()) is not None:
        size, head = _data_prefix(stream, n)
        if size < 0:  # not a data-only message: parse it whole (header-sized, or another server's encoding)
            data = _data_of(head + stream.read_bytes(n - len(head)))
            router.feed(pos, data)
            pos += len(data)
            continue
        cursor = 0
        router.route(pos, size, fill)
        drop(size - cursor)
        pos += size
    router.check(pos, total)


def _data_prefix(stream: H2Stream, n: int) -> tuple[int, bytes]:
    """Reads the tag and length of a data-only message's `data` field (#2) off the stream.

    A data-only message of n bytes starts with exactly `_data_head(n)`; this reads that many
    bytes and returns (length of the data, the bytes read), or (-1, the bytes read) when they
    differ (another message, or another encoding): the caller then parses those bytes plus the
    rest with protobuf.
    """
    expected = _data_head(n)
    if not expected:
        return -1, b""
    head = stream.read_bytes(len(expected))
    return (n - len(expected), head) if head == expected else (-1, head)


def _data_head(n: int) -> bytes:
    """Tag + varint length of a serialized message of n bytes whose only field is `data`: the
    k-byte varint of n - 1 - k, for the k that fits (b"" when none does, e.g. n < 2)."""
    for k in range(1, 11):
        if n - 1 - k < 0:
            break
        if len(length := _varint(n - 1 - k)) == k:
            return b"\x12" + length
    return b""
