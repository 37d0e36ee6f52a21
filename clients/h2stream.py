"""A gRPC call spoken straight over a socket, so bulk bytes leave and land where they belong.

grpcio hands each received message to Python as a new `bytes` object, assembled first in a
bytearray (ReceiveMessageOperation.un_c): after the kernel's copy every byte is copied three more
times (gRPC core's slice, the bytearray, the bytes) before the caller copies it a fourth time
into its tensors, and a reader holds two messages at once. For the weight store's GetWeights
stream that was most of a load's CPU time and twice a chunk of memory.

Sending is the mirror image: grpcio takes each request as one `bytes`, so a message made of
tensor slices is first joined (a copy) and then copied again into gRPC core's slice.

`H2Stream` speaks the same protocol (gRPC over HTTP/2, grpc/doc/PROTOCOL-HTTP2.md; RFC 9113) on
a blocking socket: the caller hands `send_message` a list of buffers (tensor memory, no copy: the
kernel's `sendmsg` gathers them) and `recv_into`s the memory a received message's bytes are meant
for, so the kernel's copy is the only one each way. Deliberately small:

* one call per connection: h2c with prior knowledge (plaintext), or TLS (ALPN "h2") from an
  `ssl.SSLContext` (clients/channel.py `ssl_context`: the channel's CA, client certificate and
  name override); TLS can't gather buffers in one `sendmsg`, so each is written on its own;
* the client sends all of its messages before it reads the response (unary or client-streaming
  requests, any response): a response that arrives before the request ended is an error unless
  it is the call's final status;
* identity encoding only (we never ask for compression; a compressed message is an error);
* flow control: a 64 MiB receive window, topped up every 16 MiB read (a real network's
  bandwidth-delay product fits; on loopback the socket buffer, not the window, paces the server);
  sends wait for the peer's window (WINDOW_UPDATE, SETTINGS_INITIAL_WINDOW_SIZE) and respect its
  SETTINGS_MAX_FRAME_SIZE;
* control frames answered as RFC 9113 asks: SETTINGS and PING acknowledged, GOAWAY and
  RST_STREAM turned into errors, everything else skipped.

Every failure is a `ForgeRPCError` with the code grpcio would report: the server's status and
ErrorInfo from the trailers, UNAVAILABLE for a refused or dropped connection, DEADLINE_EXCEEDED
when the deadline passes, INTERNAL for a protocol violation. Blocking calls: run it in a thread
(`close()` from another thread wakes a blocked read). Standard library + hpack; no torch.
"""

from __future__ import annotations

import base64
import select
import socket
import ssl
import struct
import time
import urllib.parse

import grpc
import hpack

from forgerpc.clients.errors import ForgeRPCError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 5, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
STREAM = 1  # the connection's only stream
WINDOW = 64 << 20  # receive window, stream and connection
TOP_UP = 16 << 20  # WINDOW_UPDATE after this many bytes read
MAX_FRAME = (1 << 24) - 1  # the largest DATA frame we accept: fewer frame headers to read
IOV_BATCH = 512  # buffers per sendmsg (Linux takes up to 1024)
_HTTP_TO_GRPC = {400: grpc.StatusCode.INTERNAL, 401: grpc.StatusCode.UNAUTHENTICATED,
                 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
                 429: grpc.StatusCode.UNAVAILABLE, 502: grpc.StatusCode.UNAVAILABLE,
                 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.UNAVAILABLE}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _frame_head(kind: int, flags: int, stream: int, size: int) -> bytes:
    return struct.pack(">I", size)[1:] + bytes((kind, flags)) + struct.pack(">I", stream)


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _frame_head(kind, flags, stream, len(payload)) + payload


