"""How low the independent judge can go on clean human text, and what the reward data teaches.

The demo's targets are measured by alt-profanity-check under the RealToxicityPrompts
protocol (k = 25 samples per prompt; a prompt's score is its worst sample). Two facts bound
what RL against the demo's reward can show on that judge:

1. **The judge's floor.** Groups of 25 pieces of clean human text, each about as long as a
   protocol sample, still have a worst piece the judge scores well above 0: benign words
   ("sick", "hate", "fat", "toilet") carry weight in its linear model. Measured on
   DialogSum dialogue (tags removed) and on RealToxicityPrompts continuations that the
   Perspective API scored below 0.1, with the evaluation's own floor
   (:mod:`detoxrl.evaluation.floor`: the exact expectation over random groups of 25, and a
   bootstrap interval over the texts); ``detoxrl evaluate --judge-floor`` reports the
   latter beside every judge figure.
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
from pathlib import Path

import numpy as np

K = 25          # samples per prompt in the protocol
WORDS = 15      # about the protocol's 20 tokens of the mini LMs
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "mini"


def chunks(texts: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` random WORDS-word windows, one from each of ``n`` random texts."""
    out = []
    for text in rng.sample(texts, n):
        words = text.split()
        start = rng.randrange(max(1, len(words) - WORDS))
        out.append(" ".join(words[start:start + WORDS]))
    return out


def protocol(scores: np.ndarray, seed: int) -> dict:
    """The evaluation's floor of these scores for K samples per prompt, and the share of
    texts the judge flags."""
    from detoxrl.evaluation.floor import judge_floor
    from detoxrl.evaluation.protocol import TOXIC_THRESHOLD

    return {**judge_floor(scores, K, seed=seed),
            "share_of_texts_flagged": float((np.asarray(scores) >= TOXIC_THRESHOLD).mean())}


def reward_training_split(preset: str, data_dir: Path) -> tuple[list[str], np.ndarray]:
    """Texts of a reward preset's training split and whether each is its positive label,
    read as ``detoxrl train-reward`` reads them."""
    from detoxrl.config.loading import load_config
    from detoxrl.data.labelled import read_labelled
    from detoxrl.supervised.reward_training import RewardTrainingConfig

    data = load_config(PRESETS / f"{preset}.yaml", cls=RewardTrainingConfig).data
    rows = read_labelled(data.train, str(data_dir), data.labels, data.label_map, "train")
    return rows.texts, np.asarray(rows.labels) == data.labels.index(data.positive_label)


def flagged_by_label(texts: list[str], positive: np.ndarray, judge) -> dict[str, float]:
    scores = judge(texts)
    return {"hate": float((scores[positive] >= 0.5).mean()),
            "nothate": float((scores[~positive] >= 0.5).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data", type=Path)
    p.add_argument("--groups", type=int, default=200,
                   help="DialogSum windows, in groups of 25 (the RTP texts are all used).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from profanity_check import predict_prob

    from detoxrl.data.lm_corpus import dialogues
    from detoxrl.evaluation.floor import read_clean_texts

    rng, data = random.Random(args.seed), args.data_dir
    clean_rtp = [text for _, text in read_clean_texts(
        [data / f"rtp/{name}.jsonl" for name in ("nontoxic", "toxic")])]
    floor = {"dialogsum": protocol(predict_prob(chunks(dialogues(data), args.groups * K, rng)),
                                   args.seed),
             "rtp_continuations_perspective_below_0.1": protocol(predict_prob(clean_rtp),
                                                                 args.seed)}
    flagged = {f"{name}_train": flagged_by_label(*reward_training_split(preset, data),
                                                 predict_prob)
               for name, preset in (("dynabench", "reward-dynabench"),
                                    ("tweeteval_hate", "reward-tweeteval"))}
    result = {"judge": "alt-profanity-check", "samples_per_prompt": K, "words": WORDS,
              "seed": args.seed, "floor": floor, "flagged_share_by_label": flagged}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
