"""Tasks with verifiable rewards, generated locally from a seed (no downloads).

    tasks = make_task("addition", digits=3, seed=0)
    example = tasks.sample_train(rng)     # Example(prompt="123+456=", target="579")
    held_out = tasks.eval_set             # fixed, never drawn for training
    code = make_task("code", seed=0)      # Example(prompt="f(1)=7 f(4)=16 f(6)=22 f(9)=31\n",
                                          #   target="f=lambda x:x*3+4", metadata=(("tests", "[...]"),))

Every task keeps a held-out eval split disjoint from what training can draw: eval prompts are
fixed at construction and rejected by `sample_train`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    metadata: tuple[tuple[str, str], ...] = ()


class TaskSet:
    """Base: subclasses implement `_draw(rng) -> Example`."""

    name = "task"

    def __init__(self, seed: int = 0, eval_size: int = 200):
        rng = random.Random(f"{self.name}-eval-{seed}")
        held: dict[str, Example] = {}
        for _ in range(eval_size * 50):
            if len(held) == eval_size:
                break
            ex = self._draw(rng)
            held.setdefault(ex.prompt, ex)
        self.eval_set = list(held.values())
        self._eval_prompts = set(held)

    def _draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def sample_train(self, rng: random.Random) -> Example:
        while True:
            ex = self._draw(rng)
            if ex.prompt not in self._eval_prompts:
                return ex


class Addition(TaskSet):
    """`a+b=` with up to `digits`-digit operands; target is the decimal sum."""

    name = "addition"

    def __init__(self, digits: int = 3, seed: int = 0, eval_size: int = 200):
        self.digits = digits
        super().__init__(seed, eval_size)

    def _draw(self, rng):
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        return Example(f"{a}+{b}=", str(a + b))


class Multiplication(TaskSet):
    """`a*b=` with up to `digits`-digit operands."""

    name = "multiplication"

    def __init__(self, digits: int = 2, seed: int = 0, eval_size: int = 200):
        self.digits = digits
        super().__init__(seed, eval_size)

    def _draw(self, rng):
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        return Example(f"{a}*{b}=", str(a * b))


class Reverse(TaskSet):
    """`rev:abcd=` -> `dcba`, lowercase letters, length in [min_len, max_len]."""

    name = "reverse"

    def __init__(self, min_len: int = 3, max_len: int = 6, seed: int = 0, eval_size: int = 200):
        self.min_len, self.max_len = min_len, max_len
        super().__init__(seed, eval_size)

    def _draw(self, rng):
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(self.min_len, self.max_len)))
        return Example(f"rev:{word}=", word[::-1])


def _functions() -> list[tuple[str, object]]:
    """The coding task's answer space: (expression in x, the same as a Python function).
    111 short expressions, so a whole answer stays under 20 characters ("f=lambda x:abs(x-9)")."""
    out = [("x*x", lambda x: x * x)]
    for c in range(1, 10):
        out += [(f"x+{c}", lambda x, c=c: x + c), (f"x-{c}", lambda x, c=c: x - c),
                (f"x*x+{c}", lambda x, c=c: x * x + c), (f"abs(x-{c})", lambda x, c=c: abs(x - c)),
                (f"max(x,{c})", lambda x, c=c: max(x, c)), (f"min(x,{c})", lambda x, c=c: min(x, c))]
    for c in range(2, 10):
        out += [(f"x*{c}", lambda x, c=c: x * c), (f"x%{c}", lambda x, c=c: x % c)]
    for c in range(2, 6):
        out += [(f"x//{c}", lambda x, c=c: x // c)]
        out += [(f"x*{c}+{b}", lambda x, c=c, b=b: x * c + b) for b in range(1, 10)]
    return out


class Code(TaskSet):
    """Write a one-line Python function from input/output examples; hidden tests score it.

        prompt:  "f(1)=7 f(4)=16 f(6)=22 f(9)=31\n"    (`shown` examples, x in [0, 12])
        target:  "f=lambda x:x*3+4"                     (the canonical answer; SFT trains on it)
        metadata["tests"] = '["assert f(-3) == -5", ...]'   (`tests` other points, x in [-9, 30])

    Scored by the reward service's `code_tests` (each test one sandbox run):
    score = passed / tests, so echoing the shown examples scores 0 and any equivalent program 1.
    Draws are well posed: when another expression of the answer space agrees with the answer on
    the shown examples but not on the tests, the draw is rejected.
    """

    name = "code"
    FUNCTIONS = _functions()

    def __init__(self, shown: int = 4, tests: int = 3, seed: int = 0, eval_size: int = 200):
        self.shown, self.tests = shown, tests
        super().__init__(seed, eval_size)

    def _draw(self, rng):
        while True:
            source, fn = rng.choice(self.FUNCTIONS)
            xs = sorted(rng.sample(range(13), self.shown))
            hidden = rng.sample([x for x in range(-9, 31) if x not in xs], self.tests)
            if not any(all(g(x) == fn(x) for x in xs) and any(g(x) != fn(x) for x in hidden)
                       for _, g in self.FUNCTIONS):
                break
        tests = [f"assert f({x}) == {fn(x)}" for x in hidden]
        return Example(" ".join(f"f({x})={fn(x)}" for x in xs) + "\n", f"f=lambda x:{source}",
                       (("tests", json.dumps(tests)),))


TASKS = {"addition": Addition, "multiplication": Multiplication, "reverse": Reverse, "code": Code}


class Templated(TaskSet):
    """Another task's examples with each prompt rewritten by `template`, e.g. into the chat format
    an instruct model expects (the apps send prompts as plain text):

        "<|im_start|>user\nWhat is {body}? Reply with the number only.<|im_end|>\n<|im_start|>assistant\n"

    `{prompt}` is the task's prompt ("12+34="), `{body}` the same without its final "=" or newline.
    Targets, metadata and the held-out split are the wrapped task's.
    """

    def __init__(self, task: TaskSet, template: str):
        self.task, self.template = task, template
        self.name = task.name
        self.eval_set = [self._format(e) for e in task.eval_set]

    def _format(self, ex: Example) -> Example:
        body = ex.prompt.removesuffix("\n").removesuffix("=")
        return dataclasses.replace(ex, prompt=self.template.format(prompt=ex.prompt, body=body))

    def sample_train(self, rng: random.Random) -> Example:
        return self._format(self.task.sample_train(rng))


def make_task(name: str, seed: int = 0, template: str = "", **options) -> TaskSet:
    """The task `name` built with `options`; `template` (optional) rewrites its prompts (Templated)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (allowed: {', '.join(TASKS)})")
    task = TASKS[name](seed=seed, **options)
    return Templated(task, template) if template else task
