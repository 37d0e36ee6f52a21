"""Channels to forgerpc services: message-size limits, TLS/mTLS and bearer tokens."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import ssl

import grpc

MAX_MESSAGE_BYTES = 512 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ChannelSettings:
    """How to reach a service. Empty fields mean: plaintext, no token.

    Attributes:
        token_env: env var holding the bearer token sent as `authorization: Bearer <token>`.
        tls_ca: CA bundle that signed the server's certificate (turns TLS on).
        tls_cert, tls_key: the client's own certificate, for mutual TLS.
        server_name: overrides the TLS host name checked against the certificate.
    """

    token_env: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    server_name: str = ""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = os.environ.get(self.token_env, "") if self.token_env else ""
        return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(address: str, settings: ChannelSettings = ChannelSettings()) -> grpc.aio.Channel:
    """An asyncio channel to `address` ("host:port")."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Fail fast on a dead replica so the group can route around it.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    if not settings.tls_ca:
        return grpc.aio.insecure_channel(address, options=options)
    read = lambda p: pathlib.Path(p).read_bytes() if p else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(settings.tls_ca),
        private_key=read(settings.tls_key),
        certificate_chain=read(settings.tls_cert),
    )
    return grpc.aio.secure_channel(address, credentials, options=options)


def ssl_context(settings: ChannelSettings) -> ssl.SSLContext | None:
    """The TLS settings of `open_channel` as an ssl.SSLContext (ALPN h2), for the SDK's own HTTP/2
    streams (clients/h2stream.py); None for a plaintext channel."""
    if not settings.tls_ca:
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca)
    if settings.tls_cert:
        context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    context.set_alpn_protocols(["h2"])
    return context
