"""The SDK against real in-process grpc.aio servers that fail on purpose (no mocks)."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from forgerpc.clients import (CLIENTS, ForgeRPCError, ReplicaGroup, RetryPolicy, RewardClient, SyncClient,
                              TrainerClient)
from forgerpc.services.common.errors import ServiceError
from forgerpc.services.common.runtime import Server, ServiceConfig, ServiceDefinition
from forgerpc.v1 import reward_pb2, reward_pb2_grpc, trainer_pb2, trainer_pb2_grpc

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


class FlakyReward(reward_pb2_grpc.RewardServiceServicer):
    """Fails the first `failures` Evaluate calls with `code`; records every call."""

    def __init__(self, tag: str, failures: int = 0, code=grpc.StatusCode.UNAVAILABLE, delay: float = 0.0):
        self.tag, self.failures, self.code, self.delay, self.calls = tag, failures, code, delay, 0

    async def Evaluate(self, request, context):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.calls <= self.failures:
            raise ServiceError(self.code, "INJECTED", f"injected failure {self.calls}")
        return reward_pb2.EvaluateResponse(scores=[reward_pb2.RewardScore(score=1.0, reason=self.tag)])


class FlakyTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self):
        self.calls = 0

    async def TrainStep(self, request, context):
        self.calls += 1
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "INJECTED", "busy")


async def start(servicer) -> Server:
    async def create(_cfg):
        return [servicer]

    server = Server(ServiceDefinition("test", ServiceConfig, create), ServiceConfig())
    await server.start()
    return server


def addr(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


ITEM = reward_pb2.RewardItem(response="x", target="x")


async def test_retries_idempotent_rpc_until_success():
    servicer = FlakyReward("a", failures=2)
    server = await start(servicer)
    async with RewardClient(addr(server), retry=FAST) as client:
        out = await client.evaluate(items=[ITEM])
    assert out.scores[0].reason == "a" and servicer.calls == 3
    await server.stop()


async def test_gives_up_after_max_attempts_with_typed_error():
    servicer = FlakyReward("a", failures=100)
    server = await start(servicer)
    async with RewardClient(addr(server), retry=FAST) as client:
        with pytest.raises(ForgeRPCError) as err:
            await client.evaluate(items=[ITEM])
    assert servicer.calls == 4
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "INJECTED"
    assert err.value.method == "/forgerpc.v1.RewardService/Evaluate" and err.value.address == addr(server)
    await server.stop()


async def test_non_retryable_code_is_not_retried():
    servicer = FlakyReward("a", failures=100, code=grpc.StatusCode.FAILED_PRECONDITION)
    server = await start(servicer)
    async with RewardClient(addr(server), retry=FAST) as client:
        with pytest.raises(ForgeRPCError) as err:
            await client.evaluate(items=[ITEM])
    assert servicer.calls == 1 and err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    await server.stop()


async def test_non_idempotent_rpc_is_not_retried():
    servicer = FlakyTrainer()
    server = await start(servicer)
    async with TrainerClient(addr(server), retry=FAST) as client:
        with pytest.raises(ForgeRPCError):
            await client.train_step(episodes=[])
    assert servicer.calls == 1, "TrainStep is not idempotent and must be sent once"
    await server.stop()


async def test_deadline_covers_the_whole_call():
    server = await start(FlakyReward("slow", delay=2.0))
    async with RewardClient(addr(server), retry=FAST) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ForgeRPCError) as err:
            await client.evaluate(items=[ITEM], timeout=0.3)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - t0 < 1.5
    await server.stop()


async def test_unexpected_server_exception_is_internal_without_traceback():
    class Broken(reward_pb2_grpc.RewardServiceServicer):
        async def Evaluate(self, request, context):
            raise ZeroDivisionError("secret internals")

    server = await start(Broken())
    async with RewardClient(addr(server), retry=FAST) as client:
        with pytest.raises(ForgeRPCError) as err:
            await client.evaluate(items=[ITEM])
        assert err.value.code == grpc.StatusCode.INTERNAL and "Traceback" not in err.value.message
        assert "secret internals" not in err.value.message
        assert await client.health() == "SERVING"
    await server.stop()


async def test_route_round_robin_spreads_calls():
    servicers = [FlakyReward(t) for t in "abc"]
    servers = [await start(s) for s in servicers]
    async with ReplicaGroup(RewardClient, [addr(s) for s in servers], retry=FAST) as group:
        tags = [(await group.evaluate.route(items=[ITEM])).scores[0].reason for _ in range(9)]
    assert sorted(tags) == sorted("abc" * 3)
    for s in servers:
        await s.stop()


async def test_route_least_loaded_prefers_idle_replica():
    slow, fast = FlakyReward("slow", delay=0.5), FlakyReward("fast")
    servers = [await start(slow), await start(fast)]
    async with ReplicaGroup(RewardClient, [addr(s) for s in servers], strategy="least_loaded", retry=FAST) as group:
        first = asyncio.ensure_future(group.evaluate.route(items=[ITEM]))
        await asyncio.sleep(0.05)
        busy = next(r for r in group.replicas if r.in_flight == 1)
        others = [await group.evaluate.route(items=[ITEM]) for _ in range(3)]
        await first
    expected = "fast" if busy.address == addr(servers[0]) else "slow"
    assert all(o.scores[0].reason == expected for o in others)
    for s in servers:
        await s.stop()


async def test_failover_ejection_and_readmission():
    a, b = FlakyReward("a"), FlakyReward("b")
    server_a, server_b = await start(a), await start(b)
    port_a = server_a.port
    group = ReplicaGroup(RewardClient, [addr(server_a), addr(server_b)], retry=FAST, health_interval=0.1)
    await server_a.stop()
    tags = [(await group.evaluate.route(items=[ITEM])).scores[0].reason for _ in range(6)]
    assert set(tags) == {"b"}, "every call must fail over to the live replica"
    assert [r.healthy for r in group.replicas] == [False, True]

    # Bring replica a back on the same port: the health loop re-admits it.
    cfg = ServiceConfig.model_validate({"server": {"port": port_a}})

    async def create(_cfg):
        return [a]

    revived = Server(ServiceDefinition("test", ServiceConfig, create), cfg)
    await revived.start()
    for _ in range(100):
        if group.replicas[0].healthy:
            break
        await asyncio.sleep(0.05)
    assert group.replicas[0].healthy, "replica a was not re-admitted"
    tags = {(await group.evaluate.route(items=[ITEM])).scores[0].reason for _ in range(4)}
    assert tags == {"a", "b"}
    await group.close()
    await revived.stop()
    await server_b.stop()


async def test_fanout_returns_per_replica_results_and_errors():
    good, bad = FlakyReward("good"), FlakyReward("bad", failures=100, code=grpc.StatusCode.INTERNAL)
    servers = [await start(good), await start(bad)]
    async with ReplicaGroup(RewardClient, [addr(s) for s in servers], retry=FAST) as group:
        results = await group.evaluate.fanout(items=[ITEM])
    by_addr = {r.address: r for r in results}
    assert by_addr[addr(servers[0])].ok and by_addr[addr(servers[0])].value.scores[0].reason == "good"
    assert not by_addr[addr(servers[1])].ok and by_addr[addr(servers[1])].error.code == grpc.StatusCode.INTERNAL
    for s in servers:
        await s.stop()


async def test_call_one_is_for_singletons():
    servers = [await start(FlakyReward("x")), await start(FlakyReward("y"))]
    async with ReplicaGroup(RewardClient, [addr(servers[0])]) as single:
        assert (await single.evaluate.call_one(items=[ITEM])).scores[0].reason == "x"
    async with ReplicaGroup(RewardClient, [addr(s) for s in servers]) as pair:
        with pytest.raises(ValueError, match="one replica"):
            await pair.evaluate.call_one(items=[ITEM])
    for s in servers:
        await s.stop()


async def test_sticky_session_stays_then_moves_on_failure():
    servers = [await start(FlakyReward(t)) for t in "ab"]
    async with ReplicaGroup(RewardClient, [addr(s) for s in servers], retry=FAST) as group:
        async with group.session() as s:
            tags = {(await s.evaluate(items=[ITEM])).scores[0].reason for _ in range(5)}
            assert len(tags) == 1
            pinned = next(srv for srv in servers if addr(srv) == s.replica.address)
            await pinned.stop()
            moved = (await s.evaluate(items=[ITEM])).scores[0].reason
            assert moved not in tags and s.moves == 1
    for srv in servers:
        await srv.stop()


def test_sync_client_blocks_and_raises_typed_errors():
    """The sync facade: same retries (one injected UNAVAILABLE is absorbed), same typed errors."""
    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    flaky = FlakyReward("sync", failures=1)
    broken = FlakyReward("never", failures=100, code=grpc.StatusCode.PERMISSION_DENIED)
    servers = [asyncio.run_coroutine_threadsafe(start(s), loop).result() for s in (flaky, broken)]
    try:
        with SyncClient(RewardClient, addr(servers[0]), retry=FAST) as client:
            assert client.evaluate(items=[ITEM]).scores[0].reason == "sync"
        assert flaky.calls == 2
        with SyncClient(RewardClient, addr(servers[1]), retry=FAST) as client:
            with pytest.raises(ForgeRPCError) as err:
                client.evaluate(items=[ITEM])
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and broken.calls == 1
    finally:
        for server in servers:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_every_rpc_has_an_sdk_method():
    missing = []
    for cls in CLIENTS.values():
        for method in cls.SERVICE.methods:
            expected = "close_session" if method.name == "Close" else _snake(method.name)
            if not callable(getattr(cls, expected, None)):
                missing.append(f"{cls.__name__}.{expected} for {cls.SERVICE.name}.{method.name}")
    assert not missing, missing
    assert {c.SERVICE.full_name for c in CLIENTS.values()} == {
        f"forgerpc.v1.{n}" for n in ("GeneratorService", "RewardService", "ReplayBufferService", "TrainerService",
                                     "WeightStoreService", "SandboxService", "EnvironmentService")}
