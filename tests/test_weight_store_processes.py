"""One trainer process publishes 5 versions; two generator processes follow them through the store.

All four are real OS processes on loopback: the store (`forgerpc serve weight_store`), a trainer
that perturbs a model and publishes after each "step", and two generators that watch for new
versions and load the newest into their own model (one over shared memory, one over gRPC).
Both must end on version 5 with weights bit-identical to the trainer's.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import ServiceProcess

COMMON = """
import asyncio, hashlib, sys, torch
from forgerpc.clients import WeightStoreClient
from forgerpc.clients.weights import load_into, publish

def model():
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))

def digest(m):
    h = hashlib.sha256()
    for name, t in m.state_dict().items():
        h.update(name.encode() + t.numpy().tobytes())
    return h.hexdigest()
"""

TRAINER = COMMON + """
async def main(address):
    torch.manual_seed(0)
    m, client = model(), WeightStoreClient(address)
    for version in range(1, 6):
        with torch.no_grad():  # a stand-in for an optimizer step
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        await publish(client, m.state_dict(), version, producer="trainer-0", step=10 * version)
        await asyncio.sleep(0.2)
    print("TRAINER", digest(m), flush=True)

asyncio.run(main(sys.argv[1]))
"""

GENERATOR = COMMON + """
async def main(address, transport):
    torch.manual_seed(1)  # different initial weights than the trainer
    m, client, loaded, seen = model(), WeightStoreClient(address), 0, []
    async for event in client.watch_versions(after_version=0, timeout=120):
        if event.version.version <= loaded:
            continue
        loaded = (await load_into(client, m, None, transport=transport)).version  # newest
        seen.append(loaded)
        if loaded == 5:
            break
    print("GENERATOR", loaded, digest(m), seen, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_two_generators_end_on_the_trainers_last_version_bit_identical():
    store = ServiceProcess("weight_store", "retain_versions=2")
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "-c", GENERATOR, store.address, t], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for t in ("shm", "grpc")]
        procs.append(subprocess.Popen([sys.executable, "-c", TRAINER, store.address], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-2000:]
        *generators, trainer = [out.split() for out, _ in outputs]
        assert trainer[0] == "TRAINER"
        for g in generators:
            assert g[0] == "GENERATOR" and g[1] == "5", g
            assert g[2] == trainer[1], "generator weights differ from the trainer's"
    finally:
        for p in procs:
            p.kill()
            p.wait()
        store.terminate()
