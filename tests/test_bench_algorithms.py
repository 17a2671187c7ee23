"""bench/algorithms.py runs: two tiny configs differing only in the algorithm, one seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import algorithms  # noqa: E402


def _config(tmp_path: Path, name: str, **ppo) -> str:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["ppo"].update({"batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, **ppo})
    cfg["generation"].update({"min_new_tokens_draw": 4, "max_new_tokens_draw": 4})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_algorithms_bench_runs_and_refuses_incomparable_configs(tmp_path, capsys):
    ppo = _config(tmp_path, "ppo")
    rloo = _config(tmp_path, "rloo", algorithm="rloo", num_generations=2, batch_size=2)
    out = tmp_path / "results"
    assert algorithms.main(["--configs", ppo, rloo, "--samples", "8", "--seeds", "0",
                            "--out", str(out)]) == 0
    summary = json.loads((out / "algorithms.json").read_text())
    rows = {r["algorithm"]: r for r in summary["table"]}
    assert set(rows) == {"ppo", "rloo"}
    assert all(r["samples"] == 8 for r in summary["runs"])          # the same budget
    assert [r["steps"] for r in summary["runs"]] == [2, 2]           # 4 and 2 x 2 per step
    assert "| rloo |" in (out / "algorithms.md").read_text()
    other = _config(tmp_path, "other", learning_rate=0.5)
    assert algorithms.main(["--configs", ppo, other, "--samples", "8", "--seeds", "0",
                            "--out", str(out)]) == 2
    assert "only the algorithm's options may differ" in capsys.readouterr().err
