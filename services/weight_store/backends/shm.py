"""Shared-memory backend: every version is a POSIX shared-memory segment (a file in /dev/shm).

Same-host writers fill an upload segment that then *becomes* the version (no copy in the store),
and same-host readers map it read-only, so Put and Get each cost about one memcpy. A version that
came over gRPC stays as the pieces it arrived in (no copy: most of its readers are remote); the
first same-host reader has it copied into a segment then (Catalog.shared).

Freed segments of the common size are kept (up to `spare_segments`) and handed out again: a
policy has the same byte size every version, and re-filling a mapped segment is ~3x faster than
faulting in a fresh one (ENVIRONMENT.md: 3.3 vs 1.1 GB/s).

Segment names are "<prefix>.<pid>.<kind>-<random>": the pid says which store owns a segment, so
a store starting up deletes the segments of stores that died without cleaning up (SIGKILL, OOM)
and never touches those of a live store sharing the prefix.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import secrets
import threading

from forgerpc.clients.weights_shm import buffer_address
from forgerpc.services.common.errors import resource_exhausted
from forgerpc.services.weight_store.backends.base import Pieces

SHM_DIR = "/dev/shm"
log = logging.getLogger("forgerpc.weight_store.shm")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def populate(region: mmap.mmap, size: int, threads: int) -> None:
    """Allocates every page of a new segment now, in `threads` parallel slices, instead of one
    fault per 4 KiB page during the first upload into it.

    MAP_POPULATE does the same in one thread: 6.25 s for 3.42 GB (a 1.7B bf16 model) on a 2-core
    VM, against 1.84 s for MADV_POPULATE_WRITE in two threads (bench/README.md, 2026-11-28).
    On a kernel without it (EINVAL) the pages are left to fault in on first use. Raises OSError
    when a page cannot be had (a full /dev/shm: EFAULT), which MAP_POPULATE ignored, leaving the
    first writer to die of SIGBUS.
    """
    populate_pages(buffer_address(region), size, threads)


def populate_pages(base: int, size: int, threads: int) -> None:
    """`populate` for `size` bytes of mapped memory at the page-aligned address `base`."""
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    step = -(-size // max(threads, 1) // mmap.PAGESIZE) * mmap.PAGESIZE  # page-aligned slices
    failed: list[int] = []

    def run(lo: int) -> None:
        if madvise(base + lo, min(step, size - lo), MADV_POPULATE_WRITE) != 0:  # ctypes drops the GIL
            failed.append(ctypes.get_errno())

    workers = [threading.Thread(target=run, args=(lo,)) for lo in range(step, size, step)]
    for w in workers:
        w.start()
    run(0)
    for w in workers:
        w.join()
    if any(e != errno.EINVAL for e in failed):
        raise OSError(failed[0], f"madvise(MADV_POPULATE_WRITE): {os.strerror(failed[0])}")


class ShmBlob:
    """A segment of `size` bytes mapped read-write into the store."""

    def __init__(self, name: str, size: int, populate_threads: int):
        self.segment_name = name
        self.size = size
        self.path = os.path.join(SHM_DIR, name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            # mmap cannot map 0 bytes; an empty version still gets a (1-byte) segment.
            self._mmap: mmap.mmap | None = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED)
            populate(self._mmap, max(size, 1), populate_threads)
        except BaseException:
            os.unlink(self.path)
            if getattr(self, "_mmap", None) is not None:
                self._mmap.close()  # its pages go now, not when the traceback is collected
            raise
        finally:
            os.close(fd)
        self.view = memoryview(self._mmap)[:size]
        self._backend: SharedMemoryBackend | None = None  # set by SharedMemoryBackend.allocate

    def free(self) -> None:
        """Back to the backend's spare pool, or destroyed."""
        if self._backend is None:
            self.destroy()
        else:
            self._backend._recycle(self)

    def destroy(self) -> None:
        if self._mmap is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:  # a slice is still referenced; the mapping goes with it (name is gone)
            pass
        self._mmap = None
        if self._backend is not None:
            self._backend._blobs.discard(self)


class SharedMemoryBackend:
    shared_memory = True

    def __init__(self, prefix: str, spare_segments: int = 2, populate_threads: int = 2):
        self.prefix = prefix
        self.spare_segments = spare_segments
        self.populate_threads = populate_threads
        self._closed = False
        self._blobs: set[ShmBlob] = set()
        self._spares: list[ShmBlob] = []

    async def start(self) -> None:
        if not os.path.isdir(SHM_DIR):
            raise OSError(f"{SHM_DIR} is missing: use backend=memory on this host")
        reclaimed = reclaim_orphans(self.prefix)
        if reclaimed:
            log.warning("reclaimed %d orphaned segments of dead stores: %s", len(reclaimed), reclaimed[:5])

    async def allocate(self, size: int, kind: str) -> ShmBlob:
        for blob in self._spares:
            if blob.size == size:
                self._spares.remove(blob)
                return blob
        name = f"{self.prefix}.{os.getpid()}.{kind}-{secrets.token_hex(8)}"
        # Populating a new segment takes seconds for GBs (4-5 s for 3.42 GB here): off the loop.
        created = asyncio.get_running_loop().run_in_executor(None, ShmBlob, name, size, self.populate_threads)
        try:
            blob = await asyncio.shield(created)
        except asyncio.CancelledError:  # the caller left; the segment is freed once it exists
            created.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().destroy())
            raise
        except OSError as e:  # e.g. /dev/shm full: madvise fails (EFAULT) where MAP_POPULATE gave a SIGBUS later
            raise resource_exhausted("SHARED_MEMORY_FULL", f"could not allocate a {size}-byte segment in {SHM_DIR}: "
                                     f"{e.strerror or e}; free space there (df {SHM_DIR}) or lower retain_versions",
                                     bytes=str(size)) from None
        if self._closed:  # the store stopped meanwhile: nothing may outlive close()
            blob.destroy()
            raise RuntimeError("the shared-memory backend is closed")
        blob._backend = self
        self._blobs.add(blob)  # registered on the loop thread, where close() iterates
        return blob

    def _recycle(self, blob: ShmBlob) -> None:
        if blob._mmap is None or blob in self._spares:
            return
        self._spares.append(blob)
        if len(self._spares) > self.spare_segments:
            self._spares.pop(0).destroy()

    async def seal(self, key: str, blob: ShmBlob | Pieces) -> ShmBlob | Pieces:
        return blob

    async def readable(self, blob: ShmBlob | Pieces) -> Pieces:
        return Pieces.of(blob)

    async def close(self) -> None:
        self._closed = True
        self._spares.clear()
        for blob in list(self._blobs):
            blob.destroy()


def reclaim_orphans(prefix: str) -> list[str]:
    """Deletes segments named "<prefix>.<pid>.*" whose pid no longer runs; returns their names."""
    reclaimed = []
    for name in os.listdir(SHM_DIR):
        head, _, rest = name.partition(".")
        pid_text = rest.partition(".")[0]
        if head != prefix or not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            reclaimed.append(name)
        except FileNotFoundError:  # another store reclaimed it first
            pass
    return reclaimed
