"""Every bench script still imports, and bench/ppo_step.py still runs (tiny shape, one short
warm-up and one measured step)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "ppo_step.py"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_every_bench_script_imports(name, monkeypatch):
    # The scripts import each other by file name, as they do when run from bench/.
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == BENCH / f"{name}.py"


def test_ppo_step_bench_runs_on_tiny(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "1", "--warmup", "short",
           "--batch", "4", "--new-tokens", "4", "--prompt-tokens", "32", "--out", str(out),
           "--grad-accum", "2", "--gradient-checkpointing"]
    # DETOXRL_CACHE comes from conftest's autouse fixture: tiny models build under tmp.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    [json_path] = out.glob("ppo_step-tiny-*-ga2-gc.json")
    report = json.loads(json_path.read_text())
    assert json_path.with_suffix(".md").is_file()
    assert not list(out.glob("*partial*"))  # the steps-so-far file goes once the report is in
    modes = report["modes"]
    assert set(modes) == {"detoxrl", "tutorial", "floor"}
    for name in ("detoxrl", "tutorial", "floor"):
        assert set(modes[name]["phases_s"]) == {"rollout", "score", "forward", "optimize"}
        assert modes[name]["tokens_per_step"] == 4 * 4  # fixed length: EOS cannot stop early
        assert modes[name]["memory"]["step_peak_rss_mib"] > 0
    names = {h["name"] for h in report["headline"]}
    assert names >= {"step speedup (tutorial / detoxrl)", "step / floor (detoxrl)",
                     "rollout / floor rollout", "score / floor score",
                     "forward / floor forward", "optimize / floor optimize"}
    floor_phases = modes["floor"]["phases_s"]
    assert all(floor_phases[p] > 0 for p in ("rollout", "score", "forward", "optimize"))
    assert report["versions"]["torch"] and report["config"]["batch"] == 4
    assert report["config"]["detoxrl_grad_accum"] == 2
    assert "(detoxrl: ppo.gradient_accumulation_steps 2, gradient checkpointing)" in \
        json_path.with_suffix(".md").read_text()
