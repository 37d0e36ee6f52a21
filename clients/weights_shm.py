"""Shared-memory side of the weight SDK: segment mappings, filling an upload, copying a version out.

Only local memory work lives here (no RPCs): clients/weights.py runs the PutWeights / GetWeights
protocol and calls `fill_segment` (publish) and `copy_from_segment` (load) when the store's
segments are visible from this process.

Cost model (one 135M bf16 version, 270 MB, on the 2-core dev machine): a copy is a memmove in a
few Python threads (ctypes drops the GIL; torch's OpenMP copy_ stalls when another process holds
a core); the publish also hashes each block right after copying it, while it is in cache, so the
xxh3_64 checksum costs a fraction of a second pass over memory. Per-call Python work is kept out
of the block loops: a version is split once into one list of tensors per thread.

torch and xxhash are imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

SHM_DIR = "/dev/shm"
_BLOCK = 256 << 10  # copy+hash granularity when filling a segment: source + copy fit in L2
_CAST_BLOCK = 1 << 20  # the same for torch copy_ (casts, CUDA): fewer calls, each one costs more
# A shm publish sends the checksums of each ~32 MiB copied, so the store hashes those tensors while
# the rest is copied (from L3 when it keeps up). Each report is a message and a wake-up on both
# sides: 8 MiB reports made a 135M publish ~5 ms slower (median of 60 alternating rounds, loaded
# 2-core machine) than 32 MiB ones, and no report until the end ~2 ms faster still there; 32 MiB
# keeps the overlap for hosts whose cores are not all busy copying.
_REPORT_BYTES = 32 << 20
_COPY_BLOCK = 4 << 20  # unit of work when copying out of a segment in several threads
# Map every page at once: one call instead of a page fault per 4 KiB (~0.5 s for 3.4 GB).
_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def buffer_address(buffer) -> int:
    """Address of a buffer's first byte (bytes, mmap, memoryview; read-only ones too), no copy.

    The caller keeps `buffer` alive while it uses the address.
    """
    import numpy as np
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def memmove_all(jobs: list[tuple[int, int, int]], threads: int) -> None:
    """Runs memmove(dst, src, n) for every (dst, src, n), split into 4 MiB pieces over `threads`.

    ctypes drops the GIL for the call, so the threads copy in parallel; plain memmove in Python
    threads also avoids torch's OpenMP fan-out, whose spinning workers stall on a busy machine.
    """
    pieces = [(d + lo, s + lo, min(_COPY_BLOCK, n - lo)) for d, s, n in jobs for lo in range(0, n, _COPY_BLOCK)]

    def run(part) -> None:
        for d, s, n in part:
            ctypes.memmove(d, s, n)

    if threads <= 1 or len(pieces) <= 1:
        return run(pieces)
    with ThreadPoolExecutor(threads, thread_name_prefix="copy") as pool:
        list(pool.map(run, [pieces[i::threads] for i in range(threads)]))  # interleaved: balanced


class _Mappings:
    """This process's mappings of store segments, kept across calls and looked up by name.

    The store hands freed segments out again (same name, same file) for later versions; mapping
    one afresh costs a page-table entry per 4 KiB page (MAP_POPULATE of 270 MB: 10-25 ms here).
    A kept mapping is MAP_SHARED on the same file, so it shows the bytes the store holds now,
    never an old copy. An entry whose file is gone or was replaced (other inode or size) is
    dropped at the next lookup (and by `prune`), and at most `keep` are held: a mapping of an
    unlinked segment keeps its memory alive, so a reader pins at most one dead segment between
    two loads (`forget_segments` lets go of all). Entries are dropped, never closed: a thread
    still copying from one keeps it mapped until it lets go of the object.
    """

    def __init__(self, writable: bool, keep: int = 8):  # > retain_versions + spares + 1 upload
        self.writable, self.keep = writable, keep
        self.entries: dict[str, tuple[tuple[int, int, int], mmap.mmap]] = {}  # oldest first
        self.lock = threading.Lock()

    def get(self, name: str) -> mmap.mmap:
        """The segment `name` mapped whole (FileNotFoundError when it is not visible here)."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR if self.writable else os.O_RDONLY)
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino, st.st_size)
            with self.lock:
                entry = self.entries.pop(name, None)
                if entry is None or entry[0] != ident:
                    prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
                    entry = (ident, mmap.mmap(fd, st.st_size, flags=_POPULATE, prot=prot))
                self.entries[name] = entry
                self._prune(name)
                return entry[1]
        finally:
            os.close(fd)

    def prune(self) -> None:
        """Drops the mappings of segments that are gone (called after a publish retired some)."""
        with self.lock:
            self._prune("")

    def _prune(self, current: str) -> None:
        for name, (ident, _) in list(self.entries.items()):
            if name == current:
                continue
            try:
                st = os.stat(os.path.join(SHM_DIR, name))
                alive = (st.st_dev, st.st_ino, st.st_size) == ident
            except FileNotFoundError:
                alive = False
            if not alive:
                del self.entries[name]
        while len(self.entries) > self.keep:
            del self.entries[next(iter(self.entries))]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


_UPLOAD_MAPPINGS = _Mappings(writable=True)  # upload segments this process filled (publish)
_READ_MAPPINGS = _Mappings(writable=False)  # version segments this process read (load_into)


