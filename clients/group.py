"""Replica groups: several addresses of one service behind one name.

    policy = ReplicaGroup(GeneratorClient, ["127.0.0.1:7001", "127.0.0.1:7002"])
    out = await policy.generate.route(prompts=[...])          # one replica, load-balanced
    results = await policy.update_weights.fanout(version=3)   # every healthy replica
    state = await trainer.get_state.call_one()                # the singleton
    async with policy.session() as s:                         # sticky: same replica each call
        await s.generate(...)

Failover: `route` retries an idempotent RPC on another replica when one answers UNAVAILABLE
(and ejects it), with the backoff of the group's RetryPolicy. A background health loop checks
every replica (grpc.health.v1) and ejects those not SERVING, re-admitting them when they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import Any, Generic, Literal, Sequence, TypeVar

import grpc

from forgerpc.clients.base import AsyncClient, is_idempotent
from forgerpc.clients.channel import ChannelSettings
from forgerpc.clients.errors import ForgeRPCError
from forgerpc.clients.retry import NO_RETRY, RETRYABLE, RetryPolicy

C = TypeVar("C", bound=AsyncClient)
log = logging.getLogger("forgerpc.clients.group")


@dataclasses.dataclass
class Replica:
    address: str
    client: AsyncClient
    healthy: bool = True
    in_flight: int = 0
    ejected_at: float | None = None


@dataclasses.dataclass
class ReplicaResult:
    """One replica's outcome in a fanout: `value` or `error`, never both."""

    address: str
    value: Any = None
    error: ForgeRPCError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class NoHealthyReplica(ForgeRPCError):
    def __init__(self, service: str, addresses: Sequence[str]):
        super().__init__(grpc.StatusCode.UNAVAILABLE, "NO_HEALTHY_REPLICA",
                         f"no healthy replica of {service} among {list(addresses)}")


