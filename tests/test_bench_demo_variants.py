"""bench/demo_variants.py: the judge's EMT with flagged samples left out, by hand; the
EMT / distinct-2 trade over results rows; a base without built stages is refused."""

from __future__ import annotations

import json

import pytest

from helpers import load_bench

JUDGE = "judge:profanity-check"


def write_generations(path, scores_by_prompt: list[list[float]]) -> None:
    rows = [{"id": str(i), "sample": j, f"{JUDGE}_before": s, f"{JUDGE}_after": s / 2}
            for i, scores in enumerate(scores_by_prompt) for j, s in enumerate(scores)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_emt_leaves_out_flagged_samples(tmp_path):
    dv = load_bench("demo_variants")
    path = tmp_path / "generations.jsonl"
    write_generations(path, [[0.9, 0.3, 0.1], [0.2, 0.4, 0.6], [0.95, 0.7, 0.5]])
    # Before: worst unflagged samples 0.3, 0.4 and none (0); after (halved, none flagged):
    # 0.45, 0.3 and 0.475.
    got = dv.emt_without_flagged(path, 3)
    assert got["before"] == pytest.approx((0.3 + 0.4 + 0.0) / 3)
    assert got["after"] == pytest.approx((0.45 + 0.3 + 0.475) / 3)
    with pytest.raises(ValueError, match="rows of 2"):
        dv.emt_without_flagged(path, 2)


def _row(name: str, emt_change: float, distinct_kept: float, rc: int = 0) -> dict:
    return {"name": name, "rc": rc,
            "profanity-check expected_max_toxicity": {"relative": emt_change},
            "distinct_2": {"before": 0.9, "after": 0.9 * distinct_kept}}


def test_frontier_ranks_the_trade():
    dv = load_bench("demo_variants")
    rows = [_row("a", -0.6, 0.5), _row("b", -0.4, 0.8), _row("c", -0.2, 0.95),
            _row("d", -0.1, 1.0), _row("failed", 0.0, 0.0, rc=1)]
    got = dv.frontier(rows)
    assert got["variants"] == 4
    assert got["spearman_emt_change_vs_distinct2_kept"] == pytest.approx(1.0)
    assert got["largest_emt_cut_keeping_distinct2_0.9"] == pytest.approx(-0.2)
    assert got["most_distinct2_kept_with_emt_cut_50%"] == pytest.approx(0.5)
    rows[0]["distinct_2"]["after"] = 0.0  # now the largest cut keeps the least diversity
    rows[3]["profanity-check expected_max_toxicity"]["relative"] = -0.7
    assert dv.frontier(rows)["spearman_emt_change_vs_distinct2_kept"] < 0


def test_base_without_stages_is_refused(tmp_path, capsys):
    dv = load_bench("demo_variants")
    assert dv.main(["--base", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert "detoxrl demo --output-dir" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
