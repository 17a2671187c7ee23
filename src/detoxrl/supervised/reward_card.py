"""The README.md of a ``detoxrl train-reward`` folder: what the classifier was trained on,
how it scores on its own held-out split and, above all, its validity as a reward."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..evaluation.validity import describe
from ..runs.io import atomic_write_text


def write_reward_card(folder: Path, name: str, cfg: dict, metrics: dict,
                      note: str | None) -> Path:
    """``folder/README.md``; ``name`` is the folder's final name (it may be built elsewhere)."""
    return atomic_write_text(folder / "README.md", reward_card(name, cfg, metrics, note))


def reward_card(name: str, cfg: dict, metrics: dict, note: str | None) -> str:
    data, e = cfg.get("data", {}), metrics.get("eval", {})
    labels = data.get("labels", [])
    v = metrics.get("validity")
    validity = (f"{describe(v)}.\n\nThe score is the one RL pushes down (minus the reward "
                "label's score); the judge is an independent classifier, a yardstick for "
                "what a good reward reaches on the same texts.\n" if v else f"Not measured: "
                f"{note}.\n")
    settings = cfg.get("validity", {})
    label = settings.get("label") or next(
        (x for x in labels if x != data.get("positive_label")), "LABEL")
    return "\n".join([
        "---\nlibrary_name: transformers\npipeline_tag: text-classification\ntags: [detoxrl, "
        "reward-model, toxicity]\n---\n",
        f"# {name}\n\nA text classifier trained by `detoxrl train-reward`, "
        f"to serve as the reward of RL detoxification. Labels, in class-id order: "
        f"{', '.join(f'`{x}`' for x in labels)}.\n",
        "## Validity as a reward\n\n" + validity,
        "## Held-out split\n\n"
        f"Accuracy {e.get('accuracy', float('nan')):.4f}, macro-F1 "
        f"{e.get('macro_f1', float('nan')):.4f}, ROC-AUC of `{data.get('positive_label')}` "
        f"{e.get('roc_auc', float('nan')):.4f} on {metrics.get('eval_rows', 0):,} rows of "
        f"`{data.get('eval', {}).get('path') or data.get('train', {}).get('path')}`; trained "
        f"on {metrics.get('train_rows', 0):,} rows in {metrics.get('train_runtime_s', 0):.0f} "
        "s.\n",
        f"## Use\n\n```yaml\nreward:\n  model: {name}   # this folder\n"
        f"  label: {label}\n  output: {settings.get('output', 'logit')}\n```\n",
        "## Full config\n\n```yaml\n" + yaml.safe_dump(cfg, sort_keys=False) + "```\n"])
