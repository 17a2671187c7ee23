"""``detoxrl report RUN_DIR``: one self-contained HTML page for a finished run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DetoxError


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the ``detoxrl`` parser."""
    parser = subparsers.add_parser(
        "report", help="Write an HTML report of a run (curves, toxicity, tables).",
        description="Render a run folder (config.yaml, metrics.jsonl, eval/) as one "
        "self-contained HTML file, with figures embedded; open it in any browser, offline.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="The output_dir of a training run.")
    parser.add_argument("--output", "-o", metavar="PATH", default=None,
                        help="Where to write the report (default: RUN_DIR/report.html).")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the report; a missing run folder is a DetoxError (exit status 2)."""
    from ..evaluation.report import build_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise DetoxError(f"Run folder {str(run_dir)!r} does not exist. Pass the output_dir "
                         "of a training run, e.g. detoxrl report runs/detoxrl.")
    from ..evaluation.setup import check_evaluation_current

    check_evaluation_current(run_dir / "eval")
    if args.output:
        from ..runs.io import check_writable

        check_writable(Path(args.output).parent, "--output")
    path = build_report(run_dir, args.output)
    print(f"Report written to {path}")
    if (run_dir / "adapter_config.json").is_file():  # the model card shows the evaluation too
        from ..evaluation.model_card import write_model_card

        print(f"Model card refreshed: {write_model_card(run_dir)}")
    return 0
