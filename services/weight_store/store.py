"""The catalog of a weight store: complete versions, uploads in flight, readers, leases, watchers.

Invariants:
* A version is in `versions` only after all its bytes arrived and every checksum matched
  (atomic publish); until then its number is only reserved in `pending`.
* Retention keeps the newest `retain_versions`; a retired version leaves the catalog at once
  but its bytes stay until the last reader (stream or lease) lets go.
* An upload or lease not finished within its TTL is reclaimed by `reap` (crashed clients).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import xxhash

from forgerpc.clients.weights_shm import buffer_address, memmove_all
from forgerpc.services.common.errors import ServiceError, not_found, require
from forgerpc.services.weight_store.backends import Backend, Blob, Pieces
from forgerpc.services.weight_store.config import WeightStoreConfig
from forgerpc.v1 import common_pb2

CHECKSUM_ALGORITHM = "xxh3_64"


def checksum_error(spec: common_pb2.TensorSpec, got: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH",
        f"tensor '{spec.name}': xxh3_64 of its bytes is {got:#x}, manifest says {spec.checksum:#x}; "
        "the version was not published",
        tensor=spec.name,
    )


class Checksums:
    """A Put's expected per-tensor checksums: from its header, or sent later (0 = "comes later").

    A client may send the checksums after the bytes (later `header` messages listing name and
    checksum), so it can hash each tensor while it copies it instead of in a pass of its own
    beforehand. Each tensor is compared once, as soon as both its digest and its checksum are
    known; `finish` compares the rest against what was sent (still 0 if never sent: DATA_LOSS).
    """

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.index = {t.name: i for i, t in enumerate(self.tensors)}
        self.expected = [t.checksum for t in self.tensors]
        self.digests: dict[int, int] = {}  # computed, waiting for a checksum
        self.compared = [False] * len(self.tensors)

    def updates(self, header) -> list[int]:
        """Takes the checksums of a later header; returns the indices of the tensors it names."""
        out = []
        for i, t in enumerate(header.manifest.tensors):
            j = self.index.get(t.name)
            require(j is not None, f"header.manifest.tensors[{i}].name",
                    f"'{t.name}' is not in this Put's manifest (a later header only sends checksums)")
            require(not self.compared[j] and j not in out, f"header.manifest.tensors[{i}].checksum",
                    f"the checksum of '{t.name}' was given twice or after its bytes were checked")
            self.expected[j] = t.checksum
            out.append(j)
        return out

    def digest(self, i: int, got: int) -> None:
        """Records tensor i's digest; compares it now unless its checksum is still to come."""
        if self.expected[i]:
            self.compare(i, got)
        else:
            self.digests[i] = got

    def compare(self, i: int, got: int) -> None:
        self.compared[i] = True
        self.digests.pop(i, None)
        if got != self.expected[i]:
            raise checksum_error(self.tensors[i], got)

    def finish(self) -> None:
        """Compares the digests still waiting; then the manifest holds the verified checksums."""
        for i, got in list(self.digests.items()):
            self.compare(i, got)
        self.write_back()

    def write_back(self) -> None:
        for t, checksum in zip(self.tensors, self.expected):
            t.checksum = checksum


class StreamVerifier:
    """Checks per-tensor checksums while bytes arrive in buffer order, in arbitrary chunks.

    feed(pos, data) hashes the part of `data` (bytes [pos, pos+len)) inside each tensor and
    compares a tensor's digest as soon as its last byte arrived and its checksum is known, so a
    bad tensor fails the Put early; `checksums.finish()` at the end compares the rest.
    """

    def __init__(self, tensors):
        self.checksums = Checksums(tensors)
        self.tensors = self.checksums.tensors
        self.i = 0
        self.hasher = xxhash.xxh3_64()

    def feed(self, pos: int, data: memoryview) -> None:
        end = pos + len(data)
        while self.i < len(self.tensors):
            t = self.tensors[self.i]
            lo, hi = max(pos, t.offset), min(end, t.offset + t.byte_size)
            if lo < hi:
                self.hasher.update(data[lo - pos:hi - pos])
            if t.offset + t.byte_size > end:
                return
            self.checksums.digest(self.i, self.hasher.intdigest())
            self.hasher.reset()
            self.i += 1

    def expect(self, header) -> None:
        """A later header's checksums; the tensors already hashed are compared at once."""
        for j in self.checksums.updates(header):
            if j in self.checksums.digests:
                self.checksums.compare(j, self.checksums.digests[j])


