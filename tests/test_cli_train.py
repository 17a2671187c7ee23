"""``detoxrl train`` with the tiny preset, end to end through the CLI, and its error paths."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from detoxrl import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
METRICS = ["objective/kl", "objective/kl_coef", "objective/entropy", "env/reward_mean",
           "env/reward_std", "ppo/returns/mean", "ppo/policy/advantages_mean",
           "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/loss/policy", "ppo/loss/value",
           "ppo/val/vpred", "time/rollout", "time/score", "time/forward", "time/optimize",
           "tokens/s"]


def test_tiny_preset_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--config", TINY, "--output-dir", str(out), "--steps", "3",
                     "--save_every", "2", "--generation.max_new_tokens_draw", "10"])
    assert code == 0
    printed, err = capsys.readouterr()
    # tiny:roberta-hate is a named test model with random weights: no validity warning.
    assert "records no validity" not in err
    assert "trainable model parameters:" in printed and "percentage of trainable" in printed
    for name in ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "config.yaml", "run_info.json",
                 "metrics.jsonl", "samples.jsonl"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")), "no pickles"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in METRICS:
        assert all(key in m for m in lines), key
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 0 and {"torch", "transformers", "peft"} <= set(info["versions"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 3 and saved["generation"]["max_new_tokens_draw"] == 10
    checkpoint = out / "checkpoints" / "step-2"
    for name in ("adapter/adapter_model.safetensors", "adapter/value_head.safetensors",
                 "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                 "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {"step", "query", "response", "score"} <= set(samples[0])


def test_a_reward_folder_without_validity_is_warned_about(tmp_path, tiny_classifier_path,
                                                          capsys):
    reward = tmp_path / "reward"
    shutil.copytree(tiny_classifier_path, reward)  # a local classifier, never validated
    code = cli.main(["train", "--config", TINY, "--output-dir", str(tmp_path / "run"),
                     "--steps", "1", "--save_every", "0", "--reward.model", str(reward),
                     "--quiet"])
    assert code == 0
    warned = [line for line in capsys.readouterr().err.splitlines()
              if "records no validity" in line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: The reward {str(reward)!r}")


@pytest.mark.parametrize("args, words", [
    (["--ppo.batch_size", "10", "--ppo.mini_batch_size", "4"], ["batch_size (10)", "multiple"]),
    (["--ppo.learning_rate", "fast"], ["ppo.learning_rate", "float"]),
    (["--ppo.lr", "1e-5"], ["Unknown option 'ppo.lr'", "ppo.learning_rate"]),
    (["--model.dtype", "float16"], ["float16", "T5", "bfloat16"]),
    (["--reward.label", "toxic"], ["toxic", "nothate", "hate"]),
    (["--model.name_or_path", "./no/such/model"], ["./no/such/model", "local"]),
])
def test_bad_options_exit_2_with_a_clear_message(tmp_path, capfd, args, words):
    code = cli.main(["train", "--config", TINY, "--output-dir", str(tmp_path / "r"),
                     "--steps", "1", "--quiet", *args])
    err = _without_logging_errors(capfd.readouterr().err)
    assert code == 2
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def _without_logging_errors(err: str) -> str:
    """Drop "--- Logging error ---" reports: a library logger whose handler still holds a
    stream pytest closed after an earlier test. Outside pytest they do not occur."""
    return re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", err, flags=re.S)


def test_missing_config_file(capsys, tmp_path):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_config_lists_every_option(capsys):
    assert cli.main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "--ppo.learning_rate" in out and "--reward.label" in out
    assert "local_batch_size" not in out  # derived, not an option
