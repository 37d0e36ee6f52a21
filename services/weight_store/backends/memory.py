"""Heap-memory backend: versions stay as the pieces a gRPC Put received (bytearrays for other
blobs). Readers get them over gRPC only."""

from __future__ import annotations

from forgerpc.services.weight_store.backends.base import Pieces


class HeapBlob:
    segment_name = ""

    def __init__(self, size: int, owner: set):
        self.size = size
        self._data: bytearray | None = bytearray(size)
        self.view = memoryview(self._data)
        self._owner = owner
        owner.add(self)

    def free(self) -> None:
        if self._data is not None:
            try:
                self.view.release()
            except BufferError:  # a reader's slice is still alive; the GC frees it later
                pass
            self._data = None
            self._owner.discard(self)


class MemoryBackend:
    shared_memory = False

    def __init__(self):
        self._blobs: set[HeapBlob] = set()

    async def start(self) -> None:
        pass

    async def allocate(self, size: int, kind: str) -> HeapBlob:
        return HeapBlob(size, self._blobs)

    async def seal(self, key: str, blob: HeapBlob | Pieces) -> HeapBlob | Pieces:
        return blob

    async def readable(self, blob: HeapBlob | Pieces) -> Pieces:
        return Pieces.of(blob)

    async def close(self) -> None:
        for blob in list(self._blobs):
            blob.free()
