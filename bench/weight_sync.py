"""Weight sync benchmark: how close the weight store gets to memcpy (same host) and raw gRPC.

    .venv/bin/python bench/weight_sync.py --sizes 135m    # quick run (~1.5 min)
    .venv/bin/python bench/weight_sync.py                 # 135M and 1.7B: needs ~14 GB free RAM
                                                          # (~4 min on an idle 2-core, 24 GB VM)
    bash bench/gpu_check.sh                               # on a lent GPU machine (see the script)

For each model size (synthetic bf16 tensors with the layer shapes of SmolLM2-135M / -1.7B, both
Llama architectures) it measures, in this run:

    memcpy_gbps        = bytes / t, copying every tensor into preallocated tensors, best of 10 of
                         each of two ways, the faster counts: torch copy_ (memcpy_torch_gbps) and
                         memmove of 4 MiB pieces in --threads Python threads (memcpy_threads_gbps,
                         the way the SDK copies; torch's OpenMP copy_ stalls when another process
                         holds a core: 0.7-1.8 GB/s vs 4.5-8.4 for the memmoves under load 5-7,
                         when it alone made shm_vs_memcpy read 1.7-2.2)
    raw_grpc_gbps      = 2 bytes / (t_up + t_down), plain bytes over loopback grpc.aio (no store,
                         one reused 4 MiB message), in a separate server process, best of --repeats
    shm_put_get_gbps   = 2 bytes / (t_publish + t_load), shared-memory transport, best of --repeats
    grpc_put_get_gbps  = 2 bytes / (t_publish + t_load), gRPC transport, best of --repeats; the
                         SDK's default wire: its own HTTP/2 streams (clients/h2stream.py)
    grpc_grpcio_put_get_gbps = the same with wire="grpcio": publish and load through grpcio
    shm_vs_memcpy      = shm_put_get_gbps / memcpy_gbps    (target >= 0.5)
    grpc_vs_raw        = grpc_put_get_gbps / raw_grpc_gbps (target >= 0.8)

Publish includes the per-tensor xxh3_64 checksums (client) and their verification (store, which
hashes each tensor of a shared-memory upload as soon as the client reports it copied);
load writes into the existing tensors of a second "model". Steady state: the store reuses the
segment of the version before last (retain_versions=1, as in an RL loop that publishes every
step); the first publish+load of a size (fresh segment, new connection) is reported as cold_*.
Memory: a fresh reader process (its model already allocated) loads the newest version 3 times;
load_first_load_rss_extra_bytes / load_steady_rss_extra_bytes are its anonymous RSS (RssAnon,
sampled every 2 ms) above the level before the load, load_python_peak_bytes the tracemalloc
peak of Python objects during one more load (the SDK's default: the direct reader receives into
the model and holds no message; load_grpcio_* the same through grpcio, which holds ~2 messages
while it assembles one); load_raw_grpc_python_peak_bytes the same peak for a plain grpc.aio
download of the same messages from the raw server (no store, no SDK), i.e. what grpcio alone needs.
Results go to bench/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from forgerpc.clients import WeightStoreClient
from forgerpc.clients.weights import load_into, publish, tune_allocator

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHUNK = 4 << 20
THREADS = 2  # torch intra-op, publish copy/hash and store checksum threads (--threads)
# (hidden, intermediate, layers, heads, kv_heads, vocab): SmolLM2 configs, tied embeddings.
SHAPES = {"135m": (576, 1536, 30, 9, 3, 49152), "1.7b": (2048, 8192, 24, 32, 32, 49152)}


def llama_state_dict(size: str, fill: bool) -> dict[str, torch.Tensor]:
    hidden, inter, layers, heads, kv, vocab = SHAPES[size]
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.normal_() if fill else t.zero_()  # zero_ touches every page: the reader's memory is resident
        out[name] = t
    return out


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Peak RssAnon above the level at start, sampled in a thread."""

    def __enter__(self):
        self.base = self.peak = rss_anon()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_anon())
        self.extra = self.peak - self.base


def memcpy_gbps(src: dict, dst: dict, repeats: int) -> tuple[float, float]:
    """(torch copy_, memmove in THREADS threads) GB/s, best of `repeats` each.

    The memmoves run first: right after a torch op, torch's OpenMP workers keep spinning on the
    cores for a while, and a copy in other threads then waits for them (a shm load right after a
    torch zero_ of its targets took ~85 ms instead of ~50 here).
    """
    pieces = [(dst[k].data_ptr() + lo, v.data_ptr() + lo, min(CHUNK, v.nbytes - lo))
              for k, v in src.items() for lo in range(0, v.nbytes, CHUNK)]

    def run(part) -> None:
        for d, s, n in part:
            ctypes.memmove(d, s, n)  # drops the GIL

    best_torch = best_threads = float("inf")
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(run, [pieces[i::THREADS] for i in range(THREADS)]))
            best_threads = min(best_threads, time.perf_counter() - t)
    for _ in range(repeats):
        t = time.perf_counter()
        for k, v in src.items():
            dst[k].copy_(v)
        best_torch = min(best_torch, time.perf_counter() - t)
    nbytes = sum(v.nbytes for v in src.values())
    return nbytes / best_torch / 1e9, nbytes / best_threads / 1e9