def split_address(address: str) -> tuple[str, int] | None:
    """("host", port) of a plain "host:port" / "[v6]:port" address; None for anything grpcio
    resolves itself (dns:///, unix:, ipv4:, lists), which the caller then leaves to grpcio."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host or (":" in host and not host.startswith("[")):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    return host, int(port)


class H2Stream:
    """One gRPC call on its own connection.

        call = H2Stream(("127.0.0.1", 50061), "/pkg.Service/Method", metadata, timeout=30.0)
        call.send_message([request_bytes]); call.end()      # or several messages, then end()
        while (n := call.next_message()) is not None:       # n = the message's length
            call.read_into(memoryview_of_n_bytes)           # or read_bytes(n), in pieces as you like
        call.close()
    """

    def __init__(self, endpoint: tuple[str, int], method: str,
                 metadata: tuple[tuple[str, str], ...] = (), timeout: float = 60.0, address: str = "",
                 tls: ssl.SSLContext | None = None, server_name: str = ""):
        self.method, self.address = method, address or f"{endpoint[0]}:{endpoint[1]}"
        self._deadline = time.monotonic() + timeout
        self._frame_left = 0  # DATA payload bytes of the current frame still to read (padding excluded)
        self._pad_left = 0  # its padding, read and dropped after the payload
        self._last_data = False  # the current DATA frame carries END_STREAM
        self._msg_left = 0  # bytes of the current gRPC message still to read
        self._unacked = 0  # bytes read since the last WINDOW_UPDATE
        self._headers_seen = False
        self._done = False  # trailers read: the stream is over
        self._ended = False  # END_STREAM sent
        # What the peer lets us send (RFC 9113 6.9): its defaults until its SETTINGS arrive.
        self._window, self._stream_window, self._peer_initial, self._peer_frame = 65535, 65535, 65535, 16384
        self._small = bytearray(16)
        self._decoder = hpack.Decoder()
        self._tls = tls is not None
        try:
            self._sock = socket.create_connection(endpoint, timeout=timeout)
        except socket.timeout:
            raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except OSError as e:
            raise self._fail(grpc.StatusCode.UNAVAILABLE, f"failed to connect to {self.address}: {e}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                self._sock = tls.wrap_socket(self._sock, server_hostname=server_name or endpoint[0])
            except (OSError, ValueError) as e:  # handshake refused, certificate not trusted, timeout
                self._sock.close()
                raise self._fail(grpc.StatusCode.UNAVAILABLE, f"TLS handshake with {self.address} failed: {e}") from None
            if self._sock.selected_alpn_protocol() != "h2":
                self.close()
                raise self._fail(grpc.StatusCode.UNAVAILABLE, f"{self.address} did not agree to HTTP/2 (ALPN h2)")
        headers = [(":method", "POST"), (":scheme", "https" if tls is not None else "http"), (":path", method),
                   (":authority", self.address),
                   ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", "forgerpc-h2stream"),
                   ("grpc-accept-encoding", "identity"),
                   ("grpc-timeout", f"{min(int(timeout * 1000), 99_999_999)}m"), *metadata]
        settings = struct.pack(">HIHIHI", 0x2, 0, 0x4, WINDOW, 0x5, MAX_FRAME)  # no push, window, frame size
        self._send(PREFACE + _frame(SETTINGS, 0, 0, settings)
                   + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WINDOW - 65535))
                   + _frame(HEADERS, END_HEADERS, STREAM, hpack.Encoder().encode(headers)))

    # -- sending ------------------------------------------------------------------------------
    def send_message(self, pieces: list, end: bool = False) -> None:
        """Sends one message made of `pieces` (bytes-like: bytes, memoryviews of tensors), uncopied;
        `end`: it is the request's last message (its last frame carries END_STREAM)."""
        views = [memoryview(p).cast("B") for p in pieces if len(p)]
        size = sum(len(v) for v in views)
        views.insert(0, memoryview(b"\x00" + struct.pack(">I", size)))
        if not self._frame_left:
            self._read_control(block=False)  # the peer's SETTINGS may have come: its limits apply
        batch: list = []  # frame headers and payload slices for one sendmsg
        while views:
            while min(self._window, self._stream_window) <= 0:
                if self._frame_left:  # the response began: its bytes stand before any WINDOW_UPDATE
                    raise self._fail(grpc.StatusCode.INTERNAL, "the server answered before the request ended")
                self._read_control(block=True)
            room = min(self._window, self._stream_window, self._peer_frame)
            payload, taken = [], 0
            while views and taken < room:
                v = views[0]
                k = min(len(v), room - taken)
                payload.append(v[:k])
                taken += k
                if k == len(v):
                    views.pop(0)
                else:
                    views[0] = v[k:]
            last = end and not views
            batch.append(_frame_head(DATA, END_STREAM if last else 0, STREAM, taken))
            self._ended = self._ended or last
            batch.extend(payload)
            self._window -= taken
            self._stream_window -= taken
            if len(batch) >= IOV_BATCH or not views or min(self._window, self._stream_window) <= 0:
                self._sendmsg(batch)
                batch = []
                if not self._frame_left:
                    self._read_control(block=False)

    def end(self) -> None:
        """Ends the request stream (an empty DATA frame with END_STREAM)."""
        if not self._ended:
            self._ended = True
            self._send(_frame(DATA, END_STREAM, STREAM))

    # -- the caller's side ------------------------------------------------------------------
    def next_message(self) -> int | None:
        """Length of the next message (its bytes are read next), or None once the call ended OK.

        Raises ForgeRPCError when the call ended with a non-OK status, or the previous message
        was not read to its end.
        """
        if self._msg_left:
            raise ValueError(f"{self._msg_left} bytes of the previous message are unread")
        self.end()
        if self._frame_left == 0 and not self._next_data_frame():
            return None
        prefix = memoryview(self._small)[:5]
        self._msg_left = 5
        self.read_into(prefix)
        if prefix[0] != 0:
            raise self._fail(grpc.StatusCode.INTERNAL, "compressed message received; none was asked for")
        self._msg_left = int.from_bytes(prefix[1:5], "big")
        return self._msg_left

    def read_into(self, view: memoryview) -> None:
        """Fills `view` (writable, bytes) with the next len(view) bytes of the current message."""
        n = len(view)
        if n > self._msg_left:
            raise ValueError(f"read of {n} bytes past the message's end ({self._msg_left} left)")
        filled = 0
        while filled < n:
            if self._frame_left == 0 and not self._next_data_frame():
                raise self._fail(grpc.StatusCode.INTERNAL, "the stream ended inside a message")
            k = min(self._frame_left, n - filled)
            self._recv_into(view[filled:filled + k])
            filled += k
            self._frame_left -= k
            if self._frame_left == 0:
                self._end_frame()
        self._msg_left -= n

    def read_bytes(self, n: int) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        """Drops the connection (the server sees the call cancelled unless it had ended)."""
        try:  # wakes a recv blocked in another thread (the plain socket's shutdown, also under TLS)
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    # -- frames -----------------------------------------------------------------------------
    def _next_data_frame(self) -> bool:
        """Reads frames up to the next DATA payload of our stream (True) or its trailers (False)."""
        while not self._done:
            if self._last_data:  # END_STREAM on DATA: the server left out the trailers
                raise self._fail(grpc.StatusCode.INTERNAL, "the stream ended without trailers")
            size, kind, flags, stream = self._read_head()
            if kind == DATA and stream == STREAM:
                self._start_data(size, flags)
                if self._frame_left > 0:
                    return True
                continue
            self._control(kind, flags, stream, self._recv_small(size))
        return False

    def _start_data(self, size: int, flags: int) -> None:
        """A DATA frame of our stream begins: its payload is next on the socket (none: done with it)."""
        pad = self._recv_small(1)[0] if flags & PADDED else 0
        self._frame_left, self._pad_left = size - pad - (1 if flags & PADDED else 0), pad
        self._last_data = bool(flags & END_STREAM)
        self._unacked += size
        if self._frame_left <= 0:
            self._frame_left = 0
            self._end_frame()

    def _control(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        """Acts on a frame other than our stream's DATA."""
        if kind == HEADERS and stream == STREAM:
            self._on_headers(payload, flags)
        elif kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HI", payload, i)
                if key == 0x4:  # INITIAL_WINDOW_SIZE: open streams' windows move by the change
                    self._stream_window += value - self._peer_initial
                    self._peer_initial = value
                elif key == 0x5:
                    self._peer_frame = value
            self._send(_frame(SETTINGS, ACK, 0))
        elif kind == WINDOW_UPDATE and len(payload) == 4:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream == 0:
                self._window += increment
            elif stream == STREAM:
                self._stream_window += increment
        elif kind == PING and not flags & ACK:
            self._send(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM and stream == STREAM:
            code = int.from_bytes(payload[:4], "big")
            raise self._fail(grpc.StatusCode.CANCELLED if code == 0x8 else grpc.StatusCode.UNAVAILABLE
                             if code == 0x7 else grpc.StatusCode.INTERNAL, f"stream reset by the server (HTTP/2 error {code})")
        elif kind == GOAWAY:
            last, code = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big")
            if last < STREAM:  # our stream was never processed
                raise self._fail(grpc.StatusCode.UNAVAILABLE, f"the server is going away (HTTP/2 error {code})")
        elif kind == PUSH_PROMISE:
            raise self._fail(grpc.StatusCode.INTERNAL, "PUSH_PROMISE received with push disabled")
        # PRIORITY, unknown kinds: nothing to do

    def _read_control(self, block: bool) -> None:
        """While sending: reads the frames waiting (with `block`, at least one, up to the deadline).

        Stops at the response's first DATA frame (gRPC servers may answer as soon as a request
        message is in): its payload is left for next_message, sending goes on while the window lasts.
        """
        while block or (self._tls and self._sock.pending()) or select.select([self._sock], [], [], 0)[0]:
            block = False
            size, kind, flags, stream = self._read_head()
            if kind == DATA and stream == STREAM:
                self._start_data(size, flags)
                if self._frame_left:
                    return
                continue
            self._control(kind, flags, stream, self._recv_small(size))
            if self._done and not self._ended:  # trailers with an OK status before our request ended
                raise self._fail(grpc.StatusCode.INTERNAL, "the call ended before the request did")

    def _end_frame(self) -> None:
        """The current DATA frame is read: drop its padding, return its bytes to the window."""
        if self._pad_left:
            self._recv_small(self._pad_left)
            self._pad_left = 0
        if self._unacked >= TOP_UP:
            increment = struct.pack(">I", self._unacked)
            self._send(_frame(WINDOW_UPDATE, 0, 0, increment) + _frame(WINDOW_UPDATE, 0, STREAM, increment))
            self._unacked = 0

    def _on_headers(self, payload: bytes, flags: int) -> None:
        if flags & PADDED:
            payload = payload[1:len(payload) - payload[0]]
        if flags & PRIORITY:
            payload = payload[5:]
        block = bytearray(payload)
        while not flags & END_HEADERS:  # CONTINUATION frames follow, with nothing in between
            size, kind, flags, _ = self._read_head()
            if kind != CONTINUATION:
                raise self._fail(grpc.StatusCode.INTERNAL, f"frame type {kind} inside a header block")
            block += self._recv_small(size)
        fields = dict(self._decoder.decode(bytes(block)))
        if not self._headers_seen:
            self._headers_seen = True
            status = fields.get(":status", "")
            if status != "200":
                code = _HTTP_TO_GRPC.get(int(status) if status.isdigit() else 0, grpc.StatusCode.UNKNOWN)
                raise self._fail(code, f"HTTP status {status or '(none)'} from {self.address}")
            if not fields.get("content-type", "").startswith("application/grpc"):
                raise self._fail(grpc.StatusCode.UNKNOWN, f"content-type {fields.get('content-type')!r} is not gRPC")
            if not flags & END_STREAM:
                return
        elif not flags & END_STREAM:
            raise self._fail(grpc.StatusCode.INTERNAL, "a second header block without END_STREAM")
        self._done = True  # trailers (or a trailers-only response)
        code = _CODES.get(int(fields.get("grpc-status", "2")) if fields.get("grpc-status", "").isdigit() else 2,
                          grpc.StatusCode.UNKNOWN)
        if code is not grpc.StatusCode.OK:
            details = fields.get("grpc-status-details-bin", "")
            raise ForgeRPCError.from_status(
                code, urllib.parse.unquote(fields.get("grpc-message", "")),
                base64.b64decode(details + "=" * (-len(details) % 4)) if details else b"", self.method, self.address)

    # -- socket -----------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            try:
                self._sock.settimeout(left)
                k = self._sock.recv_into(view[got:], n - got)
            except socket.timeout:
                raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except OSError as e:
                raise self._fail(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} lost: {e}") from None
            if k == 0:
                raise self._fail(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} closed mid-call")
            got += k

    def _read_head(self) -> tuple[int, int, int, int]:
        """The next frame's (payload size, type, flags, stream id)."""
        head = self._recv_small(9)
        return int.from_bytes(head[:3], "big"), head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF

    def _recv_small(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _sendmsg(self, buffers: list) -> None:
        """Sends every buffer, in order, gathered by the kernel (partial sends resumed)."""
        try:
            self._sock.settimeout(max(self._deadline - time.monotonic(), 0.001))
            if self._tls:  # an SSLSocket has no sendmsg: each buffer becomes its own TLS records
                for buffer in buffers:
                    self._sock.sendall(buffer)
                return
            while buffers:
                sent = self._sock.sendmsg(buffers)
                while buffers and sent >= len(buffers[0]):
                    sent -= len(buffers.pop(0))
                if sent:
                    buffers[0] = memoryview(buffers[0])[sent:]
        except socket.timeout:
            raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except OSError as e:
            raise self._fail(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} lost: {e}") from None

    def _send(self, data: bytes) -> None:
        try:
            self._sock.settimeout(max(self._deadline - time.monotonic(), 0.001))
            self._sock.sendall(data)
        except socket.timeout:
            raise self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except OSError as e:
            raise self._fail(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} lost: {e}") from None

    def _fail(self, code: grpc.StatusCode, message: str) -> ForgeRPCError:
        return ForgeRPCError(code, code.name, message, method=self.method, address=self.address)
