"""Task generators: verifiable targets, seeded, held-out eval disjoint from training draws."""

import json
import random

import pytest

from forgerpc.clients import RewardClient
from forgerpc.orchestrator.tasks import make_task
from forgerpc.v1.reward_pb2 import RewardItem


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


# -- the coding task ----------------------------------------------------------------------------

def _run_tests(solution: str, tests: list[str]) -> int:
    """Tests passed by `solution`, run in this process (our own generated code, trusted)."""
    passed = 0
    for test in tests:
        scope: dict = {}
        try:
            exec(solution, scope)
            exec(test, scope)
            passed += 1
        except Exception:  # noqa: BLE001 - a failing test of a wrong solution
            pass
    return passed


def _shown(prompt: str) -> dict[int, int]:
    """{x: f(x)} of the examples a code prompt shows ("f(1)=7 f(4)=16 ...\\n")."""
    pairs = (p.removeprefix("f(").split(")=") for p in prompt.split())
    return {int(x): int(y) for x, y in pairs}


def test_code_targets_pass_hidden_tests_that_the_prompt_does_not_show():
    task = make_task("code", seed=5, eval_size=100, shown=4, tests=3)
    assert len({e.prompt for e in task.eval_set}) == 100
    rng = random.Random(1)
    examples = task.eval_set + [task.sample_train(rng) for _ in range(300)]
    eval_prompts = {e.prompt for e in task.eval_set}
    assert not any(e.prompt in eval_prompts for e in examples[100:])
    for ex in examples:
        assert ex.prompt.endswith("\n") and ex.target.startswith("f=lambda x:") and len(ex.target) <= 19
        tests = json.loads(dict(ex.metadata)["tests"])
        assert len(tests) == 3 and _run_tests(ex.target, tests) == 3, ex
        shown = _shown(ex.prompt)
        assert len(shown) == 4 and all(0 <= x <= 12 for x in shown)
        scope: dict = {}
        exec(ex.target, scope)
        assert all(scope["f"](x) == y for x, y in shown.items()), ex
        hidden = {int(t.split("(")[1].split(")")[0]) for t in tests}
        assert hidden.isdisjoint(shown), "a test repeats a shown example"
        # Echoing the shown examples back as a lookup table passes no test.
        assert _run_tests(f"f=lambda x:{shown!r}.get(x)", tests) == 0


def test_code_examples_pin_down_the_answer():
    """Every expression of the answer space that fits the shown examples also passes the hidden
    tests: the prompt determines the answer (up to equivalence on the tests)."""
    task = make_task("code", seed=0, eval_size=60)
    for ex in task.eval_set:
        shown, tests = _shown(ex.prompt), json.loads(dict(ex.metadata)["tests"])
        for source, fn in task.FUNCTIONS:
            if all(fn(x) == y for x, y in shown.items()):
                assert _run_tests(f"f=lambda x:{source}", tests) == 3, (ex, source)
    # A wrong constant fails: the tests are not trivially satisfied.
    ex = task.eval_set[0]
    assert _run_tests(ex.target + "+1", json.loads(dict(ex.metadata)["tests"])) == 0


def test_code_task_is_seeded_and_varied():
    a, b = make_task("code", seed=1, eval_size=50), make_task("code", seed=1, eval_size=50)
    assert a.eval_set == b.eval_set
    assert make_task("code", seed=2, eval_size=50).eval_set != a.eval_set
    kinds = {e.target.removeprefix("f=lambda x:").rstrip("0123456789)").rstrip(",-+*/%") for e in a.eval_set}
    assert len(kinds) >= 5, kinds  # several function families, not one


async def test_code_answers_are_scored_by_the_sandbox(serve_process, tmp_path):
    """The task's items through the real reward service (code_tests) and a real sandbox process,
    built as the orchestrator builds them (prompt, response, target, metadata)."""
    sandbox = serve_process("sandbox", "workers=2", "uid_base=66100", f"work_root={tmp_path / 'sbx'}")
    reward = serve_process("reward", f"sandbox_address={sandbox.address}",
                           "functions=[{kind: code_tests, options: {timeout_seconds: 2.0}}]")
    task = make_task("code", seed=0, eval_size=8)
    responses = {
        "canonical": lambda e: e.target,
        "equivalent": lambda e: "def f(x):\n    return " + e.target.removeprefix("f=lambda x:") + "\n",
        "wrong": lambda e: e.target + "+1",
        "lookup": lambda e: f"f=lambda x:{_shown(e.prompt)!r}[x]",
        "garbage": lambda e: "f=lambda x:x*(",
    }
    items = [RewardItem(prompt=e.prompt, response=make(e), target=e.target, metadata=dict(e.metadata))
             for make in responses.values() for e in task.eval_set]
    async with RewardClient(reward.address) as client:
        scores = (await client.evaluate(items=items)).scores
    by_kind = {k: [s.score for s in scores[i * 8:(i + 1) * 8]] for i, k in enumerate(responses)}
    assert by_kind["canonical"] == [1.0] * 8 and by_kind["equivalent"] == [1.0] * 8, scores[:16]
    assert by_kind["wrong"] == [0.0] * 8 and by_kind["lookup"] == [0.0] * 8 and by_kind["garbage"] == [0.0] * 8
    assert all(s.reason.startswith("code_tests: 3/3 passed") for s in scores[:8]), scores[0].reason
    assert "RUNTIME_ERROR" in scores[-1].reason, scores[-1].reason  # judged by running it, not by matching


def test_template_rewrites_prompts_only():
    plain = make_task("addition", seed=4, eval_size=20, digits=2)
    chat = make_task("addition", seed=4, eval_size=20, digits=2, template="Q: What is {body}?\nA: ({prompt})")
    a, b = plain.eval_set[0], chat.eval_set[0]
    assert b.prompt == f"Q: What is {a.prompt[:-1]}?\nA: ({a.prompt})" and b.target == a.target
    assert [e.target for e in chat.eval_set] == [e.target for e in plain.eval_set]
    eval_prompts = {e.prompt for e in chat.eval_set}
    rng, rng2 = random.Random(0), random.Random(0)
    for _ in range(200):
        ex, raw = chat.sample_train(rng), plain.sample_train(rng2)
        assert ex.prompt not in eval_prompts and ex.prompt.startswith("Q: What is ") and ex.target == raw.target
    code = make_task("code", seed=0, eval_size=5, template="{body}\n# f:\n")
    assert code.eval_set[0].metadata == make_task("code", seed=0, eval_size=5).eval_set[0].metadata
    assert code.eval_set[0].prompt == "f(0)=4 f(3)=1 f(6)=2 f(9)=5\n# f:\n"  # body: the final newline dropped
