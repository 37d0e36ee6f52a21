"""How fast a new /dev/shm segment gets its pages: the cost behind a weight store's first publish.

    .venv/bin/python bench/shm_populate.py --gib 3.42      # a 1.7B bf16 version

For a fresh file of --gib GiB in /dev/shm it times, on this machine:

    store_map_populate   mmap(MAP_SHARED | MAP_POPULATE): the kernel allocates every page in one thread
    store_madvise_N      mmap, then MADV_POPULATE_WRITE on N slices in N threads (what the store does,
                         N = verify_threads; services/weight_store/backends/shm.py: populate)
and then, for a writer with its own mapping of that file (the SDK's client):
    first_write_plain / first_write_map_populate    the first pass of 4 MiB memmoves in 2 threads
    second_write                                     the next pass (page tables in place)

No reference copy in the same run: these are the kernel's page-allocation costs the store pays once
per segment; compare the rows with each other.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import threading
import time

from forgerpc.clients.weights_shm import buffer_address
from forgerpc.services.weight_store.backends.shm import populate

PIECE = 4 << 20


def write_all(region: mmap.mmap, size: int, threads: int = 2) -> float:
    base, source = buffer_address(region), bytes(PIECE)
    pieces = list(range(0, size, PIECE))

    def run(part):
        for lo in part:
            ctypes.memmove(base + lo, source, min(PIECE, size - lo))  # drops the GIL

    workers = [threading.Thread(target=run, args=(pieces[i::threads],)) for i in range(threads)]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    size = int(args.gib * 2**30)
    path = f"/dev/shm/forgerpc-bench-populate.{os.getpid()}"
    out = {"bytes": size}
    for way in ["map_populate"] + [f"madvise_{n}" for n in args.threads]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            t = time.perf_counter()
            if way == "map_populate":
                store = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            else:
                store = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
                populate(store, size, int(way.split("_")[1]))
            row = {"store_s": time.perf_counter() - t}
            for client in ("plain", "map_populate"):
                t = time.perf_counter()
                flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if client == "map_populate" else 0)
                mapping = mmap.mmap(fd, size, flags=flags)
                mapped = time.perf_counter() - t  # the mmap call itself (MAP_POPULATE works here)
                row[f"first_write_{client}_s"] = mapped + write_all(mapping, size)
                row[f"second_write_{client}_s"] = write_all(mapping, size)
                mapping.close()
            store.close()
        finally:
            os.close(fd)
            os.unlink(path)
        out[way] = {k: round(v, 3) for k, v in row.items()}
        print(way, json.dumps(out[way]), flush=True)


if __name__ == "__main__":
    main()
