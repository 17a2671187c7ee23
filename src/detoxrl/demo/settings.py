"""The demo's own options, the stage presets it reads, and the quick (CI) sizes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import option, presets
from ..errors import ConfigError

ARCHS = ("causal", "seq2seq")
JUDGE = "profanity-check"  # the independent judge: alt-profanity-check, never the reward
BEST_OF = 4  # the reranking baseline RL is shown beside: best of 4 samples by the reward

# The quick demo runs every stage's real code at tiny sizes, for CI: dotted overrides of each
# stage's preset, applied before the user's own.
_TINY_MODEL = ["--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2",
               "--model.intermediate_size", "64", "--model.vocab_size", "400",
               "--model.tokenizer_texts", "1000"]
QUICK = {
    "reward": ["--training.max_steps", "4", "--data.max_train_rows", "256", *_TINY_MODEL],
    "policy": ["--training.max_steps", "4", "--data.max_eval_rows", "16",
               *[f"--data.corpus.{name}={n}" for name, n in (
                   ("rtp_nontoxic", 100), ("rtp_toxic", 20), ("dialogsum", 100),
                   ("davidson", 20), ("tweeteval", 20), ("dynabench", 20))],
               *_TINY_MODEL],
    "rl": ["--steps", "2", "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4",
           "--ppo.ppo_epochs", "1", "--validation.num_prompts", "8"],
}
QUICK_DATA = {"max_train": 64, "max_eval": 4}
QUICK_SAMPLES_PER_PROMPT = 2
# The toxic ("challenging") held-out set is reported beside the headline non-toxic one; its
# first 100 of 250 prompts keep the demo's first run within its 15 minutes.
TOXIC_PROMPTS = 100


@dataclass
class DemoConfig:
    arch: str = option("causal", "Policy architecture: 'causal' (GPT-2-shaped) or 'seq2seq' "
                       "(T5-shaped, the tutorial's model class).")
    data_dir: str = option("../shared/data", "Folder with the public data (rtp/, "
                           "hate-speech/, ...); any copy of the shared data folder.")
    output_dir: str | None = option(None, "Where the stages go; default runs/demo or "
                                    "runs/demo-seq2seq (-quick added for --quick).")
    seed: int = option(0, "Seed of every stage.")
    quick: bool = option(False, "Tiny sizes and a few steps of every stage, for CI: checks "
                         "that the stages chain, detoxifies nothing.")
    eval_prompts: int | None = option(None, "Held-out prompts evaluated per set (default: "
                                      "all of them).")
    toxic_prompts: int = option(TOXIC_PROMPTS, "Held-out toxic (challenging) prompts "
                                "evaluated: the first N of the set (also capped by "
                                "--eval-prompts); the non-toxic set is the headline.")
    samples_per_prompt: int | None = option(None, "Samples per evaluation prompt (default: "
                                            "25, the field's protocol; 2 with --quick).")
    jobs: int | None = option(None, "Stages run at once, each in its own process: the "
                              "reward classifier beside the LM, the best-of baseline beside "
                              "RL, the held-out sets side by side (default: one per CPU "
                              "core; 1 with a GPU).")
    reward_overrides: list[str] = option([], "Dotted overrides of the reward preset.")
    policy_overrides: list[str] = option([], "Dotted overrides of the policy (SFT) preset.")
    rl_overrides: list[str] = option([], "Dotted overrides of the RL preset.")

    def finalize(self) -> DemoConfig:
        """Fill the defaults that depend on other options; check the rest."""
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch is {self.arch!r}; choose 'causal' or 'seq2seq'.")
        if self.output_dir is None:
            name = "demo" + ("-seq2seq" if self.arch == "seq2seq" else "")
            self.output_dir = f"runs/{name}{'-quick' if self.quick else ''}"
        if self.samples_per_prompt is None:
            self.samples_per_prompt = QUICK_SAMPLES_PER_PROMPT if self.quick else 25
        for name in ("eval_prompts", "toxic_prompts", "samples_per_prompt", "jobs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got "
                                  f"{value}.")
        if self.jobs is not None and self.jobs > 1 and not sys.platform.startswith("linux"):
            raise ConfigError("--jobs above 1 runs stages in forked processes, which needs "
                              "Linux; leave --jobs out (or set it to 1) here.")
        return self

    @property
    def data_limits(self) -> dict[str, int | None]:
        """Caps on the prompt files of stage 0 (``max_train``, ``max_eval``)."""
        limits = dict(QUICK_DATA) if self.quick else {"max_train": None, "max_eval": None}
        if self.eval_prompts is not None:
            limits["max_eval"] = self.eval_prompts
        return limits


def preset(name: str) -> Path:
    """The stage preset ``configs/mini/NAME.yaml``, from the checkout or the package."""
    return presets.preset(f"mini/{name}.yaml")
