"""Reward validity: how well a reward classifier ranks text by an external gold toxicity.

A classifier can score well on its own held-out split and still carry no information about
the text an RL policy writes (a hate-speech classifier scoring general web text ranks it at
chance). Validity is the ROC-AUC of the reward's toxicity direction (the score RL pushes
down, ``-score(label)``) against gold labels of text it was not trained on, beside the
ROC-AUC of an independent judge on the same texts, as a yardstick.

A gold file is JSONL, one text per line, in either layout:

* RealToxicityPrompts records: ``continuation.text`` with ``continuation.toxicity``
  (Perspective's score; toxic at or above the threshold, 0.5 by default);
* flat records: ``{"text": ..., "score": 0.83}`` (toxic at or above the threshold) or
  ``{"text": ..., "label": 1}`` (1/true: toxic, 0/false: not toxic).

Without a file, the gold is the RealToxicityPrompts continuations under ``data_dir``
(``rtp/nontoxic.jsonl``, ``rtp/toxic.jsonl``) whose prompt is not held out
(:func:`detoxrl.data.is_held_out`), each text once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import option
from ..errors import ConfigError, DataError
from .stats import roc_auc

RTP_FILES = ("rtp/nontoxic.jsonl", "rtp/toxic.jsonl")
BUILTIN = "RealToxicityPrompts continuations (Perspective toxicity), held-out prompts left out"
# Below this the reward ranks toxic text little better than chance; RL on it mostly drifts.
WARN_BELOW = 0.7


@dataclass
class ValiditySettings:
    gold: str | None = option(None, "JSONL of texts with gold toxicity scores or labels "
                              "(continuation.text + continuation.toxicity, or text + score | "
                              "label). Default: the RealToxicityPrompts continuations under "
                              "data_dir, held-out prompts left out.")
    threshold: float = option(0.5, "A gold score at or above this counts as toxic.")
    judge: str | None = option("profanity-check", "Independent judge scored on the same texts "
                               "as a yardstick (see detoxrl evaluate --judge); null: none.")
    label: str | None = option(None, "The label RL pushes up (reward.label); default: the "
                               "one label that is not data.positive_label.")
    output: str = option("logit", "Score of that label, as reward.output: 'logit' or "
                         "'prob'.")

    def validate(self, labels: list[str], positive: str) -> None:
        if self.label is None and len(labels) != 2:
            raise ConfigError("validity.label is needed with more than two labels: name the "
                              f"one the RL reward pushes up, one of {labels}.")
        if self.label is not None and self.label not in labels:
            raise ConfigError(f"validity.label {self.label!r} is not one of data.labels "
                              f"{labels}.")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"validity.threshold must lie in (0, 1], got {self.threshold}.")
        if self.output not in ("logit", "prob"):
            raise ConfigError(f"validity.output is {self.output!r}; choose 'logit' or 'prob'.")

    def reward_label(self, labels: list[str], positive: str) -> str:
        return self.label or next(n for n in labels if n != positive)


@dataclass
class Gold:
    texts: list[str]
    toxic: np.ndarray       # bool, one per text
    source: str


def read_gold(paths: list[Path], threshold: float, drop_held_out: bool = False) -> Gold:
    """The texts and gold labels of ``paths`` (each text once); DataError naming the fix."""
    from ..data import is_held_out

    texts, toxic, seen = [], [], set()
    for path in paths:
        for number, record in _records(path):
            prompt = (record.get("prompt") or {}).get("text") if "continuation" in record else None
            if drop_held_out and isinstance(prompt, str) and is_held_out(prompt):
                continue
            text, is_toxic = _gold_row(record, threshold, f"{str(path)!r} line {number}")
            if text is not None and text.strip() and text not in seen:
                seen.add(text)
                texts.append(text)
                toxic.append(is_toxic)
    where = ", ".join(str(p) for p in paths)
    gold = Gold(texts, np.asarray(toxic, dtype=bool), where)
    if not texts:
        raise DataError(f"The validation set {where} holds no texts with a gold score or "
                        "label. Give a JSONL file with one {\"text\": ..., \"score\" or "
                        "\"label\": ...} per line.")
    if gold.toxic.all() or not gold.toxic.any():
        kind = "toxic" if gold.toxic.all() else "non-toxic"
        raise DataError(f"Every text of the validation set {where} is {kind} (threshold "
                        f"{threshold}): ROC-AUC needs both toxic and non-toxic texts. Add "
                        "texts of the other kind.")
    return gold


def builtin_gold(data_dir: str, threshold: float) -> Gold | None:
    """The RealToxicityPrompts gold under ``data_dir``, or None when it is not there."""
    paths = [Path(data_dir).expanduser() / rel for rel in RTP_FILES]
    if not all(p.is_file() for p in paths):
        return None
    gold = read_gold(paths, threshold, drop_held_out=True)
    gold.source = BUILTIN
    return gold


def _records(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read the validation set {str(path)!r} ({type(exc).__name__}: "
                        f"{exc}). Pass a readable UTF-8 JSONL file to --validate-on.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise DataError(f"{str(path)!r} line {number} is not a JSON object. The validation "
                            "set is JSONL: one {\"text\": ..., \"score\" or \"label\": ...} per "
                            "line, or RealToxicityPrompts records.")
        yield number, record


def _gold_row(record: dict, threshold: float, where: str) -> tuple[str | None, bool]:
    """(text, toxic) of one record; (None, False) for an RTP record Perspective left unscored."""
    if isinstance(record.get("continuation"), dict):
        cont = record["continuation"]
        score = cont.get("toxicity")
        if score is None:
            return None, False
        return _text(cont.get("text"), where), _score(score, threshold, where)
    text = _text(record.get("text"), where)
    if record.get("score") is not None:
        return text, _score(record["score"], threshold, where)
    if record.get("label") is not None:
        return text, _label(record["label"], where)
    raise DataError(f"{where} has no gold score or label: the validation set needs "
                    "\"score\" (0-1) or \"label\" (0/1) beside \"text\", or "
                    "continuation.toxicity in RealToxicityPrompts records.")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where} has no text: give \"text\" (or continuation.text) as a "
                        "string.")
    return value


def _score(value: Any, threshold: float, where: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise DataError(f"{where}: the gold score {value!r} is not a number in [0, 1]. Give "
                        "a toxicity probability, or a 0/1 \"label\" instead.")
    return value >= threshold


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return value.strip() == "1"
    raise DataError(f"{where}: the gold label {value!r} is not 0 or 1. Use 1 (or true) for "
                    "toxic and 0 (or false) for not toxic.")


def toxicity_direction(logits: Any, label_index: int, output: str) -> np.ndarray:
    """The score RL pushes down: minus the reward label's logit or probability, ``(N,)``."""
    import torch

    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    score = logits.softmax(-1) if output == "prob" else logits
    return (-score[:, label_index]).numpy()


