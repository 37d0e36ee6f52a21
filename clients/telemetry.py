"""OpenTelemetry wiring shared by the SDK, the services and the apps.

    setup_tracing("reward", "file:runs/x/traces")   # one JSON line per span, per process
    setup_tracing("grpo", "console")                 # pretty-printed to stderr
    setup_tracing("trainer", "otlp")                 # OTEL_EXPORTER_OTLP_ENDPOINT (needs the exporter package)

The SDK injects the current trace context (W3C `traceparent`) into every call's metadata and
the service runtime extracts it, so one trace follows a rollout across processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading

from opentelemetry import propagate, trace

_configured = False


class _JsonLinesExporter:
    """Appends finished spans as JSON lines to DIR/<service>-<pid>.jsonl."""

    def __init__(self, directory: str, service: str):
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._file = open(path / f"{service}-{os.getpid()}.jsonl", "a")
        self._lock = threading.Lock()

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            for span in spans:
                self._file.write(span.to_json(indent=None) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def setup_tracing(service: str, exporter: str = "") -> None:
    """Installs a tracer provider once per process. `exporter`: "", "none", "console",
    "file:DIR" or "otlp"; empty reads FORGERPC_TRACES (default: none, i.e. no-op tracing)."""
    global _configured
    exporter = exporter or os.environ.get("FORGERPC_TRACES", "none")
    if _configured or exporter == "none":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter.startswith("file:"):
        span_exporter = _JsonLinesExporter(exporter[5:], service)
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("exporter 'otlp' needs: pip install opentelemetry-exporter-otlp") from None
        span_exporter = OTLPSpanExporter()
    else:
        raise ValueError(f"unknown trace exporter '{exporter}' (allowed: none, console, file:DIR, otlp)")
    provider = TracerProvider(resource=Resource.create({"service.name": f"forgerpc-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _configured = True


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's context as gRPC metadata (empty when no span is recording)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())
