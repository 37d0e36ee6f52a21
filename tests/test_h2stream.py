"""The SDK's own gRPC-over-HTTP/2 streams (clients/h2stream.py) and the weight transfers on them.

Two kinds of peer: a real weight store process (grpcio's server, which never pads frames or
splits headers), and a scripted HTTP/2 peer on a socket that sends what a conforming server may
send but grpcio's doesn't (padding, CONTINUATION, PING, one-byte frames, error trailers, resets).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import struct
import sys
import threading
import time

import grpc
import hpack
import pytest
import torch
from conftest import ServiceProcess
from google.rpc import error_details_pb2, status_pb2

from forgerpc.clients import WeightStoreClient, weights
from forgerpc.clients.errors import ForgeRPCError
from forgerpc.clients.h2stream import H2Stream, split_address
from forgerpc.clients.weights import load_into, publish
from forgerpc.services.weight_store.backends.shm import reclaim_orphans

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch):
    """With one set, `wire="auto"` stays on grpcio (tested below); the other tests want the default."""
    for name in ("grpc_proxy", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


def read_exact(conn, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def read_frame(conn) -> tuple[int, int, int, bytes]:
    head = read_exact(conn, 9)
    return head[3], head[4], int.from_bytes(head[5:9], "big"), read_exact(conn, int.from_bytes(head[:3], "big"))


class ScriptedPeer:
    """Accepts one connection, reads the client's request (up to its END_STREAM), then sends
    `script(conn)`'s frames. Records every frame the client sent, in `received`."""

    def __init__(self, script):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.received: list[tuple[int, int, int, bytes]] = []
        self.script = script
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def read_frame(self, conn) -> tuple[int, int, int, bytes]:
        self.received.append(read_frame(conn))
        return self.received[-1]

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            assert read_exact(conn, 24) == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            while True:
                kind, flags, stream, _ = self.read_frame(conn)
                if kind == DATA and flags & 0x1:
                    break
            try:
                self.script(conn, self)
                conn.settimeout(2)
                while True:  # what the client sends after the script (acks), until it hangs up
                    self.read_frame(conn)
            except (EOFError, OSError):
                pass

    def close(self) -> None:
        self.listener.close()


def headers_block(fields) -> bytes:
    return hpack.Encoder().encode(fields)


OK_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def error_from(script) -> ForgeRPCError:
    """The error a call to a peer that plays `script` ends with."""
    peer = ScriptedPeer(script)
    try:
        with pytest.raises(ForgeRPCError) as e:
            read_all(peer.address)
    finally:
        peer.close()
    return e.value


def read_all(address: str, timeout: float = 5.0) -> list[bytes]:
    """Every message of a server-streaming call to `address`, through H2Stream."""
    stream = H2Stream(split_address(address), "/t.S/M", (("authorization", "Bearer x"),), timeout)
    try:
        stream.send_message([b"request"], end=True)
        out = []
        while (n := stream.next_message()) is not None:
            out.append(stream.read_bytes(n))
        return out
    finally:
        stream.close()


# -- against a scripted peer ------------------------------------------------------------------------
def test_padding_continuation_ping_and_one_byte_frames():
    body = [b"first message", bytes(range(256)) * 40]

    def script(conn, peer):
        conn.sendall(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 16384)))
        block = headers_block(OK_HEADERS)
        conn.sendall(frame(HEADERS, 0, 1, block[:3]) + frame(CONTINUATION, 0, 1, block[3:5])
                     + frame(CONTINUATION, 0x4, 1, block[5:]))
        conn.sendall(frame(PING, 0, 0, b"12345678"))
        wire = grpc_message(body[0]) + grpc_message(body[1])
        conn.sendall(frame(DATA, 0x8, 1, bytes([3]) + wire[:10] + b"pad"))  # PADDED, 3 bytes of padding
        for i in range(10, 40):
            conn.sendall(frame(DATA, 0, 1, wire[i:i + 1]))  # one byte per frame across a message border
        conn.sendall(frame(DATA, 0, 1, wire[40:]))
        trailers = headers_block([("grpc-status", "0")])
        conn.sendall(frame(HEADERS, 0x1 | 0x8 | 0x4, 1, bytes([2]) + trailers + b"\0\0"))  # padded trailers
        time.sleep(0.2)

    peer = ScriptedPeer(script)
    try:
        assert read_all(peer.address) == body
    finally:
        peer.close()
    peer.thread.join(5)
    sent = {(k, f) for k, f, _, _ in peer.received}
    assert (SETTINGS, 0x1) in sent  # the peer's SETTINGS acknowledged
    assert (PING, 0x1, 0, b"12345678") in peer.received  # the PING answered with its payload
    request_headers = dict(hpack.Decoder().decode(next(p for k, _, _, p in peer.received if k == HEADERS)))
    assert request_headers[":path"] == "/t.S/M" and request_headers["authorization"] == "Bearer x"
    assert request_headers["te"] == "trailers" and request_headers["grpc-timeout"].endswith("m")


