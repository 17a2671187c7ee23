"""``detoxrl data``: build the prompt dataset, report what was kept, optionally save it."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DataConfig, load_config
from ..errors import DataError, ModelLoadError

if TYPE_CHECKING:
    from ..data.prompts import PromptData


def register(subparsers) -> None:
    """Add the ``data`` subcommand to the ``detoxrl`` parser."""
    parser = subparsers.add_parser(
        "data", help="Build the prompt dataset and report how many rows were kept.",
        description="Build the prompt dataset, report what was kept, optionally save it.",
        epilog="Run options are overridden with dotted keys, as for 'detoxrl train', e.g.\n"
        "  detoxrl data --data.path ../shared/data/dialogsum/train.jsonl --data.max_chars 800",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # so that a dotted override is never taken for a short option
    parser.add_argument("--config", metavar="YAML", help="Run config (the defaults reproduce "
                        "the tutorial).")
    parser.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="Hub id, folder or "
                        "'tiny:t5'; default: the config's model.name_or_path.")
    parser.add_argument("--output", metavar="DIR", help="Save the train and test splits here "
                        "(read them back with datasets.load_from_disk).")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="Print N example queries from the train split.")
    parser.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    """Build the prompts that ``args`` describe and print the report."""
    # Imported here so that ``detoxrl --help`` does not pay for datasets and transformers.
    from ..data.prompts import build_prompts

    cfg = load_config(args.config, args.overrides)
    if args.output:
        from ..runs.io import check_writable

        check_writable(args.output, "--output")
    if args.tokenizer:  # commands/data's own load_tokenizer resolves tiny: names
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    data = build_prompts(cfg.data, tokenizer, seed=cfg.seed)
    print("\n".join(report_lines(cfg.data, data.stats)))
    for row in data.train.select(range(min(args.show, len(data.train)))):
        print(f"\n--- {row['id']} ---\n{row['query']}")
    if args.output:
        save_splits(data, Path(args.output))
        print(f"saved: {args.output}")
    return 0


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """``AutoTokenizer.from_pretrained`` without remote code; failures become ModelLoadError."""
    from transformers import AutoTokenizer

    from ..data.prompts import exception_summary
    from ..models import tiny

    source = tiny.resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
    except Exception as exc:  # OSError, ValueError, Hub errors: all mean "cannot load it"
        raise ModelLoadError(
            f"Cannot load the tokenizer {name_or_path!r}: {exception_summary(exc)}. Pass "
            "--tokenizer a local folder with tokenizer files (or 'tiny:t5' offline); a Hub id "
            "needs the Hub, which is unreachable offline or with HF_HUB_OFFLINE=1.") from None


def report_lines(cfg: DataConfig, stats: dict) -> list[str]:
    """The human-readable summary of :func:`detoxrl.data.build_prompts`' ``stats``."""
    return [
        f"source: {cfg.path} ({cfg.kind})",
        f"rows read: {stats['rows_read']:,}",
        f"rows kept: {stats['rows_kept']:,} ({stats['filter']})",
        f"train: {stats['train']:,}",
        f"test: {stats['test']:,}",
        f"text length: {stats['text_chars_min']:,} to {stats['text_chars_max']:,} characters",
        f"prompt tokens: at most {stats['prompt_tokens_max']:,}; "
        f"{stats['prompts_at_token_limit']:,} cut at data.max_prompt_tokens "
        f"({cfg.max_prompt_tokens:,})",
    ]


def save_splits(data: PromptData, out: Path) -> None:
    """Save both splits with ``DatasetDict.save_to_disk``, atomically.

    They are written to a sibling temp folder and renamed into place, so a crash never leaves
    half a dataset. A previous save at ``out`` is replaced; any other folder is refused.
    """
    from datasets import DatasetDict

    from ..data.prompts import quiet

    if out.exists() and not _replaceable(out):
        raise DataError(f"--output {str(out)!r} exists and is not a saved prompt dataset; "
                        "choose a new folder or delete it first.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Saved one level down, so the result gets the umask's permissions, not mkdtemp's 0700.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        with quiet():
            DatasetDict(train=data.train, test=data.test).save_to_disk(str(tmp / "new"))
        if out.exists():
            os.replace(out, tmp / "old")
        os.replace(tmp / "new", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replaceable(out: Path) -> bool:
    return out.is_dir() and ((out / "dataset_dict.json").is_file() or not any(out.iterdir()))
