"""Cached stages: a stage is rebuilt only when what it is built from has changed.

A stage's *inputs* are plain data: its resolved config, the SHA-256 of every data file it
reads and the keys of the stages whose outputs it uses. Their hash is the stage's *key*. A
finished stage writes ``stage.json`` (key, inputs, wall time, result) into its folder, last
and atomically; a later run whose key matches skips the stage. As the key of each upstream
stage is an input, a changed input rebuilds that stage and every stage after it, and a stage
interrupted halfway (no ``stage.json``) is rebuilt from an empty folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..runs.io import atomic_write_json, atomic_write_text, to_jsonable

RECORD = "stage.json"
MARKER = ".detoxrl-demo"


@dataclass
class Stage:
    """One step of the demo: what it is built from, and how to build it into ``folder``.

    ``build(folder)`` writes the stage's outputs into the (empty) ``folder`` and returns a
    small JSON-able result that later stages and the summary read. ``weight``: its work
    relative to the others', so that of the stages ready to run side by side
    (:mod:`detoxrl.demo.parallel`) the heaviest start first.
    """

    name: str
    folder: Path
    inputs: dict[str, Any]
    build: Callable[[Path], dict[str, Any]]
    weight: float = 1.0

    @property
    def key(self) -> str:
        return inputs_key(self.inputs)


@dataclass
class StageResult:
    name: str
    key: str
    cached: bool
    wall_s: float  # the build's wall time (for a cached stage: when it was built)
    result: dict[str, Any]


def inputs_key(inputs: dict[str, Any]) -> str:
    """SHA-256 of the inputs as canonical JSON (sorted keys), with the detoxrl version."""
    text = json.dumps(to_jsonable({"detoxrl": __version__, **inputs}), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()



def read_record(folder: Path) -> dict[str, Any] | None:
    """The ``stage.json`` of a finished stage, or None (absent or unreadable)."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_stage(stage: Stage, fresh: bool = False,
              log: Callable[[str], None] | None = None) -> StageResult:
    """Skip ``stage`` if its folder holds a record with the same key, else build it afresh.

    ``log`` receives one line per event (default: printed after the stage's name).
    """
    log = log or (lambda text: print(f"{stage.name}: {text}", flush=True))
    key = stage.key
    record = None if fresh else read_record(stage.folder)
    if record is not None and record.get("key") == key:
        log(f"up to date, skipped (built in {record['wall_s']:.0f} s)")
        return StageResult(stage.name, key, True, float(record["wall_s"]), record["result"])
    reason = ("--fresh" if fresh else "not built yet" if record is None else "inputs changed")
    log(f"building ({reason})")
    if stage.folder.exists():
        shutil.rmtree(stage.folder)  # nothing of an older build may leak into this one
    stage.folder.mkdir(parents=True)
    start = time.perf_counter()
    result = stage.build(stage.folder)
    wall = time.perf_counter() - start
    atomic_write_json(stage.folder / RECORD, {
        "stage": stage.name, "key": key, "inputs": stage.inputs, "wall_s": wall,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "detoxrl": __version__, "result": result})
    log(f"done in {wall:.0f} s")
    return StageResult(stage.name, key, False, wall, result)


def claim_output_dir(root: Path) -> None:
    """Make ``root`` a demo folder, refusing one that holds anything else.

    The demo deletes and rebuilds its stage folders, so it only ever works in an empty
    folder or in one that an earlier demo marked as its own.
    """
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--output-dir {str(root)!r} is a file; choose a folder.")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise ConfigError(f"--output-dir {str(root)!r} already holds files that are not a "
                          "detoxrl demo; choose another --output-dir or empty it first.")
    if not (root / MARKER).is_file():
        atomic_write_text(root / MARKER, "a detoxrl demo folder: its stage folders are "
                          "rebuilt by 'detoxrl demo'\n")
