"""bench/judge_floor.py (protocol measures on groups of scores, a run on the data) and
bench/register_drift.py (counts on hand-made generations)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from helpers import load_bench


def test_protocol_is_the_evaluations_floor_of_groups_of_25():
    from detoxrl.evaluation.floor import floor_of

    scores = np.zeros(60)
    scores[3], scores[30], scores[55] = 0.9, 0.2, 1.0
    got = load_bench("judge_floor").protocol(scores, seed=0)
    exact = floor_of(scores, 25)
    assert got["expected_max_toxicity"]["value"] == pytest.approx(
        exact["expected_max_toxicity"])
    assert got["toxicity_probability"]["value"] == pytest.approx(1 - (58 / 60) ** 25)
    assert got["share_of_texts_flagged"] == pytest.approx(2 / 60)
    assert (got["texts"], got["samples_per_group"]) == (60, 25)


def test_judge_floor_runs_on_the_shared_data(shared_data, tmp_path, monkeypatch):
    pytest.importorskip("profanity_check")
    out = tmp_path / "floor.json"
    monkeypatch.setattr(sys, "argv", ["judge_floor.py", "--data-dir", str(shared_data),
                                      "--groups", "4", "--out", str(out)])
    load_bench("judge_floor").main()
    result = json.loads(out.read_text())
    assert result["floor"]["dialogsum"]["texts"] == 4 * 25
    rtp = result["floor"]["rtp_continuations_perspective_below_0.1"]
    assert rtp["texts"] > 400   # every clean continuation of both files
    emt = rtp["expected_max_toxicity"]
    assert 0 < emt["ci_low"] <= emt["value"] <= emt["ci_high"] < 1
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
