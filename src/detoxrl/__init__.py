"""detoxrl: make text generators less toxic with RL from a classifier's feedback.

``from detoxrl import DetoxTrainer, TrainConfig`` gives the trainer and its configs; the
heavy modules (torch, transformers) are imported on first use, so the CLI starts fast.

The packages, each importing only those listed before it: ``config`` (typed options),
``runs`` (run folder, checkpoints, atomic files, preflight checks), ``models`` (policy,
rewards, loading, sampling), ``data`` (prompts, labelled texts, LM corpora),
``evaluation`` (before/after measures, tables, report, model card), ``rl`` and
``supervised`` (training), ``demo``, ``commands`` and ``cli``. ``errors`` is imported by all.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DetoxTrainer": "rl.detox_trainer", "TrainConfig": "config", "ModelConfig": "config",
    "LoraSettings": "config", "DataConfig": "config", "RewardConfig": "config",
    "SamplingConfig": "config", "PPOConfig": "config", "load_config": "config",
    "ClassifierReward": "models.reward", "RewardSet": "models.reward",
    "build_prompts": "data.prompts", "write_model_card": "evaluation.model_card",
    "generate": "models.inference", "DetoxError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'detoxrl' has no attribute {name!r}")