def test_error_trailers_carry_code_message_and_error_info():
    info = error_details_pb2.ErrorInfo(reason="VERSION_UNKNOWN", metadata={"field": "version"})
    status = status_pb2.Status(code=5, message="no version 7")
    status.details.add().Pack(info)
    encoded = base64.b64encode(status.SerializeToString()).decode().rstrip("=")  # gRPC sends it unpadded

    def script(conn, peer):
        conn.sendall(frame(HEADERS, 0x4 | 0x1, 1, headers_block(
            OK_HEADERS + [("grpc-status", "5"), ("grpc-message", "no%20version%207"),
                          ("grpc-status-details-bin", encoded)])))  # trailers-only

    e = error_from(script)
    assert e.code == grpc.StatusCode.NOT_FOUND and e.message == "no version 7"
    assert e.reason == "VERSION_UNKNOWN" and e.details == {"field": "version"}


@pytest.mark.parametrize("ending, code", [
    (frame(RST_STREAM, 0, 1, struct.pack(">I", 0x2)), grpc.StatusCode.INTERNAL),
    (frame(RST_STREAM, 0, 1, struct.pack(">I", 0x8)), grpc.StatusCode.CANCELLED),
    (frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0x0)), grpc.StatusCode.UNAVAILABLE),
    (None, grpc.StatusCode.UNAVAILABLE),  # the connection just closes
    (frame(DATA, 0x1, 1, grpc_message(b"x")), grpc.StatusCode.INTERNAL),  # END_STREAM without trailers
    (frame(DATA, 0, 1, b"\x01" + struct.pack(">I", 1) + b"z"), grpc.StatusCode.INTERNAL),  # compressed
])
def test_broken_streams_become_status_codes(ending, code):
    def script(conn, peer):
        conn.sendall(frame(HEADERS, 0x4, 1, headers_block(OK_HEADERS)) + (ending or b""))
        if ending is None:
            conn.shutdown(socket.SHUT_RDWR)

    e = error_from(script)
    assert e.code == code, e


def test_http_errors_and_non_grpc_answers():
    def script(conn, peer):
        conn.sendall(frame(HEADERS, 0x4 | 0x1, 1, headers_block([(":status", "503")])))

    e = error_from(script)
    assert e.code == grpc.StatusCode.UNAVAILABLE and "503" in e.message

    def html(conn, peer):
        conn.sendall(frame(HEADERS, 0x4, 1, headers_block([(":status", "200"), ("content-type", "text/html")])))

    assert error_from(html).code == grpc.StatusCode.UNKNOWN


def test_a_silent_server_hits_the_deadline():
    peer = ScriptedPeer(lambda conn, peer: time.sleep(3))
    t = time.monotonic()
    with pytest.raises(ForgeRPCError) as e:
        read_all(peer.address, timeout=0.5)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t < 2.5
    peer.close()


