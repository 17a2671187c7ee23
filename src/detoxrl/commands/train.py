"""``detoxrl train``: PPO detoxification from a YAML config plus dotted overrides."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="Train a policy with RL (PPO, RLOO or GRPO) against a toxicity classifier.",
        description="Train with PPO, RLOO or GRPO (ppo.algorithm). Options come from --config\n"
        "(YAML) and may be overridden with dotted keys, e.g. --ppo.learning_rate 3e-5\n"
        "--steps 20 --model.name_or_path ./flan-t5-base. Run with --help-config to list\n"
        "every option.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config, e.g. configs/tiny.yaml.")
    p.add_argument("--output-dir", help="Run folder (overrides output_dir).")
    p.add_argument("--resume", action="store_true",
                   help="Continue from the newest checkpoint in the run folder.")
    p.add_argument("--overwrite", action="store_true",
                   help="Start again in a run folder that already holds a run.")
    p.add_argument("--help-config", action="store_true", help="List every config option.")
    p.add_argument("--quiet", action="store_true", help="No progress bar or parameter report.")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    from ..config import help_table, load_config
    from ..evaluation.validity import warn_about
    from ..rl.detox_trainer import train

    if args.help_config:
        for key, default, text in help_table():
            print(f"--{key} (default {default})\n    {text}")
        return 0
    _check_option_names(args.overrides)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides += ["--output_dir", args.output_dir]
    cfg = load_config(args.config, overrides)
    warn_about(cfg.reward.model)  # before any model loads
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    result.trainer.accelerator.end_training()  # the program's last run: the process group ends
    metrics = result.metrics
    if metrics and not args.quiet and result.trainer.accelerator.is_main_process:
        last = metrics[-1]
        print(f"done: {len(metrics)} steps, last reward mean "
              f"{last.get('env/reward_mean', float('nan')):.4f}, KL "
              f"{last.get('objective/kl', float('nan')):.4f}; outputs in {cfg.output_dir}")
    return 0


_FLAGS = ("--config", "--output-dir", "--resume", "--overwrite", "--help-config", "--quiet")


def _check_option_names(extra: list[str]) -> None:
    """A top-level ``--name`` left over must be a config option; suggest the closest flag.

    (Dotted keys are checked by ``load_config``, which lists the options of their section.)
    """
    import difflib

    from ..config import help_table
    from ..errors import ConfigError

    keys = {key for key, _, _ in help_table()}
    for arg in extra:
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if "." not in key and key not in keys:
            known = [*_FLAGS, *(f"--{k}" for k in keys)]
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"Unknown option {key!r}.{hint} Run detoxrl "
                              "train --help and --help-config for the options.")
