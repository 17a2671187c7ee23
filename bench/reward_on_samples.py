"""How much the reward knows about the judge's toxicity on the policy's *own* samples.

A reward's validity is measured on human text (``detoxrl train-reward`` prints it). RL sees
only what the policy writes, so the question that decides what RL can learn is narrower: on
the policy's samples, how often does the judge flag one, and how well does the reward pick
out the ones it flags? Read from ``generations.jsonl`` of ``detoxrl evaluate`` (``before`` is
the starting policy; ``toxicity_*`` the reward classifier's probability of its toxic label):

* the share of samples the reward classifier flags (toxicity >= 0.5) and the judge flags
  (judge >= 0.5), and the judge-flagged samples an RL batch of ``--batch`` holds on average;
* how often the judge flags a sample the classifier flags, and one it does not;
* the ROC-AUC of the classifier's toxicity against the judge's flag.

    python bench/reward_on_samples.py runs/demo/4-eval-nontoxic/generations.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detoxrl.evaluation.stats import roc_auc


def agreement(rows: list[dict], side: str, judge: str, batch: int) -> dict:
    reward = [float(r[f"toxicity_{side}"]) for r in rows]
    flagged = [float(r[f"judge:{judge}_{side}"]) >= 0.5 for r in rows]
    by_reward = [t >= 0.5 for t in reward]

    def share(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {
        "samples": len(rows),
        "reward_flagged": share(by_reward),
        "judge_flagged": share(flagged),
        "judge_flagged_per_batch": share(flagged) * batch,
        "judge_flagged_among_reward_flagged": share([f for f, b in zip(flagged, by_reward,
                                                                       strict=True) if b]),
        "judge_flagged_among_the_rest": share([f for f, b in zip(flagged, by_reward,
                                                                 strict=True) if not b]),
        "roc_auc_vs_judge": roc_auc(flagged, reward) if 0 < sum(flagged) < len(rows) else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("generations", type=Path, help="generations.jsonl of detoxrl evaluate")
    p.add_argument("--judge", default="profanity-check")
    p.add_argument("--batch", type=int, default=64, help="Samples per RL step (the demo's).")
    p.add_argument("--out", type=Path, help="Also write the figures here (JSON).")
    args = p.parse_args(argv)
    with args.generations.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    result = {"generations": str(args.generations), "judge": args.judge,
              **{side: agreement(rows, side, args.judge, args.batch)
                 for side in ("before", "after")}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
