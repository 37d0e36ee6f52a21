"""Reward functions. Each is `fn(item, **options) -> (score in [0, 1], reason)`.

`item` is a forgerpc.v1.RewardItem. A function never raises on bad model output: a response
that cannot be parsed scores 0 with a reason saying why.
"""

from __future__ import annotations

import math
import re
from typing import Callable

Score = tuple[float, str]

_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def exact_match(item) -> Score:
    """1 if the response equals the target after stripping surrounding whitespace."""
    ok = item.response.strip() == item.target.strip()
    return (1.0, "exact_match: equal") if ok else (0.0, "exact_match: differs from target")


def _normalize(text: str) -> str:
    text = " ".join(text.lower().split())
    return text.rstrip(".").strip()


def normalized_match(item) -> Score:
    """1 if response and target agree ignoring case, runs of whitespace and a final period."""
    ok = _normalize(item.response) == _normalize(item.target)
    return (1.0, "normalized_match: equal") if ok else (0.0, "normalized_match: differs from target")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(item, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> Score:
    """1 if the last number in the response equals the target's number within tolerance.

    |a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)   (math.isclose)
    """
    want = _last_number(item.target)
    if want is None:
        return 0.0, "numeric_match: target has no number"
    got = _last_number(item.response)
    if got is None:
        return 0.0, "numeric_match: no number in response"
    if math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol):
        return 1.0, "numeric_match: equal"
    return 0.0, f"numeric_match: {got:g} != {want:g}"


def format_tags(item, tag: str = "answer") -> Score:
    """1 if the response holds exactly one non-empty <tag>...</tag> block."""
    blocks = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", item.response, flags=re.S)
    if len(blocks) == 1 and blocks[0].strip():
        return 1.0, f"format_tags: one <{tag}> block"
    return 0.0, f"format_tags: expected one non-empty <{tag}> block, found {len(blocks)}"


def char_match(item, align: str = "right") -> Score:
    """Partial credit: the fraction of aligned characters the response gets right.

        r, t = response.strip(), target.strip()
        score = #{i < min(|r|, |t|) : r[i] == t[i]} / max(|r|, |t|)       (align="left")
        score = the same on the reversed strings                         (align="right")

    Right alignment lines numbers up at the units digit, so `957` for `956` scores 2/3 and `95`
    for `956` scores 0. 1 only for an exact match (as exact_match); an empty response scores 0
    (1 if the target is empty too).
    """
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right', got {align!r}")
    r, t = item.response.strip(), item.target.strip()
    if align == "right":
        r, t = r[::-1], t[::-1]
    n = max(len(r), len(t))
    if n == 0:
        return 1.0, "char_match: both empty"
    right = sum(a == b for a, b in zip(r, t))
    return right / n, f"char_match: {right}/{n} characters"


FUNCTIONS: dict[str, Callable[..., Score]] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "numeric_match": numeric_match,
    "format_tags": format_tags,
    "char_match": char_match,
}


def regex_match(item, pattern: str, compare_target: bool = False, ignore_case: bool = False) -> Score:
    """Regex check on the response.

    compare_target=False: 1 if `pattern` occurs anywhere in the response.
    compare_target=True:  1 if the last match's first group (whole match when the pattern has no
    group) equals the target, ignoring case, surrounding whitespace and a final period.
    """
    flags = re.S | (re.I if ignore_case else 0)
    matches = list(re.finditer(pattern, item.response, flags))
    if not matches:
        return 0.0, f"regex_match: no match for {pattern!r}"
    if not compare_target:
        return 1.0, "regex_match: matched"
    last = matches[-1]
    got = last.group(1) if last.re.groups else last.group(0)
    if _normalize(got or "") == _normalize(item.target):
        return 1.0, "regex_match: extracted answer equals target"
    return 0.0, f"regex_match: extracted {got!r:.40} differs from target"


def length_penalty(item, max_length: int, slack: int = 0, unit: str = "chars") -> Score:
    """A penalty in [-1, 0] for responses longer than `max_length`.

        n = len(response) in chars (or whitespace-separated words when unit="words")
        penalty = -min(1, max(0, n - max_length) / slack),   slack defaults to max_length

    So a response at the limit costs nothing and one `slack` units over it costs the full weight.
    """
    if unit not in ("chars", "words"):
        raise ValueError(f"unit must be 'chars' or 'words', got {unit!r}")
    n = len(item.response) if unit == "chars" else len(item.response.split())
    over = max(0, n - max_length)
    value = -min(1.0, over / float(slack or max_length or 1))
    return value, f"length_penalty: {n} {unit} ({over} over {max_length})"


FUNCTIONS["regex_match"] = regex_match
FUNCTIONS["length_penalty"] = length_penalty


def constant(item, value: float = 1.0) -> Score:
    """`value` for every item, whatever it says: a null reward for benchmarks of the loop itself."""
    return float(value), "constant"


FUNCTIONS["constant"] = constant
