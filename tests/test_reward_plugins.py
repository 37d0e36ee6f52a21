"""Reward plugins with hand-written expected scores: math equivalence, regex, length penalty,
user functions, code-test parsing; and the per-item deadline through a real reward process."""

from __future__ import annotations

import time

import pytest

from forgerpc.clients import RewardClient
from forgerpc.services.reward.code import _parse_tests, _same_output, extract_code
from forgerpc.services.reward.functions import length_penalty, regex_match
from forgerpc.services.reward.math_equiv import math_equiv
from forgerpc.services.reward.user import UserFunction
from forgerpc.v1.reward_pb2 import RewardItem


def item(response, target="", **metadata):
    return RewardItem(response=response, target=target, metadata=metadata)


@pytest.mark.parametrize("response,target,score", [
    (r"The answer is $\boxed{\frac{1}{2}}$", "0.5", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"$\sqrt{8}$", r"2\sqrt{2}", 1.0),           # symbolic simplification
    ("$1 + x$", "x+1", 1.0),                       # commutativity
    (r"$\{2, 1\}$", "1,2", 1.0),                   # sets, order-free
    ("0.1", "10%", 1.0),                           # percent
    (r"$\boxed{4}$", "3", 0.0),
    ("3.14159", r"\pi", 0.0),                      # not equal at 6 decimals
    ("I don't know", "5", 0.0),                    # malformed: no answer at all
    ("", "5", 0.0),
    (r"$\frac{1}{2$", "0.5", 0.0),                 # broken LaTeX never raises
])
def test_math_equiv(response, target, score):
    assert math_equiv(item(response, target))[0] == score


def test_math_equiv_reasons():
    assert "no answer" in math_equiv(item("nothing", "5"))[1]
    assert "empty target" in math_equiv(item("5", ""))[1]


@pytest.mark.parametrize("response,options,score", [
    ("<answer>Paris</answer>", {"pattern": "<answer>(.*?)</answer>", "compare_target": True}, 1.0),
    ("<answer> paris. </answer>", {"pattern": "<answer>(.*?)</answer>", "compare_target": True}, 1.0),
    ("<answer>Lyon</answer><answer>Paris</answer>", {"pattern": "<answer>(.*?)</answer>", "compare_target": True}, 1.0),
    ("<answer>Lyon</answer>", {"pattern": "<answer>(.*?)</answer>", "compare_target": True}, 0.0),
    ("Paris", {"pattern": "<answer>(.*?)</answer>", "compare_target": True}, 0.0),
    ("Step 1... Step 2...", {"pattern": r"Step \d"}, 1.0),
    ("step 1", {"pattern": r"STEP \d"}, 0.0),
    ("step 1", {"pattern": r"STEP \d", "ignore_case": True}, 1.0),
])
def test_regex_match(response, options, score):
    assert regex_match(item(response, "Paris"), **options)[0] == score


@pytest.mark.parametrize("n,options,value", [
    (10, {"max_length": 10}, 0.0),
    (15, {"max_length": 10}, -0.5),               # 5 over, slack 10
    (30, {"max_length": 10}, -1.0),               # capped at -1
    (12, {"max_length": 10, "slack": 4}, -0.5),
    (0, {"max_length": 10}, 0.0),
])
def test_length_penalty_chars(n, options, value):
    assert length_penalty(item("x" * n), **options)[0] == pytest.approx(value)


def test_length_penalty_words():
    assert length_penalty(item("a b c d e f"), max_length=4, unit="words")[0] == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        length_penalty(item("a"), max_length=4, unit="tokens")


# A user function by import path, with the stated signature.
def keyword_reward(prompt, response, target, metadata, keyword="yes", bonus=0.0):
    hit = keyword in response
    return float(hit) + bonus, f"keyword {'found' if hit else 'missing'}"


def slow_reward(prompt, response, target, metadata):
    if "slow" in response:
        time.sleep(3)
    if "crash" in response:
        raise RuntimeError("boom")
    return 1.0


def test_user_function():
    fn = UserFunction(path="test_reward_plugins:keyword_reward", keyword="ok", bonus=0.5)
    assert fn(item("it is ok")) == (1.5, "keyword found")
    assert fn(item("no"))[0] == 0.5
    with pytest.raises(ValueError, match="does not accept"):
        UserFunction(path="test_reward_plugins:keyword_reward", colour="red")
    with pytest.raises(ValueError, match="cannot import"):
        UserFunction(path="no_such_module_xyz:f")
    with pytest.raises(ValueError, match="pkg.module:function"):
        UserFunction(path="test_reward_plugins.keyword_reward")


