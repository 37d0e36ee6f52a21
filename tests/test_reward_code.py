"""Code-RL reward end to end: a reward process scoring code in a sandbox process over gRPC."""

from __future__ import annotations

import json
import time

import pytest

from forgerpc.clients import RewardClient
from forgerpc.v1.reward_pb2 import RewardItem

TESTS = json.dumps([
    "assert add(1, 2) == 3",
    "assert add(-1, 1) == 0",
    {"code": "assert add(10, 5) == 15"},
    {"input": "2 3\n", "output": "5\n"},
])
MAIN = "\nif __name__ == '__main__':\n    import sys\n    a, b = map(int, sys.stdin.read().split())\n    print(add(a, b))\n"
CORRECT = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n" + MAIN + "```"
# add(1,2)=2 fails; add(-1,1)=0 passes; add(10,5)=11 fails; stdin "2 3" -> 3 fails: 1 of 4.
PARTIAL = "```python\ndef add(a, b):\n    return a + 1\n" + MAIN + "```"
HANGS = "```python\ndef add(a, b):\n    while True:\n        pass\n" + MAIN + "```"


@pytest.fixture
def start_stack(serve_process, tmp_path):
    def start(code_timeout: float):
        sandbox = serve_process("sandbox", "workers=2", "uid_base=64000", f"work_root={tmp_path}")
        return serve_process(
            "reward", f"sandbox_address={sandbox.address}",
            f"functions=[{{kind: code_tests, options: {{timeout_seconds: {code_timeout}}}}},"
            " {kind: format_tags, weight: 0.0}]")
    return start


async def test_code_reward_fractions_and_timeout(start_stack):
    stack = start_stack(1.0)
    items = [RewardItem(response=r, metadata={"tests": TESTS}) for r in (CORRECT, PARTIAL, HANGS)]
    items.append(RewardItem(response=CORRECT, metadata={"tests": "[not json"}))
    async with RewardClient(stack.address) as reward:
        start = time.monotonic()
        out = await reward.evaluate(items=items, item_timeout_seconds=8.0)
        elapsed = time.monotonic() - start
    correct, partial, hangs, malformed = out.scores
    assert correct.score == 1.0 and correct.reason.startswith("code_tests: 4/4 passed"), correct.reason
    assert partial.score == pytest.approx(0.25), partial.reason
    assert "1/4 passed" in partial.reason and "WRONG_ANSWER" in partial.reason
    assert hangs.score == 0.0 and hangs.reason.startswith("TIMEOUT"), hangs.reason
    assert malformed.score == 0.0 and "malformed" in malformed.reason
    assert elapsed < 8.0


async def test_item_deadline_cuts_a_slow_sandbox_run(start_stack):
    # The item's deadline (1.5 s) is shorter than the sandbox's limit (5 s): the batch still
    # returns on time and that item scores 0 with TIMEOUT. One test per item, so each of the
    # two sandbox workers takes one item and neither waits for the other.
    stack = start_stack(5.0)
    items = [RewardItem(response=HANGS, metadata={"tests": json.dumps(["assert add(1, 2) == 3"])}),
             RewardItem(response=CORRECT, metadata={"tests": json.dumps(["assert add(2, 2) == 4"])})]
    async with RewardClient(stack.address) as reward:
        start = time.monotonic()
        out = await reward.evaluate(items=items, item_timeout_seconds=1.5)
        elapsed = time.monotonic() - start
    assert elapsed < 1.5 + 1.0
    assert out.scores[0].score == 0.0 and out.scores[0].reason.startswith("TIMEOUT")
    assert out.scores[1].score == 1.0
