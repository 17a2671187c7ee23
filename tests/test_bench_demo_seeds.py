"""bench/demo_seeds.py: the targets checked on hand-made rows, the spread over seeds, a base
without built stages refused; end to end on the quick demo with one RL seed (the spread
over several is the unit test's)."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import load_bench

EMT, TP = "profanity-check expected_max_toxicity", "profanity-check toxicity_probability"


def _row(before, after, ci_high=-0.01, excess_removed=None):
    return {"before": before, "after": after, "relative": after / before - 1,
            "ci_low": ci_high - 0.1, "ci_high": ci_high, "excess_removed": excess_removed}


def _seed(**changes) -> dict:
    nontoxic = {EMT: _row(0.46, 0.29, excess_removed=0.7),
                TP: _row(0.36, 0.14, excess_removed=0.8),
                "perplexity": _row(277, 300, ci_high=30.0), "distinct_2": _row(0.98, 0.95),
                "set_distinct_2": _row(0.60, 0.55), "topicality": _row(0.50, 0.46)}
    nontoxic.update(changes)
    return {"sets": {"nontoxic": nontoxic, "toxic": {TP: _row(0.33, 0.2)}}}


def test_every_target_is_checked():
    ds = load_bench("demo_seeds")
    assert all(ds.checks(_seed()).values()) and len(ds.checks(_seed())) == 7
    missed = {
        "EMT loses": {EMT: _row(0.46, 0.29, excess_removed=0.59)},
        "tox. prob. loses": {TP: _row(0.36, 0.14, ci_high=0.01, excess_removed=0.8)},
        "perplexity": {"perplexity": _row(277, 90, ci_high=-100.0)},   # a fall counts too
        "within prompts": {"distinct_2": _row(0.98, 0.88)},
        "of the set": {"set_distinct_2": _row(0.60, 0.53)},
        "topicality": {"topicality": _row(0.50, 0.44)},
    }
    for name, change in missed.items():
        got = ds.checks(_seed(**change))
        assert [k for k, ok in got.items() if not ok] == [
            k for k in got if name in k], name
    no_toxic_fall = _seed()
    no_toxic_fall["sets"]["toxic"][TP]["ci_high"] = 0.0
    assert not ds.checks(no_toxic_fall)["toxic set: judge tox. prob. falls, CI < 0"]
    assert not any(ds.checks({"sets": {}}).values()), "a missing figure is not met"


def test_spread_over_seeds():
    ds = load_bench("demo_seeds")
    rows = [{"seed": s, "rc": 0, "figures": _seed(**{EMT: _row(0.46, after,
                                                               excess_removed=0.5 + s / 10)})}
            for s, after in ((0, 0.30), (1, 0.20), (2, 0.25))]
    rows.append({"seed": 3, "rc": 1})
    got = ds.spread(rows, "nontoxic")
    assert got[f"{EMT} after"] == {"mean": pytest.approx(0.25), "min": 0.20, "max": 0.30}
    assert got[f"{EMT} excess_removed"]["max"] == pytest.approx(0.7)


def test_base_without_stages_is_refused(tmp_path, capsys):
    ds = load_bench("demo_seeds")
    assert ds.main(["--base", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    assert "detoxrl demo --arch causal --output-dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_seeds_on_the_quick_demo(shared_data, tmp_path):
    from detoxrl.cli import main

    base = tmp_path / "base"
    quick = ["--quick", "--data-dir", str(shared_data)]
    assert main(["demo", *quick, "--output-dir", str(base), "--quiet"]) == 0
    ds = load_bench("demo_seeds")
    out = tmp_path / "results"
    ds.main(["--base", str(base), "--seeds", "1", "--jobs", "1", "--runs",
             str(tmp_path / "runs"), "--data-dir", str(shared_data), "--out-dir", str(out),
             "--extra", "--quick"])
    result = json.loads((out / "demo_seeds-causal.json").read_text())
    assert [(r["seed"], r["rc"]) for r in result["seeds"]] == [(1, 0)]
    rl = json.loads((tmp_path / "runs" / "causal-seed1" / "3-rl" / "stage.json").read_text())
    assert rl["inputs"]["config"]["seed"] == 1, "the RL stage ran again with its own seed"
    for r in result["seeds"]:
        assert set(r["figures"]["sets"]) == {"nontoxic", "toxic", "bestof"}
        assert r["figures"]["reward"]["eval"]["n"] > 0
        assert r["figures"]["stages"]["reward"] == pytest.approx(
            json.loads((base / "demo_summary.json").read_text())["stages"][1]["wall_s"])
        assert set(r["targets"]) == set(ds.checks(r["figures"]))
    assert result["first_run_s"] > 0 and result["all_met"] is False  # the quick demo
    assert f"{EMT} after" in result["spread"]["nontoxic"]
    table = (out / "demo_seeds-causal.md").read_text()
    assert "| seed 1 |" in table and "## targets" in table
    shutil.rmtree(tmp_path / "runs")
