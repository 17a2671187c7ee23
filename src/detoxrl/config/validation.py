"""Allowed ranges of every numeric option, checked before anything loads or is written.

One table, keyed by dotted option name, so the message can name the option and its range.
Keys a config class does not have are skipped: the same table serves ``TrainConfig``, the
demo's config and options added or renamed later.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit

# option -> allowed range: "> a", ">= a" or an interval "[a, b)"; None values (optional
# options left unset) are always allowed.
RANGES = {
    "lora.r": ">= 1", "lora.alpha": "> 0", "lora.dropout": "[0, 1)",
    "data.min_chars": ">= 0", "data.max_chars": ">= 1", "data.max_prompt_tokens": ">= 1",
    "data.test_fraction": "[0, 1)", "data.toxicity_threshold": "[0, 1]", "data.max_rows": ">= 1",
    "reward.batch_size": ">= 1", "reward.max_length": ">= 1",
    "generation.min_new_tokens_draw": ">= 1", "generation.max_new_tokens_draw": ">= 1",
    "generation.min_length": ">= 0", "generation.top_k": ">= 0", "generation.top_p": "(0, 1]",
    "generation.temperature": "> 0", "generation.num_beams": ">= 1",
    "ppo.learning_rate": "> 0", "ppo.weight_decay": ">= 0", "ppo.warmup_steps": ">= 0",
    "ppo.batch_size": ">= 1", "ppo.mini_batch_size": ">= 1",
    "ppo.gradient_accumulation_steps": ">= 1", "ppo.forward_batch_size": ">= 1",
    "ppo.ppo_epochs": ">= 1",
    "ppo.gamma": "[0, 1]", "ppo.lam": "[0, 1]", "ppo.cliprange": "> 0",
    "ppo.cliprange_value": "> 0", "ppo.vf_coef": ">= 0", "ppo.max_grad_norm": "> 0",
    "ppo.init_kl_coef": ">= 0", "ppo.kl_target": "> 0", "ppo.kl_horizon": ">= 1",
    "ppo.score_clip": "> 0", "ppo.missing_eos_penalty": ">= 0", "ppo.beta": ">= 0",
    "ppo.num_generations": ">= 1", "ppo.best_of_n_target": ">= 2", "ppo.reference_samples": ">= 1",
    "steps": ">= 1", "seed": f"[0, {SEED_MAX}]", "save_every": ">= 0",
    "num_samples_logged": ">= 0", "max_skipped_steps": ">= 0",
    "eval_every": ">= 0", "validation.num_prompts": ">= 1",
    "validation.samples_per_prompt": ">= 1", "validation.max_new_tokens": ">= 1",
}

STEP_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                   "constant_with_warmup", "inverse_sqrt")

_BOUND = re.compile(r"^(>=?) (\S+)$")
_INTERVAL = re.compile(r"^([\[(])(\S+), (\S+)([\])])$")


def in_range(value: float, spec: str) -> bool:
    """Whether the finite number ``value`` lies in ``spec`` (a RANGES entry)."""
    if not math.isfinite(value):
        return False
    if m := _BOUND.match(spec):
        bound = float(m.group(2))
        return value >= bound if m.group(1) == ">=" else value > bound
    m = _INTERVAL.match(spec)
    lo, hi = float(m.group(2)), float(m.group(3))
    above = value >= lo if m.group(1) == "[" else value > lo
    below = value <= hi if m.group(4) == "]" else value < hi
    return above and below


def check_ranges(cfg: Any) -> None:
    """Raise ConfigError naming the first option outside its range, with the range."""
    for key, spec in RANGES.items():
        found, value = _lookup(cfg, key)
        if not found or value is None or isinstance(value, bool) or value == "auto":
            continue  # "auto" options (batch splits) are resolved in finalize
        if not isinstance(value, (int, float)) or not in_range(value, spec):
            what = "in " if spec[0] not in "<>" else (
                "a number " if isinstance(value, int) else "a finite number ")
            raise ConfigError(f"{key} must be {what}{spec}, got {value!r}. Set --{key} "
                              "to a value in that range.")
    _check_scheduler(cfg)


def _lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    node = cfg
    for name in key.split("."):
        if not hasattr(node, name):
            return False, None
        node = getattr(node, name)
    return True, node


def _check_scheduler(cfg: Any) -> None:
    found, name = _lookup(cfg, "ppo.lr_scheduler")
    if not found:
        return
    from transformers import SchedulerType

    # The others need extra arguments (min_lr, decay steps) or a metric at every step.
    allowed = [s.value for s in SchedulerType if s.value in STEP_SCHEDULERS]
    if name not in allowed:
        raise ConfigError(f"ppo.lr_scheduler is {name!r}; choose one of the transformers "
                          "schedulers " + ", ".join(allowed) + ".")


# --------------------------------------------------------------------------- config files

def read_yaml_mapping(path: Path) -> tuple[dict, str]:
    """The mapping in a YAML file and its text; unreadable, non-UTF-8 or torn files refused."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {str(path)!r} is not UTF-8 text (byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start}). Save it as "
                          "UTF-8, e.g. iconv -f latin1 -t utf-8.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {str(path)!r}: {exc.strerror}.") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        if truncated(text):
            raise ConfigError(truncated_message(path)) from None
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of options.")
    return raw, text


def truncated(text: str) -> bool:
    # YAML written by detoxrl, yaml.safe_dump and editors ends with a newline; a file that
    # stops mid-line was cut short (a full disk, an interrupted copy).
    return bool(text) and not text.endswith("\n")


def truncated_message(path: Path) -> str:
    return (f"Config file {str(path)!r} looks truncated: it ends mid-line, without a final "
            "newline, and does not read as a complete config. Restore the full file (a run "
            "folder's config.yaml is rewritten by --resume or --overwrite), or pass another "
            "--config.")
