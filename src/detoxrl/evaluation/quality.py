"""Quality of generated text: ROUGE against references, diversity and length.

Detoxification can "win" by saying less, or the same bland thing every time; these numbers
show whether the tuned model still summarises (ROUGE), still varies (distinct-n) and still
says as much (length).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str],
          references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures of ``predictions`` against their ``references``.

    Uses the ``rouge_score`` library with ``use_stemmer=True`` (as ``evaluate``'s "rouge").
    ``references[i]`` is a list of references for ``predictions[i]`` (a bare string counts as
    one). With several references the best F-measure over them is kept, per prediction and
    per ROUGE type (``RougeScorer.score_multi``, as ``evaluate`` does), then averaged over
    predictions. Empty input gives NaN.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} "
                         "reference lists.")
    if not predictions:
        return {name: float("nan") for name in ROUGE_TYPES}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("Every prediction needs at least one reference.")
        scores = scorer.score_multi(refs, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over the whole set of ``texts`` (whitespace tokens).

    Corpus-level distinct-n (Li et al., 2016): 1.0 when no n-gram repeats anywhere, near 0
    when the model says the same thing every time. 0.0 when there are no n-grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    from .protocol import ngrams

    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(text, n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def mean_length(texts: Sequence[str], tokenizer=None) -> float:
    """Mean length of ``texts``: in tokens (no special tokens) if a tokenizer is given,
    else in whitespace-separated words. NaN for no texts."""
    if not texts:
        return float("nan")
    if tokenizer is not None:
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        lengths = [len(x) for x in ids]
    else:
        lengths = [len(text.split()) for text in texts]
    return float(np.mean(lengths))


def quality_metrics(texts: Sequence[str], references: Sequence[Sequence[str] | str] | None = None,
                    tokenizer=None) -> dict[str, float]:
    """The ``quality`` block of ``summary.json`` for one model's responses.

    ``rouge1``/``rouge2``/``rougeL`` (only when ``references`` are given), ``distinct_1``,
    ``distinct_2`` and ``mean_length`` (tokens with a tokenizer, else words).
    """
    metrics: dict[str, float] = {}
    if references is not None:
        metrics.update(rouge(texts, references))
    metrics["distinct_1"] = distinct_n(texts, 1)
    metrics["distinct_2"] = distinct_n(texts, 2)
    metrics["mean_length"] = mean_length(texts, tokenizer)
    return metrics
