"""Math answer equivalence with the `math-verify` package (HF's sympy-based verifier).

    score = 1 if verify(parse(target), parse(response)) else 0

parse() extracts the final answer from free text and LaTeX (\\boxed{}, $...$, plain numbers) and
verify() compares symbolically and numerically (1/2 == 0.5 == \\frac{1}{2}, 2\\sqrt{2} == \\sqrt{8},
{1,2} as a set, 10% == 0.1). Its own signal-based timeouts only work on the main thread, so they
are off here and the reward server's per-item deadline bounds the time instead.
"""

from __future__ import annotations

import logging

from forgerpc.services.reward.functions import Score

# math-verify warns on every call that its timeouts are off; the server's deadline covers that.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def math_equiv(item, float_rounding: int = 6) -> Score:
    from math_verify import parse, verify  # sympy import is slow: only when configured

    target = item.target.strip()
    if not target:
        return 0.0, "math_equiv: empty target"
    gold = parse(target if "$" in target or "\\boxed" in target else f"${target}$", parsing_timeout=None)
    if not gold:
        return 0.0, "math_equiv: target does not parse"
    answer = parse(item.response, parsing_timeout=None)
    if not answer:
        return 0.0, "math_equiv: no answer found in response"
    if verify(gold, answer, float_rounding=float_rounding, timeout_seconds=None):
        return 1.0, f"math_equiv: {answer[-1]} equals {gold[-1]}"
    return 0.0, f"math_equiv: {answer[-1]!s:.40} != {gold[-1]!s:.40}"
