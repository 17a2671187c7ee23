"""The ``detoxrl`` command: ``data``, ``sft``, ``train-reward``, ``train``, ``evaluate``,
``compare`` and ``report``.

Each subcommand lives in ``detoxrl.commands.<name>`` with a ``register(subparsers)`` that
adds its parser and sets ``func``. Errors a user can fix (``DetoxError``) are printed as one
paragraph with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import DetoxError


def build_parser() -> argparse.ArgumentParser:
    from .commands import compare, data, evaluate, report, supervised, train

    parser = argparse.ArgumentParser(
        prog="detoxrl", description="Make text generators less toxic with PPO from a "
        "classifier's feedback.")
    parser.add_argument("--version", action="version", version=f"detoxrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, supervised, train, evaluate, compare, report):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error("unrecognized arguments: " + " ".join(extra))
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except DetoxError as exc:
        print(f"detoxrl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detoxrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
