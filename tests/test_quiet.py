"""Quiet by default: no warning a user cannot act on, no control characters, defaults shown.

The smoke run and the quick demo run in a subprocess, started as a user starts them, from a
folder outside the checkout: what reaches stderr is the point, so the process boundary is
kept. The smoke run is shortened to 2 steps: every warning checked here comes from loading
the models and the first rollouts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detoxrl.cli import main
from detoxrl.commands.compare import terminal_cell
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
# Python warnings ("UserWarning: ...", "warnings.warn("), logging warnings ("[WARNING]",
# "[transformers] ..."), and deprecation notices.
WARNING = re.compile(r"warn|\[transformers\]|deprecat", re.IGNORECASE)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def detoxrl(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "detoxrl", *map(str, argv)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def warnings_in(stderr: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", stderr) if WARNING.search(line)]


def test_smoke_run_writes_no_warning(tmp_path):
    proc = detoxrl("train", "--config", "configs/tiny.yaml", "--steps", "2", "--save_every",
                   "0", "--output-dir", "runs/tiny", cwd=tmp_path)
    assert "done: 2 steps" in proc.stdout
    assert warnings_in(proc.stderr) == []


def test_quick_demo_writes_no_warning(tmp_path, shared_data):
    proc = detoxrl("demo", "--quick", "--data-dir", shared_data, cwd=tmp_path)
    assert "[8/8] report" in proc.stdout
    assert warnings_in(proc.stderr) == []


def test_compare_prints_no_control_characters(tmp_path, monkeypatch, capsys):
    assert terminal_cell("ok\x08\x1b[2J\x00 fine\u0085") == "ok\\x08\\x1b[2J\\x00 fine\\x85"
    monkeypatch.chdir(tmp_path)
    code, _ = cli("train", "--config", "configs/tiny.yaml", "--steps", "1", "--save_every", "0",
                  "--output-dir", "runs/tiny")
    assert code == 0
    capsys.readouterr()
    code, printed = cli("compare", "runs/tiny", "--n", "8")
    assert code == 0 and "| query |" in printed
    assert not CONTROL.search(printed)


def test_help_shows_the_data_folder_default(capsys):
    for command in ("demo", "sft", "train-reward"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "default ../shared/data" in " ".join(capsys.readouterr().out.split()), command
