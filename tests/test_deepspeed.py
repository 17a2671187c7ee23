"""DeepSpeed ZeRO-2 and ZeRO-3 through ``accelerate launch`` and the repository's configs,
one process on the CPU (DeepSpeed picks its CPU accelerator; accelerate starts several
DeepSpeed processes only with GPUs). One process still runs what detoxrl adds under
DeepSpeed: the engine wrapping the policy, ``zero.Init`` loading under ZeRO-3 (the LoRA
target check, the reward model kept whole), generation with ``synced_gpus`` and the save of
the gathered adapter. Skipped where DeepSpeed is not installed (CI installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def launch(stage: int, model: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"deepspeed-zero{stage}.yaml"),
           "--num_processes", "1", "-m", "detoxrl", "train",
           "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.name_or_path", model,
           "--steps", "2", "--save_every", "0", "--output-dir", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_zero2_and_zero3_train_the_same_steps(tmp_path):
    runs = {stage: tmp_path / f"zero{stage}" for stage in (2, 3)}
    for stage, out in runs.items():
        result = launch(stage, "tiny:gpt2", out)
        assert result.returncode == 0, result.stderr[-3000:]
        # ZeRO-3 hooks the backward of a module's output tensors only if it can find them
        assert "unknown inputs or outputs type" not in result.stdout + result.stderr
    metrics = {s: [json.loads(line) for line in (out / "metrics.jsonl").open()]
               for s, out in runs.items()}
    assert [m["step"] for m in metrics[3]] == [1, 2]
    for m2, m3 in zip(metrics[2], metrics[3], strict=True):  # same samples, same updates
        assert m3["env/reward_mean"] == pytest.approx(m2["env/reward_mean"], abs=1e-5)
        assert m3["objective/kl"] == pytest.approx(m2["objective/kl"], abs=1e-4)
    adapters = {s: load_file(out / "adapter_model.safetensors") for s, out in runs.items()}
    assert adapters[3].keys() == adapters[2].keys()
    for name, weight in adapters[2].items():  # ZeRO-3 saved the gathered, trained weights
        assert weight.shape == adapters[3][name].shape and weight.numel() > 0
        assert (adapters[3][name].float() - weight.float()).abs().max() < 1e-3
    assert any(w.abs().sum() > 0 for n, w in adapters[3].items() if "lora_B" in n)

