"""Evaluation statistics, text quality, comparison tables, atomic I/O and the HTML report."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
import types

import numpy as np
import pytest
import torch

from detoxrl.commands import report as report_command
from detoxrl.errors import DetoxError
from detoxrl.evaluation import quality, stats, tables
from detoxrl.evaluation.report import build_report
from detoxrl.runs.io import atomic_dir, atomic_write_json, atomic_write_text


def _simulated(seed: int, n: int = 500, shift: float = -0.05):
    rng = np.random.default_rng(seed)
    before = rng.uniform(0, 1, n)
    return before, before + shift + rng.normal(0, 0.1, n)


# --------------------------------------------------------------------------- stats

def test_summarize_uses_population_std():
    s = stats.summarize(torch.tensor([0.1, 0.2, 0.6, 0.9]))
    assert s["mean"] == pytest.approx(0.45)
    assert s["std"] == pytest.approx(np.std([0.1, 0.2, 0.6, 0.9]))  # ddof=0
    assert s["median"] == pytest.approx(0.4)
    assert (s["share_above_0_5"], s["max"], s["n"]) == (0.5, pytest.approx(0.9), 4)
    assert stats.summarize([])["n"] == 0


def test_percent_improvement_by_hand():
    # before: mean 0.3, std 0.1; after: mean 0.1, std 0.
    result = stats.percent_improvement([0.2, 0.4], [0.1, 0.1])
    assert result["mean"] == pytest.approx((0.3 - 0.1) / 0.3 * 100)
    assert result["std"] == pytest.approx(100.0)
    assert np.isnan(stats.percent_improvement([0.0, 0.0], [0.1, 0.1])["mean"])


def test_bootstrap_interval_covers_the_true_difference():
    before, after = _simulated(seed=0)
    boot = stats.paired_bootstrap(before, after, seed=0)
    assert boot["ci_low"] < -0.05 < boot["ci_high"]
    assert boot["observed"] == pytest.approx(after.mean() - before.mean())
    assert boot["ci_high"] - boot["ci_low"] < 0.05  # pairing removes the uniform spread
    # Over repeated experiments a 95% interval should miss rarely (a few in 40).
    covered = 0
    for seed in range(40):
        b, a = _simulated(seed=100 + seed, n=200)
        ci = stats.paired_bootstrap(b, a, n_resamples=1000, seed=seed)
        covered += ci["ci_low"] <= -0.05 <= ci["ci_high"]
    assert covered >= 34


def test_bootstrap_is_seeded_and_supports_std():
    before, after = _simulated(seed=1)
    first = stats.paired_bootstrap(before, after, n_resamples=500, seed=3, statistic=np.std)
    again = stats.paired_bootstrap(before, after, n_resamples=500, seed=3, statistic=np.std)
    assert first == again and first["statistic"] == "std"
    assert first["observed"] == pytest.approx(after.std() - before.std())
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_bootstrap([1.0, 2.0], [1.0])


def test_verdicts():
    before, _ = _simulated(seed=2)
    for after, expected in ((before - 0.3, "improved"), (before + 0.3, "worse"),
                            (before.copy(), "no significant change")):
        boot = stats.paired_bootstrap(before, after, n_resamples=1000)
        assert stats.verdict(boot["ci_low"], boot["ci_high"]) == expected
    assert stats.verdict(0.1, 0.2, lower_is_better=False) == "improved"
    assert stats.verdict(float("nan"), float("nan")) == "no significant change"


def test_evaluation_summary_layout():
    before, after = _simulated(seed=4, n=50)
    summary = stats.evaluation_summary(before, after, reward_before=-before,
                                       reward_after=-after, kl=[0.5, 1.5], n_resamples=200)
    assert summary["n"] == 50
    assert summary["metrics"]["toxicity"]["bootstrap"]["mean"]["verdict"] == "improved"
    assert summary["metrics"]["reward"]["bootstrap"]["mean"]["verdict"] == "improved"
    assert summary["kl"] == {"mean": 1.0, "std": 0.5}


def _pairwise_auc(labels, scores) -> float:
    """The definition, pair by pair: a positive above a negative counts 1, a tie 1/2."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0
             for p in scores[labels] for n in scores[~labels]]
    return float(np.mean(pairs))


@pytest.mark.parametrize("labels, scores", [
    ([1, 0, 1, 0, 1, 0], [0.9, 0.1, 0.4, 0.4, 0.4, 0.8]),      # ties across the classes
    ([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]),                      # all tied: chance
    ([0, 0, 1, 1, 0], [3.0, 2.0, 1.0, 0.0, 5.0]),              # perfectly wrong
    ([1, 0, 0, 1, 0, 1, 1], [-2.0, -1.0, -1.0, 7.0, 0.0, -1.0, 0.0]),
])
def test_roc_auc_equals_sklearn_and_the_pairwise_definition(labels, scores):
    from sklearn.metrics import roc_auc_score

    got = stats.roc_auc(labels, scores)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def test_roc_auc_with_many_ties_and_one_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300).astype(bool)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: many ties
    assert stats.roc_auc(labels, torch.tensor(scores)) == pytest.approx(
        _pairwise_auc(labels, scores), abs=1e-12)
    # Negated scores rank the other way round.
    assert stats.roc_auc(labels, -scores) == pytest.approx(1 - stats.roc_auc(labels, scores))
    assert np.isnan(stats.roc_auc([True, True], [0.2, 0.1]))
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        stats.roc_auc([True, False, True], [0.2, 0.1])


# --------------------------------------------------------------------------- quality

