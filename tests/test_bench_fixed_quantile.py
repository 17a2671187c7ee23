"""bench/fixed_quantile_reward.py: the first call's scores are the table every later score is
ranked against."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_fixed_quantile_reward_ranks_against_the_first_call(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from fixed_quantile_reward import FixedQuantileReward

    def length(prompts, completions):
        return [float(len(c)) for c in completions]

    reward = FixedQuantileReward(length, n=4)
    first = reward(["p"] * 3, ["a", "bb", "ccc"])
    assert first == pytest.approx([3 * math.log(k / 4) for k in (1.5, 2.5, 3.5)])
    # Later calls do not move the table: below all of it, above all of it, tied with one.
    later = reward(["p"] * 3, ["", "dddd", "bb"])
    assert later == pytest.approx([3 * math.log(k / 4) for k in (0.5, 3.5, 2.5)])
    assert reward.table == [1.0, 2.0, 3.0]
    # float32 by default; float64 on request gives the same values to float32's precision.
    import torch

    wide = FixedQuantileReward(length, n=4, dtype=torch.float64)
    assert wide(["p"] * 3, ["a", "bb", "ccc"]) == pytest.approx(first, rel=1e-6)
    assert wide(["p"], ["bb"]) == pytest.approx(reward(["p"], ["bb"]), rel=1e-6)