class ReplicaGroup(Generic[C]):
    """A named set of replicas of one service with routing, fanout and health-based ejection."""

    def __init__(self, client_cls: type[C], addresses: Sequence[str], *,
                 strategy: Literal["round_robin", "least_loaded"] = "round_robin",
                 settings: ChannelSettings = ChannelSettings(), timeout: float = 60.0,
                 retry: RetryPolicy = RetryPolicy(), health_interval: float = 1.0):
        if not addresses:
            raise ValueError(f"a {client_cls.__name__} group needs at least one address")
        self.client_cls = client_cls
        self.strategy = strategy
        self.retry = retry
        self.health_interval = health_interval
        # The group retries across replicas itself, so each client tries once.
        self.replicas = [Replica(a, client_cls(a, settings=settings, timeout=timeout, retry=NO_RETRY))
                         for a in addresses]
        self._rr = itertools.count()
        self._health_task: asyncio.Task | None = None
        self._idempotent: dict[str, bool] = {}

    @property
    def service(self) -> str:
        return self.client_cls.SERVICE.full_name

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    # -- health ---------------------------------------------------------------------------
    def eject(self, replica: Replica, why: str) -> None:
        if replica.healthy:
            log.warning("ejecting %s replica %s: %s", self.service, replica.address, why)
            replica.healthy, replica.ejected_at = False, time.monotonic()

    def admit(self, replica: Replica) -> None:
        if not replica.healthy:
            log.info("re-admitting %s replica %s", self.service, replica.address)
            replica.healthy, replica.ejected_at = True, None

    async def check_health(self) -> None:
        """One round of active health checks over every replica."""
        async def check(replica: Replica):
            try:
                status = await replica.client.health(timeout=max(self.health_interval, 0.5))
            except ForgeRPCError as e:
                status = e.code.name
            if status == "SERVING":
                self.admit(replica)
            else:
                self.eject(replica, f"health {status}")

        await asyncio.gather(*(check(r) for r in self.replicas))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.check_health()

    def _ensure_health_loop(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    # -- picking and calling --------------------------------------------------------------
    def pick(self, exclude: set[str] = frozenset()) -> Replica:
        candidates = [r for r in self.healthy() if r.address not in exclude] or self.healthy()
        if not candidates:
            raise NoHealthyReplica(self.service, [r.address for r in self.replicas])
        if self.strategy == "least_loaded":
            return min(candidates, key=lambda r: (r.in_flight, next(self._rr)))
        return candidates[next(self._rr) % len(candidates)]

    async def call_on(self, replica: Replica, method: str, args: tuple, kwargs: dict) -> Any:
        replica.in_flight += 1
        try:
            return await getattr(replica.client, method)(*args, **kwargs)
        except ForgeRPCError as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:
                self.eject(replica, e.message)
            raise
        finally:
            replica.in_flight -= 1

    def _rpc_descriptor(self, method: str):
        rpc = "".join(part.capitalize() for part in method.split("_"))
        return self.client_cls.SERVICE.methods_by_name.get(rpc if method != "close_session" else "Close")

    async def route(self, method: str, *args, **kwargs) -> Any:
        self._ensure_health_loop()
        idempotent = self._idempotent.get(method)
        if idempotent is None:  # once per method name: descriptor options are not free to read
            rpc = self._rpc_descriptor(method)
            idempotent = self._idempotent[method] = rpc is not None and is_idempotent(rpc)
        attempts = self.retry.max_attempts if idempotent else 1
        tried: set[str] = set()
        for attempt in range(attempts):
            replica = self.pick(exclude=tried)
            tried.add(replica.address)
            try:
                return await self.call_on(replica, method, args, kwargs)
            except ForgeRPCError as e:
                if e.code not in RETRYABLE or attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    async def fanout(self, method: str, *args, **kwargs) -> list[ReplicaResult]:
        """Calls every healthy replica concurrently; returns per-replica results (errors included)."""
        self._ensure_health_loop()
        targets = self.healthy()
        if not targets:
            raise NoHealthyReplica(self.service, [r.address for r in self.replicas])

        async def one(replica: Replica) -> ReplicaResult:
            try:
                return ReplicaResult(replica.address, value=await self.call_on(replica, method, args, kwargs))
            except ForgeRPCError as e:
                return ReplicaResult(replica.address, error=e)

        return list(await asyncio.gather(*(one(r) for r in targets)))

    async def call_one(self, method: str, *args, **kwargs) -> Any:
        """For singleton services: the group must hold exactly one replica."""
        if len(self.replicas) != 1:
            raise ValueError(f"call_one needs a group of one replica; {self.service} has {len(self.replicas)}")
        return await self.route(method, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def session(self):
        """Pins one replica for several calls (e.g. to reuse its KV cache). If the pinned replica
        becomes unavailable, the session moves to another healthy one and counts the move."""
        self._ensure_health_loop()
        yield Session(self, self.pick())

    def __getattr__(self, method: str) -> "GroupMethod":
        if method.startswith("_") or not hasattr(self.client_cls, method):
            raise AttributeError(f"{self.client_cls.__name__} has no RPC method '{method}'")
        return GroupMethod(self, method)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(r.client.close() for r in self.replicas))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


@dataclasses.dataclass
class GroupMethod:
    """`group.<rpc>`: choose how to call it with .route / .fanout / .call_one."""

    group: ReplicaGroup
    method: str

    async def route(self, *args, **kwargs):
        return await self.group.route(self.method, *args, **kwargs)

    async def fanout(self, *args, **kwargs) -> list[ReplicaResult]:
        return await self.group.fanout(self.method, *args, **kwargs)

    async def call_one(self, *args, **kwargs):
        return await self.group.call_one(self.method, *args, **kwargs)


class Session:
    """Calls pinned to one replica; `moves` counts failovers to another replica."""

    def __init__(self, group: ReplicaGroup, replica: Replica):
        self.group = group
        self.replica = replica
        self.moves = 0

    def __getattr__(self, method: str):
        getattr(self.group, method)  # validates the name

        async def call(*args, **kwargs):
            rpc = self.group._rpc_descriptor(method)
            try:
                return await self.group.call_on(self.replica, method, args, kwargs)
            except ForgeRPCError as e:
                if e.code != grpc.StatusCode.UNAVAILABLE or rpc is None or not is_idempotent(rpc):
                    raise
                self.replica = self.group.pick(exclude={self.replica.address})
                self.moves += 1
                return await self.group.call_on(self.replica, method, args, kwargs)

        return call
