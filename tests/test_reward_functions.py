"""Reward functions with hand-written expected scores."""

import pytest

from forgerpc.services.reward.functions import char_match, exact_match, format_tags, normalized_match, numeric_match
from forgerpc.v1.reward_pb2 import RewardItem


def item(response, target=""):
    return RewardItem(response=response, target=target)


@pytest.mark.parametrize("response,target,score", [
    ("42", "42", 1.0), (" 42\n", "42", 1.0), ("42.", "42", 0.0), ("", "42", 0.0), ("4 2", "42", 0.0),
])
def test_exact_match(response, target, score):
    assert exact_match(item(response, target))[0] == score


@pytest.mark.parametrize("response,target,score", [
    ("Paris.", "paris", 1.0), ("  The   Answer ", "the answer", 1.0), ("Lyon", "paris", 0.0),
])
def test_normalized_match(response, target, score):
    assert normalized_match(item(response, target))[0] == score


@pytest.mark.parametrize("response,target,score", [
    ("so the answer is 1,234", "1234", 1.0),
    ("x = 0.5", "1/2 = 0.5", 1.0),
    ("3 then 7", "7", 1.0),          # the last number counts
    ("7 then 3", "7", 0.0),
    ("no digits here", "7", 0.0),
    ("-3", "-3.0", 1.0),
    ("1e3", "1000", 1.0),
])
def test_numeric_match(response, target, score):
    assert numeric_match(item(response, target))[0] == score


def test_numeric_match_reasons():
    assert "no number" in numeric_match(item("none", "1"))[1]
    assert "target has no number" in numeric_match(item("1", "x"))[1]


@pytest.mark.parametrize("response,score", [
    ("<answer>4</answer>", 1.0), ("think... <answer> 4 </answer>", 1.0), ("<answer></answer>", 0.0),
    ("<answer>1</answer><answer>2</answer>", 0.0), ("4", 0.0), ("<answer>4", 0.0),
])
def test_format_tags(response, score):
    assert format_tags(item(response))[0] == score


@pytest.mark.parametrize("response,target,align,score", [
    ("956", "956", "right", 1.0), (" 956\n", "956", "right", 1.0),
    ("957", "956", "right", 2 / 3),   # units digit wrong
    ("95", "956", "right", 0.0),      # right-aligned: 5 vs 6, 9 vs 5
    ("95", "956", "left", 2 / 3),
    ("1956", "956", "right", 3 / 4),  # an extra digit costs its position
    ("", "956", "right", 0.0), ("", "", "right", 1.0),
])
def test_char_match(response, target, align, score):
    assert char_match(item(response, target), align=align)[0] == pytest.approx(score)