class UploadVerifier:
    """Checks a shared-memory upload while the client is still filling it.

    The client sends each tensor's checksum (a later header) as soon as it has copied it; the
    tensor is then hashed here in a `verify_threads` thread, while the client copies the next
    ones and while its bytes are likely still in the L3 cache. `finish` hashes the tensors no
    checksum came for (an old client that sends the whole manifest at the end), in balanced
    parts, and waits for all: every byte of the segment is read here, nothing is taken on trust.
    """

    def __init__(self, view: memoryview, manifest: common_pb2.TensorManifest, pool: ThreadPoolExecutor):
        self.view, self.pool = view, pool
        self.checksums = Checksums(manifest.tensors)
        self.futures: list[concurrent.futures.Future] = []
        self.queued: set[int] = set()

    def _check(self, indices: list[int]) -> None:
        for i in indices:
            t = self.checksums.tensors[i]
            got = xxhash.xxh3_64_intdigest(self.view[t.offset:t.offset + t.byte_size])
            if got != self.checksums.expected[i]:
                raise checksum_error(t, got)

    def expect(self, header) -> None:
        """Starts checking the tensors a later header names; raises a failure found meanwhile."""
        indices = self.checksums.updates(header)
        for i in indices:
            self.checksums.compared[i] = True  # their checksums are final: later ones are refused
        self.queued.update(indices)
        self.futures.append(self.pool.submit(self._check, indices))
        for f in [f for f in self.futures if f.done()]:
            f.result()  # a checksum error fails the Put early

    async def finish(self, threads: int) -> None:
        rest = [i for i in range(len(self.checksums.tensors)) if i not in self.queued]
        parts: list[list[int]] = [[] for _ in range(threads)]
        loads = [0] * threads
        for i in sorted(rest, key=lambda i: -self.checksums.tensors[i].byte_size):  # greedy by bytes
            k = loads.index(min(loads))
            parts[k].append(i)
            loads[k] += self.checksums.tensors[i].byte_size
        self.futures += [self.pool.submit(self._check, p) for p in parts if p]
        for f in self.futures:
            await asyncio.wrap_future(f)
        self.checksums.write_back()

    def settle(self) -> None:
        """Blocks until no thread reads the segment (before it can be freed or reused)."""
        concurrent.futures.wait(self.futures)


class Receiver:
    """Keeps a Put's chunks as they came (`Pieces`, no copy) and checks checksums off the loop.

    One worker thread, one chunk in flight: the loop parses chunk k+1 while the worker hashes
    chunk k (xxhash releases the GIL), in order.
    """

    def __init__(self, manifest: common_pb2.TensorManifest, pool: ThreadPoolExecutor):
        self.pool = pool
        self.pieces = Pieces()
        self.verifier = StreamVerifier(manifest.tensors)
        self.future: concurrent.futures.Future | None = None

    async def write(self, data: memoryview) -> None:
        await self.drain()
        self.future = self.pool.submit(self.verifier.feed, self.pieces.size, data)
        self.pieces.append(data)

    async def drain(self) -> None:
        """Waits for the chunk in flight; raises its checksum error, if any."""
        if self.future is not None:
            await asyncio.wrap_future(self.future)
            self.future = None


@dataclasses.dataclass(eq=False)
class Version:
    meta: common_pb2.WeightVersion
    manifest: common_pb2.TensorManifest
    blob: Blob | Pieces
    readers: int = 0
    retired: bool = False
    sharing: asyncio.Future | None = None  # the copy of Pieces into a segment (Catalog.shared)

    def __post_init__(self):
        self.by_name = {t.name: t for t in self.manifest.tensors}


@dataclasses.dataclass(eq=False)
class Upload:
    id: str
    blob: Blob
    expires: float


@dataclasses.dataclass(eq=False)
class Lease:
    id: str
    version: Version
    expires: float


