"""Helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import io

from detoxrl.cli import main


def cli(*argv: str) -> tuple[int, str]:
    """Run ``detoxrl ARGV...`` in this process: ``(exit code, what it printed)``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()
