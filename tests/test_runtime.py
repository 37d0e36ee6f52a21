"""Every service as a real process: health, reflection, bad input, UNIMPLEMENTED, SIGTERM."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from forgerpc.clients import CLIENTS, ForgeRPCError, RewardClient
from forgerpc.services import registry
from forgerpc.v1 import reward_pb2

# Bytes that are not a valid protobuf message of any type: field 1, wire type 7 (invalid).
GARBAGE = b"\x0f\xff\xff"


def _reflect(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return [s.name for r in responses for s in r.list_services_response.service]


def _raw_call(channel, method, path: str, payload: bytes, timeout=5.0):
    """Calls `path` with raw request bytes whatever the RPC's streaming shape."""
    ident = dict(request_serializer=None, response_deserializer=None)
    if method.client_streaming and method.server_streaming:
        return list(channel.stream_stream(path, **ident)(iter([payload]), timeout=timeout))
    if method.client_streaming:
        return channel.stream_unary(path, **ident)(iter([payload]), timeout=timeout)
    if method.server_streaming:
        return list(channel.unary_stream(path, **ident)(payload, timeout=timeout))
    return channel.unary_unary(path, **ident)(payload, timeout=timeout)


@pytest.mark.parametrize("name", sorted(registry.MODULES))
def test_service_process_contract(serve_process, name):
    """Starts, is SERVING, lists itself over reflection, rejects garbage for every RPC with
    INVALID_ARGUMENT (and stays up), and exits cleanly on SIGTERM within 5 s."""
    proc = serve_process(name)
    service = CLIENTS[name].SERVICE
    with grpc.insecure_channel(proc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for svc in ("", service.full_name):
            assert health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        listed = _reflect(channel)
        assert service.full_name in listed and "grpc.health.v1.Health" in listed, listed

        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            with pytest.raises(grpc.RpcError) as err:
                _raw_call(channel, method, path, GARBAGE)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.value.details())
            assert "request body" in err.value.details() and method.input_type.full_name in err.value.details()

        # Still alive after all that.
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING

        definition = registry.load(name)
        if definition.planned_in:
            # A valid, empty request to an unbuilt service: UNIMPLEMENTED naming the plan.
            method = next(m for m in service.methods if not m.client_streaming)
            empty = message_factory.GetMessageClass(method.input_type)().SerializeToString()
            with pytest.raises(grpc.RpcError) as err:
                _raw_call(channel, method, f"/{service.full_name}/{method.name}", empty)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "issue" in err.value.details() or "later" in err.value.details()
    assert proc.terminate(timeout=10) < 5.0
    assert proc.proc.returncode == 0


async def test_reward_exact_match_end_to_end(serve_process):
    proc = serve_process("reward", "functions=[{kind: exact_match}]")
    async with RewardClient(proc.address) as reward:
        items = [reward_pb2.RewardItem(prompt="2+2=", response=" 4 ", target="4"),
                 reward_pb2.RewardItem(prompt="2+2=", response="5", target="4")]
        out = await reward.evaluate(items=items)
        assert [s.score for s in out.scores] == [1.0, 0.0]
        assert out.scores[0].sub_scores["exact_match"] == 1.0
        assert "differs" in out.scores[1].reason

        with pytest.raises(ForgeRPCError) as err:
            await reward.evaluate(items=[])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.reason == "FIELD_INVALID" and err.value.details["field"] == "items"

        with pytest.raises(ForgeRPCError) as err:
            await reward.evaluate(items=items, item_timeout_seconds=-1)
        assert err.value.details["field"] == "item_timeout_seconds"


def test_bad_config_fails_at_start_naming_the_key():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "forgerpc.services", "serve", "reward", "--port", "0",
                          "functions=[{kind: exact_mtch}]"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "functions.0.kind" in out.stderr and "exact_match" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_bearer_token_required_when_configured(serve_process):
    proc = serve_process("reward", "server.auth.token_env=TEST_TOKEN", env={"TEST_TOKEN": "s3cret"})
    with grpc.insecure_channel(proc.address) as channel:
        evaluate = channel.unary_unary("/forgerpc.v1.RewardService/Evaluate",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=reward_pb2.EvaluateResponse.FromString)
        request = reward_pb2.EvaluateRequest(items=[reward_pb2.RewardItem(response="a", target="a")])
        with pytest.raises(grpc.RpcError) as err:
            evaluate(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            evaluate(request, timeout=5, metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = evaluate(request, timeout=5, metadata=[("authorization", "Bearer s3cret")])
        assert ok.scores[0].score == 1.0
        # Health stays open for probes.
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1


async def test_profile_env_writes_the_service_profile_at_exit(serve_process, tmp_path):
    # FORGERPC_PROFILE=DIR (bench/pipeline.py --profile-services): the whole process under
    # cProfile, written on a clean SIGTERM exit; the servicer's own methods are in it.
    import pstats

    proc = serve_process("reward", "functions=[{kind: constant}]", env={"FORGERPC_PROFILE": str(tmp_path)})
    async with RewardClient(proc.address) as reward:
        await reward.evaluate(items=[reward_pb2.RewardItem(response="a")])
    proc.terminate()
    (path,) = tmp_path.glob(f"reward-{proc.proc.pid}.prof")
    names = {name for _, _, name in pstats.Stats(str(path)).stats}
    assert "Evaluate" in names
