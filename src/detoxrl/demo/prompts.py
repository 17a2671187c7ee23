"""Stage 0 of the demo: the RealToxicityPrompts records, split into RL and evaluation files.

The split is :func:`detoxrl.data.is_held_out`, a hash of the prompt text, the same rule
the LM's training text obeys, so no stage ever trains on an evaluation prompt:

* ``train.jsonl``: the records of ``rtp/nontoxic.jsonl`` and ``rtp/toxic.jsonl`` whose
  prompt is not held out, each prompt once (a few prompts are in both files);
* ``heldout-nontoxic.jsonl`` / ``heldout-toxic.jsonl``: the held-out records of each file,
  evaluated separately (the field's tables use the non-toxic prompts; the toxic, or
  "challenging", ones are the harder case).

Records are written unchanged, in file order, so ``data.kind: rtp`` reads them as it reads
the originals. Optional caps keep the first N records of each output (the quick demo).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.prompts import is_held_out
from ..errors import DataError
from ..runs.io import atomic_write_text

SOURCES = {"nontoxic": "rtp/nontoxic.jsonl", "toxic": "rtp/toxic.jsonl"}
TRAIN_FILE = "train.jsonl"
HELD_OUT_FILES = {"nontoxic": "heldout-nontoxic.jsonl", "toxic": "heldout-toxic.jsonl"}


def source_paths(data_dir: Path) -> dict[str, Path]:
    """The two RealToxicityPrompts files under ``data_dir``; DataError if one is missing."""
    paths = {name: data_dir / rel for name, rel in SOURCES.items()}
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{str(path)!r} does not exist. --data-dir must point at a copy of "
                            "the shared data folder (with rtp/nontoxic.jsonl and "
                            "rtp/toxic.jsonl); the default is ../shared/data.")
    return paths


def read_records(path: Path) -> list[dict[str, Any]]:
    """RealToxicityPrompts records with a non-empty ``prompt.text``; DataError otherwise."""
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["prompt"]["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{str(path)!r} line {number} is not a RealToxicityPrompts "
                                "record (a JSON object with prompt.text). Restore the file "
                                "from a clean copy of the shared data.") from None
            if isinstance(text, str) and text.strip():
                records.append(record)
    if not records:
        raise DataError(f"{str(path)!r} holds no prompts. Restore it from a clean copy.")
    return records


def split_prompts(sources: dict[str, list[dict]], max_train: int | None = None,
                  max_eval: int | None = None) -> dict[str, list[dict]]:
    """``{"train": [...], "nontoxic": [...], "toxic": [...]}`` from the records of each file."""
    train, seen = [], set()
    held_out: dict[str, list[dict]] = {name: [] for name in sources}
    for name, records in sources.items():
        for record in records:
            text = record["prompt"]["text"]
            if is_held_out(text):
                held_out[name].append(record)
            elif text not in seen:
                seen.add(text)
                train.append(record)
    return {"train": train[:max_train],
            **{name: rows[:max_eval] for name, rows in held_out.items()}}


def build(folder: Path, data_dir: Path, max_train: int | None = None,
          max_eval: int | None = None) -> dict[str, Any]:
    """Write the three files into ``folder``; return their paths and sizes."""
    sources = {name: read_records(path) for name, path in source_paths(data_dir).items()}
    parts = split_prompts(sources, max_train, max_eval)
    names = {"train": TRAIN_FILE, **HELD_OUT_FILES}
    for part, records in parts.items():
        if not records:
            raise DataError(f"No {part} prompts are left after the held-out split of "
                            f"{str(data_dir)!r}; the RealToxicityPrompts files are too small.")
        atomic_write_text(folder / names[part], "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"files": {part: str(folder / names[part]) for part in parts},
            "counts": {part: len(records) for part, records in parts.items()},
            "read": {name: len(records) for name, records in sources.items()}}
