"""Task generators: verifiable targets, seeded, held-out eval disjoint from training draws."""

import random

import pytest

from forgerpc.orchestrator.tasks import make_task


@pytest.mark.parametrize("name", ["addition", "multiplication", "reverse"])
def test_targets_are_correct_and_eval_is_held_out(name):
    task = make_task(name, seed=3, eval_size=50)
    assert len(task.eval_set) == 50 and len({e.prompt for e in task.eval_set}) == 50
    rng = random.Random(0)
    eval_prompts = {e.prompt for e in task.eval_set}
    for _ in range(500):
        ex = task.sample_train(rng)
        assert ex.prompt not in eval_prompts
        body = ex.prompt.rstrip("=")
        if name == "addition":
            a, b = map(int, body.split("+"))
            assert ex.target == str(a + b)
        elif name == "multiplication":
            a, b = map(int, body.split("*"))
            assert ex.target == str(a * b)
        else:
            assert ex.target == body.removeprefix("rev:")[::-1]


def test_seeded_and_reproducible():
    a, b = make_task("addition", seed=1), make_task("addition", seed=1)
    assert a.eval_set == b.eval_set
    assert make_task("addition", seed=2).eval_set != a.eval_set


def test_unknown_task():
    with pytest.raises(ValueError, match="allowed: addition"):
        make_task("sudoku")
