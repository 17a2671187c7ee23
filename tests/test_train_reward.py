"""``detoxrl train-reward``: tiny classifiers end to end through the CLI, the data layouts,
the metrics, the bad-input errors, and a short real-Dynabench run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detoxrl import cli
from detoxrl.data import labelled
from detoxrl.models.reward import ClassifierReward
from helpers import reward_config as _config

ROOT = Path(__file__).resolve().parents[1]
def test_cli_writes_a_classifier_the_reward_loads(tmp_path, dyna_dir, capsys):
    out = tmp_path / "clf"
    code = cli.main(["train-reward", "--config", str(_config(tmp_path)), "--data-dir",
                     str(dyna_dir), "--output-dir", str(out), "--quiet", "--seed", "3"])
    assert code == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json",
                 "config.yaml", "run_info.json"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) and not (out / ".trainer").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".clf")], "no leftovers"
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "nothate", "1": "hate"}
    metrics = json.loads((out / "metrics.json").read_text())
    # A trivially separable task: the classifier must actually have learned it.
    assert metrics["eval"]["roc_auc"] > 0.9 and metrics["eval"]["n"] == 60
    assert {"accuracy", "macro_f1"} <= set(metrics["eval"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 3 and "transformers" in info["versions"]
    reward = ClassifierReward(str(out))
    texts = ["those cats are vile and drivers know it",
             "those cats are lovely and drivers know it"]
    hate = reward.toxicity(texts)
    assert hate[0] > hate[1]
    assert reward(["", ""], texts).shape == (2,)  # the nothate logit, found by name


def test_label_names_round_trip(tmp_path, dyna_dir):
    out = tmp_path / "clf"
    cfg = _config(tmp_path, **{"data.labels": ["fine", "toxic"], "data.positive_label": "toxic",
                               "data.label_map": {"0": "fine", "1": "toxic"},
                               "training.max_steps": 2})
    assert cli.main(["train-reward", "--config", str(cfg), "--data-dir", str(dyna_dir),
                     "--output-dir", str(out), "--quiet"]) == 0
    reward = ClassifierReward(str(out), label="fine", toxic_label="toxic")
    assert reward.labels == ["fine", "toxic"]
    assert reward.label_index("toxic") == 1


def test_layouts_read_to_the_same_class_ids(tmp_path):
    texts, labels = ["a b", "c, \"d\"", "e"], [1, 0, 2]
    # Davidson: a CSV table, class 0/1/2 = hate/offensive/neither, mapped to two labels.
    (tmp_path / "dav.csv").write_text('tweet,class\n"a b",1\n"c, ""d""",0\n"e",2\n')
    src = labelled.LabelledSource(path="dav.csv", text_column="tweet", label_column="class")
    dav = labelled.read_labelled(src, str(tmp_path), ["nothate", "hate"],
                                 {"0": "hate", "1": "hate", "2": "nothate"}, "train")
    assert dav.texts == texts and dav.labels == [1, 1, 0]
    # TweetEval: a text file and a label file, line by line.
    (tmp_path / "t_text.txt").write_text("".join(t + " \n" for t in texts))
    (tmp_path / "t_labels.txt").write_text("".join(f"{v}\n" for v in labels))
    src = labelled.LabelledSource(path="t_text.txt", labels_path="t_labels.txt")
    tweets = labelled.read_labelled(src, str(tmp_path), ["a", "b", "c"], {}, "train")
    assert tweets.texts == texts and tweets.labels == labels
    # JSONL with label names.
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t, "label": n}) + "\n"
                                              for t, n in zip(texts, "bac", strict=True)))
    rows = labelled.read_labelled(labelled.LabelledSource(path="x.jsonl"), str(tmp_path),
                                  ["a", "b", "c"], {}, "train")
    assert rows.labels == [1, 0, 2]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("case, words", [
    ("missing_label_column", ["no column 'label'", "label_column"]),
    ("label_outside_mapping", ["'maybe'", "label_map"]),
    ("single_class", ["at least two classes"]),
    ("empty_split", ["holds no rows"]),
    ("tokenizer_mismatch", ["do not belong together"]),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capfd, case, words,
                                              tiny_classifier_path):
    data = tmp_path / "d"
    good = "".join(f'"text {i}",{i % 2}\n' for i in range(20))
    table = {"missing_label_column": "text,class\n" + good,
             "label_outside_mapping": "text,label\n" + good + '"odd",maybe\n',
             "single_class": "text,label\n" + "".join(f'"t {i}",1\n' for i in range(9)),
             "empty_split": "text,label\n",
             "tokenizer_mismatch": "text,label\n" + good}[case]
    _write(data / "train.csv", table)
    _write(data / "eval.csv", "text,label\n" + good)
    args = []
    for split in ("train", "eval"):
        args += [f"--data.{split}.path", f"{split}.csv", f"--data.{split}.labels_path", "null",
                 f"--data.{split}.format", "csv", f"--data.{split}.header", "true",
                 f"--data.{split}.text_column", "text"]
    if case == "tokenizer_mismatch":
        from detoxrl.models import tiny

        big = tiny.train_tokenizer([f"word{i} other{i * 7}" for i in range(3000)], 2000)
        big.save_pretrained(tmp_path / "big-tok")
        args += ["--model.architecture", "null", "--model.name_or_path",
                 str(tiny_classifier_path), "--model.tokenizer", str(tmp_path / "big-tok")]
    out = tmp_path / "out"
    code = cli.main(["train-reward", "--config", str(_config(tmp_path)), "--data-dir",
                     str(data), "--output-dir", str(out), "--quiet", *args])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refuses_to_replace_a_run_without_overwrite(tmp_path, dyna_dir, capsys):
    out = tmp_path / "clf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli.main(["train-reward", "--config", str(_config(tmp_path)), "--data-dir",
                     str(dyna_dir), "--output-dir", str(out), "--quiet"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_short_real_dynabench_run_beats_chance(tmp_path, shared_data):
    """200 steps (about 20 s) on Dynabench's Train split, judged on its whole Test split."""
    from detoxrl.config import load_config
    from detoxrl.supervised.reward_training import RewardTrainingConfig, train_reward

    cfg = load_config(ROOT / "configs" / "mini" / "reward-dynabench.yaml", [
        "--data_dir", str(shared_data), "--output_dir", str(tmp_path / "dyna"),
        "--training.max_steps", "200", "--data.hatecheck", "null"], cls=RewardTrainingConfig)
    metrics = train_reward(cfg, quiet=True)
    assert metrics["eval_rows"] == 4062
    assert metrics["eval"]["roc_auc"] > 0.62, metrics["eval"]


def test_label_map_from_yaml_and_the_command_line(tmp_path):
    from detoxrl.config import load_config
    from detoxrl.errors import ConfigError
    from detoxrl.supervised.reward_training import RewardTrainingConfig

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  label_map: {0: hate, 1: hate, 2: nothate}\n")
    from_yaml = load_config(path, [], cls=RewardTrainingConfig).data.label_map
    from_cli = load_config(None, ["--data.label_map", "0=hate,1=hate,2=nothate"],
                           cls=RewardTrainingConfig).data.label_map
    assert from_yaml == from_cli == {"0": "hate", "1": "hate", "2": "nothate"}
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["--data.label_map", "0:hate"], cls=RewardTrainingConfig)
    with pytest.raises(ConfigError, match=r"not in data\.labels"):
        load_config(None, ["--data.label_map", "0=toxic", "--data.train.path", "x.csv"],
                    cls=RewardTrainingConfig).validate()
