"""The async client every typed facade derives from: deadlines, retries, typed errors.

A facade method is one line, e.g.

    async def evaluate(self, request=None, /, *, timeout=None, **fields) -> EvaluateResponse:
        return await self._unary("Evaluate", request, fields, timeout)

`request` may be the message itself or its fields as keywords. `timeout` is the deadline for the
whole call, retries included. Each retry adds 1 to the OpenTelemetry counter
`forgerpc.client.retries` (attributes `rpc.method`: the full path, `rpc.grpc.status_code`: the
code that was retried), so the failures the SDK absorbs stay visible.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterable, AsyncIterator, ClassVar, Iterable

import grpc
from google.protobuf import descriptor, descriptor_pb2, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import metrics

from forgerpc.clients.channel import ChannelSettings, open_channel
from forgerpc.clients.errors import ForgeRPCError
from forgerpc.clients.retry import NO_RETRY, RETRYABLE, RetryPolicy
from forgerpc.clients.telemetry import trace_metadata

_UNKNOWN = descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN
_retries = metrics.get_meter("forgerpc.clients").create_counter(
    "forgerpc.client.retries", description="calls the SDK retried, by method and the status that was retried")


def is_idempotent(method: descriptor.MethodDescriptor) -> bool:
    """True when the proto marks the RPC IDEMPOTENT or NO_SIDE_EFFECTS."""
    return method.GetOptions().idempotency_level != _UNKNOWN


class AsyncClient:
    """Base of the typed clients. One channel per client; reuse clients, they are cheap to share."""

    SERVICE: ClassVar[descriptor.ServiceDescriptor]

    def __init__(self, address: str, *, settings: ChannelSettings = ChannelSettings(),
                 timeout: float = 60.0, retry: RetryPolicy = RetryPolicy(),
                 channel: grpc.aio.Channel | None = None):
        self.address = address
        self.timeout = timeout
        self.retry = retry
        self._channel = channel or open_channel(address, settings)
        self._metadata = settings.metadata()
        # How to reach the service without grpcio (clients/h2stream.py: bulk weight streams); None
        # for a caller's channel, whose settings the SDK doesn't know.
        self._settings = settings if channel is None else None
        self._calls: dict[str, Any] = {}
        self._idempotent: dict[str, bool] = {}

    # -- plumbing -------------------------------------------------------------------------
    def _method(self, name: str) -> descriptor.MethodDescriptor:
        return self.SERVICE.methods_by_name[name]

    def _path(self, name: str) -> str:
        return f"/{self.SERVICE.full_name}/{name}"

    def _callable(self, name: str):
        if name not in self._calls:
            m = self._method(name)
            factory = {
                (False, False): self._channel.unary_unary,
                (False, True): self._channel.unary_stream,
                (True, False): self._channel.stream_unary,
                (True, True): self._channel.stream_stream,
            }[(m.client_streaming, m.server_streaming)]
            self._calls[name] = factory(
                self._path(name),
                request_serializer=lambda r: r.SerializeToString(),
                response_deserializer=message_factory.GetMessageClass(m.output_type).FromString,
            )
        return self._calls[name]

    def _request(self, name: str, request: Any, fields: dict) -> Any:
        if request is not None and fields:
            raise TypeError(f"{name}: pass either a request message or its fields, not both")
        if request is None:
            request = message_factory.GetMessageClass(self._method(name).input_type)(**fields)
        return request

    def _policy(self, name: str) -> RetryPolicy:
        """The retry policy of RPC `name`: the client's when the proto marks it idempotent."""
        idempotent = self._idempotent.get(name)
        if idempotent is None:  # looked up once per RPC: the descriptor's options are not free to read
            idempotent = self._idempotent[name] = is_idempotent(self._method(name))
        return self.retry if idempotent else NO_RETRY

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata + trace_metadata()

    def _count_retry(self, name: str, e: grpc.RpcError) -> None:
        _retries.add(1, {"rpc.method": self._path(name), "rpc.grpc.status_code": e.code().value[0]})

    def _error(self, name: str, e: grpc.RpcError) -> ForgeRPCError:
        return ForgeRPCError.from_rpc_error(e, self._path(name), self.address)

    async def _unary(self, name: str, request: Any, fields: dict, timeout: float | None) -> Any:
        request = self._request(name, request, fields)
        policy = self._policy(name)
        deadline = time.monotonic() + (timeout or self.timeout)
        call = self._callable(name)
        for attempt in range(policy.max_attempts):
            try:
                return await call(request, timeout=max(deadline - time.monotonic(), 0.001),
                                  metadata=self._call_metadata())
            except grpc.aio.AioRpcError as e:
                sleep = policy.delay(attempt)
                last = attempt + 1 >= policy.max_attempts or time.monotonic() + sleep >= deadline
                if e.code() not in RETRYABLE or last:
                    raise self._error(name, e) from None
                self._count_retry(name, e)
                await asyncio.sleep(sleep)
        raise AssertionError("unreachable")

    async def _server_stream(self, name: str, request: Any, fields: dict, timeout: float | None) -> AsyncIterator[Any]:
        """Yields responses. Retries (idempotent RPCs) only until the first message arrived."""
        request = self._request(name, request, fields)
        policy = self._policy(name)
        deadline = time.monotonic() + (timeout or self.timeout)
        for attempt in range(policy.max_attempts):
            received = False
            try:
                call = self._callable(name)(request, timeout=max(deadline - time.monotonic(), 0.001),
                                            metadata=self._call_metadata())
                async for response in call:
                    received = True
                    yield response
                return
            except grpc.aio.AioRpcError as e:
                sleep = policy.delay(attempt)
                last = attempt + 1 >= policy.max_attempts or time.monotonic() + sleep >= deadline
                if received or e.code() not in RETRYABLE or last:
                    raise self._error(name, e) from None
                self._count_retry(name, e)
                await asyncio.sleep(sleep)

    async def _client_stream(self, name: str, requests: AsyncIterable | Iterable, timeout: float | None) -> Any:
        """Sends a request stream once (a half-sent stream cannot be replayed safely)."""
        try:
            return await self._callable(name)(requests, timeout=timeout or self.timeout,
                                              metadata=self._call_metadata())
        except grpc.aio.AioRpcError as e:
            raise self._error(name, e) from None

    # -- lifecycle ------------------------------------------------------------------------
    async def health(self, service: str = "", timeout: float = 1.0) -> str:
        """The grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...); raises ForgeRPCError."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                        timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise ForgeRPCError.from_rpc_error(e, "/grpc.health.v1.Health/Check", self.address) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until the service reports SERVING; raises TimeoutError naming the address."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health(timeout=1.0) == "SERVING":
                    return
            except ForgeRPCError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.SERVICE.name} at {self.address} not SERVING after {timeout:g}s")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
