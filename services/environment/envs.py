"""The environments: small, seeded, multi-turn tasks with a verifiable outcome.

An environment is a class with

    reset(rng, options) -> (state, observations)          the first turn(s) the agent sees
    step(state, action) -> Outcome                        the agent's message -> what comes back

`options` are strings (the proto's map<string, string>); a bad one raises `OptionError` naming it,
which the server turns into INVALID_ARGUMENT on `options.<key>`. Actions are plain text: the
agent's tool calls and answers are tags inside its message, so any generator's completion can be
passed through unparsed.

    calculator     arithmetic word problem; `<calc>EXPR</calc>` returns EXPR's value as a tool turn,
                   `<answer>N</answer>` ends the episode: reward 1 if N is the value, else 0
    guess_number   a secret integer in [low, high]; each `<answer>N</answer>` gets "higher" /
                   "lower" back; finding it ends the episode with reward 1
Both stop with reward 0 after `max_turns` actions (info["truncated"] = "true").
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import random
import re

from forgerpc.v1.common_pb2 import ChatMessage

ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
CALC = re.compile(r"<calc>\s*(.*?)\s*</calc>", re.S)


class OptionError(ValueError):
    """A bad environment option; `key` is the option's name."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key


@dataclasses.dataclass
class Outcome:
    observations: list[ChatMessage]
    reward: float = 0.0
    done: bool = False
    info: dict[str, str] = dataclasses.field(default_factory=dict)


def _int_option(options: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise OptionError(key, f"must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise OptionError(key, f"must be in [{low}, {high}], got {value}")
    return value


def _check_known(options: dict[str, str], known: tuple[str, ...]) -> None:
    for key in options:
        if key not in known:
            raise OptionError(key, f"unknown option (known: {', '.join(known)})")


# -- a calculator that evaluates arithmetic only ---------------------------------------------------
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
       ast.Mod: operator.mod, ast.Div: operator.truediv}
MAX_EXPR_CHARS = 200
MAX_MAGNITUDE = 10 ** 40  # bounds every intermediate value, so no expression can cost more than microseconds


def evaluate(expr: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // %, unary minus, parentheses.

    Walks the parsed tree itself (never `eval`): names, calls, attributes and ** are refused, and
    every intermediate value is bounded by MAX_MAGNITUDE. Raises ValueError with a short reason.
    """
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = walk(node.left), walk(node.right)
            try:
                value = OPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
        else:
            raise ValueError(f"unsupported element {type(node).__name__}")
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError("value out of range")
        return value

    return walk(tree)


def _number(text: str) -> int | float:
    """An answer's number: an int when it is written as one, so that answers past 2**53 compare
    exactly (float("100000000000000001") is 1e17); "1,234", "1234.0" and "1.234e3" are accepted."""
    text = text.replace(",", "")
    try:
        return int(text)
    except ValueError:
        return float(text)


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


class Calculator:
    """A multi-step arithmetic question that a calculator tool makes easy: a * b + c.

    Options: digits (of a and b, 1-9, default 4), max_turns (1-64, default 6).
    """

    name = "calculator"
    OPTIONS = ("digits", "max_turns")
    SYSTEM = ("Solve the problem. To compute, write <calc>EXPRESSION</calc> (+ - * / and parentheses) and "
              "wait for the result. Give the final answer as <answer>NUMBER</answer>.")

    def reset(self, rng: random.Random, options: dict[str, str]):
        _check_known(options, self.OPTIONS)
        digits = _int_option(options, "digits", 4, 1, 9)
        max_turns = _int_option(options, "max_turns", 6, 1, 64)
        a, b = (rng.randrange(10 ** (digits - 1), 10 ** digits) for _ in range(2))
        c = rng.randrange(0, 10 ** digits)
        state = {"target": a * b + c, "max_turns": max_turns, "turns": 0}
        question = f"A warehouse holds {a} crates of {b} items each, plus {c} loose items. How many items in all?"
        return state, [ChatMessage(role="system", content=self.SYSTEM), ChatMessage(role="user", content=question)]

    def step(self, state: dict, action: str) -> Outcome:
        state["turns"] += 1
        answer = ANSWER.search(action)
        if answer:  # an answer ends the episode, even beside a calc call
            try:
                correct = _number(answer.group(1)) == state["target"]
            except ValueError:
                correct = False
            return Outcome([], reward=float(correct), done=True,
                           info={"target": str(state["target"]), "correct": str(correct).lower()})
        calc = CALC.search(action)
        if calc:
            try:
                result = _format(evaluate(calc.group(1)))
            except ValueError as e:
                result = f"error: {e}"
            reply = [ChatMessage(role="tool", name="calc", content=result)]
        else:
            reply = [ChatMessage(role="user", content="Use <calc>EXPRESSION</calc> or <answer>NUMBER</answer>.")]
        return _limit(state, Outcome(reply))


class GuessNumber:
    """Find a secret integer by bisection: each guess is answered "higher" or "lower".

    Options: low (default 1), high (default 100), max_turns (1-64, default 10).
    """

    name = "guess_number"
    OPTIONS = ("low", "high", "max_turns")

    def reset(self, rng: random.Random, options: dict[str, str]):
        _check_known(options, self.OPTIONS)
        low = _int_option(options, "low", 1, -10 ** 9, 10 ** 9)
        high = _int_option(options, "high", 100, -10 ** 9, 10 ** 9)
        if high < low:
            raise OptionError("high", f"must be >= low ({low}), got {high}")
        max_turns = _int_option(options, "max_turns", 10, 1, 64)
        state = {"secret": rng.randint(low, high), "max_turns": max_turns, "turns": 0}
        prompt = (f"I am thinking of an integer between {low} and {high}. Guess it: reply <answer>N</answer>; "
                  "I will say higher or lower.")
        return state, [ChatMessage(role="user", content=prompt)]

    def step(self, state: dict, action: str) -> Outcome:
        state["turns"] += 1
        answer = ANSWER.search(action)
        try:
            guess = int(answer.group(1)) if answer else None
        except ValueError:
            guess = None
        if guess is None:
            return _limit(state, Outcome([ChatMessage(role="user", content="Reply <answer>N</answer> with an integer N.")]))
        if guess == state["secret"]:
            return Outcome([ChatMessage(role="user", content="Correct.")], reward=1.0, done=True,
                           info={"turns": str(state["turns"])})
        hint = "higher" if guess < state["secret"] else "lower"
        return _limit(state, Outcome([ChatMessage(role="user", content=hint)]))


def _limit(state: dict, outcome: Outcome) -> Outcome:
    """Ends a still-running episode with reward 0 once it has used its `max_turns` actions."""
    if state["turns"] >= state["max_turns"]:
        outcome.done = True
        outcome.info["truncated"] = "true"
    return outcome


ENVIRONMENTS = {cls.name: cls for cls in (Calculator, GuessNumber)}
