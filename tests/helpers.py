"""Helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path
from types import ModuleType

from detoxrl.cli import main


def cli(*argv: str) -> tuple[int, str]:
    """Run ``detoxrl ARGV...`` in this process: ``(exit code, what it printed)``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def load_bench(name: str) -> ModuleType:
    """``bench/NAME.py`` imported as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
