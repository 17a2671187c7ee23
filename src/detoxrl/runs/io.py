"""Atomic file output: a reader, or a crash, never sees a half-written file or folder.

Everything is first written to a hidden sibling in the same folder (same filesystem, so the
final ``os.replace`` is a rename) and only then moved into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, creating parent folders; returns the path.

    Newlines are written as given (no platform translation), so CSV text keeps its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    # os.open with mode 0o666 lets the umask decide permissions, as a plain open() would;
    # tempfile.mkstemp would leave the final file readable by its owner only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically; numpy/torch scalars and arrays become plain JSON.

    NaN and infinities are written as ``null``: strict JSON has no spelling for them, and
    other tools (``jq``, browsers) refuse Python's ``NaN``.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy/torch values, tuples and paths turned into plain JSON data."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy, torch
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` (file or folder).

    On an exception the temporary folder is deleted and ``path`` is left untouched. An
    existing ``path`` is first renamed aside, so for an instant neither version is at
    ``path``; a reader never sees a mix of the two.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir(mode=0o777)  # the umask decides, as for an ordinary mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = _sibling(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_writable(path: str | Path, option: str) -> None:
    """Refuse, before anything is written, a folder that cannot be created or written.

    ``path`` need not exist; its nearest existing ancestor must be a writable folder.
    """
    from ..errors import ConfigError

    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {str(path)!r} cannot be created: {str(probe)!r} is a "
                          "file, not a folder. Choose another folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(path)!r} cannot be written: {str(probe)!r} is "
                          "read-only for this user. Choose a folder you can write to.")


# Hidden siblings left by a save killed mid-way: _sibling's .NAME.tmp-XXXXXXXX /
# .NAME.old-XXXXXXXX, and the .final-* folder of the run's final weights.
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$|^\.final-")


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders a killed save left in ``folder``."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if LEFTOVER.match(p.name)] if folder.is_dir() else []
    for path in found:
        _remove(path)
    return found


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints, adapters, data)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
