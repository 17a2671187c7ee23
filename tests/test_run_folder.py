"""A run folder never mixes two runs; non-finite training stops; metrics are strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detoxrl import cli
from detoxrl.config import load_config
from detoxrl.errors import ConfigError, TrainingDiverged
from detoxrl.rl.detox_trainer import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SMALL = ["--ppo.batch_size", "4", "--ppo.mini_batch_size", "2", "--ppo.ppo_epochs", "1",
         "--generation.min_new_tokens_draw", "2", "--generation.max_new_tokens_draw", "4",
         "--generation.min_length", "1", "--save_every", "1"]


def _cfg(out: Path, *extra: str):
    return load_config(TINY, [*SMALL, "--output_dir", str(out), *extra])


def zero(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def test_resume_refuses_a_changed_learning_rate_and_allows_more_steps(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "--steps", "2"), reward_fn=zero, quiet=True)
    with pytest.raises(ConfigError) as err:
        train(_cfg(out, "--steps", "3", "--ppo.learning_rate", "0.5", "--seed", "7"),
              reward_fn=zero, resume=True, quiet=True)
    message = str(err.value)
    assert "ppo.learning_rate: 0.001 in the run, 0.5 now" in message
    assert "seed: 0 in the run, 7 now" in message and "steps" not in message.split(":")[0]
    result = train(_cfg(out, "--steps", "3"), reward_fn=zero, resume=True, quiet=True)
    assert [m["step"] for m in result.metrics] == [2, 3]  # resumed from step-1, extended


def test_overwrite_leaves_no_stale_evaluation_and_resume_with_overwrite_is_refused(tmp_path,
                                                                                  capfd):
    out = tmp_path / "run"
    train(_cfg(out, "--steps", "1"), reward_fn=zero, quiet=True)
    (out / "eval").mkdir()
    (out / "eval" / "summary.json").write_text("{}")
    (out / "report.html").write_text("<html></html>")
    (out / "notes.txt").write_text("mine")
    code = cli.main(["train", "--config", str(TINY), *SMALL, "--output-dir", str(out),
                     "--steps", "1", "--resume", "--overwrite", "--quiet"])
    assert code == 2 and "pass only one" in capfd.readouterr().err
    assert (out / "eval" / "summary.json").exists()  # refused before touching anything
    train(_cfg(out, "--steps", "1"), reward_fn=zero, overwrite=True, quiet=True)
    assert not (out / "eval").exists() and not (out / "report.html").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is removed
    assert "Not evaluated yet" in (out / "README.md").read_text()


def test_a_nan_run_stops_after_n_skipped_steps_with_strict_json(tmp_path, capfd):
    def nan(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        train(_cfg(out, "--steps", "6", "--max_skipped_steps", "2"), reward_fn=nan, quiet=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line, parse_constant=pytest.fail) for line in lines]  # no NaN tokens
    assert rows[0]["env/reward/nan"] is None
    assert not (out / "adapter_model.safetensors").exists()  # no final weights from a failure