def forget_segments() -> None:
    """Drops this process's kept segment mappings (their memory goes once the store frees them)."""
    _UPLOAD_MAPPINGS.clear()
    _READ_MAPPINGS.clear()


def prune_uploads() -> None:
    """Drops the kept upload mappings whose segments are gone (a publish may retire some)."""
    _UPLOAD_MAPPINGS.prune()


def _balance(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices 0..n-1 split into `parts` lists of about equal total size, each in index order.

    Greedy in buffer order (each index to the lightest list so far): every list then finishes
    tensors from the front of the buffer first, which is the order their checksums are reported.
    """
    out, loads = [[] for _ in range(max(parts, 1))], [0] * max(parts, 1)
    for i, size in enumerate(sizes):
        k = loads.index(min(loads))
        out[k].append(i)
        loads[k] += size
    return [p for p in out if p]


def fill_segment(name: str, items, manifest, threads: int, report: Callable[[list[tuple[int, int]]], None],
                 stop: threading.Event) -> None:
    """Copies (and casts) every tensor into the upload segment and checksums what was written.

    Args:
        name: the upload segment (AllocateUploadResponse.segment_name).
        items: (name, source tensor, stored dtype) per tensor, in manifest order.
        manifest: the TensorManifest (offsets and byte sizes in the segment).
        report: called with [(index, xxh3_64 of the tensor's bytes), ...] every ~_REPORT_BYTES
            filled, from the copy threads; the caller sends those checksums so the store can
            hash the tensors while this copies the next ones.
        stop: set when the Put was abandoned; the threads quit between blocks.

    Block by block (256 KiB; 1 MiB for casts and CUDA): each block is hashed right after its
    copy, while it is still in cache, so the checksum costs a fraction of a second pass over
    memory. The tensors are split once into `threads` lists of about equal bytes (`_balance`),
    one per thread, and each block's addresses are plain ints: a task per tensor (a queue
    hand-off each, 272 for a 135M model) and torch calls inside the block loop had made the fill
    take 37-45 ms where this takes 31-32 (135M, best of 10 alternating rounds, loaded 2-core
    machine, 2026-11-27). memmove, copy_ and xxhash release the GIL. The segment's mapping is kept
    for the next publish (`_Mappings`).
    """
    import torch
    import xxhash

    mm = _UPLOAD_MAPPINGS.get(name)
    view, base = memoryview(mm), buffer_address(mm)  # the address is valid while `mm` lives (kept)
    flat = torch.frombuffer(mm, dtype=torch.uint8)  # only the cast path writes through it
    specs = manifest.tensors
    lock, ready, ready_bytes = threading.Lock(), [], 0

    def fill(spec, tensor, out) -> int | None:
        """Copies one tensor and returns the xxh3_64 of its bytes (None when stopped)."""
        src, hasher = tensor.detach().reshape(-1), xxhash.xxh3_64()
        start, end = spec.offset, spec.offset + spec.byte_size
        if src.dtype == out and src.device.type == "cpu":  # plain bytes: memmove, no OpenMP fan-out
            shift = src.data_ptr() - start  # segment offset a <-> source address shift + a
            for a in range(start, end, _BLOCK):
                if stop.is_set():
                    return None
                n = min(_BLOCK, end - a)
                ctypes.memmove(base + a, shift + a, n)
                hasher.update(view[a:a + n])
            return hasher.intdigest()
        dst, step = flat[start:end].view(out), max(_CAST_BLOCK // out.itemsize, 1)
        for lo in range(0, src.numel(), step):
            if stop.is_set():
                return None
            dst[lo:lo + step].copy_(src[lo:lo + step])
            a = start + lo * out.itemsize
            hasher.update(view[a:min(a + step * out.itemsize, end)])
        return hasher.intdigest()

    def run(indices: list[int]) -> None:
        nonlocal ready_bytes
        for i in indices:
            digest = fill(specs[i], items[i][1], items[i][2])
            if digest is None:
                return
            with lock:
                ready.append((i, digest))
                ready_bytes += specs[i].byte_size
                if ready_bytes >= _REPORT_BYTES:
                    report(ready[:])
                    ready.clear()
                    ready_bytes = 0

    try:
        parts = _balance([t.byte_size for t in specs], threads)
        with ThreadPoolExecutor(max(len(parts), 1), thread_name_prefix="fill") as pool:
            list(pool.map(run, parts))
        if ready and not stop.is_set():
            report(ready[:])
    finally:
        del flat
        view.release()


def copy_from_segment(name: str, parts: list[tuple[int, int, Any, Any]], threads: int) -> None:
    """Copies tensors out of a version's segment (mapping kept, see `_Mappings`).

    Same-dtype CPU targets: memmove in `threads` threads. Others (casts, CUDA, non-contiguous
    targets): torch copy_ per tensor.

    Args:
        parts: (offset, byte_size, stored torch dtype, target tensor) per tensor.
    """
    import torch
    mm = _READ_MAPPINGS.get(name)
    base, jobs = buffer_address(mm), []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for offset, byte_size, dtype, target in parts:
            n = target.numel()
            if not n:
                continue
            if dtype == target.dtype and target.device.type == "cpu" and target.is_contiguous():
                jobs.append((target.data_ptr(), base + offset, byte_size))
            else:
                src = torch.frombuffer(mm, dtype=dtype, count=n, offset=offset)
                target.copy_(src.view(target.shape))
                del src
    memmove_all(jobs, threads)
