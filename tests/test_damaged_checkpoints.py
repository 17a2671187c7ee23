"""Damaged checkpoints are named and skipped, leftovers of killed saves are removed, and a
run killed before its first checkpoint starts again without --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detoxrl.config import load_config
from detoxrl.errors import ConfigError
from detoxrl.rl.detox_trainer import train
from detoxrl.runs.checkpoint import checkpoint_problem, list_checkpoints

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SMALL = ["--ppo.batch_size", "4", "--ppo.mini_batch_size", "2", "--ppo.ppo_epochs", "1",
         "--generation.min_new_tokens_draw", "2", "--generation.max_new_tokens_draw", "4",
         "--generation.min_length", "1", "--steps", "4", "--save_every", "1"]


class _Killed(Exception):
    pass


def _cfg(out: Path, *extra: str):
    return load_config(TINY, [*SMALL, "--output_dir", str(out), *extra])


def by_length(prompts, completions, **kwargs):
    return [len(c) % 3 - 1.0 for c in completions]


def killed_at_call(n: int):
    calls = {"n": 0}

    def reward(prompts, completions, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed
        return by_length(prompts, completions)
    return reward


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {**load_file(run_dir / "adapter_model.safetensors"),
            **{"vh." + k: v for k, v in load_file(run_dir / "value_head.safetensors").items()}}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_newest_checkpoint_falls_back_and_ends_bit_identical(tmp_path):
    full = train(_cfg(tmp_path / "full"), reward_fn=by_length, quiet=True)
    cut = tmp_path / "cut"
    with pytest.raises(_Killed):
        train(_cfg(cut), reward_fn=killed_at_call(4), quiet=True)  # killed in step 4
    step2, step3 = list_checkpoints(cut)
    assert step3.name == "step-3" and checkpoint_problem(step3) is None
    _truncate(step3 / "adapter" / "value_head.safetensors")
    assert "value_head.safetensors" in checkpoint_problem(step3)

    with pytest.warns(UserWarning) as caught:
        resumed = train(_cfg(cut), reward_fn=by_length, resume=True, quiet=True)
    said = " ".join(str(w.message) for w in caught)
    assert "step-3" in said and "truncated" in said and f"Resuming from {step2}" in said
    assert [m["step"] for m in resumed.metrics] == [3, 4]  # from step-2, not step-3
    a, b = _weights(full.output_dir), _weights(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_missing_value_head_is_never_replaced_by_a_fresh_one(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(_Killed):
        train(_cfg(out), reward_fn=killed_at_call(3), quiet=True)  # checkpoints 1 and 2
    for path in list_checkpoints(out):
        (path / "adapter" / "value_head.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"No intact checkpoint.*step-2, step-1"):
        train(_cfg(out), reward_fn=by_length, resume=True, quiet=True)
    assert "value_head.safetensors is missing" in checkpoint_problem(list_checkpoints(out)[0])


def test_leftovers_of_killed_saves_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(_Killed):
        train(_cfg(out), reward_fn=killed_at_call(3), quiet=True)
    leftovers = [out / "checkpoints" / ".step-3.tmp-0123abcd", out / ".final-k1ll3d",
                 out / "checkpoints" / ".step-1.old-89abcdef"]
    for path in leftovers:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".config.yaml.tmp-76543210").write_text("steps: 4")
    (out / ".notes").write_text("mine")
    with pytest.warns(UserWarning, match="left by a save that was killed"):
        train(_cfg(out), reward_fn=by_length, resume=True, quiet=True)
    assert not any(p.exists() for p in leftovers)
    assert not (out / ".config.yaml.tmp-76543210").exists()
    assert (out / ".notes").read_text() == "mine"  # not ours: kept


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(_Killed):
        train(_cfg(out, "--save_every", "3"), reward_fn=killed_at_call(2), quiet=True)
    assert (out / "metrics.jsonl").exists() and not list_checkpoints(out)
    with pytest.warns(UserWarning, match="stopped before its first checkpoint"):
        again = train(_cfg(out, "--steps", "2"), reward_fn=by_length, quiet=True)
    assert [m["step"] for m in again.metrics] == [1, 2]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    with pytest.raises(ConfigError, match="already holds a run"):  # finished: refused again
        train(_cfg(out, "--steps", "2"), reward_fn=by_length, quiet=True)