def test_nobody_listening_is_unavailable():
    with socket.create_server(("127.0.0.1", 0)) as s:
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ForgeRPCError) as e:
        read_all(address)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_sends_wait_for_the_peers_window():
    """A 200 KiB message against a 16 KiB stream window and 4 KiB frames: the client sends only
    what each WINDOW_UPDATE allows, in frames no larger than the peer's SETTINGS_MAX_FRAME_SIZE."""
    sent_data: list[int] = []
    violations: list[str] = []

    def run(listener):
        conn, _ = listener.accept()
        with conn:
            read_exact(conn, 24)
            conn.sendall(frame(SETTINGS, 0, 0, struct.pack(">HIHI", 0x4, 16384, 0x5, 4096)))
            window, conn_window, body = 16384, 65535, b""
            while True:
                kind, flags, stream, payload = read_frame(conn)
                if kind != DATA:
                    continue
                sent_data.append(len(payload))
                if len(payload) > min(4096, window, conn_window):
                    violations.append(f"{len(payload)} bytes with windows {window}/{conn_window}")
                window, conn_window = window - len(payload), conn_window - len(payload)
                body += payload
                if window < 4096:  # the peer read what came, and hands out more
                    increment = struct.pack(">I", 20000)
                    conn.sendall(frame(8, 0, 0, increment) + frame(8, 0, 1, increment))
                    window, conn_window = window + 20000, conn_window + 20000
                if flags & 0x1:
                    break
            conn.sendall(frame(HEADERS, 0x4, 1, headers_block(OK_HEADERS))
                         + frame(DATA, 0, 1, grpc_message(struct.pack(">I", len(body))))
                         + frame(HEADERS, 0x5, 1, headers_block([("grpc-status", "0")])))
            time.sleep(0.2)

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=run, args=(listener,), daemon=True).start()
    stream = H2Stream(("127.0.0.1", listener.getsockname()[1]), "/t.S/Up", timeout=5)
    time.sleep(0.2)  # the peer's SETTINGS are in: before them the client may use the defaults (16 KiB)
    try:
        stream.send_message([b"a" * 100_000, memoryview(b"b" * 104_800)], end=True)
        n = stream.next_message()
        assert int.from_bytes(stream.read_bytes(n), "big") == 5 + 204_800  # prefix + body, all arrived
        assert stream.next_message() is None
    finally:
        stream.close()
        listener.close()
    assert not violations and max(sent_data) == 4096 and sum(sent_data) == 5 + 204_800


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:50061", ("127.0.0.1", 50061)), ("localhost:1", ("localhost", 1)), ("[::1]:7", ("::1", 7)),
    ("dns:///store:5", None), ("unix:/tmp/s", None), ("store", None), ("::1:7", None), ("h:port", None),
])
def test_split_address(address, expected):
    assert split_address(address) == expected


# -- against a real weight store ------------------------------------------------------------------
@pytest.fixture
def store():
    prefix = f"wsh2-{os.getpid()}"
    proc = ServiceProcess("weight_store", "retain_versions=2", f"shm_prefix={prefix}")
    yield proc
    proc.terminate()
    reclaim_orphans(prefix)


def big_state(n: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(1 << 20, generator=g) for i in range(n)}  # 4 MiB each


class Counting(H2Stream):
    calls: list[str] = []

    def __init__(self, endpoint, method, *args, **kwargs):
        Counting.calls.append(method.rsplit("/", 1)[1])
        super().__init__(endpoint, method, *args, **kwargs)


async def test_grpc_transfers_use_direct_streams_and_match_grpcio(store, monkeypatch):
    monkeypatch.setattr(weights, "H2Stream", Counting)
    Counting.calls = []
    src = big_state()
    async with WeightStoreClient(store.address) as client:
        await publish(client, src, 1, transport="grpc")
        direct = {k: torch.zeros_like(v) for k, v in src.items()}
        await load_into(client, direct, 1, transport="grpc", chunk_bytes=(1 << 20) + 3)  # messages split tensors
        assert Counting.calls == ["PutWeights", "GetWeights"]
        await publish(client, src, 2, transport="grpc", wire="grpcio")
        via_grpcio = {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in src.items()}
        await load_into(client, via_grpcio, 2, transport="grpc", wire="grpcio")
        assert Counting.calls == ["PutWeights", "GetWeights"]  # nothing more went direct
        cast = {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in src.items()}
        await load_into(client, cast, 1, transport="grpc", wire="direct")  # through the bounce buffer
    assert all(torch.equal(direct[k], v) for k, v in src.items())
    assert all(torch.equal(via_grpcio[k], v.bfloat16()) and torch.equal(cast[k], v.bfloat16()) for k, v in src.items())


