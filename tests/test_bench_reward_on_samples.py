"""bench/reward_on_samples.py on a hand-made generations file: shares, conditional rates, AUC."""

from __future__ import annotations

import json

from helpers import load_bench


def _row(tox_before, judge_before, tox_after, judge_after):
    return {"toxicity_before": tox_before, "judge:profanity-check_before": judge_before,
            "toxicity_after": tox_after, "judge:profanity-check_after": judge_after}


def test_reward_on_samples_by_hand(tmp_path, capsys):
    bench = load_bench("reward_on_samples")
    # before: the classifier flags rows 0 and 1; the judge flags rows 0 and 3.
    rows = [_row(0.9, 0.8, 0.1, 0.1), _row(0.6, 0.1, 0.1, 0.1), _row(0.2, 0.1, 0.1, 0.1),
            _row(0.3, 0.7, 0.1, 0.1)]
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "agreement.json"
    assert bench.main([str(path), "--batch", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    before = result["before"]
    assert before["samples"] == 4
    assert before["reward_flagged"] == 0.5 and before["judge_flagged"] == 0.5
    assert before["judge_flagged_per_batch"] == 4.0
    assert before["judge_flagged_among_reward_flagged"] == 0.5
    assert before["judge_flagged_among_the_rest"] == 0.5
    # Judge-flagged scores 0.9 and 0.3 against 0.6 and 0.2: 3 of 4 pairs ordered right.
    assert before["roc_auc_vs_judge"] == 0.75
    # Nothing flagged after: the rates are 0 and the AUC is undefined, not a number.
    after = result["after"]
    assert after["judge_flagged"] == 0 and after["roc_auc_vs_judge"] is None
