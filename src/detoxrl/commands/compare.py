"""``detoxrl compare``: the tutorial's before/after table for a few test prompts.

One row per prompt (query, response before, response after, reward before, reward after,
diff), sorted by diff, largest gain first; written as CSV, Markdown and HTML into
``RUN_DIR/eval/compare.*``. The responses come from the same generation code as
``detoxrl evaluate``; when evaluate already wrote ``generations.jsonl`` with the same
settings for at least N prompts, its first N rows are used as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

from .evaluate import RUN_DIR_HELP, add_common_arguments, options, paragraphs, target, usage

# Control characters other than whitespace: a model's byte-level tokens can decode to them,
# and a terminal would act on them (move the cursor, clear the screen).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to the ``detoxrl`` parser."""
    p = subparsers.add_parser(
        "compare", help="Before/after responses and rewards for N test prompts, as tables.",
        usage=usage("compare"),
        description=paragraphs(
            "Generate responses to N test prompts with the reference (starting) policy and the "
            "trained adapter (same prompts, same seeds as evaluate), score them with the run's "
            "reward, and write compare.csv, compare.md and compare.html sorted by reward gain; "
            "then rebuild report.html.", RUN_DIR_HELP),
        epilog="Run options are overridden with dotted keys, e.g.\n"
        "  detoxrl compare runs/detoxrl --n 20 --reward.model DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    add_common_arguments(p, n_default=20)
    p.add_argument("--regenerate", action="store_true", help="Generate afresh even when "
                   "evaluate's generations.jsonl matches these settings.")
    p.set_defaults(func=run, accepts_overrides=True)
    return p


def run(args: argparse.Namespace) -> int:
    from ..evaluation.runner import rebuild_report
    from ..evaluation.tables import markdown_table

    tgt = target(args)
    rows, reused = comparison(tgt, options(args), reuse=not args.regenerate)
    if reused:
        print(f"Reused the first {len(rows)} rows of {tgt.out_dir}/generations.jsonl "
              "(same settings; --regenerate to generate afresh).")
    shown = [{**r, **{k: terminal_cell(r[k]) for k in ("query", "response_before",
                                                  "response_after")}} for r in rows]
    print(markdown_table(shown), end="")
    print(f"\ntables: {tgt.out_dir}/compare.csv, compare.md, compare.html")
    report = rebuild_report(tgt.out_dir)
    if report is not None:
        print(f"report: {report}")
    return 0


def comparison(tgt, opts, reuse: bool = True):
    """Rows of the table (written to ``compare.{csv,md,html}``) and whether evaluate's
    generations were reused."""
    from ..evaluation import setup
    from ..evaluation.tables import comparison_rows, write_csv, write_html, write_markdown

    opts = dataclasses.replace(opts, samples_per_prompt=1)  # the table has one row per prompt
    setup.check_options(opts)
    setup.check_evaluation_current(tgt.out_dir, tgt.adapter)  # its report would mix adapters
    found = reusable_generations(tgt, opts) if reuse else None
    reused = found is not None
    if found is None:
        gen, scores = _generate(tgt, opts)
        found = (gen.queries, gen.before, gen.after, scores["reward_before"],
                 scores["reward_after"])
    rows = comparison_rows(*found)
    out = tgt.out_dir
    write_csv(rows, out / "compare.csv")
    write_markdown(rows, out / "compare.md")
    write_html(rows, out / "compare.html", title=f"Before / after: {len(rows)} test prompts")
    return rows, reused


def _generate(tgt, opts):
    """Before/after responses and their rewards, by evaluate's generation loop."""
    from ..evaluation import runner, setup
    from ..evaluation.sampling import generate_before_after
    from ..evaluation.scoring import score_generations, scoring_jobs

    cfg, device = tgt.cfg, setup.device_for(opts)
    dec = setup.eval_sampling(cfg, opts)
    reward, _ = runner.load_classifiers(cfg, opts, device, toxicity=False)
    policy = setup.load_policy(tgt, device)
    rows = setup.first_prompts(setup.eval_prompts(cfg, opts, policy.tokenizer), opts.n)
    gen = generate_before_after(policy, rows, dec.sampling, dec.max_new_tokens,
                                opts.batch_size, dec.seed, progress=opts.progress)
    jobs = scoring_jobs(reward, None, opts.score_on, with_toxicity=False)
    return gen, score_generations(gen, jobs, opts.progress)


def reusable_generations(tgt, opts):
    """evaluate's first ``opts.n`` rows (queries, before, after, rewards before and after)
    when its summary.json records the same generation settings; else None."""
    from ..evaluation import setup

    summary_path = tgt.out_dir / "summary.json"
    gen_path = tgt.out_dir / "generations.jsonl"
    if not (summary_path.is_file() and gen_path.is_file()):
        return None
    try:
        old = json.loads(summary_path.read_text(encoding="utf-8")).get("settings") or {}
        rows = [json.loads(line) for line in gen_path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(old.get("test_prompts"), int):
        return None
    new = setup.settings(tgt, opts, n_available=old["test_prompts"])
    if any(old.get(k) != new[k] for k in setup.GENERATION_KEYS) or len(rows) < new["n"]:
        return None
    rows = rows[:new["n"]]
    try:
        return ([r["query"] for r in rows], [r["before"] for r in rows],
                [r["after"] for r in rows], [r["reward_before"] for r in rows],
                [r["reward_after"] for r in rows])
    except KeyError:
        return None


def terminal_cell(text: str, width: int = 60) -> str:
    """``text`` as one cell of the printed table: control characters written as ``\\xNN``,
    whitespace collapsed, cut at ``width``. The files keep the text as generated."""
    text = " ".join(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text).split())
    return text if len(text) <= width else text[:width - 1] + "…"
