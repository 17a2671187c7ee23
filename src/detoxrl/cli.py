"""The ``detoxrl`` command: demo, data, sft, train-reward, train, evaluate, compare, report
and generate.

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
from .runs.preflight import reuse_freed_memory


def build_parser() -> argparse.ArgumentParser:
    from .commands import compare, data, demo, evaluate, generate, report, supervised, train

    parser = argparse.ArgumentParser(
        prog="detoxrl", description="Make text generators less toxic with RL (PPO, RLOO, "
        "GRPO) from a classifier's feedback.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"detoxrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, data, supervised, train, evaluate, compare, report, generate):
        module.register(sub)
    for command in sub.choices.values():  # `--overwrit` must not pass for --overwrite
        command.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    reuse_freed_memory()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error("unrecognized arguments: " + " ".join(extra))
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except DetoxError as exc:
        if _is_main_rank():  # every rank raises the same error; one copy is enough
            print(f"detoxrl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detoxrl {args.command}: interrupted", file=sys.stderr)
        return 130


def _is_main_rank() -> bool:
    """Rank 0 of a launched multi-process run, or a plain single process."""
    return os.environ.get("RANK", "0") in ("", "0")


if __name__ == "__main__":
    sys.exit(main())
