"""Authentication for services: a bearer-token interceptor and TLS/mTLS credentials.

Both are off by default (loopback development). Turn them on in a service's config:

    server:
      auth:
        token_env: FORGERPC_TOKEN      # the token itself never sits in a YAML file
        tls_cert: certs/reward.pem
        tls_key: certs/reward.key
        tls_client_ca: certs/ca.pem    # set => mutual TLS (clients must present a cert)
"""

from __future__ import annotations

import hmac
import os
import pathlib

import grpc

from forgerpc.clients.config import Config, ConfigError

# Health checks stay open so that load balancers and kubelets can probe without secrets.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class AuthConfig(Config):
    token_env: str = ""  # name of the env var holding the bearer token; empty = no token check
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""


def _token(cfg: AuthConfig) -> str:
    if not cfg.token_env:
        return ""
    token = os.environ.get(cfg.token_env, "")
    if not token:
        raise ConfigError(f"key 'server.auth.token_env': environment variable {cfg.token_env} is empty or unset")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls whose `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return handler
        return _deny_like(handler)


def _deny_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that fails with UNAUTHENTICATED."""

    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

    async def deny_stream(_request, context):
        await deny(_request, context)
        yield

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


def interceptors(cfg: AuthConfig) -> list[grpc.aio.ServerInterceptor]:
    token = _token(cfg)
    return [BearerTokenInterceptor(token)] if token else []


def _read(key: str, path: str) -> bytes:
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"key 'server.auth.{key}': file not found: {path}")
    return p.read_bytes()


def server_credentials(cfg: AuthConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; mutual TLS when a client CA is too."""
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError("keys 'server.auth.tls_cert' and 'server.auth.tls_key' must be set together")
    pair = (_read("tls_key", cfg.tls_key), _read("tls_cert", cfg.tls_cert))
    client_ca = _read("tls_client_ca", cfg.tls_client_ca) if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)
