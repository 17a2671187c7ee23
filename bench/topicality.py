#!/usr/bin/env python
"""Is a response about its prompt? Prompt-response PMI, recomputed from a generations file.

``detoxrl evaluate`` reports topicality itself (``protocol.topicality`` of summary.json);
this script recomputes it for an existing ``generations.jsonl`` under any model, with the
evaluation's own :func:`detoxrl.evaluation.fluency.pmi` (its docstring defines the
measure), plus the share of responses the prompt helps at all. Reported per prompt (mean
over its samples), before and after, with the evaluation's paired bootstrap CI.

    python bench/topicality.py runs/demo/4-eval-nontoxic/generations.jsonl \\
        --model runs/demo/2-policy --out bench/results/topicality-causal.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from detoxrl.evaluation.fluency import load_fluency_model, pmi
from detoxrl.evaluation.protocol import as_matrix, nanmean_per_prompt
from detoxrl.evaluation.stats import paired_bootstrap, verdict


def topicality(rows: list[dict], fm) -> dict:
    """``rows``: whole prompts, each prompt's samples consecutive, as evaluate writes them."""
    k = 1 + max(r["sample"] for r in rows)
    prompts = [r["query"] for r in rows]
    sides = {side: pmi(fm, prompts, [r[side] for r in rows]) for side in ("before", "after")}
    before, after = (nanmean_per_prompt(as_matrix(sides[s], k)) for s in ("before", "after"))
    boot = paired_bootstrap(before, after)
    return {"measure": "prompt-response PMI, nats per token, mean over each prompt's samples",
            "responses": len(rows), "prompts": len(before),
            "before": boot["before"], "after": boot["after"], "change": boot["observed"],
            "ci95": [boot["ci_low"], boot["ci_high"]],
            "verdict": verdict(boot["ci_low"], boot["ci_high"], lower_is_better=False),
            "share_of_responses_with_pmi_above_0": {
                s: float(np.nanmean(v > 0)) for s, v in sides.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("generations", type=Path, help="generations.jsonl of detoxrl evaluate")
    p.add_argument("--model", required=True, help="the starting policy (folder or Hub id)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N responses only (whole prompts: a multiple of K)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with args.generations.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()][:args.limit]
    result = {"generations": str(args.generations), "model": args.model,
              **topicality(rows, load_fluency_model(args.model, torch.device("cpu")))}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
