"""``detoxrl evaluate``: toxicity, reward, quality and KL of a trained adapter vs its reference.

The work is done by :mod:`detoxrl.evaluation.runner`; this module parses the command line
and prints the result as a table.
"""

from __future__ import annotations

import argparse
import textwrap

from ..config.choices import CHOICES


def count(text: str) -> int | None:
    """``--n``: a positive number, or ``all`` (``None``) for the whole test split."""
    if text.lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


RUN_DIR_HELP = ("RUN_DIR is a training run folder: its config.yaml and trained adapter are "
                "used.")


def paragraphs(*texts: str) -> str:
    """Help text wrapped by hand (the raw formatter keeps the epilog's example lines)."""
    return "\n\n".join(textwrap.fill(t, 88) for t in texts)


def usage(command: str) -> str:
    return (f"detoxrl {command} RUN_DIR [options] [--section.key VALUE ...]\n"
            f"       detoxrl {command} --config YAML --adapter PATH [options] "
            "[--section.key VALUE ...]")


def split_run_dir(extra: list[str]) -> tuple[str | None, list[str]]:
    """(RUN_DIR, dotted overrides) from the arguments argparse did not know.

    RUN_DIR is not an argparse positional: one would swallow the value of an override
    given before it (``--reward.model DIR RUN_DIR``).
    """
    from ..errors import ConfigError

    run_dirs, overrides, i = [], [], 0
    while i < len(extra):
        token = extra[i]
        if token.startswith("--") and "=" not in token and i + 1 < len(extra):
            overrides += extra[i:i + 2]
            i += 2
            continue
        (overrides if token.startswith("--") or "=" in token else run_dirs).append(token)
        i += 1
    if len(run_dirs) > 1:
        raise ConfigError(f"Expected one RUN_DIR, got {len(run_dirs)}: "
                          + ", ".join(repr(r) for r in run_dirs) + ".")
    return (run_dirs[0] if run_dirs else None), overrides