def test_code_helpers():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("print(1)") == "print(1)"
    assert _parse_tests('["assert f(1) == 2", {"input": "1", "output": "2"}]') == [
        {"code": "assert f(1) == 2"}, {"input": "1", "output": "2"}]
    for bad in ["", "{}", "[]", "[1]", '[{"input": "1"}]', "not json"]:
        with pytest.raises(ValueError):
            _parse_tests(bad)
    assert _same_output(b"3  \n4\n\n", "3\n4")
    assert not _same_output(b"3\n5\n", "3\n4")


async def test_item_deadline_through_a_real_process(serve_process):
    proc = serve_process(
        "reward", "functions=[{kind: python, options: {path: 'test_reward_plugins:slow_reward'}},"
                  " {kind: exact_match, weight: 0.5}]",
        env={"PYTHONPATH": "tests"})
    items = [RewardItem(response="fast", target="fast"), RewardItem(response="slow", target="slow"),
             RewardItem(response="crash", target="crash")]
    async with RewardClient(proc.address) as reward:
        start = time.monotonic()
        out = await reward.evaluate(items=items, item_timeout_seconds=0.5)
        elapsed = time.monotonic() - start
    assert elapsed < 2.0  # the slow item (3 s) does not hold the batch
    fast, slow, crash = out.scores
    assert fast.score == pytest.approx(1.5) and fast.sub_scores["exact_match"] == 1.0
    assert slow.score == 0.0 and slow.reason.startswith("TIMEOUT")
    assert slow.sub_scores["exact_match"] == 1.0 and slow.sub_scores["python"] == 0.0
    assert crash.score == 0.0 and crash.reason.startswith("ERROR: RuntimeError")
    assert "boom" in crash.reason


def test_config_errors_name_the_key():
    from forgerpc.clients.config import ConfigError
    from forgerpc.services.reward.config import FunctionConfig, RewardConfig
    from forgerpc.services.reward.server import _build

    cfg = RewardConfig()
    cases = [
        (FunctionConfig(kind="code_tests"), "sandbox_address"),
        (FunctionConfig(kind="regex_match"), "pattern"),
        (FunctionConfig(kind="math_equiv", options={"tolerance": 1}), "tolerance"),
        (FunctionConfig(kind="python", options={"path": "nope"}), "pkg.module:function"),
        (FunctionConfig(kind="length_penalty", options={"max_length": 2, "unit": "bytes"}), "unit"),
        (FunctionConfig(kind="char_match", options={"align": "middle"}), "align"),
    ]
    for f, words in cases:
        with pytest.raises(ConfigError, match="functions.3.options") as err:
            _build(3, f, cfg)
        assert words in str(err.value)


async def test_inline_functions_score_in_a_plain_loop_and_report_errors_per_item():
    # Every function a cheap built-in: the servicer scores without tasks or deadlines
    # (services/reward/server.py, all_inline). A raising function still zeroes only its item.
    from forgerpc.services.reward.config import RewardConfig
    from forgerpc.services.reward.server import RewardServicer
    from forgerpc.v1.reward_pb2 import EvaluateRequest

    cfg = RewardConfig(functions=[{"kind": "exact_match"},
                                  {"kind": "length_penalty", "weight": 0.5, "options": {"max_length": 2}}])
    servicer = RewardServicer(cfg)
    assert servicer.all_inline
    out = await servicer.Evaluate(EvaluateRequest(items=[item("4", "4"), item("4444", "4")]), None)
    assert [s.score for s in out.scores] == [1.0, pytest.approx(-0.5)]  # 4 chars: 2 over a slack of 2
    assert dict(out.scores[1].sub_scores) == {"exact_match": 0.0, "length_penalty": -1.0}
    await servicer.close()

    # (a bad option value is a config error at start-up: test_config_errors_name_the_key) one that
    # raises on an item costs that item its score, not the batch
    bad = RewardServicer(RewardConfig(functions=[{"kind": "exact_match"}, {"kind": "length_penalty",
                                                                           "options": {"max_length": 2}}]))
    name, weight, _, mode = bad.functions[1]
    bad.functions[1] = (name, weight, lambda item: 1 / 0 if item.response else (0.0, ""), mode)
    out = await bad.Evaluate(EvaluateRequest(items=[item("4", "4")]), None)
    assert out.scores[0].score == 0.0 and out.scores[0].reason.startswith("ERROR: ZeroDivisionError")
    assert out.scores[0].sub_scores["exact_match"] == 1.0 and out.scores[0].sub_scores["length_penalty"] == 0.0
    await bad.close()
