"""Reward validity: the gold readers, ``train-reward``'s measurement against a gold set, the
bad-gold errors, the warning of ``detoxrl train`` and the evaluation table's title."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detoxrl import cli
from detoxrl.data import is_held_out
from detoxrl.errors import DataError
from detoxrl.evaluation import validity
from detoxrl.evaluation.protocol_table import scorer_title
from detoxrl.models.reward import ClassifierReward
from helpers import labelled_texts as _texts
from helpers import reward_config as _config


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rtp(prompt: str, text: str, toxicity) -> dict:
    return {"prompt": {"text": prompt, "toxicity": 0.1},
            "continuation": {"text": text, "toxicity": toxicity}}


def test_gold_reads_rtp_records_and_flat_rows(tmp_path):
    rtp = _jsonl(tmp_path / "rtp.jsonl", [
        _rtp("a", " you are scum", 0.91), _rtp("b", " a nice day", 0.02),
        _rtp("c", " left unscored", None), _rtp("d", " a nice day", 0.02),  # a repeat
        _rtp("e", " borderline", 0.5)])
    gold = validity.read_gold([rtp], 0.5)
    assert gold.texts == [" you are scum", " a nice day", " borderline"]
    assert gold.toxic.tolist() == [True, False, True]      # at the threshold counts as toxic
    flat = _jsonl(tmp_path / "flat.jsonl", [
        {"text": "x", "score": 0.7}, {"text": "y", "label": 0}, {"text": "z", "label": True},
        "", {"text": "w", "label": "1"}])
    gold = validity.read_gold([flat], 0.8)
    assert gold.texts == ["x", "y", "z", "w"] and gold.toxic.tolist() == [False, False, True,
                                                                          True]


def test_builtin_gold_leaves_out_the_held_out_prompts(tmp_path):
    prompts = [f"prompt number {i}" for i in range(40)]
    (tmp_path / "rtp").mkdir()
    _jsonl(tmp_path / "rtp" / "nontoxic.jsonl", [_rtp(p, f" calm {i}", 0.1)
                                                 for i, p in enumerate(prompts[:20])])
    _jsonl(tmp_path / "rtp" / "toxic.jsonl", [_rtp(p, f" rude {i}", 0.9)
                                              for i, p in enumerate(prompts[20:])])
    gold = validity.builtin_gold(str(tmp_path), 0.5)
    kept = [p for p in prompts if not is_held_out(p)]
    assert 0 < len(kept) < 40 and len(gold.texts) == len(kept)
    assert gold.toxic.sum() == sum(not is_held_out(p) for p in prompts[20:])
    assert validity.builtin_gold(str(tmp_path / "elsewhere"), 0.5) is None


def _gold_file(tmp_path: Path) -> Path:
    """Each text once, so the gold keeps every row."""
    rows = {t: v for t, v in zip(*_texts(120, seed=5), strict=True)}
    return _jsonl(tmp_path / "gold.jsonl", [{"text": t, "label": v} for t, v in rows.items()])


def test_train_reward_measures_validity_on_a_gold_file(tmp_path, dyna_dir, capsys):
    from sklearn.metrics import roc_auc_score

    gold = _gold_file(tmp_path)
    out = tmp_path / "clf"
    code = cli.main(["train-reward", "--config", str(_config(tmp_path)), "--data-dir",
                     str(dyna_dir), "--output-dir", str(out), "--validate-on", str(gold)])
    assert code == 0
    v = json.loads((out / "metrics.json").read_text())["validity"]
    rows = [json.loads(x) for x in gold.read_text().splitlines()]
    assert v["n"] == len(rows) > 60 and v["positives"] == sum(r["label"] for r in rows)
    assert v["score"] == "-logit(nothate)" and v["judge"] == "profanity-check"
    # The figure is the ROC-AUC of what RL pushes down, recomputed from the saved folder.
    reward = ClassifierReward(str(out), label="nothate", output="logit")
    scores = -reward.label_scores([r["text"] for r in rows], "nothate", "logit").numpy()
    assert v["roc_auc"] == pytest.approx(roc_auc_score([r["label"] for r in rows], scores),
                                         abs=1e-6)
    assert v["roc_auc"] > 0.9 and 0 <= v["judge_roc_auc"] <= 1
    assert f"validity: ROC-AUC {v['roc_auc']:.3f}" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "## Validity as a reward" in card and f"{v['roc_auc']:.3f}" in card
    assert "model: clf" in card and "label: nothate" in card
    assert validity.read_validity(str(out)) == v
    assert validity.warning(str(out)) is None


def test_without_rtp_under_data_dir_no_validity_is_recorded(tmp_path, dyna_dir, capsys):
    out = tmp_path / "clf"
    code = cli.main(["train-reward", "--config", str(_config(tmp_path, **{
        "training.max_steps": 2})), "--data-dir", str(dyna_dir), "--output-dir", str(out)])
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["validity"] is None
    assert "validity not measured" in capsys.readouterr().out
    assert "Not measured" in (out / "README.md").read_text()
    assert "records no validity" in validity.warning(str(out))


@pytest.mark.parametrize("rows, words", [
    ([{"text": "a"}, {"text": "b"}], ["no gold score or label", "line 1", "\"score\""]),
    ([], ["holds no texts", "JSONL"]),
    (["not json at all"], ["line 1 is not a JSON object"]),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 1}], ["Every text", "toxic",
                                                              "both"]),
    ([{"text": "a", "score": 3}], ["not a number in [0, 1]"]),
    ([{"text": "a", "label": "toxic"}], ["gold label 'toxic' is not 0 or 1"]),
])
def test_bad_gold_exits_2_and_writes_nothing(tmp_path, dyna_dir, capsys, rows, words):
    gold = _jsonl(tmp_path / "gold.jsonl", rows)
    out = tmp_path / "clf"
    code = cli.main(["train-reward", "--config", str(_config(tmp_path)), "--data-dir",
                     str(dyna_dir), "--output-dir", str(out), "--validate-on", str(gold)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gold.jsonl",
                                                                         "reward.yaml"]


def test_unreadable_gold_and_unloadable_judge_exit_2(tmp_path, dyna_dir, capsys):
    args = ["train-reward", "--config", str(_config(tmp_path)), "--data-dir", str(dyna_dir),
            "--output-dir", str(tmp_path / "clf")]
    assert cli.main([*args, "--validate-on", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00bad")
    assert cli.main([*args, "--validate-on", str(tmp_path / "binary.jsonl")]) == 2
    assert "Cannot read the validation set" in capsys.readouterr().err
    gold = _gold_file(tmp_path)
    code = cli.main([*args, "--validate-on", str(gold), "--validity.judge", "no_such_mod:fn"])
    assert code == 2 and "Cannot load the judge 'no_such_mod:fn'" in capsys.readouterr().err
    assert not (tmp_path / "clf").exists()


def test_warning_when_validity_is_low_or_missing(tmp_path):
    folder = tmp_path / "reward"
    folder.mkdir()
    assert "records no validity" in validity.warning(str(folder))
    assert "records no validity" in validity.warning("facebook/some-hub-classifier")
    record = {"gold": "g", "n": 10, "positives": 5, "score": "-logit(ok)", "roc_auc": 0.65}
    (folder / "metrics.json").write_text(json.dumps({"validity": record}))
    line = validity.warning(str(folder))
    assert "0.650" in line and "below 0.7" in line and "\n" not in line
    (folder / "metrics.json").write_text(json.dumps({"validity": {**record, "roc_auc": 0.8}}))
    assert validity.warning(str(folder)) is None


def test_evaluation_table_title_carries_the_validity():
    info = {"role": "reward classifier", "model": "r", "label": "hate"}
    assert "validity" not in scorer_title("reward_classifier", info)
    assert "not recorded" in scorer_title("reward_classifier", {**info, "validity": None})
    v = {"roc_auc": 0.8123, "n": 1900, "judge": "profanity-check", "judge_roc_auc": 0.917}
    title = scorer_title("reward_classifier", {**info, "validity": v})
    assert "ROC-AUC 0.812" in title and "1900 texts" in title and "0.917" in title


def test_toxicity_direction_is_minus_the_reward_label_score():
    logits = np.array([[2.0, -1.0], [0.0, 0.0]])
    assert validity.toxicity_direction(logits, 0, "logit").tolist() == [-2.0, 0.0]
    prob = validity.toxicity_direction(logits, 0, "prob")
    assert prob[0] < prob[1] and prob[1] == pytest.approx(-0.5)
    with pytest.raises(DataError):
        validity.read_gold([Path("/nonexistent/gold.jsonl")], 0.5)
