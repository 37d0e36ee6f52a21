"""One trace follows a call across processes: client span -> server span (W3C traceparent)."""

import json
import subprocess
import sys
import textwrap


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
