"""``detoxrl demo``: train a classifier and an LM, detoxify the LM with PPO, measure it."""

from __future__ import annotations

import argparse
import dataclasses

from ..demo.settings import TOXIC_PROMPTS, DemoConfig
from ..errors import ConfigError
from .evaluate import paragraphs

STAGE_PREFIXES = ("reward", "policy", "rl")


def _help(name: str) -> str:
    """The option's one help text, from :class:`DemoConfig`."""
    return next(f.metadata["help"] for f in dataclasses.fields(DemoConfig) if f.name == name)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to the ``detoxrl`` parser."""
    p = subparsers.add_parser(
        "demo", help="A real detoxification, offline: reward, LM, PPO, evaluation, report.",
        description=paragraphs(
            "Train a mini offensive-language classifier on TweetEval offensive and a mini "
            "LM on public text, detoxify the LM with PPO on RealToxicityPrompts prompts, "
            "and evaluate it on held-out prompts with an independent judge. Each stage is "
            "cached: a re-run skips what is built and rebuilds what changed; --fresh "
            "rebuilds everything."),
        epilog="A stage's preset is overridden with dotted keys after its name, e.g.\n"
        "  detoxrl demo --rl.steps 80 --rl.ppo.init_kl_coef 0.05",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # a dotted override is never taken for a short option
    p.add_argument("--arch", choices=("causal", "seq2seq"), default="causal",
                   help=_help("arch"))
    p.add_argument("--data-dir", default="../shared/data", metavar="DIR",
                   help=_help("data_dir") + " (default %(default)s)")
    p.add_argument("--output-dir", default=None, metavar="DIR", help=_help("output_dir"))
    p.add_argument("--fresh", action="store_true", help="Rebuild every stage.")
    p.add_argument("--quick", action="store_true", help=_help("quick"))
    p.add_argument("--seed", type=int, default=0, help=_help("seed"))
    p.add_argument("--eval-prompts", type=int, default=None, metavar="N",
                   help=_help("eval_prompts"))
    p.add_argument("--toxic-prompts", type=int, default=TOXIC_PROMPTS, metavar="N",
                   help=_help("toxic_prompts"))
    p.add_argument("--samples-per-prompt", type=int, default=None, metavar="K",
                   help=_help("samples_per_prompt"))
    p.add_argument("--jobs", type=int, default=None, metavar="N", help=_help("jobs"))
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=run, accepts_overrides=True)
    return p


def stage_overrides(extra: list[str]) -> dict[str, list[str]]:
    """Split ``--rl.steps 80 --reward.x=1`` into each stage's own dotted overrides."""
    out: dict[str, list[str]] = {name: [] for name in STAGE_PREFIXES}
    i = 0
    while i < len(extra):
        token = extra[i]
        stage, _, rest = token.removeprefix("--").partition(".")
        if not token.startswith("--") or stage not in out or not rest:
            raise ConfigError(f"Cannot read {token!r}: demo options are listed by "
                              "'detoxrl demo --help'; a stage's preset takes --reward.KEY, "
                              "--policy.KEY or --rl.KEY followed by a value.")
        if "=" in rest:
            out[stage].append("--" + rest)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out[stage] += ["--" + rest, extra[i + 1]]
            i += 1
        else:
            raise ConfigError(f"Option {token} needs a value, e.g. {token} 3.")
        i += 1
    return out


def run(args: argparse.Namespace) -> int:
    from ..demo.pipeline import run_demo

    overrides = stage_overrides(args.overrides)
    cfg = DemoConfig(arch=args.arch, data_dir=args.data_dir, output_dir=args.output_dir,
                     seed=args.seed, quick=args.quick, eval_prompts=args.eval_prompts,
                     toxic_prompts=args.toxic_prompts,
                     samples_per_prompt=args.samples_per_prompt, jobs=args.jobs,
                     reward_overrides=overrides["reward"],
                     policy_overrides=overrides["policy"], rl_overrides=overrides["rl"])
    run_demo(cfg, fresh=args.fresh, quiet=args.quiet)
    return 0
