"""A wheel built from the repository runs the quick demo from any folder.

The wheel is installed into a fresh virtual environment that also sees this interpreter's
packages (``--system-site-packages``: torch and the rest are not downloaded again), and the
demo runs in a subprocess from a folder outside the checkout, with nothing of the checkout
on its path: its presets must come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What building a wheel reads; the build runs on a copy, since it writes build/ and
# *.egg-info beside its sources.
BUILD_INPUTS = ("src", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def run(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_runs_the_quick_demo_outside_the_checkout(tmp_path, shared_data):
    sources = tmp_path / "sources"
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, sources / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, sources / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", tmp_path / "dist", sources], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("detoxrl-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
        cwd=tmp_path)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
         "--no-index", "-q", wheel], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import detoxrl; print(detoxrl.__file__)"], cwd=elsewhere)
    assert where.stdout.startswith(str(venv)), where.stdout
    proc = run([venv / "bin" / "detoxrl", "demo", "--quick", "--quiet", "--data-dir",
                shared_data], cwd=elsewhere)
    assert "[8/8] report" in proc.stdout
    assert (elsewhere / "runs" / "demo-quick" / "5-report" / "report.html").is_file()