def test_rouge_on_known_strings():
    assert quality.rouge(["the cat sat"], [["the cat sat"]]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    scores = quality.rouge(["the cat sat"], [["the cat ran"]])
    assert scores["rouge1"] == pytest.approx(2 / 3)  # 2 shared unigrams of 3 each side
    assert scores["rouge2"] == pytest.approx(1 / 2)  # "the cat" of 2 bigrams each side
    best = quality.rouge(["the cat sat"], [["a dog barked", "the cat sat"]])
    assert best["rouge1"] == pytest.approx(1.0)  # best reference wins
    mean = quality.rouge(["the cat sat", "xyz"], ["the cat sat", "abc"])
    assert mean["rouge1"] == pytest.approx(0.5)


def test_distinct_n_and_length(tokenizer):
    texts = ["a b a", "a b"]
    assert quality.distinct_n(texts, 1) == pytest.approx(2 / 5)
    assert quality.distinct_n(texts, 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert quality.distinct_n(["a"], 2) == 0.0
    assert quality.mean_length(texts) == pytest.approx(2.5)
    expected = np.mean([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])
    assert quality.mean_length(texts, tokenizer) == pytest.approx(expected)


# --------------------------------------------------------------------------- tables, io

def _rows():
    return tables.comparison_rows(
        ["q1", "q2 | pipe", "q3"], ["b1", "<script>alert(1)</script>", "b3\nline"],
        ["a1", "a2", "a3"], torch.tensor([0.0, 1.0, 2.0]), [0.5, 3.0, 1.0])


def test_comparison_rows_sorted_by_gain():
    rows = _rows()
    assert [r["query"] for r in rows] == ["q2 | pipe", "q1", "q3"]
    assert [r["reward_diff"] for r in rows] == pytest.approx([2.0, 0.5, -1.0])


def test_table_files(tmp_path):
    rows = _rows()
    tables.write_csv(rows, tmp_path / "t.csv")
    with (tmp_path / "t.csv").open(newline="") as fh:
        parsed = list(csv.DictReader(fh))
    assert parsed[1]["response_before"] == "b1" and float(parsed[0]["reward_diff"]) == 2.0
    assert tables.read_rows(tmp_path / "t.csv") == rows
    tables.write_markdown(rows, tmp_path / "t.md")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].startswith("| query | response_before") and lines[1].startswith("|---")
    assert len(lines) == 5 and "q2 \\| pipe" in lines[2] and "b3<br>line" in lines[4]
    tables.write_html(rows, tmp_path / "t.html")
    page = (tmp_path / "t.html").read_text()
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_helpers(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"v": np.float32(0.5), "bad": float("nan")})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": 0.5, "bad": None}
    atomic_write_text(tmp_path / "a" / "x.json", "replaced")
    assert (tmp_path / "a" / "x.json").read_text() == "replaced"
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("2")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "partial.txt").write_text("3")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]


# --------------------------------------------------------------------------- report

def _fake_run(run_dir):
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("steps: 3\nreward:\n  label: nothate\n")
    lines = [json.dumps({"step": s, "env/reward_mean": 0.1 * s, "objective/kl": 0.2 * s,
                         "objective/kl_coef": 0.2, "ppo/returns/mean": 0.3,
                         "ppo/loss/policy": -0.01 * s}) for s in range(1, 4)]
    (run_dir / "metrics.jsonl").write_text("\n".join([*lines, '{"step": 4, "env/rew']) + "\n")
    before, after = _simulated(seed=5, n=40)
    before, after = before.clip(0, 1), after.clip(0, 1)
    atomic_write_json(run_dir / "eval" / "toxicity.json", {"before": before, "after": after})
    summary = stats.evaluation_summary(
        before, after, quality_before=quality.quality_metrics(["a b"], [["a b"]]),
        quality_after=quality.quality_metrics(["a c"], [["a b"]]), kl=[1.0, 2.0],
        n_resamples=200)
    atomic_write_json(run_dir / "eval" / "summary.json", summary)
    tables.write_csv(_rows(), run_dir / "eval" / "compare.csv")


def test_report_is_self_contained(tmp_path):
    _fake_run(tmp_path / "run")
    path = build_report(tmp_path / "run")
    assert path == tmp_path / "run" / "report.html"
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 2  # curves + toxicity histogram
    assert "http://" not in page and "https://" not in page
    assert "steps: 3" in page and "ppo/loss/value" in page  # config; the missing curve noted
    assert "improved" in page and "rouge1" in page and "&lt;script&gt;" in page
    assert "<script>" not in page


def test_report_tolerates_an_empty_run(tmp_path):
    out = build_report(tmp_path, tmp_path / "elsewhere" / "r.html")
    page = out.read_text()
    assert "No config.yaml" in page and "No training metrics" in page
    assert "data:image/png" not in page
    with pytest.raises(DetoxError, match="does not exist"):
        build_report(tmp_path / "missing")


def test_report_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="detoxrl")
    report_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(tmp_path), "--output", str(tmp_path / "r.html")])
    assert args.func(args) == 0 and (tmp_path / "r.html").is_file()
    with pytest.raises(DetoxError, match="does not exist"):
        args.func(parser.parse_args(["report", str(tmp_path / "missing")]))


def _stub_missing_commands(monkeypatch):
    """Stand-ins for sibling subcommands not written yet, so ``cli.main`` can be exercised."""
    for name in ("data", "train", "evaluate", "compare"):
        full = f"detoxrl.commands.{name}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:
                raise
            stub = types.ModuleType(full)
            stub.register = lambda subparsers: None
            monkeypatch.setitem(sys.modules, full, stub)


def test_cli_report_on_a_missing_dir_exits_2(tmp_path, capsys, monkeypatch):
    _stub_missing_commands(monkeypatch)
    from detoxrl.cli import main

    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "detoxrl report: error: Run folder" in err and "does not exist" in err
