"""Where the presets are, and how a ``--config configs/...`` path finds them from anywhere.

The presets' one home is the checkout's ``configs/`` (``tiny.yaml``, ``mini/``,
``recommended.yaml``, ...). setup.py ships a copy of that folder inside the wheel as
``detoxrl/presets``, so an installed detoxrl finds them from any folder, and
``--config configs/tiny.yaml`` means the same file in a checkout and outside one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError

CONFIGS = "configs"


def presets_dir() -> Path | None:
    """``detoxrl/presets`` of an installed wheel, else the checkout's ``configs/``."""
    package = Path(str(resources.files("detoxrl")))
    for folder in (package / "presets", package.parents[1] / CONFIGS):
        if folder.is_dir():
            return folder
    return None


def find_config(path: str | Path) -> Path:
    """``path`` when it exists; else, for a relative ``configs/...`` path, the preset it
    names; else ``path`` unchanged, for the caller to report missing."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != (CONFIGS,):
        return path
    root = presets_dir()
    if root is not None and root.joinpath(*path.parts[1:]).is_file():
        return root.joinpath(*path.parts[1:])
    return path


def preset(relative: str) -> Path:
    """The preset ``configs/RELATIVE``; ConfigError when this installation lacks it."""
    found = find_config(Path(CONFIGS, relative))
    if not found.is_file():
        raise ConfigError(f"The preset configs/{relative} is missing from this installation "
                          "of detoxrl; reinstall it from a wheel or a checkout (its configs/ "
                          "folder holds the presets).")
    return found
