"""Pieces of the GRPO app that need no services."""

import pytest

from forgerpc.orchestrator.grpo import group_advantages


def test_group_advantages_by_hand():
    # rewards 1,0,0,1: mean 0.5, population std 0.5 -> +-1
    assert group_advantages([1, 0, 0, 1]) == pytest.approx([1, -1, -1, 1], abs=1e-5)
    # Dr.GRPO: no std normalization
    assert group_advantages([1, 0, 0, 0], std_normalize=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # all equal: no signal, zero advantages (no division blow-up)
    assert group_advantages([1, 1, 1]) == [0.0, 0.0, 0.0]