class Catalog:
    def __init__(self, cfg: WeightStoreConfig, backend: Backend):
        self.cfg = cfg
        self.backend = backend
        self.versions: dict[int, Version] = {}
        self.pending: set[int] = set()
        self.reaper: asyncio.Task | None = None  # started by the server (see server.create)
        self.uploads: dict[str, Upload] = {}
        self.leases: dict[str, Lease] = {}
        # Publish log for watchers: (sequence number, version), bounded.
        self.events: collections.deque[tuple[int, common_pb2.WeightVersion]] = collections.deque(maxlen=1024)
        self.seq = 0
        self.changed = asyncio.Condition()
        self.pool = ThreadPoolExecutor(cfg.verify_threads, thread_name_prefix="verify")
        self.receive_pool = ThreadPoolExecutor(1, thread_name_prefix="receive")  # ordered chunk writes

    # -- publishing ---------------------------------------------------------------------------
    def reserve(self, number: int) -> None:
        if number in self.versions or number in self.pending:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, "VERSION_EXISTS",
                               f"version {number} exists or is being uploaded; publish a new number",
                               version=str(number))
        self.pending.add(number)

    def unreserve(self, number: int) -> None:
        self.pending.discard(number)

    async def publish(self, meta: common_pb2.WeightVersion, manifest: common_pb2.TensorManifest,
                      blob: Blob | Pieces) -> Version:
        """Makes a verified, reserved version visible, tells watchers, applies retention."""
        blob = await self.backend.seal(str(meta.version), blob)
        meta.created_unix_ms = int(time.time() * 1000)
        version = Version(meta, manifest, blob)
        self.versions[meta.version] = version
        self.pending.discard(meta.version)
        self.seq += 1
        self.events.append((self.seq, meta))
        for old in sorted(self.versions)[:-self.cfg.retain_versions]:
            self.retire(self.versions[old])
        async with self.changed:
            self.changed.notify_all()
        return version

    # -- reading ------------------------------------------------------------------------------
    def latest(self) -> Version | None:
        return self.versions[max(self.versions)] if self.versions else None

    def find(self, number: int, latest: bool = False) -> Version:
        version = self.latest() if latest else self.versions.get(number)
        if version is None:
            what = "the store holds no version yet" if latest else f"version {number} is not stored"
            have = ", ".join(map(str, sorted(self.versions))) or "none"
            raise not_found("version", f"{what} (stored: {have})")
        return version

    def acquire(self, version: Version) -> Version:
        version.readers += 1
        return version

    def release(self, version: Version) -> None:
        version.readers -= 1
        if version.readers == 0 and version.retired:
            version.blob.free()

    async def shared(self, version: Version) -> Blob:
        """The version's bytes in a shared-memory segment, for a same-host reader holding it.

        A version that came over gRPC is `Pieces` in the store's heap: the first same-host reader
        has them copied into a new segment (one memcpy, in `verify_threads` threads), which then
        replaces them; readers that come meanwhile wait for the same copy.
        """
        if version.sharing is None and isinstance(version.blob, Pieces):
            version.sharing = asyncio.ensure_future(self._copy_to_segment(version))
        if version.sharing is not None:
            await asyncio.shield(version.sharing)  # a reader that leaves doesn't stop the copy
        return version.blob

    async def _copy_to_segment(self, version: Version) -> None:
        pieces, n = version.blob, self.cfg.verify_threads
        self.acquire(version)  # nothing frees the pieces (or the segment) meanwhile
        try:
            segment = await self.backend.allocate(pieces.size, "put")
            address = buffer_address(segment.view)
            jobs = [(address + start, buffer_address(view), len(view)) for view, start in zip(pieces.views, pieces.starts)]
            copy = self.pool.submit(memmove_all, jobs, n)
            try:
                await asyncio.wrap_future(copy)
            except BaseException:
                concurrent.futures.wait([copy])  # no thread may write into a freed segment
                segment.free()
                raise
            version.blob = segment
            pieces.free()
        except BaseException:
            version.sharing = None  # the next reader tries again (e.g. once /dev/shm has room)
            raise
        finally:
            self.release(version)  # frees the segment now if the version was retired meanwhile

    def retire(self, version: Version) -> None:
        """Removes from the catalog now; frees the bytes once no reader holds them."""
        self.versions.pop(version.meta.version, None)
        version.retired = True
        if version.readers == 0:
            version.blob.free()

    # -- shared-memory uploads and leases -------------------------------------------------------
    async def allocate_upload(self, size: int) -> Upload:
        blob = await self.backend.allocate(size, "upload")
        upload = Upload(secrets.token_hex(12), blob, time.monotonic() + self.cfg.upload_ttl_seconds)
        self.uploads[upload.id] = upload
        return upload

    def take_upload(self, upload_id: str) -> Blob:
        """Removes the upload from the table (so the reaper leaves it alone) and returns its blob."""
        upload = self.uploads.pop(upload_id, None)
        if upload is None:
            raise not_found("upload", f"upload '{upload_id}' is unknown, used already or expired; "
                                      "call AllocateUpload again")
        return upload.blob

    def lease(self, version: Version) -> Lease:
        lease = Lease(secrets.token_hex(12), self.acquire(version), time.monotonic() + self.cfg.lease_ttl_seconds)
        self.leases[lease.id] = lease
        return lease

    def release_lease(self, lease_id: str) -> bool:
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            self.release(lease.version)
        return lease is not None

    def reap(self) -> None:
        now = time.monotonic()
        for upload in [u for u in self.uploads.values() if u.expires < now]:
            self.uploads.pop(upload.id).blob.free()
        for lease in [l for l in self.leases.values() if l.expires < now]:
            self.release_lease(lease.id)

    async def close(self) -> None:
        for lease_id in list(self.leases):
            self.release_lease(lease_id)
        for upload in self.uploads.values():
            upload.blob.free()
        self.uploads.clear()
        for version in list(self.versions.values()):
            self.retire(version)
        await self.backend.close()
        self.pool.shutdown(wait=False)
        self.receive_pool.shutdown(wait=False)
