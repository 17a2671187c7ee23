"""The one table of allowed values for the options that take a name, and its check.

The config check, the reward classifier, the RL math and the command line read their value
lists from :data:`CHOICES`, so a new value is added in one place.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("data", "kind"): ("dialogsum", "rtp"),
    ("reward", "output"): ("logit", "prob"),
    ("reward", "score_on"): ("response", "query+response"),
    ("ppo", "algorithm"): ("ppo", "rloo", "grpo"),
    ("ppo", "kl_estimator"): ("k1", "k2", "k3", "abs"),
    ("ppo", "loss_type"): ("grpo", "bnpo", "dr_grpo"),
    ("ppo", "scale_rewards"): ("group", "batch", "none"),
    ("ppo", "kl_controller"): ("adaptive", "fixed"),
}

# Names and values that mean something else in TRL or OpenRLHF, renamed after their
# meaning there; a config still using one is refused with the new name.
RENAMED_OPTIONS = {"ppo.target_kl": "ppo.kl_target", "ppo.horizon": "ppo.kl_horizon"}
RENAMED_VALUES = {("ppo", "kl_estimator"): {"kl": "k1", "mse": "k2", "full": "k3"}}


def check_choice(section: str, name: str, value: Any) -> None:
    """ConfigError unless ``value`` is allowed for ``section.name`` (naming a renamed value)."""
    new = RENAMED_VALUES.get((section, name), {}).get(value)
    if new is not None:
        raise ConfigError(f"{section}.{name}: {value!r} is now called {new!r}; write "
                          f"{section}.{name}: {new}.")
    allowed = CHOICES[(section, name)]
    if value not in allowed:
        raise ConfigError(f"{section}.{name} is {value!r}; choose one of "
                          + ", ".join(repr(a) for a in allowed) + ".")


def check_choices(cfg: Any) -> None:
    """Check every option of a ``TrainConfig`` that takes a name."""
    for section, name in CHOICES:
        check_choice(section, name, getattr(getattr(cfg, section), name))
