"""One trace follows a call across processes: client span -> server span (W3C traceparent)."""

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import grpc
import pytest

from conftest import ROOT


def _client_spans(serve_process, tmp_path, body: str) -> list[dict]:
    """Runs `body` (the inside of `async with RewardClient(...) as reward:`, `items` at hand) in a
    client process that traces to files, next to a reward service that does too; returns all spans."""
    traces = tmp_path / "traces"
    proc = serve_process("reward", env={"FORGERPC_TRACES": f"file:{traces}"})
    client = textwrap.dedent("""
        import asyncio
        from opentelemetry import context, trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
        from forgerpc.clients import RewardClient
        from forgerpc.clients.telemetry import setup_tracing, shutdown_tracing
        from forgerpc.v1.reward_pb2 import RewardItem

        async def main():
            setup_tracing("client", "file:TRACES")
            items = [RewardItem(response="a", target="a")]
            async with RewardClient("ADDRESS") as reward:
        BODY
            shutdown_tracing()

        asyncio.run(main())
    """).replace("TRACES", str(traces)).replace("ADDRESS", proc.address).replace(
        "BODY", textwrap.indent(textwrap.dedent(body), " " * 8))
    subprocess.run([sys.executable, "-c", client], check=True, timeout=60)
    proc.terminate()  # flushes the server's spans
    return [json.loads(line) for f in traces.glob("*.jsonl") for line in f.read_text().splitlines()]


def test_trace_context_crosses_process_boundary(serve_process, tmp_path):
    spans = _client_spans(serve_process, tmp_path, """
        with trace.get_tracer("test").start_as_current_span("rollout"):
            await reward.evaluate(items=items)
    """)
    rollout = next(s for s in spans if s["name"] == "rollout")
    server = next(s for s in spans if s["name"] == "/forgerpc.v1.RewardService/Evaluate")
    assert server["context"]["trace_id"] == rollout["context"]["trace_id"]
    assert server["parent_id"] == rollout["context"]["span_id"]
    assert server["kind"] == "SpanKind.SERVER"


def test_unsampled_trace_makes_no_server_span_and_a_sampled_one_does(serve_process, tmp_path):
    # The runtime skips the server span when the caller did not sample its trace (the default
    # sampler follows the parent); a sampled caller still gets its child span.
    spans = _client_spans(serve_process, tmp_path, """
        unsampled = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(0))
        token = context.attach(trace.set_span_in_context(NonRecordingSpan(unsampled)))
        await reward.evaluate(items=items)
        context.detach(token)
        with trace.get_tracer("test").start_as_current_span("rollout"):
            await reward.evaluate(items=items)
    """)
    rollout = next(s for s in spans if s["name"] == "rollout")
    servers = [s for s in spans if s["name"] == "/forgerpc.v1.RewardService/Evaluate"]
    assert [s["context"]["trace_id"] for s in servers] == [rollout["context"]["trace_id"]]


# -- metrics --------------------------------------------------------------------------------

def _reward_calls(address: str) -> None:
    """Three Evaluate calls that succeed and one that is INVALID_ARGUMENT (no items)."""
    from forgerpc.clients import ForgeRPCError, RewardClient
    from forgerpc.v1.reward_pb2 import RewardItem

    async def main():
        async with RewardClient(address) as reward:
            for _ in range(3):
                await reward.evaluate(items=[RewardItem(response="a", target="a")])
            try:
                await reward.evaluate(items=[])
            except ForgeRPCError:
                pass

    asyncio.run(main())


def _durations(resource_metrics) -> dict[tuple[str, int], int]:
    """(rpc.method, status code) -> call count, from the rpc.server.duration histogram
    (cumulative: the newest export holds every call)."""
    out = {}
    for scope in resource_metrics["scope_metrics"]:
        for metric in scope["metrics"]:
            if metric["name"] == "rpc.server.duration":
                assert metric["unit"] == "ms"
                for point in metric["data"]["data_points"]:
                    a = point["attributes"]
                    assert a["rpc.system"] == "grpc" and a["rpc.service"] == "forgerpc.v1.RewardService"
                    out[(a["rpc.method"], a["rpc.grpc.status_code"])] = point["count"]
    return out


def test_service_exports_rpc_durations_to_a_file_at_shutdown(serve_process, tmp_path):
    # No periodic export in the test's time: what is in the file was flushed by the SIGTERM path.
    proc = serve_process("reward", env={"FORGERPC_METRICS": f"file:{tmp_path / 'm'}",
                                        "OTEL_METRIC_EXPORT_INTERVAL": "600000"})
    _reward_calls(proc.address)
    assert proc.terminate() < 5.0
    [file] = (tmp_path / "m").glob("reward-*.jsonl")
    exports = [json.loads(line) for line in file.read_text().splitlines()]
    [resource] = exports[-1]["resource_metrics"]
    assert resource["resource"]["attributes"]["service.name"] == "forgerpc-reward"
    assert _durations(resource) == {("Evaluate", 0): 3, ("Evaluate", 3): 1}


