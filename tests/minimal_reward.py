"""A second, independent RewardService implementation: plain grpcio + the generated stubs, none of
forgerpc's runtime. Used by the swap test: the stack must use it when given only its address.

    python tests/minimal_reward.py CALLS_FILE     # prints "PORT <n>" once listening
"""

import asyncio
import pathlib
import sys

import grpc

from forgerpc.v1 import reward_pb2, reward_pb2_grpc


class MinimalReward(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, calls_file: pathlib.Path):
        self.calls_file = calls_file
        self.calls = 0

    async def Evaluate(self, request, context):
        self.calls += 1
        self.calls_file.write_text(str(self.calls))
        scores = []
        for item in request.items:
            ok = float(item.response.strip() == item.target.strip())
            scores.append(reward_pb2.RewardScore(score=ok, sub_scores={"minimal": ok}, reason="minimal"))
        return reward_pb2.EvaluateResponse(scores=scores)


async def main(calls_file: str) -> None:
    from grpc_health.v1 import _async as health_async
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server()
    reward_pb2_grpc.add_RewardServiceServicer_to_server(MinimalReward(pathlib.Path(calls_file)), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_async.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
