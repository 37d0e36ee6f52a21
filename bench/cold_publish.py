"""The first shared-memory publishes of a 1.7B bf16 state dict into a fresh store, split in two.

    .venv/bin/python bench/cold_publish.py

Starts a weight store (retain_versions=1, spare_segments=1) and publishes versions 1, 2, 3 over
shared memory, printing for each the AllocateUpload call (the store creates and populates a new
segment for versions 1 and 2; version 3 refills version 1's) and the client's fill of the segment
(copy + xxh3). No reference in the same run: A/B it against another checkout of the store.
"""
import asyncio, sys, time, subprocess, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from weight_sync import llama_state_dict
from forgerpc.clients import WeightStoreClient
from forgerpc.clients import weights, weights_shm
from forgerpc.clients.weights import publish, load_into

async def main():
    proc = subprocess.Popen([sys.executable, "-m", "forgerpc.services", "serve", "weight_store", "--port", "0",
                             "retain_versions=1", "spare_segments=1"], stdout=subprocess.PIPE, text=True)
    addr = proc.stdout.readline().split()[2]
    try:
        c = WeightStoreClient(addr, timeout=600); await c.wait_ready()
        sd = llama_state_dict("1.7b", fill=True)
        torch.set_num_threads(2)
        orig_fill = weights_shm.fill_segment
        def timed_fill(*a, **k):
            t = time.perf_counter(); r = orig_fill(*a, **k); print(f"  fill_segment {time.perf_counter()-t:.2f}s", flush=True); return r
        weights_shm.fill_segment = timed_fill
        orig_alloc = c.allocate_upload
        async def timed_alloc(**kw):
            t = time.perf_counter(); r = await orig_alloc(**kw); print(f"  allocate_upload {time.perf_counter()-t:.2f}s", flush=True); return r
        c.allocate_upload = timed_alloc
        for v in (1, 2, 3):
            t = time.perf_counter(); await publish(c, sd, v, transport="shm", threads=2)
            print(f"publish {v}: {time.perf_counter()-t:.2f}s", flush=True)
    finally:
        proc.terminate(); proc.wait()
asyncio.run(main())
