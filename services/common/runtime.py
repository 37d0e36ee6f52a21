"""The one way every forgerpc service is served.

A service module exposes a `ServiceDefinition`: its CLI name, its config model and a `create`
coroutine returning servicer objects (subclasses of the generated `XServiceServicer`). The runtime:

    parse bytes -> check auth (interceptor) -> server span -> servicer method -> map errors

* Requests arrive as raw bytes and are parsed here, so a body that is not a valid message gets
  INVALID_ARGUMENT (grpc's default would be INTERNAL) and the server stays up.
* `ServiceError` leaves as its canonical code + ErrorInfo; any other exception is logged and
  leaves as INTERNAL with no traceback for the caller.
* RPCs a servicer does not override answer UNIMPLEMENTED naming the issue that plans them.
* Health (grpc.health.v1) and reflection are always on; SIGTERM drains in-flight calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import sys
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from pydantic import field_validator

from forgerpc.clients.config import ClientConfig, Config
from forgerpc.clients.telemetry import exporter_names, setup_metrics, setup_tracing, shutdown_telemetry
from forgerpc.services.common import auth
from forgerpc.services.common.auth import AuthConfig
from forgerpc.services.common.errors import ServiceError, invalid_argument, unimplemented

log = logging.getLogger("forgerpc.runtime")
tracer = trace.get_tracer("forgerpc.services")


class ServerConfig(Config):
    """Network settings shared by every service (key `server` in a service's config)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port; the chosen one is printed on the READY line
    max_message_bytes: int = 512 * 1024 * 1024  # bulk tensors and big batches
    max_concurrent_rpcs: int | None = None
    grace_seconds: float = 4.0  # drain time on SIGTERM; stays under the 5 s contract
    # Exporters (comma-separated): "" (env FORGERPC_TRACES / FORGERPC_METRICS; else "otlp" when
    # OTEL_EXPORTER_OTLP_ENDPOINT is set; else none), "none", "console", "file:DIR", "otlp".
    traces: str = ""
    metrics: str = ""  # rpc.server.duration per method and status (clients/telemetry.py)
    auth: AuthConfig = AuthConfig()

    @field_validator("traces", "metrics")
    @classmethod
    def _known_exporters(cls, value: str, info):
        exporter_names(info.field_name, value)  # ValueError naming the unknown one
        return value


class ServiceConfig(Config):
    """Base of every service's config model."""

    server: ServerConfig = ServerConfig()
    # This service's own calls to other services (token / TLS), e.g. reward -> sandbox.
    client: ClientConfig = ClientConfig()


@dataclasses.dataclass
class ServiceDefinition:
    """What a service module exports as `SERVICE`.

    Attributes:
        name: CLI name, e.g. "reward".
        config_model: pydantic model of the service's config (a ServiceConfig).
        create: builds the servicers from a validated config.
        close: optional coroutine run after the server has drained.
        planned_in: for services not built yet, the issue that will build them.
    """

    name: str
    config_model: type[ServiceConfig]
    create: Callable[[Any], Awaitable[list[Any]]]
    close: Callable[[], Awaitable[None]] | None = None
    planned_in: str = ""


def generated_base(servicer: Any) -> type:
    """The generated `XServiceServicer` class a servicer derives from."""
    for cls in type(servicer).__mro__:
        if cls.__module__.startswith("forgerpc.v1.") and cls.__name__.endswith("Servicer"):
            return cls
    raise TypeError(f"{type(servicer).__name__} does not subclass a generated forgerpc.v1 Servicer")


def service_descriptor(servicer: Any) -> _descriptor.ServiceDescriptor:
    base = generated_base(servicer)
    pb2 = importlib.import_module(base.__module__.replace("_pb2_grpc", "_pb2"))
    return pb2.DESCRIPTOR.services_by_name[base.__name__.removesuffix("Servicer")]


def _parse(cls: type, raw: bytes):
    message = cls()
    try:
        message.ParseFromString(raw)
    except DecodeError as e:
        raise invalid_argument("(request body)", f"not a valid {cls.DESCRIPTOR.full_name}: {e}") from None
    return message


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    """Ends the call with the status `exc` maps to; never lets a traceback reach the caller."""
    if isinstance(exc, ServiceError):
        await context.abort_with_status(exc.to_status())
    log.exception("unexpected error in %s", method, exc_info=exc)
    error = ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error in {method}: {type(exc).__name__}")
    await context.abort_with_status(error.to_status())


def _follows_parent() -> bool:
    """Whether this process's sampler keeps a remote parent's decision (OTel's ParentBased, what
    `forgerpc run` configures): then a call whose caller did not sample its trace is not sampled here."""
    from opentelemetry.sdk.trace import sampling  # the SDK is installed with the runtime

    return isinstance(getattr(trace.get_tracer_provider(), "sampler", None), sampling.ParentBased)


@contextlib.contextmanager
def _attached(parent):
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


def _span(method: str, context: grpc.aio.ServicerContext, follows_parent: bool):
    """The call's server span, child of the caller's. When the caller's trace is not sampled and
    the sampler follows the parent, no span is made: the caller's context is only made current, so
    calls this one makes carry the same unsampled decision on (a NonRecordingSpan cost ~30 us)."""
    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    parent = propagate.extract(carrier)
    if follows_parent and "traceparent" in carrier:
        span_context = trace.get_current_span(parent).get_span_context()
        if span_context.is_valid and not span_context.trace_flags.sampled:
            return _attached(parent)
    return tracer.start_as_current_span(
        method, context=parent, kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": method},
    )


class _CallTimer:
    """Records each call's server-side duration in the histogram `rpc.server.duration` (ms, as
    OpenTelemetry's RPC conventions name it), by service, method and gRPC status code. Without a
    meter provider (no metrics exporter) the histogram is the API's no-op (~1 us a call)."""

    histogram = metrics.get_meter("forgerpc.services").create_histogram(
        "rpc.server.duration", unit="ms", description="duration of inbound gRPC calls, as the service saw them")

    def __init__(self, method: _descriptor.MethodDescriptor):
        base = {"rpc.system": "grpc", "rpc.service": method.containing_service.full_name, "rpc.method": method.name}
        self.attributes = {code: {**base, "rpc.grpc.status_code": code.value[0]} for code in grpc.StatusCode}

    @contextlib.contextmanager
    def __call__(self, context: grpc.aio.ServicerContext):
        start, code = time.perf_counter(), grpc.StatusCode.UNKNOWN
        try:
            yield
            code = context.code() or grpc.StatusCode.OK  # a handler may set a code without raising
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller left (GeneratorExit: mid-stream)
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.histogram.record((time.perf_counter() - start) * 1e3, self.attributes[code])


def _method_handler(servicer: Any, method: _descriptor.MethodDescriptor, planned_in: str) -> grpc.RpcMethodHandler:
    """Wraps one servicer method: parse, span, call, map errors. Shape follows the RPC's streaming."""
    name = f"/{method.containing_service.full_name}/{method.name}"
    request_cls = message_factory.GetMessageClass(method.input_type)
    fn = getattr(servicer, method.name)
    if getattr(type(servicer), method.name) is getattr(generated_base(servicer), method.name):
        error = unimplemented(method.containing_service.full_name, planned_in or "a later release")

        async def fn(request, _context):  # noqa: F811 - replaces the generated default
            if method.client_streaming:  # read the stream so that malformed input is reported as such
                async for _ in request:
                    pass
            raise error

        if method.server_streaming:
            unary = fn

            async def fn(request, context):  # noqa: F811
                await unary(request, context)
                yield

    async def parse_stream(raw_iterator: AsyncIterator[bytes]):
        async for raw in raw_iterator:
            yield _parse(request_cls, raw)

    # A servicer may take some requests as raw bytes (class attribute RAW_REQUESTS, method names):
    # the weight store parses its 4 MiB Put chunks without protobuf's copy of the bytes field.
    raw_requests = method.name in getattr(servicer, "RAW_REQUESTS", ())

    def request_of(raw):
        if raw_requests:
            return raw
        return parse_stream(raw) if method.client_streaming else _parse(request_cls, raw)

    serialize = lambda message: message.SerializeToString()  # noqa: E731
    follows_parent = _follows_parent()  # the tracer provider is set up before any servicer is made
    timed = _CallTimer(method)

    if method.server_streaming:
        async def handler(raw, context):
            with timed(context), _span(name, context, follows_parent):
                try:
                    async for response in fn(request_of(raw), context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status, never a crash
                    await _fail(context, name, exc)
    else:
        async def handler(raw, context):
            with timed(context), _span(name, context, follows_parent):
                try:
                    return await fn(request_of(raw), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _fail(context, name, exc)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return kind(handler, request_deserializer=None, response_serializer=serialize)


def generic_handler(servicer: Any, planned_in: str = "") -> tuple[str, grpc.GenericRpcHandler]:
    desc = service_descriptor(servicer)
    handlers = {m.name: _method_handler(servicer, m, planned_in) for m in desc.methods}
    return desc.full_name, grpc.method_handlers_generic_handler(desc.full_name, handlers)


class Server:
    """A running service: grpc.aio server + health + reflection + graceful stop."""

    def __init__(self, definition: ServiceDefinition, config: ServiceConfig):
        self.definition = definition
        self.config = config
        self.health = health_async.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._names: list[str] = []

    async def start(self) -> int:
        cfg = self.config.server
        options = [
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.aio.server(
            options=options,
            interceptors=auth.interceptors(cfg.auth),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        servicers = await self.definition.create(self.config)
        for servicer in servicers:
            name, handler = generic_handler(servicer, self.definition.planned_in)
            self._server.add_generic_rpc_handlers((handler,))
            self._names.append(name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*self._names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server,
        )
        address = f"{cfg.host}:{cfg.port}"
        credentials = auth.server_credentials(cfg.auth)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: address in use or not available")
        await self._server.start()
        for name in ["", *self._names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self) -> None:
        """Stops admitting calls (health NOT_SERVING), drains in-flight ones, closes the backend."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.config.server.grace_seconds)
        self._server = None
        if self.definition.close is not None:
            await self.definition.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(definition: ServiceDefinition, config: ServiceConfig) -> None:
    """Serves until SIGTERM/SIGINT, then drains and exits. Prints one READY line for launchers.

    With env FORGERPC_PROFILE=DIR the whole process runs under cProfile, written to
    DIR/<service>-<pid>.prof at exit (bench/pipeline.py --profile-services sets it)."""
    profile_dir = os.environ.get("FORGERPC_PROFILE")
    if not profile_dir:
        return await _serve(definition, config)
    import cProfile

    with cProfile.Profile() as prof:
        await _serve(definition, config)
    os.makedirs(profile_dir, exist_ok=True)
    prof.dump_stats(os.path.join(profile_dir, f"{definition.name}-{os.getpid()}.prof"))


async def _serve(definition: ServiceDefinition, config: ServiceConfig) -> None:
    try:
        setup_tracing(definition.name, config.server.traces)
        setup_metrics(definition.name, config.server.metrics)
    except ValueError as e:  # an unknown exporter in FORGERPC_TRACES / FORGERPC_METRICS
        print(f"forgerpc serve {definition.name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    server = Server(definition, config)
    port = await server.start()
    print(f"FORGERPC_READY {definition.name} {config.server.host}:{port} pid={os.getpid()}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("%s: stopping (draining up to %.1fs)", definition.name, config.server.grace_seconds)
    await server.stop()
    shutdown_telemetry()
    print(f"FORGERPC_STOPPED {definition.name}", file=sys.stderr, flush=True)
