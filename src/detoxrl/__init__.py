"""detoxrl: make text generators less toxic with PPO from a classifier's feedback."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