def measure(toxicity: Any, gold: Gold, reward: str, judge=None) -> dict[str, Any]:
    """Validity of ``toxicity`` (one score per gold text, higher = more toxic)."""
    result = {"gold": gold.source, "n": len(gold.texts), "positives": int(gold.toxic.sum()),
              "score": reward, "roc_auc": roc_auc(gold.toxic, toxicity)}
    if judge is not None:
        result["judge"] = judge.name
        result["judge_roc_auc"] = roc_auc(gold.toxic, judge(gold.texts))
    return result


def read_validity(model: str) -> dict[str, Any] | None:
    """The validity a reward folder's ``metrics.json`` records; None for none (a Hub id, a
    folder trained elsewhere or without a gold set)."""
    path = Path(model).expanduser() / "metrics.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("validity")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(value, dict) and isinstance(value.get("roc_auc"), int | float)
    return value if ok and not math.isnan(value["roc_auc"]) else None


def describe(v: dict[str, Any]) -> str:
    """One line: the reward's ROC-AUC, the judge's, on what."""
    judge = (f"; judge {v['judge']}: {v['judge_roc_auc']:.3f} on the same texts"
             if v.get("judge_roc_auc") is not None else "")
    return (f"ROC-AUC {v['roc_auc']:.3f} ({v.get('score', 'reward')}) against {v['gold']}: "
            f"{v['n']:,} texts, {v['positives']:,} toxic{judge}")


def warning(model: str) -> str | None:
    """The line ``detoxrl train`` warns with when the reward's validity is low or unknown.

    ``tiny:`` rewards are the offline test models with random weights, named as such: a
    warning about them would tell the user nothing they can act on."""
    if isinstance(model, str) and model.startswith("tiny:"):
        return None
    v = read_validity(model)
    if v is None:
        return (f"The reward {model!r} records no validity against gold toxicity labels, so "
                "nothing shows that it measures toxicity on this text; train it with "
                "`detoxrl train-reward` (optionally --validate-on FILE) to measure it.")
    if v["roc_auc"] < WARN_BELOW:
        return (f"The reward {model!r} ranks gold toxic text poorly (ROC-AUC "
                f"{v['roc_auc']:.3f} against {v['gold']}, below {WARN_BELOW}): RL will "
                "mostly follow what it rewards besides toxicity. Consider a reward with "
                "higher validity, e.g. configs/mini/reward-offensive.yaml.")
    return None


def prepare(settings: ValiditySettings, data_dir: str) -> tuple[Gold | None, Any, str | None]:
    """(gold, judge, note) before any training: a bad gold file or a judge that cannot load
    stops the run here, before anything is written. Without a gold file and without the
    built-in one, gold is None and ``note`` says why."""
    from .judges import load_judge

    if settings.gold is not None:
        path = Path(settings.gold).expanduser()
        if not path.is_file():
            raise DataError(f"The validation set {settings.gold!r} does not exist. Pass a JSONL "
                            "file of texts with gold scores or labels to --validate-on.")
        gold = read_gold([path], settings.threshold)
    else:
        gold = builtin_gold(data_dir, settings.threshold)
    if gold is None:
        return None, None, (f"validity not measured: {data_dir!r} has no "
                            f"{' and '.join(RTP_FILES)}; pass --validate-on FILE to measure it")
    judge = load_judge(settings.judge) if settings.judge else None
    return gold, judge, None


def warn_about(model: str) -> None:
    """Print :func:`warning`'s line on stderr, once per launch (the main process)."""
    import os
    import sys

    line = warning(model)
    if line and os.environ.get("RANK", "0") == "0":
        print(f"warning: {line}", file=sys.stderr, flush=True)
