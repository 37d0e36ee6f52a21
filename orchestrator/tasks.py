"""Tasks with verifiable rewards, generated locally from a seed (no downloads).

    tasks = make_task("addition", digits=3, seed=0)
    example = tasks.sample_train(rng)     # Example(prompt="123+456=", target="579")
    held_out = tasks.eval_set             # fixed, never drawn for training

Every task keeps a held-out eval split disjoint from what training can draw: eval prompts are
fixed at construction and rejected by `sample_train`.
"""

from __future__ import annotations

import dataclasses
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


TASKS = {"addition": Addition, "multiplication": Multiplication, "reverse": Reverse}


def make_task(name: str, seed: int = 0, **options) -> TaskSet:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (allowed: {', '.join(TASKS)})")
    return TASKS[name](seed=seed, **options)
