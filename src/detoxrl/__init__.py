"""detoxrl: make text generators less toxic with RL from a classifier's feedback.

``from detoxrl import DetoxTrainer, TrainConfig`` gives the trainer and its configs; the
heavy modules (torch, transformers) are imported on first use, so the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DetoxTrainer": "detox_trainer", "TrainConfig": "config", "ModelConfig": "config",
    "LoraSettings": "config", "DataConfig": "config", "RewardConfig": "config",
    "SamplingConfig": "config", "PPOConfig": "config", "load_config": "config",
    "ClassifierReward": "reward", "RewardSet": "reward", "build_prompts": "data",
    "write_model_card": "model_card", "generate": "inference", "DetoxError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'detoxrl' has no attribute {name!r}")
