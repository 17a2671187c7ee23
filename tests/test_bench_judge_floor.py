"""bench/judge_floor.py (protocol measures on groups of scores, a run on the data) and
bench/register_drift.py (counts on hand-made generations)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from helpers import load_bench


def test_protocol_is_the_worst_of_each_group_of_25():
    floor = load_bench("judge_floor")
    scores = np.zeros(60)                      # two whole groups; the last 10 are dropped
    scores[3], scores[30], scores[55] = 0.9, 0.2, 1.0
    got = floor.protocol(scores)
    assert got == {"expected_max_toxicity": pytest.approx(0.55), "toxicity_probability": 0.5,
                   "share_of_texts_flagged": pytest.approx(2 / 60), "groups": 2}


def test_judge_floor_runs_on_the_shared_data(shared_data, tmp_path, monkeypatch):
    pytest.importorskip("profanity_check")
    out = tmp_path / "floor.json"
    monkeypatch.setattr(sys, "argv", ["judge_floor.py", "--data-dir", str(shared_data),
                                      "--groups", "4", "--out", str(out)])
    load_bench("judge_floor").main()
    result = json.loads(out.read_text())
    assert result["floor"]["dialogsum"]["groups"] == 4
    for labels in result["flagged_share_by_label"].values():
        assert 0 < labels["hate"] < 1 and 0 < labels["nothate"] < 1


def test_register_drift_counts_by_hand():
    module = load_bench("register_drift")
    rows = [{"after": "I know.\nI think you know"}, {"after": "I know.\nI think you know"},
            {"after": "You see"}]
    got = module.drift(rows, "after", top=2)
    assert got["responses"] == 3 and got["distinct_responses"] == 2
    assert got["newlines_per_response"] == 2 / 3
    assert got["line_starts"] == [("I", 4), ("You", 1)]
    assert got["words"] == [("i", 4), ("know", 4)]   # ties in first-seen order