async def test_a_proxy_variable_keeps_auto_on_grpcio(store, monkeypatch):
    """grpcio would tunnel through the proxy the environment names; the SDK's streams can't."""
    monkeypatch.setattr(weights, "H2Stream", Counting)
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # grpcio itself still goes straight to the store
    monkeypatch.setenv("no_grpc_proxy", "127.0.0.1")
    Counting.calls = []
    src = big_state(2)
    async with WeightStoreClient(store.address) as client:
        await publish(client, src, 1, transport="grpc")
        got = {k: torch.zeros_like(v) for k, v in src.items()}
        await load_into(client, got, 1, transport="grpc")
    assert Counting.calls == [] and all(torch.equal(got[k], v) for k, v in src.items())


async def test_auto_goes_direct_once_the_store_answered_over_grpc(store, monkeypatch):
    """A store on another host (another boot id): the first "auto" load learns it over grpcio,
    later ones read the stream directly."""
    monkeypatch.setattr(weights, "H2Stream", Counting)
    monkeypatch.setattr(weights, "host_id", lambda: "another-host")
    Counting.calls = []
    src = big_state(2)
    async with WeightStoreClient(store.address) as client:
        await publish(client, src, 1, transport="grpc", wire="grpcio")
        got = {k: torch.zeros_like(v) for k, v in src.items()}
        await load_into(client, got, 1)
        assert Counting.calls == [] and client._weights_over_grpc
        await load_into(client, got, 1)
        assert Counting.calls == ["GetWeights"]
    assert all(torch.equal(got[k], v) for k, v in src.items())


async def test_direct_errors_match_grpcio(store):
    async with WeightStoreClient(store.address) as client:
        errors = {}
        for wire in ("direct", "grpcio"):
            with pytest.raises(ForgeRPCError) as e:
                await load_into(client, {}, 12345, transport="grpc", wire=wire)
            errors[wire] = (e.value.code, e.value.reason, e.value.message, e.value.details, e.value.method)
        assert errors["direct"] == errors["grpcio"] and errors["direct"][0] == grpc.StatusCode.NOT_FOUND
        bad = {"a": torch.zeros(3)}
        for wire in ("direct", "grpcio"):  # a checksum the store recomputes differently: DATA_LOSS, nothing published
            with pytest.MonkeyPatch.context() as m:
                m.setattr(weights, "_checksum_header", lambda v, names, digests: weights.pb.PutWeightsRequest(
                    header=weights.pb.PutWeightsHeader(version=v, manifest=weights.common_pb2.TensorManifest(
                        tensors=[weights.common_pb2.TensorSpec(name=n, checksum=d ^ 1) for n, d in zip(names, digests)])
                    )).SerializeToString())
                with pytest.raises(ForgeRPCError) as e:
                    await publish(client, bad, 7, transport="grpc", wire=wire)
            assert e.value.code == grpc.StatusCode.DATA_LOSS and e.value.reason == "CHECKSUM_MISMATCH", wire
            with pytest.raises(ForgeRPCError) as e:
                await load_into(client, {"a": torch.zeros(3)}, 7, transport="grpc", wire=wire)
            assert e.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_store_killed_mid_load_is_unavailable_not_a_hang():
    prefix = f"wsh2kill-{os.getpid()}"
    proc = ServiceProcess("weight_store", "retain_versions=1", f"shm_prefix={prefix}")
    try:
        src = big_state(64)  # 256 MiB: the load takes long enough to be cut
        async with WeightStoreClient(proc.address, timeout=60) as client:
            await publish(client, src, 1, transport="grpc")
            got = {k: torch.zeros_like(v) for k, v in src.items()}
            load = asyncio.create_task(load_into(client, got, 1, transport="grpc", chunk_bytes=64 << 10))
            await asyncio.sleep(0.05)
            os.kill(proc.proc.pid, signal.SIGKILL)
            t = time.monotonic()
            with pytest.raises(ForgeRPCError) as e:
                await load
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t < 10
    finally:
        proc.terminate()
        reclaim_orphans(prefix)


