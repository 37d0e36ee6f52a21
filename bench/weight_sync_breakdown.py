"""Where a gRPC publish and load spend their time, beside raw gRPC (135M bf16, one store, loopback).

    .venv/bin/python bench/weight_sync_breakdown.py [--rounds 8]

bench/weight_sync.py gives the ratios; this splits them. Each figure is best and median of
--rounds on warm channels (ms):

    drain      GetWeights read to the end through grpcio, bytes dropped: the store's Get side + the wire
    load       load_into a model, the SDK's default (its own HTTP/2 stream: the socket's bytes
               received straight into the tensors)
    load_grpcio   the same through grpcio: drain + the client's copy into the tensors
    raw_down   a plain grpc.aio download of as many bytes (weight_sync.py's raw server)
    replay     PutWeights fed the messages `publish` built for an earlier version, kept in memory:
               the store's receive (copy into the version's segment + xxh3) + the wire
    publish    publish, the SDK's default (its own HTTP/2 stream: xxh3 of each message, then the
               kernel gathers the tensors' bytes)
    publish_grpcio   publish through grpcio: replay + the client's build (tensor -> message copy + xxh3)
    raw_up     a plain grpc.aio upload of as many bytes

The replayed messages are captured by running `publish` against a stand-in for the PutWeights
call, so they are byte for byte what the SDK sends.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import grpc  # noqa: E402
import weight_sync as ws  # noqa: E402

from forgerpc.clients import WeightStoreClient  # noqa: E402
from forgerpc.clients import weights as W  # noqa: E402
from forgerpc.v1 import weight_store_pb2 as pb  # noqa: E402


async def captured_messages(client, src: dict, version: int) -> list[bytes]:
    """The PutWeights messages `publish` builds for `version`, without sending them."""
    real_rpc, out = W._rpc, []

    class Captured(Exception):
        pass

    def stand_in(c, name, kind):
        if name != "PutWeights":
            return real_rpc(c, name, kind)

        async def call(messages, **_):
            out.extend([m async for m in messages])
            raise Captured

        return call

    W._rpc = stand_in
    try:
        await W.publish(client, src, version, transport="grpc", chunk_bytes=ws.CHUNK, wire="grpcio")
    except Captured:
        pass
    finally:
        W._rpc = real_rpc
    return out


async def main(rounds: int) -> None:
    with ws.servers(ws.THREADS) as (store_address, raw_address):
        client = WeightStoreClient(store_address, timeout=600)
        await client.wait_ready()
        src, dst = ws.llama_state_dict("135m", fill=True), ws.llama_state_dict("135m", fill=False)
        nbytes = sum(v.nbytes for v in src.values())
        # Versions must grow (the store keeps the newest): round i publishes 3i + 1 and 3i + 2, replays 3i + 3.
        replays = [await captured_messages(client, src, 3 * i + 3) for i in range(rounds)]
        put = W._rpc(client, "PutWeights", "stream_unary")
        get = W._rpc(client, "GetWeights", "unary_stream")
        keys = ("drain", "load", "load_grpcio", "replay", "publish", "publish_grpcio")
        times = {k: [] for k in keys}

        async def timed(key, coro):
            t = time.perf_counter()
            await coro
            times[key].append(time.perf_counter() - t)

        async def drain(version: int):
            request = pb.GetWeightsRequest(version=version, transport=pb.TRANSPORT_GRPC, chunk_bytes=ws.CHUNK,
                                           client_host_id=W.host_id())
            call = get(request.SerializeToString(), timeout=600)
            while await call.read() is not grpc.aio.EOF:
                pass

        async def replay(messages):
            async def stream():
                for m in messages:
                    yield m
            await put(stream(), timeout=600)

        for i in range(rounds):
            await timed("publish_grpcio", W.publish(client, src, 3 * i + 1, transport="grpc", chunk_bytes=ws.CHUNK,
                                                    wire="grpcio"))
            await timed("publish", W.publish(client, src, 3 * i + 2, transport="grpc", chunk_bytes=ws.CHUNK))
            await timed("drain", drain(3 * i + 2))
            await timed("load", W.load_into(client, dst, 3 * i + 2, transport="grpc", chunk_bytes=ws.CHUNK))
            await timed("load_grpcio", W.load_into(client, dst, 3 * i + 2, transport="grpc", chunk_bytes=ws.CHUNK,
                                                   wire="grpcio"))
            await timed("replay", replay(replays[i]))
        _, up, down = await ws.raw_grpc_gbps(raw_address, nbytes, rounds)
        print(f"135m: {nbytes / 1e6:.0f} MB, {rounds} rounds (ms: best / median)")
        for key in keys:
            print(f"  {key:14s} {min(times[key]) * 1e3:6.1f} / {statistics.median(times[key]) * 1e3:6.1f}")
        print(f"  {'raw_down':14s} {nbytes / down / 1e6:6.1f} (best)\n  {'raw_up':14s} {nbytes / up / 1e6:6.1f} (best)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    asyncio.run(main(parser.parse_args().rounds))
