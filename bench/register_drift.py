"""What the RL'd policy says differently: a reading aid for reward hacking in an evaluation.

Length is fixed in the demo and distinct-n is in the table; this counts what they miss, on
``generations.jsonl`` of ``detoxrl evaluate`` (before = the starting policy, after = RL):
distinct responses, newlines per response, the most common first words of lines and the
most common words. A policy that games the classifier by changing register (short
first-person lines, say) shows here before it shows in any average.

    python bench/register_drift.py runs/demo/4-eval-nontoxic/generations.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def drift(rows: list[dict], side: str, top: int = 6) -> dict:
    texts = [r[side] for r in rows]
    lines = [line.split() for t in texts for line in t.split("\n")]
    words = [w.lower().strip(".,?!\"'") for t in texts for w in t.split()]
    return {"responses": len(texts), "distinct_responses": len(set(texts)),
            "newlines_per_response": sum(t.count("\n") for t in texts) / max(1, len(texts)),
            "line_starts": collections.Counter(w[0] for w in lines if w).most_common(top),
            "words": collections.Counter(w for w in words if w).most_common(top)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("generations", type=Path, help="generations.jsonl of detoxrl evaluate")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    with args.generations.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    print(json.dumps({side: drift(rows, side, args.top) for side in ("before", "after")},
                     indent=1))


if __name__ == "__main__":
    main()
