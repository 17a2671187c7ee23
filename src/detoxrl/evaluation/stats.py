"""Statistics for before/after comparisons: summaries, percent change, paired bootstrap;
and ROC-AUC, for how well a score ranks texts against gold labels.

Pure numpy; inputs may be lists, numpy arrays or torch tensors. Differences are always
``after - before``, so for toxicity a negative difference means the tuned model is less toxic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Statistic = Callable[..., Any]

IMPROVED, WORSE, NO_CHANGE = "improved", "worse", "no significant change"
# The verdicts of a measure that has no better direction (a distance from the start).
HIGHER, LOWER = "higher", "lower"
_CHUNK_ELEMENTS = 4_000_000  # resampled values held at once: ~32 MB of int64 indices


def as_array(x: Any) -> np.ndarray:
    """A 1-D float64 numpy array from a list, array or (CPU/GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def summarize(x: Any) -> dict[str, float]:
    """mean, std, median, share_above_0_5, max and n of ``x``.

    ``std`` is the population standard deviation (numpy's default ``ddof=0``), as the
    tutorial's ``np.std``; ``share_above_0_5`` is the fraction of values strictly above 0.5
    (for toxicity probabilities: the share the classifier calls toxic). Empty input gives
    NaN statistics and ``n = 0``.
    """
    a = as_array(x)
    if a.size == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "median": nan, "share_above_0_5": nan, "max": nan,
                "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "share_above_0_5": float((a > 0.5).mean()), "max": float(a.max()), "n": int(a.size)}


def roc_auc(is_positive, scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count
    half. NaN with only one class.

    The Mann-Whitney U statistic over average ranks (Hanley & McNeil 1982, "The meaning and
    use of the area under a ROC curve"), O(n log n) instead of the pairwise O(n_pos n_neg).
    """
    is_positive = np.asarray(is_positive, dtype=bool).reshape(-1)
    scores = as_array(scores)
    if len(scores) != len(is_positive):
        raise ValueError(f"roc_auc got {len(is_positive)} labels but {len(scores)} scores.")
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]          # 1-based average ranks
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def percent_improvement(before: Any, after: Any) -> dict[str, float]:
    """The tutorial's ``(before - after) / before * 100``, for the mean and for the std.

    Meant for toxicity (lower is better): a positive percentage means the tuned model is
    less toxic on average (``mean``) or less variable (``std``). NaN where the ``before``
    statistic is 0, where the ratio is undefined.
    """
    b, a = as_array(before), as_array(after)
    return {"mean": _percent(b.mean(), a.mean()), "std": _percent(b.std(), a.std())}


def _percent(before: float, after: float) -> float:
    return float((before - after) / before * 100) if before != 0 else float("nan")


def paired_bootstrap(before: Any, after: Any, n_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0,
                     statistic: Statistic = np.mean) -> dict[str, Any]:
    """Percentile bootstrap interval of ``statistic(after) - statistic(before)``, paired.

    Each resample draws the same prompt indices for both arrays, so the interval reflects
    the per-prompt pairing (the same prompts were answered before and after tuning).
    ``statistic`` must accept ``axis=`` (``np.mean``, ``np.std``, ``np.median``...).

    Returns ``statistic`` (its name), ``observed`` (the difference on the data),
    ``before`` and ``after`` (the statistic on each), ``ci_low``, ``ci_high``,
    ``confidence``, ``se`` (bootstrap standard error), ``n`` and ``n_resamples``.
    """
    b, a = as_array(before), as_array(after)
    if b.shape != a.shape:
        raise ValueError(f"Paired samples need equal lengths, got {b.size} and {a.size}.")
    if b.size == 0:
        raise ValueError("Cannot bootstrap empty samples.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    diffs = _resampled_differences(b, a, n_resamples, seed, statistic)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    stat_b, stat_a = float(statistic(b)), float(statistic(a))
    return {"statistic": getattr(statistic, "__name__", str(statistic)),
            "observed": stat_a - stat_b, "before": stat_b, "after": stat_a,
            "ci_low": float(low), "ci_high": float(high), "confidence": confidence,
            "se": float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0,
            "n": int(b.size), "n_resamples": int(n_resamples)}


def _resampled_differences(b: np.ndarray, a: np.ndarray, n_resamples: int, seed: int,
                           statistic: Statistic) -> np.ndarray:
    """``statistic(a[idx]) - statistic(b[idx])`` for each of ``n_resamples`` index draws."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}.")
    rng = np.random.default_rng(seed)
    n = b.size
    chunk = max(1, _CHUNK_ELEMENTS // n)  # bounds memory for large evaluation sets
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = statistic(a[idx], axis=1) - statistic(b[idx], axis=1)
    return out


def verdict(ci_low: float, ci_high: float, lower_is_better: bool | None = True) -> str:
    """Read an interval of ``after - before``: improved, worse, or no significant change.

    With ``lower_is_better`` (toxicity) an interval wholly below 0 is "improved" and one
    wholly above 0 is "worse"; an interval touching or spanning 0 (or NaN) is neither.
    ``lower_is_better=None`` is a measure where any change is a departure (the perplexity
    under the starting policy): its verdict says only "higher" or "lower".
    """
    if lower_is_better is None:
        return LOWER if ci_high < 0 else HIGHER if ci_low > 0 else NO_CHANGE
    if ci_high < 0:
        return IMPROVED if lower_is_better else WORSE
    if ci_low > 0:
        return WORSE if lower_is_better else IMPROVED
    return NO_CHANGE


def compare(before: Any, after: Any, lower_is_better: bool = True, n_resamples: int = 10_000,
            confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Everything the report shows for one metric measured before and after tuning.

    Returns ``{"lower_is_better", "before": summarize(before), "after": summarize(after),
    "percent_improvement": {"mean", "std"}, "bootstrap": {"mean": ..., "std": ...}}`` where
    each bootstrap entry is :func:`paired_bootstrap` plus its ``verdict``.
    ``percent_improvement`` follows :func:`percent_improvement`, whose sign assumes lower
    is better.
    """
    result: dict[str, Any] = {
        "lower_is_better": lower_is_better, "before": summarize(before),
        "after": summarize(after), "percent_improvement": percent_improvement(before, after),
        "bootstrap": {},
    }
    for name, statistic in (("mean", np.mean), ("std", np.std)):
        boot = paired_bootstrap(before, after, n_resamples, confidence, seed, statistic)
        boot["verdict"] = verdict(boot["ci_low"], boot["ci_high"], lower_is_better)
        result["bootstrap"][name] = boot
    return result


def evaluation_summary(toxicity_before: Any, toxicity_after: Any, *,
                       reward_before: Any = None, reward_after: Any = None,
                       quality_before: dict | None = None, quality_after: dict | None = None,
                       kl: Any = None, toxic_label: str = "hate", n_resamples: int = 10_000,
                       confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The ``eval/summary.json`` document that ``detoxrl report`` renders.

    Toxicity is compared with ``lower_is_better=True``, the reward (when given) with
    ``lower_is_better=False``; ``kl`` holds per-response KL(tuned || reference) values,
    summarised. See :func:`detoxrl.evaluation.report.build_report` for the schema.
    """
    kw = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    metrics = {"toxicity": compare(toxicity_before, toxicity_after, True, **kw)}
    if reward_before is not None and reward_after is not None:
        metrics["reward"] = compare(reward_before, reward_after, False, **kw)
    summary: dict[str, Any] = {
        "n": int(as_array(toxicity_before).size), "toxic_label": toxic_label, **kw,
        "metrics": metrics,
    }
    if quality_before is not None or quality_after is not None:
        summary["quality"] = {"before": quality_before or {}, "after": quality_after or {}}
    if kl is not None:
        kl_stats = summarize(kl)
        summary["kl"] = {"mean": kl_stats["mean"], "std": kl_stats["std"]}
    return summary