async def test_a_cancelled_direct_load_stops_its_thread(store):
    src = big_state(64)
    async with WeightStoreClient(store.address, timeout=60) as client:
        await publish(client, src, 1, transport="grpc")
        got = {k: torch.zeros_like(v) for k, v in src.items()}
        load = asyncio.create_task(load_into(client, got, 1, transport="grpc", chunk_bytes=64 << 10))
        await asyncio.sleep(0.05)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        # The reader thread writes into `got`: load_into returns only once it has stopped.
        assert not any(_in_receive(f) for f in sys._current_frames().values())
        await load_into(client, got, 1, transport="grpc")  # the store serves the next load normally
    assert all(torch.equal(got[k], v) for k, v in src.items())


def _in_receive(frame_) -> bool:
    """Whether a thread's stack (its innermost frame) is inside the direct reader."""
    while frame_ is not None:
        if frame_.f_code.co_name == "_receive_direct":
            return True
        frame_ = frame_.f_back
    return False


# -- TLS: the store serving TLS + mutual TLS + a token, as deployed ------------------------------------
TOKEN_ENV = "FORGERPC_TEST_H2_TOKEN"


@pytest.fixture
def tls_store(tmp_path, monkeypatch):
    from forgerpc.orchestrator import certs
    certs.create(tmp_path, services=["weight_store"])
    prefix = f"wsh2tls-{os.getpid()}"
    proc = ServiceProcess("weight_store", "retain_versions=2", f"shm_prefix={prefix}",
                          f"server.auth.token_env={TOKEN_ENV}",
                          f"server.auth.tls_cert={tmp_path / 'weight_store.pem'}",
                          f"server.auth.tls_key={tmp_path / 'weight_store.key'}",
                          f"server.auth.tls_client_ca={tmp_path / 'ca.pem'}", env={TOKEN_ENV: "s3cret"})
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    yield proc, tmp_path
    proc.terminate()
    reclaim_orphans(prefix)


def tls_client(address: str, d, *, token: str = TOKEN_ENV, client_cert: bool = True) -> WeightStoreClient:
    from forgerpc.clients import ChannelSettings
    settings = ChannelSettings(token_env=token, tls_ca=str(d / "ca.pem"),
                               tls_cert=str(d / "client.pem") if client_cert else "",
                               tls_key=str(d / "client.key") if client_cert else "")
    return WeightStoreClient(address, settings=settings, timeout=20)


async def test_direct_streams_over_mutual_tls_with_a_token(tls_store, monkeypatch):
    proc, d = tls_store
    monkeypatch.setattr(weights, "H2Stream", Counting)
    Counting.calls = []
    src = big_state(3)
    async with tls_client(proc.address, d) as client:
        await publish(client, src, 1, transport="grpc")  # auto under TLS: uploads through grpcio
        await publish(client, src, 2, transport="grpc", wire="direct")
        got = {k: torch.zeros_like(v) for k, v in src.items()}
        await load_into(client, got, 1, transport="grpc", chunk_bytes=(1 << 20) + 3)
        assert Counting.calls == ["PutWeights", "GetWeights"]
        await load_into(client, got, 2, transport="grpc")
    assert all(torch.equal(got[k], v) for k, v in src.items())
    async with tls_client(proc.address, d, token="FORGERPC_TEST_H2_NO_TOKEN") as client:  # no token sent
        with pytest.raises(ForgeRPCError) as e:
            await load_into(client, got, 1, transport="grpc")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with tls_client(proc.address, d, client_cert=False) as client:  # mTLS: refused in the handshake
        with pytest.raises(ForgeRPCError) as e:
            await load_into(client, got, 1, transport="grpc")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    from forgerpc.orchestrator import certs
    certs.create(d / "other", services=["weight_store"])  # a CA that never signed the store's certificate
    async with tls_client(proc.address, d / "other") as client:
        with pytest.raises(ForgeRPCError) as e:
            await load_into(client, got, 1, transport="grpc")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "TLS" in e.value.message
