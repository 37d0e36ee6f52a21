"""The store's heap, where versions that came over gRPC live (the messages grpcio allocated).

glibc would give freed memory at the top of the heap back to the OS and hand out fresh pages
for new messages, each faulted in on first touch by the thread that receives the Put. Two
measures (glibc >= 2.33 only; elsewhere nothing here does anything):

* `keep_freed_memory`: never trim, so the next version reuses a retired one's pages.
* before a Put of nbytes (server._grow_heap): `shortfall`, `take` what is missing in blocks,
  `populate` their pages in parallel like a new segment's (backends/shm.py), `give_back`: the
  heap then holds that much free memory with every page in place.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

from forgerpc.services.weight_store.backends.shm import populate_pages

_BLOCK = 32 << 20  # below tune_allocator's mmap threshold (64 MiB): taken from the heap itself


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mallinfo2.restype = _Mallinfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):  # not glibc (>= 2.33)
        return None


_LIBC = _libc()


def keep_freed_memory() -> None:
    """Never hands freed heap memory back to the OS (M_TRIM_THRESHOLD = -1, mallopt(3)).

    When a retired version was freed at the top of the heap, glibc gave it back (tune_allocator's
    threshold is 512 MiB) and the next Put faulted every page in again: every other 1.7B publish
    took 3.8-3.9 s instead of 1.9-2.0 (grpcio wire, 2026-11-28, bench/README.md). Kept, the next
    version reuses those pages, as `spare_segments` does for segments; the store's RSS stays at
    the most it held at once.
    """
    if _LIBC is not None:
        _LIBC.mallopt(-1, -1)


def shortfall(nbytes: int) -> int:
    """How many bytes the heap lacks for nbytes more (0 when its free memory covers them)."""
    if _LIBC is None:
        return 0
    return max(nbytes - _LIBC.mallinfo2().fordblks, 0)


def take(nbytes: int) -> list[int]:
    """Allocates nbytes from the heap in blocks; call on the thread whose allocations should
    reuse them (glibc serves each thread from its arena; grpcio's messages come from the loop's)."""
    blocks = []
    for _ in range(-(-nbytes // _BLOCK)):
        address = _LIBC.malloc(_BLOCK)
        if not address:
            break  # out of memory: the Put itself will fail or fault pages in as before
        blocks.append(address)
    return blocks


def populate(blocks: list[int], threads: int) -> None:
    """Faults in the pages of `blocks` (from `take`) in `threads` threads; off the event loop."""
    page = mmap.PAGESIZE

    def run(part: list[int]) -> None:
        for address in part:
            lo, hi = -(-address // page) * page, (address + _BLOCK) // page * page
            try:
                populate_pages(lo, hi - lo, 1)
            except OSError:  # no pages to be had now: the Put faults them in (or fails) as before
                return

    workers = [threading.Thread(target=run, args=(blocks[k::threads],)) for k in range(1, threads)]
    for w in workers:
        w.start()
    run(blocks[::threads])
    for w in workers:
        w.join()


def give_back(blocks: list[int]) -> None:
    """Frees the blocks into the heap (kept there: keep_freed_memory), from `take`'s thread."""
    for address in blocks:
        _LIBC.free(address)
