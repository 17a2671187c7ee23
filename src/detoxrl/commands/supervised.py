"""``detoxrl train-reward`` and ``detoxrl sft``: the two supervised steps before RL.

Both read a YAML config plus dotted overrides (``--training.learning_rate 1e-3``), like
``detoxrl train``, and train with transformers' Trainer.
"""

from __future__ import annotations

import argparse

_HELP = {
    "train-reward": ("Train a toxicity classifier to use as the RL reward.",
                     "configs/mini/reward-dynabench.yaml"),
    "sft": ("Supervised fine-tuning of the starting policy (LoRA or full).",
            "configs/mini/lm-causal.yaml"),
}


def register(sub) -> None:
    for name, (text, example) in _HELP.items():
        p = sub.add_parser(
            name, help=text, description=f"{text} Options come from --config (YAML) and may "
            "be overridden with dotted keys, e.g. --training.epochs 2. Run with --help-config "
            "to list every option.", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help=f"YAML config, e.g. {example}.")
        p.add_argument("--data-dir", help="Folder that relative data paths start from "
                       "(overrides data_dir; default ../shared/data).")
        p.add_argument("--output-dir", help="Output folder (overrides output_dir).")
        p.add_argument("--overwrite", action="store_true",
                       help="Replace an output folder that already holds files.")
        p.add_argument("--help-config", action="store_true", help="List every config option.")
        p.add_argument("--quiet", action="store_true", help="No progress bar or log lines.")
        if name == "train-reward":
            p.add_argument("--validate-on", metavar="FILE", help="JSONL of texts with gold "
                           "toxicity (text + score or label, or RealToxicityPrompts records): "
                           "the classifier's ROC-AUC on it is its validity as a reward "
                           "(default: the RealToxicityPrompts continuations under --data-dir).")
        p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from ..config import help_table, load_config

    if args.command == "train-reward":
        from ..supervised.reward_training import RewardTrainingConfig as cls
        from ..supervised.reward_training import train_reward as fn
    else:
        from ..supervised.sft import SFTConfig as cls
        from ..supervised.sft import sft as fn
    if args.help_config:
        for key, default, text in help_table(cls):
            print(f"--{key} (default {default})\n    {text}")
        return 0
    overrides = list(args.overrides)
    if args.data_dir:
        overrides += ["--data_dir", args.data_dir]
    if args.output_dir:
        overrides += ["--output_dir", args.output_dir]
    if getattr(args, "validate_on", None):
        overrides += ["--validity.gold", args.validate_on]
    cfg = load_config(args.config, overrides, cls=cls)
    fn(cfg, overwrite=args.overwrite, quiet=args.quiet)
    return 0
