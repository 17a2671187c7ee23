"""bench/sampling.py still runs: both tiny shapes, every mode, one short turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sampling.py"


def test_sampling_bench_runs_on_the_tiny_shapes(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny-causal", "--shape", "tiny-seq2seq",
           "--prompts", "2", "--samples", "3", "--new-tokens", "4", "--repeats", "1",
           "--static", "--out", str(out)]
    # DETOXRL_CACHE comes from conftest's autouse fixture: tiny models build under tmp.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shape in ("tiny-causal", "tiny-seq2seq"):
        report = json.loads((out / f"sampling-{shape}-cpu.json").read_text())
        assert (out / f"sampling-{shape}-cpu.md").is_file()
        summary = report["summary"]
        assert set(summary) == {"floor", "rollout", "evaluate", "floor-static", "generate"}
        assert report["rows"] == 6 and report["tokens"] == 2 * 3 * 4
        assert summary["floor"]["cpu_ratio_to_floor"] == 1.0
        assert all(row["wall_tok_per_s"] > 0 for row in summary.values())
        assert report["versions"]["torch"] and report["command"].startswith("python bench/")
