"""The first shared-memory publishes of a 1.7B bf16 state dict into a fresh store, split in two.

    .venv/bin/python bench/cold_publish.py

Starts a weight store (retain_versions=1, spare_segments=1) and publishes versions 1, 2, 3 over
shared memory, printing for each the AllocateUpload call (the store creates and populates a new
segment for versions 1 and 2; version 3 refills version 1's) and the client's fill of the segment
(copy + xxh3). No reference in the same run: A/B it against another checkout of the store.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from weight_sync import llama_state_dict  # noqa: E402

from forgerpc.clients import WeightStoreClient, weights_shm  # noqa: E402
from forgerpc.clients.weights import publish  # noqa: E402


def timed(name: str, fn):
    """fn, printing how long each call took (sync or async)."""
    if asyncio.iscoroutinefunction(fn):
        async def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = await fn(*args, **kwargs)
            print(f"  {name} {time.perf_counter() - t:.2f} s", flush=True)
            return out
    else:
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            print(f"  {name} {time.perf_counter() - t:.2f} s", flush=True)
            return out
    return wrapper


async def main() -> None:
    store = subprocess.Popen([sys.executable, "-m", "forgerpc.services", "serve", "weight_store", "--port", "0",
                              "retain_versions=1", "spare_segments=1"], stdout=subprocess.PIPE, text=True)
    address = store.stdout.readline().split()[2]
    try:
        client = WeightStoreClient(address, timeout=600)
        await client.wait_ready()
        torch.set_num_threads(2)
        state_dict = llama_state_dict("1.7b", fill=True)
        weights_shm.fill_segment = timed("fill_segment", weights_shm.fill_segment)
        client.allocate_upload = timed("allocate_upload", client.allocate_upload)
        for version in (1, 2, 3):
            t = time.perf_counter()
            await publish(client, state_dict, version, transport="shm", threads=2)
            print(f"publish {version}: {time.perf_counter() - t:.2f} s", flush=True)
        await client.close()
    finally:
        store.terminate()
        store.wait()


if __name__ == "__main__":
    asyncio.run(main())
