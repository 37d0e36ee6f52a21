"""The backend interface: byte buffers ("blobs") that hold one version each."""

from __future__ import annotations

import bisect
from typing import Iterator, Protocol


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


class Pieces:
    """A version's bytes as consecutive pieces: the chunks a gRPC Put brought, kept as they came.

    Each piece is a memoryview into a received message (the `data` field of the bytes grpcio
    handed over), so a Put over gRPC costs no copy in the store; a Get streams the pieces back,
    and a piece that is a whole received data-only message goes out as those very bytes (see
    server.py). Same interface as a flat blob for reading: `size`, `segment_name` ("": same-host
    readers get a segment made from the pieces on first use, see Catalog.shared), `free`.

    starts[i] is the offset of piece i in the version's flat buffer; the pieces are contiguous:
    starts[i + 1] = starts[i] + len(views[i]).
    """

    segment_name = ""

    def __init__(self, views: list[memoryview] | None = None):
        self.views: list[memoryview] = []
        self.starts: list[int] = []
        self.size = 0
        for view in views or []:
            self.append(view)

    def append(self, view: memoryview) -> None:
        self.views.append(view)
        self.starts.append(self.size)
        self.size += len(view)

    @classmethod
    def of(cls, blob: "Blob | Pieces") -> "Pieces":
        """What one reader streams: a flat blob's view as one piece, or a copy of the list of
        pieces (`free` empties the blob's list, not this one: a stream in flight goes on)."""
        return cls(blob.views if isinstance(blob, Pieces) else [blob.view])

    def span(self, lo: int, hi: int) -> Iterator[tuple[memoryview, bool]]:
        """The bytes [lo, hi) as (view, whole) pairs, in order; whole: the view is a whole piece."""
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            view, start = self.views[i], self.starts[i]
            end = min(hi, start + len(view))
            yield view[lo - start:end - start], lo == start and end == start + len(view)
            lo, i = end, i + 1

    def free(self) -> None:
        """Drops the pieces; a reader still streaming holds its own references to them."""
        self.views, self.starts = [], []


class Backend(Protocol):
    """Where version bytes live.

    Life of a version: `allocate` (a shared-memory upload's bytes arrive into `blob.view`) or
    `Pieces` (a gRPC Put's received chunks) -> checksums verified by the server -> `seal` (the
    backend may move the bytes elsewhere) -> `readable` per reader -> `blob.free()` when retired
    and unread.
    """

    #: True when blobs are shared-memory segments that same-host clients can map.
    shared_memory: bool

    async def start(self) -> None:
        """Connects / reclaims leftovers of a crashed predecessor."""

    async def allocate(self, size: int, kind: str) -> Blob:
        """A new writable blob of `size` bytes; `kind` ("upload", "put") only names it.

        Slow work (allocating the pages of a new multi-GB segment takes seconds) runs off the
        event loop, so the store keeps answering health checks and readers meanwhile."""

    async def seal(self, key: str, blob: Blob | Pieces) -> Blob | Pieces:
        """Makes a verified blob the stored copy of version `key`; returns what readers use."""

    async def readable(self, blob: Blob | Pieces) -> Pieces:
        """The bytes of a sealed blob, for streaming to a reader (a flat one as a single piece)."""

    async def close(self) -> None:
        """Frees every blob still allocated."""
