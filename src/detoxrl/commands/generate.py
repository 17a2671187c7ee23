"""``detoxrl generate RUN_DIR "prompt" ...``: answer prompts with a trained run."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="Generate text with a trained run (adapter and/or reference).",
        description="Answer each PROMPT with the run's trained adapter and, with --with "
        "reference or both, with the reference it started from (same seed per prompt). "
        "A PROMPT of '-' reads one prompt per line from standard input.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="The output_dir of a training run.")
    p.add_argument("prompts", metavar="PROMPT", nargs="+", help="Prompt text, or '-'.")
    p.add_argument("--with", dest="which", default="trained",
                   choices=("trained", "reference", "both"), help="Which model answers.")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate.")
    p.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold.")
    p.add_argument("--seed", type=int, default=0, help="Seed; prompt i uses seed + i.")
    p.add_argument("--template", action="store_true",
                   help="Wrap each prompt in the run's data.template, as in training.")
    p.add_argument("--json", action="store_true", help="One JSON object per prompt.")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present).")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models.inference import generate

    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.prompts == [
        "-"] else args.prompts
    rows = generate(args.run_dir, prompts, which=args.which,
                    max_new_tokens=args.max_new_tokens, greedy=args.greedy, seed=args.seed,
                    template=args.template, temperature=args.temperature, top_p=args.top_p,
                    device=args.device)
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        elif args.which == "both":
            print(f"prompt:    {row['prompt']}\ntrained:   {row['trained']}\n"
                  f"reference: {row['reference']}\n")
        else:
            print(row[args.which])
    return 0