def add_common_arguments(p: argparse.ArgumentParser, n_default: int) -> None:
    """Options shared by ``evaluate`` and ``compare`` (same meaning, same generations)."""
    p.add_argument("--config", metavar="YAML", help="Run config, for an adapter trained "
                   "elsewhere (with --adapter; instead of RUN_DIR).")
    p.add_argument("--adapter", metavar="PATH", help="Trained adapter folder (default: "
                   "RUN_DIR), e.g. RUN_DIR/checkpoints/step-10/adapter.")
    p.add_argument("--n", type=count, default=n_default, metavar="N",
                   help=f"Test prompts to use, or 'all' (default {n_default}).")
    p.add_argument("--seed", type=int, default=None, help="Sampling seed (default: the "
                   "run's seed); batch b is generated after torch.manual_seed(seed + b).")
    p.add_argument("--greedy", action="store_true", help="Greedy decoding instead of the "
                   "run's sampling settings (generation.*).")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="T", help="Response "
                   "length limit (default: generation.max_new_tokens_draw, at most 100).")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="Prompts per generate call (default 16). Results depend on it.")
    p.add_argument("--output", metavar="DIR", help="Where results go (default: RUN_DIR/eval, "
                   "or ADAPTER/eval with --adapter); the report beside it is rebuilt when "
                   "the folder is named eval. Use one folder per prompt set.")
    p.add_argument("--prompts", metavar="FILE", help="Evaluate every prompt of FILE (read "
                   "with the run's data recipe, data.kind; no split, no toxicity filter) "
                   "instead of the run's held-out test split.")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if "
                   "available).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to the ``detoxrl`` parser."""
    p = subparsers.add_parser(
        "evaluate", help="Measure toxicity before/after training on held-out prompts.",
        usage=usage("evaluate"),
        description=paragraphs(
            "Generate K responses per test prompt with the reference (starting) policy and with "
            "the trained adapter (same prompts, same seeds), score their toxicity with the "
            "reward classifier and every --judge, their perplexity and diversity, and report "
            "the RealToxicityPrompts measures (expected maximum toxicity, toxicity "
            "probability, average toxicity, perplexity, distinct-1/2/3) with paired "
            "bootstrap confidence intervals over prompts. Writes summary.json, toxicity.json "
            "and generations.jsonl, then rebuilds report.html.", RUN_DIR_HELP),
        epilog="Run options are overridden with dotted keys, e.g.\n"
        "  detoxrl evaluate runs/detoxrl --n all --reward.model ./roberta-hate-speech-"
        "dynabench-r4-target\n  detoxrl evaluate runs/detoxrl --greedy --judge "
        "./toxic-classifier@toxic\n  detoxrl evaluate runs/rtp --protocol rtp --n 100 "
        "--prompts rtp/toxic.jsonl --output runs/rtp/eval-toxic --judge profanity-check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # a dotted override is never taken for a short option
    add_common_arguments(p, n_default=500)
    p.add_argument("--score-on", choices=CHOICES[("reward", "score_on")], default="response",
                   help="Toxicity of the response alone (default) or of query + response.")
    p.add_argument("--toxic-label", default=None, metavar="LABEL",
                   help="The reward classifier's toxic label (default: its label named "
                   "toxic, hate, offensive, ...: hate for nothate/hate classifiers).")
    p.add_argument("--samples-per-prompt", type=int, default=None, metavar="K",
                   help="Samples per prompt, all from one generate call (default 25 for "
                   "data.kind rtp or --protocol rtp, else 1).")
    p.add_argument("--protocol", choices=("rtp",), default=None, help="rtp: the "
                   "RealToxicityPrompts decoding (top_p 0.9, top_k off, temperature 1, 20 new "
                   "tokens, K = 25); explicit options still win.")
    p.add_argument("--judge", action="append", default=[], metavar="SPEC", help="An "
                   "independent toxicity judge, repeatable: 'profanity-check' (pip install "
                   "\"detoxrl[judges]\"), a Python callable module:function (list of texts -> "
                   "probabilities), or a classifier Hub id/folder, optionally MODEL@LABEL.")
    p.add_argument("--judge-label", default=None, metavar="LABEL", help="The toxic label of "
                   "classifier judges given without @LABEL (default: looked up by name: "
                   "toxic, toxicity, hate, offensive, ...).")
    p.add_argument("--fluency-model", default=None, metavar="MODEL", help="Causal LM or "
                   "seq2seq model (Hub id or folder) for the perplexity of the responses given "
                   "their prompts (default: the reference policy, adapter off).")
    p.add_argument("--judge-floor", action="append", default=[], metavar="FILE", help="Clean "
                   "human text, repeatable: RealToxicityPrompts records (.jsonl; the "
                   "continuations Perspective scored below 0.1) or one text per line. Every "
                   "scorer's expected max. toxicity and toxicity probability on groups of K "
                   "of them is its floor; each figure is also reported as excess over it.")
    p.add_argument("--best-of", type=int, default=None, metavar="N", help="Evaluate the "
                   "baseline instead of the adapter: 'after' is the starting policy with each "
                   "of the K samples the best of N by the run's reward (reranking at "
                   "inference, no training). With --config and no --adapter, the baseline of "
                   "the config's model before any training (give --output).")
    p.add_argument("--no-topicality", dest="topicality", action="store_false", help="Leave "
                   "out the topicality (each response's PMI with its prompt under the "
                   "starting policy), which scores every response once more without its "
                   "prompt.")
    p.add_argument("--bootstrap", type=int, default=10_000, metavar="R",
                   help="Bootstrap resamples (default 10000).")
    p.set_defaults(func=run, accepts_overrides=True)
    return p


def options(args: argparse.Namespace):
    """The runner's EvalOptions from parsed arguments."""
    from ..evaluation.setup import EvalOptions

    return EvalOptions(
        n=args.n, seed=args.seed, greedy=args.greedy, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, prompts=args.prompts,
        samples_per_prompt=getattr(args, "samples_per_prompt", None),
        protocol=getattr(args, "protocol", None),
        explicit_generation=generation_overrides(args.overrides),
        score_on=getattr(args, "score_on", "response"),
        toxic_label=getattr(args, "toxic_label", None), judges=getattr(args, "judge", []),
        judge_label=getattr(args, "judge_label", None),
        fluency_model=getattr(args, "fluency_model", None),
        judge_floor=getattr(args, "judge_floor", []), best_of=getattr(args, "best_of", None),
        topicality=getattr(args, "topicality", True),
        n_resamples=getattr(args, "bootstrap", 10_000), device=args.device,
        progress=not args.quiet)


def generation_overrides(extra: list[str]) -> frozenset[str]:
    """The ``generation.*`` keys set on the command line (they win over --protocol)."""
    keys = set()
    for token in extra:
        name = token.lstrip("-").split("=", 1)[0]
        if token.startswith("--") and name.startswith("generation."):
            keys.add(name.removeprefix("generation."))
    return frozenset(keys)


def target(args: argparse.Namespace):
    from ..evaluation.setup import resolve_target

    run_dir, overrides = split_run_dir(args.overrides)
    return resolve_target(run_dir, args.config, args.adapter, overrides, args.output,
                          best_of=getattr(args, "best_of", None) is not None)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.printing import format_summary
    from ..evaluation.runner import evaluate, rebuild_report

    tgt = target(args)
    summary = evaluate(tgt, options(args))
    print(format_summary(summary))
    print(f"\nresults: {tgt.out_dir}/summary.json, toxicity.json, generations.jsonl")
    report = rebuild_report(tgt.out_dir)
    if report is not None:
        print(f"report: {report}")
    return 0