# -- raw gRPC reference: a server process that streams / swallows plain bytes ----------------------
RAW_SERVICE = "bench.Raw"


async def raw_server() -> None:
    tune_allocator()  # same allocator settings as the store, so the reference is not handicapped
    async def download(request: bytes, context):
        total = int(request.decode())
        message = bytes(CHUNK)  # one reused message: gRPC's own cost only
        for _ in range(total // CHUNK):
            yield message

    async def upload(requests, context):
        n = 0
        async for message in requests:
            n += len(message)
        return str(n).encode()

    ident = lambda b: b  # noqa: E731
    handlers = {"Download": grpc.unary_stream_rpc_method_handler(download, ident, ident),
                "Upload": grpc.stream_unary_rpc_method_handler(upload, ident, ident)}
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def raw_grpc_gbps(address: str, total: int, repeats: int) -> tuple[float, float, float]:
    total = total // CHUNK * CHUNK
    ident = lambda b: b  # noqa: E731
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        down = channel.unary_stream(f"/{RAW_SERVICE}/Download", ident, ident)
        up = channel.stream_unary(f"/{RAW_SERVICE}/Upload", ident, ident)
        message = bytes(CHUNK)

        async def chunks():
            for _ in range(total // CHUNK):
                yield message

        t_up = t_down = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            assert int(await up(chunks())) == total
            t_up = min(t_up, time.perf_counter() - t)
            t = time.perf_counter()
            n = 0
            async for m in down(str(total).encode()):
                n += len(m)
            t_down = min(t_down, time.perf_counter() - t)
            assert n == total
    return 2 * total / (t_up + t_down) / 1e9, total / t_up / 1e9, total / t_down / 1e9


async def raw_python_peak(raw_address: str, total: int) -> int:
    """tracemalloc peak of a plain grpc.aio download of `total` bytes (at most 32 messages: the
    peak does not grow with the count) in CHUNK messages, each dropped before the next is read:
    what grpcio itself needs per message (no store, no SDK)."""
    import tracemalloc
    ident = lambda b: b  # noqa: E731
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(raw_address, options=options) as channel:
        down = channel.unary_stream(f"/{RAW_SERVICE}/Download", ident, ident)
        async for _ in down(str(4 * CHUNK).encode()):  # warm: the connection, grpcio's pools
            pass
        tracemalloc.start()
        call = down(str(min(total // CHUNK, 32) * CHUNK).encode())
        while (message := await call.read()) is not grpc.aio.EOF:
            del message
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


async def reader(address: str, size: str, label: str, raw_address: str) -> None:
    """A fresh generator-like process: its model exists, then it loads the newest version 3 times.

    Reports RssAnon above the pre-load level for the first load (includes one-time set-up: the
    connection, thread pools, allocator arenas) and for later loads (steady state), and the
    tracemalloc peak of Python objects (the received messages) during one more load. For gRPC,
    also the same peak for a plain download of as many bytes (`raw_python_peak`): grpcio builds
    each received message in a bytearray and then copies it into bytes, so even a reader that
    holds nothing needs 2 messages at that moment (ReceiveMessageOperation.un_c).
    """
    import tracemalloc
    tune_allocator()
    transport, wire = LABELS[label]
    model = llama_state_dict(size, fill=False)
    client = WeightStoreClient(address, timeout=600)
    await client.wait_ready()
    extras, seconds = [], []
    for _ in range(3):
        with PeakSampler() as peak:
            t = time.perf_counter()
            loaded = await load_into(client, model, None, transport=transport, chunk_bytes=CHUNK, threads=THREADS,
                                     wire=wire)
            seconds.append(time.perf_counter() - t)
        extras.append(peak.extra)
    tracemalloc.start()
    await load_into(client, model, None, transport=transport, chunk_bytes=CHUNK, threads=THREADS, wire=wire)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out = {"version": loaded.version, "load_s": min(seconds), "first_load_rss_extra_bytes": extras[0],
           "steady_rss_extra_bytes": max(extras[1:]), "python_peak_bytes": python_peak}
    if wire == "grpcio":
        out["raw_grpc_python_peak_bytes"] = await raw_python_peak(raw_address, sum(t.nbytes for t in model.values()))
    print(json.dumps(out), flush=True)


def fresh_reader(address: str, size: str, label: str, raw_address: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--reader", address, size, label, raw_address,
                          f"--chunk-bytes={CHUNK}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _die_with_parent() -> None:
    """In the child: SIGTERM when the bench dies (even by SIGKILL/OOM), so no store outlives it."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            preexec_fn=_die_with_parent)
    return proc, proc.stdout.readline().strip()


@contextlib.contextmanager
def servers(threads: int):
    """(store address, raw server address): a weight store keeping the newest version (its freed
    segment reused) and the raw gRPC reference server, each its own process, stopped on exit."""
    raw, raw_port = start([sys.executable, __file__, "--raw-server", f"--chunk-bytes={CHUNK}"])
    store, ready = start([sys.executable, "-m", "forgerpc.services", "serve", "weight_store", "--port", "0",
                          "retain_versions=1", "spare_segments=1", f"chunk_bytes={CHUNK}",
                          f"verify_threads={threads}"])
    try:
        yield ready.split()[2], f"127.0.0.1:{raw_port}"
    finally:
        for p in (store, raw):
            p.terminate()
            p.wait(30)


# label -> (transport, wire) of publish and load_into.
LABELS = {"shm": ("shm", "auto"), "grpc": ("grpc", "auto"), "grpc_grpcio": ("grpc", "grpcio")}


async def store_put_get(client, label: str, src: dict, dst: dict, repeats: int, first_version: int,
                        baseline: int) -> dict:
    """publish + load_into: two cold rounds, then `repeats` timed ones (best times).

    With retain_versions=1 the second publish still needs a fresh segment (the first version is
    live until it completes); from the third on, each publish refills the segment freed by the
    version before last, as in an RL loop that publishes every step.
    """
    transport, wire = LABELS[label]
    nbytes = sum(v.nbytes for v in src.values())
    results, version = {}, first_version
    best_put = best_get = float("inf")
    extra = grown = 0
    for i in range(2 + repeats):
        t = time.perf_counter()
        await publish(client, src, version, transport=transport, chunk_bytes=CHUNK, threads=THREADS, wire=wire)
        put = time.perf_counter() - t
        for k in dst.values():  # so that the check below proves this load wrote everything; memset,
            ctypes.memset(k.data_ptr(), 0, k.nbytes)  # not zero_: OpenMP's spinning would slow the load
        with PeakSampler() as peak:
            t = time.perf_counter()
            await load_into(client, dst, version, transport=transport, chunk_bytes=CHUNK, threads=THREADS, wire=wire)
            get = time.perf_counter() - t
        version += 1
        if i == 0:
            results |= {"cold_publish_s": put, "cold_load_s": get}
        if i < 2:
            continue
        best_put, best_get = min(best_put, put), min(best_get, get)
        extra = max(extra, peak.extra)
        grown = max(grown, peak.peak - baseline)
    assert all(torch.equal(src[k], dst[k]) for k in src), "loaded weights differ"
    return {**results, "publish_s": best_put, "load_s": best_get, "publish_plus_load_s": best_put + best_get,
            "put_get_gbps": 2 * nbytes / (best_put + best_get) / 1e9, "peak_extra_bytes": extra,
            "rss_anon_above_start_bytes": grown, "next_version": version}


async def bench_size(size: str, store_address: str, raw_address: str, repeats: int, first_version: int) -> dict:
    src, dst = llama_state_dict(size, fill=True), llama_state_dict(size, fill=False)
    nbytes = sum(v.nbytes for v in src.values())
    params = sum(v.numel() for v in src.values())
    print(f"[{size}] {params / 1e6:.0f}M params, {nbytes / 1e9:.2f} GB bf16, {len(src)} tensors", flush=True)
    out = {"params": params, "bytes": nbytes, "tensors": len(src), "largest_tensor_bytes": max(v.nbytes for v in src.values())}
    client = WeightStoreClient(store_address, timeout=600)
    version, memcpy, raw, baseline = first_version, [], [], rss_anon()
    for label in LABELS:
        # References right before each store run, best of all: a shared machine's load drifts.
        # Best of >= 10: torch's OpenMP copy_ stalls whenever another process holds a core (4 tries
        # gave 0.3 GB/s on a loaded 2-core machine); more tries only make the reference harder to
        # match. The transports get as many tries (--repeats 10): best of 3 against best of 10 on
        # a shared machine measured luck as much as speed.
        memcpy.append(memcpy_gbps(src, dst, max(10, repeats + 1)))
        raw.append(await raw_grpc_gbps(raw_address, nbytes, repeats))
        r = await store_put_get(client, label, src, dst, repeats, version, baseline)
        version = r.pop("next_version")
        out[label] = r
        out[f"{label}_put_get_gbps"] = r["put_get_gbps"]
        print(f"[{size}] {label}: {json.dumps(r)}", flush=True)
    await client.close()
    del dst  # the fresh readers below bring their own model
    for label in LABELS:
        out[label]["fresh_reader"] = r = fresh_reader(store_address, size, label, raw_address)
        print(f"[{size}] fresh {label} reader: {json.dumps(r)}", flush=True)
    out["memcpy_torch_gbps"], out["memcpy_threads_gbps"] = max(m[0] for m in memcpy), max(m[1] for m in memcpy)
    out["memcpy_gbps"] = max(out["memcpy_torch_gbps"], out["memcpy_threads_gbps"])
    out["raw_grpc_gbps"], out["raw_grpc_upload_gbps"], out["raw_grpc_download_gbps"] = max(raw)
    out["shm_vs_memcpy"] = out["shm_put_get_gbps"] / out["memcpy_gbps"]
    out["grpc_vs_raw"] = out["grpc_put_get_gbps"] / out["raw_grpc_gbps"]
    out["grpc_grpcio_vs_raw"] = out["grpc_grpcio_put_get_gbps"] / out["raw_grpc_gbps"]
    # In a fresh reader process: nothing of the publisher's retained heap counts as baseline.
    for key in ("first_load_rss_extra_bytes", "steady_rss_extra_bytes", "python_peak_bytes"):
        out[f"load_{key}"] = max(out[t]["fresh_reader"][key] for t in ("shm", "grpc"))  # the SDK's defaults
        out[f"load_grpcio_{key}"] = out["grpc_grpcio"]["fresh_reader"][key]
    out["peak_extra_memory_limit_bytes"] = int(1.1 * CHUNK)  # 1.1 x largest chunk (the model is preallocated)
    out["load_raw_grpc_python_peak_bytes"] = out["grpc_grpcio"]["fresh_reader"]["raw_grpc_python_peak_bytes"]
    print(f"[{size}] memcpy {out['memcpy_gbps']:.2f} GB/s (torch {out['memcpy_torch_gbps']:.2f}, "
          f"{THREADS} threads {out['memcpy_threads_gbps']:.2f}), raw gRPC {out['raw_grpc_gbps']:.2f} GB/s, "
          f"shm put+get {out['shm_put_get_gbps']:.2f} GB/s (x{out['shm_vs_memcpy']:.2f} memcpy), "
          f"gRPC put+get {out['grpc_put_get_gbps']:.2f} GB/s (x{out['grpc_vs_raw']:.2f} raw; loads through grpcio "
          f"{out['grpc_grpcio_put_get_gbps']:.2f}, x{out['grpc_grpcio_vs_raw']:.2f}), "
          f"load extra memory: steady {out['load_steady_rss_extra_bytes'] / 2**20:.1f} MiB RSS, "
          f"python {out['load_python_peak_bytes'] / 2**20:.1f} MiB (through grpcio "
          f"{out['load_grpcio_python_peak_bytes'] / 2**20:.1f}; a plain grpc.aio download of the same "
          f"messages: {out['load_raw_grpc_python_peak_bytes'] / 2**20:.1f}; "
          f"limit {out['peak_extra_memory_limit_bytes'] / 2**20:.1f})", flush=True)
    return out


def write_results(path: str, results: dict) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


async def main(args) -> None:
    global CHUNK, THREADS
    CHUNK, THREADS = args.chunk_bytes, args.threads
    tune_allocator()
    torch.set_num_threads(args.threads)
    with servers(args.threads) as (store_address, raw_address):
        await WeightStoreClient(store_address).wait_ready()
        results = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
                   "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "load_average_at_start": os.getloadavg(), "chunk_bytes": CHUNK, "command": " ".join(sys.argv),
                   "sizes": {}}
        for size in args.sizes:
            repeats = args.repeats if size == "135m" else 1
            # Version numbers keep growing across sizes: the store keeps only the newest.
            results["sizes"][size] = await bench_size(size, store_address, raw_address, repeats,
                                                      first_version=1000 * (len(results["sizes"]) + 1))
        results["load_average_at_end"] = os.getloadavg()
        if "1.7b" in results["sizes"]:
            r = results["sizes"]["1.7b"]["shm"]
            results["1.7b_publish_plus_load_s"] = r["publish_plus_load_s"]
        write_results(args.out, results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["135m", "1.7b"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed repeats for 135M, of the references and of each transport alike (1.7B: 1)")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch, publish and the store's checksums")
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK, help="gRPC message size, store and reference")
    parser.add_argument("--out", default=str(ROOT / "bench/results/weight_sync.json"), help="results file")
    parser.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reader", nargs=4, metavar=("ADDRESS", "SIZE", "LABEL", "RAW_ADDRESS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    CHUNK = args.chunk_bytes
    if args.reader:
        torch.set_num_threads(args.threads)
        asyncio.run(reader(*args.reader))
    elif args.raw_server:
        asyncio.run(raw_server())
    else:
        asyncio.run(main(args))
