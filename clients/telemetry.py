"""OpenTelemetry wiring shared by the SDK, the services and the apps: traces and metrics.

    setup_tracing("reward", "file:runs/x/traces")   # one JSON line per span, per process
    setup_tracing("grpo", "console")                 # pretty-printed to stderr
    setup_tracing("trainer", "otlp")                 # OTLP/gRPC to OTEL_EXPORTER_OTLP_ENDPOINT
    setup_metrics("reward", "file:runs/x/otel-metrics,otlp")  # several exporters: comma-separated

An empty exporter reads FORGERPC_TRACES / FORGERPC_METRICS; when those are unset too, a process
exports over OTLP if an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT, or the
signal's own OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / ..._METRICS_ENDPOINT), and nothing otherwise.
The OTLP exporter reads the rest of its settings (headers, TLS, timeout) from the standard
OTEL_EXPORTER_OTLP_* variables. Metrics are exported every OTEL_METRIC_EXPORT_INTERVAL ms
(default here 10,000) and once more at shutdown.

The SDK injects the current trace context (W3C `traceparent`) into every call's metadata and
the service runtime extracts it, so one trace follows a rollout across processes.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import sys
import threading
import time

from opentelemetry import metrics, propagate, trace

_configured = False
_metrics_configured = False
METRIC_EXPORT_INTERVAL_MS = 10_000  # the SDK's default is 60 s: a 5-minute run would get 5 points
# The last flush at shutdown may take this long at most: an unreachable OTLP collector held a
# service's SIGTERM exit for 15.7 s (the exporter's retries), against the runtime's 5 s contract.
SHUTDOWN_SECONDS = 1.0


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


def otlp_endpoint(signal: str) -> str:
    """The OTLP endpoint configured for `signal` ("traces" or "metrics"), or ""."""
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))


def exporter_names(signal: str, exporter: str = "") -> list[str]:
    """The exporters a process uses for `signal`: `exporter`, else env FORGERPC_<SIGNAL>, else
    ["otlp"] when an OTLP endpoint is configured, else none. Comma-separated; "none" is dropped."""
    source, value = "", exporter
    if not value:
        source, value = f" (env FORGERPC_{signal.upper()})", os.environ.get(f"FORGERPC_{signal.upper()}", "")
    if not value:
        value = "otlp" if otlp_endpoint(signal) else "none"
    names = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
    for name in names:
        if name not in ("console", "otlp") and not name.startswith("file:"):
            raise ValueError(f"unknown {signal} exporter '{name}'{source} (allowed: none, console, file:DIR, otlp; "
                             "several comma-separated)")
    return names


def _resource(service: str):
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": f"forgerpc-{service}"})


def setup_tracing(service: str, exporter: str = "") -> None:
    """Installs a tracer provider once per process (see the module docstring for `exporter`)."""
    global _configured
    names = exporter_names("traces", exporter)
    if _configured or not names:
        return
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=_resource(service), shutdown_on_exit=False)  # atexit: ours, bounded
    for name in names:
        if name == "console":
            span_exporter = ConsoleSpanExporter()
        elif name.startswith("file:"):
            span_exporter = _JsonLinesExporter(name[5:], service)
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            span_exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    atexit.register(shutdown_tracing)


def _shutdown(providers: list, seconds: float) -> bool:
    """Calls each provider's shutdown (flush + stop) in its own daemon thread and waits at most
    `seconds` in all; True when every one finished. What has not been sent by then is dropped."""
    threads = [threading.Thread(target=p.shutdown, name="otel-shutdown", daemon=True)
               for p in providers if hasattr(p, "shutdown") and not getattr(p, "_forgerpc_stopped", False)]
    for p in providers:
        if hasattr(p, "shutdown"):
            p._forgerpc_stopped = True  # once: the atexit hook finds it done
    deadline = time.monotonic() + seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0))
    return not any(t.is_alive() for t in threads)


def shutdown_tracing(seconds: float = SHUTDOWN_SECONDS) -> bool:
    """Exports the spans still buffered, then stops; at most `seconds` (see SHUTDOWN_SECONDS)."""
    return _shutdown([trace.get_tracer_provider()], seconds)


def setup_metrics(service: str, exporter: str = "") -> None:
    """Installs a meter provider once per process; instruments made earlier through
    `metrics.get_meter` start recording. File exporter: DIR/<service>-<pid>.jsonl, one line per
    export (the SDK's MetricsData as JSON: cumulative sums, histograms, last gauge values)."""
    global _metrics_configured
    names = exporter_names("metrics", exporter)
    if _metrics_configured or not names:
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    interval = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", METRIC_EXPORT_INTERVAL_MS))
    readers = []
    for name in names:
        if name == "console":
            metric_exporter = ConsoleMetricExporter(out=sys.stderr)
        elif name.startswith("file:"):
            path = pathlib.Path(name[5:])
            path.mkdir(parents=True, exist_ok=True)
            out = open(path / f"{service}-{os.getpid()}.jsonl", "a")
            metric_exporter = ConsoleMetricExporter(out=out, formatter=lambda data: data.to_json(indent=None) + "\n")
        else:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            metric_exporter = OTLPMetricExporter()
        readers.append(PeriodicExportingMetricReader(metric_exporter, export_interval_millis=interval))
    metrics.set_meter_provider(MeterProvider(resource=_resource(service), metric_readers=readers,
                                             shutdown_on_exit=False))
    _metrics_configured = True
    atexit.register(shutdown_metrics)


def shutdown_metrics(seconds: float = SHUTDOWN_SECONDS) -> bool:
    """Exports what was recorded since the last export, then stops; at most `seconds`."""
    return _shutdown([metrics.get_meter_provider()], seconds)


def shutdown_telemetry(seconds: float = SHUTDOWN_SECONDS) -> bool:
    """Both signals at once, within `seconds` together (services call it after draining)."""
    return _shutdown([trace.get_tracer_provider(), metrics.get_meter_provider()], seconds)


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's context as gRPC metadata (empty when no span is recording)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())