class _Collector:
    """A minimal OTLP/gRPC collector (the opentelemetry-proto services) that keeps what arrives."""

    def __init__(self):
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans, self.metrics = [], []
        collector = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector.spans.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                collector.metrics.append(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_otlp_endpoint_alone_sends_spans_and_metrics_to_the_collector(serve_process):
    """With only OTEL_EXPORTER_OTLP_ENDPOINT set (no FORGERPC_TRACES / FORGERPC_METRICS), a
    service exports both signals over OTLP/gRPC."""
    collector = _Collector()
    try:
        proc = serve_process("reward", env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
                                            "FORGERPC_TRACES": "", "FORGERPC_METRICS": ""})
        _reward_calls(proc.address)
        assert proc.terminate() < 5.0  # shutdown flushes both exporters
    finally:
        collector.server.stop(None)
    names = [span.name for export in collector.spans for rs in export.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    assert names.count("/forgerpc.v1.RewardService/Evaluate") == 4, names
    service = {a.key: a.value.string_value for a in collector.spans[0].resource_spans[0].resource.attributes}
    assert service["service.name"] == "forgerpc-reward"
    [resource] = collector.metrics[-1].resource_metrics  # cumulative: the newest export holds every call
    counts = {}
    for metric in (m for scope in resource.scope_metrics for m in scope.metrics if m.name == "rpc.server.duration"):
        assert metric.unit == "ms"
        for point in metric.histogram.data_points:
            a = {kv.key: kv.value for kv in point.attributes}
            assert a["rpc.service"].string_value == "forgerpc.v1.RewardService"
            counts[(a["rpc.method"].string_value, a["rpc.grpc.status_code"].int_value)] = point.count
    assert counts == {("Evaluate", 0): 3, ("Evaluate", 3): 1}


def test_unknown_exporter_is_a_clear_error(tmp_path):
    from forgerpc.clients.telemetry import exporter_names

    assert exporter_names("metrics", "file:/tmp/x, otlp") == ["file:/tmp/x", "otlp"]
    assert exporter_names("traces", "none") == []
    with pytest.raises(ValueError, match="unknown metrics exporter 'prometheus'"):
        exporter_names("metrics", "prometheus")
    # In a service's config: a config error naming the key; in the environment: the variable.
    # Neither starts anything or prints a traceback.
    serve = [sys.executable, "-m", "forgerpc.services", "serve", "reward", "--port", "0"]
    bad_key = subprocess.run([*serve, "server.metrics=prometheus"], capture_output=True, text=True, timeout=60)
    assert bad_key.returncode == 2 and "key 'server.metrics'" in bad_key.stderr and "Traceback" not in bad_key.stderr
    env = {**os.environ, "FORGERPC_TRACES": "jaeger"}
    bad_env = subprocess.run(serve, capture_output=True, text=True, timeout=60, env=env)
    assert bad_env.returncode == 2 and "FORGERPC_TRACES" in bad_env.stderr and "Traceback" not in bad_env.stderr
    run = subprocess.run([sys.executable, "-m", "forgerpc.orchestrator", "run", str(ROOT / "configs/grpo_tiny.yaml"),
                          f"run_dir={tmp_path}", "app=none"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2 and "unknown traces exporter 'jaeger'" in run.stderr and not (tmp_path / "logs").exists()


def test_unreachable_collector_neither_fails_calls_nor_holds_the_exit(serve_process):
    # Port 9 (discard) has no listener here: the exporter's retries alone took 15.7 s at SIGTERM.
    proc = serve_process("reward", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                                        "FORGERPC_TRACES": "", "FORGERPC_METRICS": ""})
    _reward_calls(proc.address)
    assert proc.terminate() < 5.0 and proc.proc.returncode == 0


def test_sdk_counts_the_retries_it_absorbs(tmp_path):
    """Two injected UNAVAILABLEs, then success: the caller sees one answer, and the client's
    metrics file holds forgerpc.client.retries = 2 for that method and code (14)."""
    client = textwrap.dedent("""
        import asyncio, grpc
        from forgerpc.clients import RewardClient, RetryPolicy
        from forgerpc.clients.telemetry import setup_metrics, shutdown_telemetry
        from forgerpc.services.common.errors import ServiceError
        from forgerpc.services.common.runtime import Server, ServiceConfig, ServiceDefinition
        from forgerpc.v1 import reward_pb2, reward_pb2_grpc

        class Flaky(reward_pb2_grpc.RewardServiceServicer):
            calls = 0
            async def Evaluate(self, request, context):
                Flaky.calls += 1
                if Flaky.calls <= 2:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE, "INJECTED", "busy")
                return reward_pb2.EvaluateResponse(scores=[reward_pb2.RewardScore(score=1.0)])

        async def main():
            setup_metrics("client", "file:DIR")
            async def create(_cfg):
                return [Flaky()]
            server = Server(ServiceDefinition("test", ServiceConfig, create), ServiceConfig())
            port = await server.start()
            policy = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
            async with RewardClient(f"127.0.0.1:{port}", retry=policy) as reward:
                out = await reward.evaluate(items=[reward_pb2.RewardItem(response="a", target="a")])
            assert out.scores[0].score == 1.0 and Flaky.calls == 3
            await server.stop()
            shutdown_telemetry()

        asyncio.run(main())
    """).replace("DIR", str(tmp_path))
    subprocess.run([sys.executable, "-c", client], check=True, timeout=60)
    [file] = tmp_path.glob("client-*.jsonl")
    [resource] = json.loads(file.read_text().splitlines()[-1])["resource_metrics"]
    retries = [point for scope in resource["scope_metrics"] for m in scope["metrics"]
               if m["name"] == "forgerpc.client.retries" for point in m["data"]["data_points"]]
    assert [(p["attributes"], p["value"]) for p in retries] == [
        ({"rpc.method": "/forgerpc.v1.RewardService/Evaluate", "rpc.grpc.status_code": 14}, 2)]
