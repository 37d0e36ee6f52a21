"""The RewardService servicer: validates batches and combines weighted reward functions.

score(item) = sum_f weight_f * f(item), with one sub-score per function. A function that is slow
or crashes scores that item 0 with reason TIMEOUT / ERROR and never fails the batch.
"""

from __future__ import annotations

import asyncio
import inspect

from forgerpc.clients.config import ConfigError
from forgerpc.services.common.errors import require
from forgerpc.services.common.runtime import ServiceDefinition
from forgerpc.services.reward.config import RewardConfig
from forgerpc.services.reward.functions import FUNCTIONS
from forgerpc.v1 import reward_pb2, reward_pb2_grpc


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.functions = []
        for i, f in enumerate(cfg.functions):
            fn = FUNCTIONS[f.kind]
            try:
                inspect.signature(fn).bind(None, **f.options)
            except TypeError as e:
                raise ConfigError(f"key 'functions.{i}.options': {e} for kind {f.kind}") from None
            self.functions.append((f.name or f.kind, f.weight, fn, f.options))

    async def Evaluate(self, request: reward_pb2.EvaluateRequest, context) -> reward_pb2.EvaluateResponse:
        require(len(request.items) > 0, "items", "must hold at least one item")
        require(
            len(request.items) <= self.cfg.max_batch_items,
            "items", f"at most {self.cfg.max_batch_items} items per call, got {len(request.items)}",
        )
        require(request.item_timeout_seconds >= 0, "item_timeout_seconds", "must not be negative")
        timeout = request.item_timeout_seconds or self.cfg.item_timeout_seconds
        scores = await asyncio.gather(*(self._score(item, timeout) for item in request.items))
        return reward_pb2.EvaluateResponse(scores=scores)

    async def _score(self, item: reward_pb2.RewardItem, timeout: float) -> reward_pb2.RewardScore:
        total, subs, reasons = 0.0, {}, []
        for name, weight, fn, options in self.functions:
            try:
                # Threads so that one slow function cannot stall the event loop or the batch.
                value, reason = await asyncio.wait_for(asyncio.to_thread(fn, item, **options), timeout)
            except asyncio.TimeoutError:
                value, reason = 0.0, f"{name}: TIMEOUT after {timeout:g}s"
            except Exception as e:  # noqa: BLE001 - a crashing function scores 0, the batch goes on
                value, reason = 0.0, f"{name}: ERROR: {type(e).__name__}: {e}"[:200]
            subs[name] = value
            total += weight * value
            reasons.append(reason)
        return reward_pb2.RewardScore(score=total, sub_scores=subs, reason="; ".join(reasons))

    async def ListRewardFunctions(self, request, context) -> reward_pb2.ListRewardFunctionsResponse:
        return reward_pb2.ListRewardFunctionsResponse(
            functions=[
                reward_pb2.RewardFunctionInfo(name=name, kind=f.kind, weight=weight)
                for (name, weight, _, _), f in zip(self.functions, self.cfg.functions)
            ]
        )


async def create(cfg: RewardConfig):
    return [RewardServicer(cfg)]


SERVICE = ServiceDefinition(name="reward", config_model=RewardConfig, create=create)
