"""The environment service: its environments in-process, then the service as a real process
(sessions, seeds, bad input, expiry, the session cap)."""

from __future__ import annotations

import asyncio
import random
import re

import grpc
import pytest

from forgerpc.clients import EnvironmentClient, ForgeRPCError
from forgerpc.services.environment.envs import ENVIRONMENTS, OptionError, evaluate
from forgerpc.v1.common_pb2 import ChatMessage


def _say(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


# -- in-process -------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, value", [("12*(3+4)", 84), ("-7 // 2", -4), ("10 / 4", 2.5), ("17 % 5", 2),
                                         ("4821 × 377 + 12", 4821 * 377 + 12)])
def test_calculator_evaluates_arithmetic(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr, problem", [
    ("__import__('os').system('true')", "unsupported"),  # a call: never evaluated
    ("(1).__class__", "unsupported"),
    ("x + 1", "unsupported"),
    ("2 ** 10", "unsupported"),
    ("1 / 0", "division by zero"),
    ("9" * 30 + " * " + "9" * 30, "out of range"),
    ("1 +", "not an arithmetic expression"),
    ("1+" * 150 + "1", "longer than"),
])
def test_calculator_refuses_everything_but_arithmetic(expr, problem):
    with pytest.raises(ValueError, match=problem):
        evaluate(expr)


def test_calculator_episode_tool_turn_then_answer():
    env = ENVIRONMENTS["calculator"]()
    state, first = env.reset(random.Random(3), {"digits": "3"})
    a, b, c = map(int, re.findall(r"\d+", first[1].content))
    tool = env.step(state, f"I will compute. <calc>{a} * {b} + {c}</calc>")
    assert not tool.done and tool.reward == 0.0
    assert (tool.observations[0].role, tool.observations[0].name) == ("tool", "calc")
    assert tool.observations[0].content == str(a * b + c)
    end = env.step(state, f"<answer>{a * b + c}</answer>")
    assert (end.done, end.reward, end.info["correct"]) == (True, 1.0, "true")
    state, _ = env.reset(random.Random(3), {"digits": "3"})
    wrong = env.step(state, f"<answer>{a * b + c + 1}</answer>")
    assert (wrong.done, wrong.reward, wrong.info["target"]) == (True, 0.0, str(a * b + c))


@pytest.mark.parametrize("written, correct", [("{n}", True), ("{n:,}", True), ("{m}", False)])
def test_large_answers_compare_exactly(written, correct):
    """Nine-digit factors give answers past 2**53, where a float cannot tell n from n + 1."""
    env = ENVIRONMENTS["calculator"]()
    state, _ = env.reset(random.Random(5), {"digits": "9"})
    n = state["target"]
    assert n > 2 ** 53
    out = env.step(state, "<answer>" + written.format(n=n, m=n + 1) + "</answer>")
    assert out.reward == float(correct)


def test_max_turns_truncates_with_zero_reward():
    env = ENVIRONMENTS["calculator"]()
    state, _ = env.reset(random.Random(0), {"max_turns": "2"})
    assert not env.step(state, "thinking").done
    last = env.step(state, "<calc>1+1</calc>")
    assert (last.done, last.reward, last.info.get("truncated")) == (True, 0.0, "true")


def test_guess_number_bisection_finds_it():
    env = ENVIRONMENTS["guess_number"]()
    state, _ = env.reset(random.Random(11), {"low": "1", "high": "1000", "max_turns": "10"})
    low, high = 1, 1000
    for turn in range(1, 11):
        guess = (low + high) // 2
        out = env.step(state, f"<answer>{guess}</answer>")
        if out.done:
            break
        hint = out.observations[0].content
        low, high = (guess + 1, high) if hint == "higher" else (low, guess - 1)
    assert out.done and out.reward == 1.0 and out.info["turns"] == str(turn)


@pytest.mark.parametrize("name, options, key", [
    ("calculator", {"digits": "ten"}, "digits"), ("calculator", {"digits": "12"}, "digits"),
    ("calculator", {"colour": "red"}, "colour"), ("guess_number", {"low": "5", "high": "2"}, "high"),
])
def test_bad_options_name_the_option(name, options, key):
    with pytest.raises(OptionError) as err:
        ENVIRONMENTS[name]().reset(random.Random(0), options)
    assert err.value.key == key


# -- the service as a process -------------------------------------------------------------------
async def test_episode_over_grpc_same_seed_same_task(serve_process):
    proc = serve_process("environment")
    async with EnvironmentClient(proc.address) as env:
        first = await env.reset(environment="calculator", seed=42, options={"digits": "2"})
        again = await env.reset(environment="calculator", seed=42, options={"digits": "2"})
        other = await env.reset(environment="calculator", seed=43, options={"digits": "2"})
        assert first.session_id != again.session_id
        assert first.observations[1].content == again.observations[1].content != other.observations[1].content
        a, b, c = map(int, re.findall(r"\d+", first.observations[1].content))
        tool = await env.step(session_id=first.session_id, action=_say(f"<calc>{a}*{b}+{c}</calc>"))
        assert tool.observations[0].content == str(a * b + c) and not tool.done
        end = await env.step(session_id=first.session_id, action=_say(f"<answer>{tool.observations[0].content}</answer>"))
        assert end.done and end.reward == 1.0

        with pytest.raises(ForgeRPCError) as err:  # the episode is over
            await env.step(session_id=first.session_id, action=_say("<answer>1</answer>"))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == "EPISODE_DONE"
        assert (await env.close_session(session_id=first.session_id)).closed
        assert not (await env.close_session(session_id=first.session_id)).closed  # idempotent
        with pytest.raises(ForgeRPCError) as err:
            await env.step(session_id=first.session_id, action=_say("<answer>1</answer>"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_bad_requests_name_the_field_and_the_server_stays_up(serve_process):
    proc = serve_process("environment")
    async with EnvironmentClient(proc.address) as env:
        sid = (await env.reset(environment="guess_number", seed=1)).session_id
        cases = [
            (env.reset(environment="chess"), "environment"),
            (env.reset(environment="calculator", options={"digits": "0"}), "options.digits"),
            (env.step(session_id=sid), "action"),
            (env.step(session_id=sid, action=ChatMessage(role="user", content="hi")), "action.role"),
            (env.step(session_id="", action=_say("hi")), "session_id"),
            (env.step(session_id=sid, action=_say("x" * 70000)), "action.content"),
        ]
        for call, field in cases:
            with pytest.raises(ForgeRPCError) as err:
                await call
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, field
            assert err.value.details["field"] == field
        out = await env.step(session_id=sid, action=_say("<answer>50</answer>"))  # the session survived it all
        assert out.observations[0].content in ("higher", "lower", "Correct.")


async def test_idle_sessions_expire_and_the_cap_holds(serve_process):
    proc = serve_process("environment", "max_sessions=2", "session_ttl_seconds=2.0")
    async with EnvironmentClient(proc.address) as env:
        old = (await env.reset(environment="guess_number", seed=1)).session_id
        await env.reset(environment="guess_number", seed=2)
        with pytest.raises(ForgeRPCError) as err:
            await env.reset(environment="guess_number", seed=3)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "SESSIONS_EXHAUSTED"
        await asyncio.sleep(2.2)
        new = (await env.reset(environment="guess_number", seed=3)).session_id  # the two idle ones expired
        with pytest.raises(ForgeRPCError) as err:
            await env.step(session_id=old, action=_say("<answer>5</answer>"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "expired" in err.value.message
        assert (await env.step(session_id=new, action=_say("<answer>5</answer>"))).observations
