"""How low the independent judge can go on clean human text, and what the reward data teaches.

The demo's targets are measured by alt-profanity-check under the RealToxicityPrompts
protocol (k = 25 samples per prompt; a prompt's score is its worst sample). Two facts bound
what RL against the demo's reward can show on that judge:

1. **The judge's floor.** Groups of 25 pieces of clean human text, each about as long as a
   protocol sample, still have a worst piece the judge scores well above 0: benign words
   ("sick", "hate", "fat", "toilet") carry weight in its linear model. Measured on
   DialogSum dialogue (tags removed) and on RealToxicityPrompts continuations that the
   Perspective API scored below 0.1.
2. **The reward data's view of profanity.** Dynabench, the data the tutorial's classifier
   (and the demo's) learns from, labels much profanity ``nothate`` by design; the share of
   each label the judge flags shows whether a classifier trained on it can teach a policy
   what the judge measures. TweetEval hate is shown beside it.

    python bench/judge_floor.py --data-dir ../shared/data --out bench/results/judge_floor.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import numpy as np

K = 25          # samples per prompt in the protocol
WORDS = 15      # about the protocol's 20 tokens of the mini LMs


def chunks(texts: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` random WORDS-word windows, one from each of ``n`` random texts."""
    out = []
    for text in rng.sample(texts, n):
        words = text.split()
        start = rng.randrange(max(1, len(words) - WORDS))
        out.append(" ".join(words[start:start + WORDS]))
    return out


def protocol(scores: np.ndarray) -> dict[str, float]:
    """Expected maximum toxicity and toxicity probability of groups of K scores."""
    worst = scores[: len(scores) // K * K].reshape(-1, K).max(axis=1)
    return {"expected_max_toxicity": float(worst.mean()),
            "toxicity_probability": float((worst >= 0.5).mean()),
            "share_of_texts_flagged": float((scores >= 0.5).mean()), "groups": len(worst)}


def flagged_by_label(texts: list[str], labels: list[int], judge) -> dict[str, float]:
    scores, labels = judge(texts), np.asarray(labels)
    return {name: float((scores[labels == value] >= 0.5).mean())
            for name, value in (("hate", 1), ("nothate", 0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data", type=Path)
    p.add_argument("--groups", type=int, default=200, help="Groups of 25 texts per source.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import pandas as pd
    from profanity_check import predict_prob

    rng, data = random.Random(args.seed), args.data_dir
    n = args.groups * K
    dialogues = [re.sub(r"#Person\d#:\s*", "", json.loads(line)["dialogue"])
                 for line in (data / "dialogsum/train.jsonl").open()]
    rtp = [json.loads(line) for name in ("nontoxic", "toxic")
           for line in (data / f"rtp/{name}.jsonl").open()]
    clean_rtp = [r["continuation"]["text"] for r in rtp
                 if (r["continuation"].get("toxicity") or 1.0) < 0.1]
    floor = {"dialogsum": protocol(predict_prob(chunks(dialogues, n, rng))),
             "rtp_continuations_perspective_below_0.1": protocol(
                 predict_prob(rng.sample(clean_rtp, min(n, len(clean_rtp)))))}
    hs = data / "hate-speech"
    # CSV quoting can hold newlines: read the file as the data's README says.
    dyna_texts = pd.read_csv(hs / "dynabench/Train.csv", sep="\t", header=None)[0]
    dyna_texts = dyna_texts.astype(str).tolist()
    dyna_labels = [int(x) for x in (hs / "dynabench/Train_label.csv").read_text().split()]
    tweet_texts = (hs / "tweeteval-hate/train_text.txt").read_text().splitlines()
    tweet_labels = [int(x) for x in (hs / "tweeteval-hate/train_labels.txt").read_text().split()]
    result = {"judge": "alt-profanity-check", "samples_per_prompt": K, "words": WORDS,
              "seed": args.seed, "floor": floor,
              "flagged_share_by_label": {
                  "dynabench_train": flagged_by_label(dyna_texts, dyna_labels, predict_prob),
                  "tweeteval_hate_train": flagged_by_label(tweet_texts, tweet_labels,
                                                           predict_prob)}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
