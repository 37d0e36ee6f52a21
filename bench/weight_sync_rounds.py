"""Weight sync as an RL loop sees it: publish + load every version in a row, each round timed.

    .venv/bin/python bench/weight_sync_rounds.py                  # 1.7B, 8 rounds per label (~3 min)
    .venv/bin/python bench/weight_sync_rounds.py --size 135m --rounds 20

bench/weight_sync.py reports the best of its rounds; a cost that comes every other round (the
store's heap handed back to the OS and faulted in again by the next version, say) hides there.
This runs one store (retain_versions=1, as weight_sync.py) and, per label of weight_sync.py
(shm, grpc = the SDK's own HTTP/2 streams, grpc_grpcio), publishes and loads `--rounds` versions
in a row. Per label: every round's publish and load seconds, and over the rounds after the first
two (which grow the store's memory: a new segment, or fresh heap): the median and the worst
publish + load. Results go to bench/results/weight_sync_rounds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402
import weight_sync as ws  # noqa: E402

from forgerpc.clients import WeightStoreClient  # noqa: E402
from forgerpc.clients.weights import load_into, publish, tune_allocator  # noqa: E402


async def rounds(client, label: str, src: dict, dst: dict, n: int, first_version: int) -> dict:
    transport, wire = ws.LABELS[label]
    out = []
    for version in range(first_version, first_version + n):
        t = time.perf_counter()
        await publish(client, src, version, transport=transport, threads=ws.THREADS, wire=wire)
        put = time.perf_counter() - t
        for k in dst.values():  # memset, not zero_: see weight_sync.py
            ctypes.memset(k.data_ptr(), 0, k.nbytes)
        t = time.perf_counter()
        await load_into(client, dst, version, transport=transport, threads=ws.THREADS, wire=wire)
        out.append((put, time.perf_counter() - t))
    assert all(torch.equal(src[k], dst[k]) for k in src), "loaded weights differ"
    steady = [p + g for p, g in out[2:]]
    return {"rounds_publish_load_s": out, "steady_median_s": statistics.median(steady),
            "steady_worst_s": max(steady), "steady_best_s": min(steady)}


async def main(args) -> None:
    tune_allocator()
    torch.set_num_threads(ws.THREADS)
    src, dst = ws.llama_state_dict(args.size, fill=True), ws.llama_state_dict(args.size, fill=False)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv),
               "size": args.size, "bytes": sum(v.nbytes for v in src.values()), "labels": {}}
    with ws.servers(ws.THREADS) as (address, _):
        client = WeightStoreClient(address, timeout=600)
        await client.wait_ready()
        for k, label in enumerate(ws.LABELS):
            r = results["labels"][label] = await rounds(client, label, src, dst, args.rounds, 1000 * (k + 1))
            each = " ".join(f"{p:.2f}+{g:.2f}" for p, g in r["rounds_publish_load_s"])
            print(f"[{args.size}] {label}: publish+load s per round: {each}; after the first two: median "
                  f"{r['steady_median_s']:.2f}, worst {r['steady_worst_s']:.2f}", flush=True)
        await client.close()
    ws.write_results(args.out, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.7b", choices=sorted(ws.SHAPES))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=str(ws.ROOT / "bench/results/weight_sync_rounds.json"))
    asyncio.run(main(parser.parse_args()))
