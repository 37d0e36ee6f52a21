"""The backend interface: flat byte buffers ("blobs") that hold one version each."""

from __future__ import annotations

from typing import Protocol


class Blob(Protocol):
    """A flat, writable byte buffer of `size` bytes.

    Attributes:
        size: bytes held.
        view: writable memoryview over all `size` bytes (valid until `free`).
        segment_name: file name under /dev/shm that same-host clients may map; "" if none.
    """

    size: int
    view: memoryview
    segment_name: str

    def free(self) -> None:
        """Releases the memory (and the segment's name). Idempotent."""


class Backend(Protocol):
    """Where version bytes live.

    Life of a version: `allocate` (bytes arrive into `blob.view`) -> checksums verified by the
    server -> `seal` (the backend may move the bytes elsewhere) -> `readable` per reader ->
    `blob.free()` when retired and unread.
    """

    #: True when blobs are shared-memory segments that same-host clients can map.
    shared_memory: bool

    async def start(self) -> None:
        """Connects / reclaims leftovers of a crashed predecessor."""

    async def allocate(self, size: int, kind: str) -> Blob:
        """A new writable blob of `size` bytes; `kind` ("upload", "put") only names it.

        Slow work (allocating the pages of a new multi-GB segment takes seconds) runs off the
        event loop, so the store keeps answering health checks and readers meanwhile."""

    async def seal(self, key: str, blob: Blob) -> Blob:
        """Makes a verified blob the stored copy of version `key`; returns what readers use."""

    async def readable(self, blob: Blob) -> memoryview:
        """The bytes of a sealed blob, for streaming to a reader."""

    async def close(self) -> None:
        """Frees every blob still allocated."""
