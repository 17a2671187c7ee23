"""Run configuration: typed dataclasses, YAML and ``--a.b value`` loading, value checks.

``schema`` holds the dataclasses (one help text per field), ``loading`` reads YAML and
command-line overrides into them, ``validation`` holds the numeric ranges and YAML
reading, ``choices`` the one table of allowed values, ``presets`` where the shipped
presets (``configs/``) are. Imports only ``detoxrl.errors``.
"""

from .loading import from_dict, help_table, load_config, parse_overrides, to_dict
from .schema import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
    ValidationSettings,
    derived,
    option,
)

__all__ = ["DataConfig", "LoraSettings", "ModelConfig", "PPOConfig", "RewardConfig",
           "SamplingConfig", "TrainConfig", "ValidationSettings", "derived", "from_dict",
           "help_table", "load_config", "option", "parse_overrides", "to_dict"]
