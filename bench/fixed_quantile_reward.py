"""RL towards a best-of-n-like target with one fixed table of the reference's scores.

``ppo.best_of_n_target`` ranks each score among the reference's samples *of the same prompt*,
drawn afresh every step. This script tries the cheaper approximation: rank it once and for
all against the scores of the first rollout batch (the starting policy's samples on 64
training prompts), through a reward callable. The reward is ``(n - 1) * log F(score)`` with
that fixed F; with a fixed KL coefficient ``beta`` the optimum is the reference reweighted
by ``F(score) ** ((n - 1) / beta)``. Nothing else of the run changes:

    python bench/fixed_quantile_reward.py --base runs/lm-e3-demo --n 6 \\
        --output-dir runs/tries/e3-fixedq6 --model.name_or_path runs/lm-e3

``--base`` holds a built demo's ``0-data``, ``1-reward`` and ``2-policy``; further
``--key value`` options go to the run's config. Evaluate the run with ``detoxrl evaluate``.
"""

from __future__ import annotations

import argparse
import bisect

import torch

from detoxrl.config import load_config
from detoxrl.models.reward import ClassifierReward
from detoxrl.rl.detox_trainer import train


class FixedQuantileReward:
    """``(n - 1) * log F(score)``, F the smoothed share of the first call's scores at most as
    high; the first call (the run's first rollout, before any update) sets the table."""

    def __init__(self, classifier, n: float, dtype: torch.dtype = torch.float32):
        self.classifier, self.n, self.dtype, self.table = classifier, n, dtype, None

    def __call__(self, prompts, completions, **kwargs):
        scores = [float(s) for s in self.classifier(prompts, completions)]
        if self.table is None:
            self.table = sorted(scores)
        shares = [(bisect.bisect_right(self.table, s) + 0.5) / (len(self.table) + 1)
                  for s in scores]
        return ((self.n - 1) * torch.log(torch.tensor(shares, dtype=self.dtype))).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="A built demo: 0-data, 1-reward, 2-policy.")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--n", type=float, default=4.0, help="The n of (n - 1) * log F.")
    parser.add_argument("--beta", type=float, default=1.0, help="The fixed KL coefficient.")
    parser.add_argument("--config", default="configs/mini/detox-causal.yaml")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="Precision of log F. The two differ in the 8th digit, and RL "
                        "amplifies that: compare runs that differ in nothing else.")
    args, extra = parser.parse_known_args(argv)
    cfg = load_config(args.config, [
        "--model.name_or_path", f"{args.base}/2-policy", "--reward.model", f"{args.base}/1-reward",
        "--data.path", f"{args.base}/0-data/train.jsonl", "--eval_every", "0",
        "--output_dir", args.output_dir, "--ppo.kl_controller", "fixed",
        "--ppo.init_kl_coef", str(args.beta), *extra])
    classifier = ClassifierReward(cfg.reward.model, label=cfg.reward.label, output="logit",
                                  score_on=cfg.reward.score_on)
    train(cfg, reward_fn=FixedQuantileReward(classifier, args.n,
                                                   getattr(torch, args.dtype)), quiet=True)


if __name__ == "__main__":
    main()
