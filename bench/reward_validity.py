"""Reward validity of the mini reward presets: does the RL reward measure toxicity on RTP text?

Trains each preset with ``detoxrl train-reward`` on ONE torch thread, then reads the validity
it measured: the ROC-AUC of the reward's toxicity direction (minus the score RL pushes up)
against Perspective's toxicity (>= 0.5) on the RealToxicityPrompts continuations whose
prompt is not held out, beside the independent judge (alt-profanity-check) on the same texts.
A TF-IDF + logistic-regression model on each preset's own training split is a second
yardstick: what a linear model learns from the same labels.

Train time is reported as wall seconds and as process CPU seconds; with one thread the CPU
seconds are what an idle machine's wall clock would show (this machine may be shared).

    python bench/reward_validity.py --data-dir ../shared/data --score runs/demo/1-reward \
        --out bench/results/reward_validity

``--presets`` names other presets to train (default: reward-offensive); ``--score`` adds
reward folders trained earlier, scored without training (``runs/demo/1-reward`` is the
Dynabench preset's classifier, stage 1 of ``detoxrl demo``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("reward-offensive",)
TARGET_ROC_AUC = 0.80       # the offensive preset's acceptance bar
TARGET_TRAIN_S = 240        # ... trained in at most 4 minutes on one thread


def train_preset(name: str, data_dir: str, runs: Path) -> dict:
    """Train ``configs/mini/NAME.yaml`` on one thread; its validity and times."""
    import torch

    from detoxrl.config import load_config
    from detoxrl.supervised.reward_training import RewardTrainingConfig, train_reward

    torch.set_num_threads(1)
    path = ROOT / "configs" / "mini" / f"{name}.yaml"
    cfg = load_config(str(path), ["--data_dir", data_dir, "--output_dir", str(runs / name)],
                      cls=RewardTrainingConfig)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    metrics = train_reward(cfg, overwrite=True, quiet=True)
    return {"preset": name, "command": f"detoxrl train-reward --config "
            f"configs/mini/{name}.yaml", "validity": metrics["validity"],
            "held_out_roc_auc": metrics["eval"]["roc_auc"],
            "train_rows": metrics["train_rows"], "train_runtime_s": metrics["train_runtime_s"],
            "command_wall_s": time.perf_counter() - wall0,
            "command_cpu_s": time.process_time() - cpu0,
            "linear_roc_auc": linear_yardstick(cfg)}


def score_folder(folder: str, data_dir: str) -> dict:
    """Validity of a reward folder trained earlier (a demo's ``1-reward``), scored here."""
    import yaml

    from detoxrl.evaluation import judges, validity
    from detoxrl.models.reward import ClassifierReward

    cfg = yaml.safe_load((Path(folder) / "config.yaml").read_text())
    data, settings = cfg["data"], cfg.get("validity") or {}
    label = settings.get("label") or next(x for x in data["labels"]
                                          if x != data["positive_label"])
    output = settings.get("output", "logit")
    gold = validity.builtin_gold(data_dir, settings.get("threshold", 0.5))
    reward = ClassifierReward(folder, label=label, output=output)
    toxicity = -reward.label_scores(gold.texts, label, output).numpy()
    measured = validity.measure(toxicity, gold, f"-{output}({label})",
                                judges.load_judge(judges.PROFANITY_CHECK))
    return {"preset": f"{folder} (trained on {data['train']['path']})",
            "command": f"python bench/reward_validity.py --score {folder}",
            "validity": measured}


def linear_yardstick(cfg) -> float:
    """TF-IDF + logistic regression on the preset's training split, scored on the same gold."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from detoxrl.evaluation import validity
    from detoxrl.evaluation.stats import roc_auc
    from detoxrl.supervised.reward_training import _read_splits

    train, _ = _read_splits(cfg)
    positive = cfg.data.labels.index(cfg.data.positive_label)
    gold = validity.builtin_gold(cfg.data_dir, cfg.validity.threshold)
    vec = TfidfVectorizer(sublinear_tf=True)
    model = LogisticRegression(max_iter=2000).fit(
        vec.fit_transform(train.texts), [int(y == positive) for y in train.labels])
    return roc_auc(gold.toxic, model.predict_proba(vec.transform(gold.texts))[:, 1])


def markdown(rows: list[dict], machine: dict) -> str:
    lines = ["| preset | reward ROC-AUC | judge ROC-AUC | TF-IDF+LR ROC-AUC | held-out ROC-AUC "
             "| train rows | train s (wall) | command CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v = r["validity"]
        trained = (f"{r['linear_roc_auc']:.3f} | {r['held_out_roc_auc']:.3f} | "
                   f"{r['train_rows']:,} | {r['train_runtime_s']:.0f} | "
                   f"{r['command_cpu_s']:.0f}" if "train_rows" in r else "| | | |")
        lines.append(f"| `{r['preset']}` | **{v['roc_auc']:.3f}** | {v['judge_roc_auc']:.3f} | "
                     f"{trained} |")
    v = rows[0]["validity"]
    return ("# Reward validity of the mini presets\n\n"
            f"Gold: {v['gold']}; {v['n']:,} texts, {v['positives']:,} toxic (Perspective "
            "toxicity >= 0.5). Reward ROC-AUC: minus the score RL pushes up "
            f"(`{v['score']}` for the first row). Judge: {v['judge']} on the same texts. "
            "One torch thread; CPU s is the process time of the whole command (training, "
            f"scoring the gold and the held-out split). Load average {machine['load_before']}"
            f" before, {machine['load_after']} after.\n\n"
            f"`{' '.join(['python', *machine['argv']])}`\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--presets", nargs="*", default=list(PRESETS))
    p.add_argument("--score", nargs="*", default=[], metavar="FOLDER", help="Reward folders "
                   "trained earlier (e.g. a demo's runs/demo/1-reward), scored, not trained.")
    p.add_argument("--runs", default="runs/bench-reward-validity", help="Where the trained "
                   "classifiers go.")
    p.add_argument("--out", default="bench/results/reward_validity", help="Writes OUT.json "
                   "and OUT.md.")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from detoxrl import __version__
    from detoxrl.runs.io import atomic_write_json, atomic_write_text
    from detoxrl.runs.run_folder import versions

    machine = {"argv": sys.argv, "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2)}
    rows = [train_preset(name, args.data_dir, Path(args.runs)) for name in args.presets]
    rows += [score_folder(folder, args.data_dir) for folder in args.score]
    machine["load_after"] = round(os.getloadavg()[0], 2)
    result = {"rows": rows, "machine": machine, "targets": {
        "reward-offensive": {"roc_auc_at_least": TARGET_ROC_AUC,
                             "train_s_at_most": TARGET_TRAIN_S}},
        "detoxrl": __version__, "versions": versions()}
    atomic_write_json(Path(f"{args.out}.json"), result)
    atomic_write_text(Path(f"{args.out}.md"), markdown(rows, machine))
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
