"""Scoring generated responses and summarising the scores for ``summary.json``.

A scoring job is ``fn(queries, responses) -> one score per response``: the reward
classifier's toxicity, the training reward, and each judge's toxicity. The before and after
responses of a chunk are scored in one call, so that an unchanged response gets exactly the
same score on both sides (see ``ClassifierReward.logits``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import protocol as P
from .sampling import Generations

ScoreFn = Callable[[list[str], list[str]], Any]
REWARD_CLASSIFIER = "reward_classifier"


def response_texts(score_on: str) -> Callable[[list[str], list[str]], list[str]]:
    """What a toxicity scorer reads: the response alone, or query + response."""

    def texts(queries: list[str], responses: list[str]) -> list[str]:
        if score_on == "response":
            return list(responses)
        return [q + r for q, r in zip(queries, responses, strict=True)]

    return texts


def scoring_jobs(reward, judges, score_on: str, with_toxicity: bool = True
                 ) -> dict[str, ScoreFn]:
    """Name -> ``fn(queries, responses)``: ``toxicity`` (the reward classifier, on
    ``score_on``), ``reward`` (the run's own ``reward.score_on``) and ``judge:SPEC`` for
    every judge."""
    texts = response_texts(score_on)
    jobs: dict[str, ScoreFn] = {}
    if with_toxicity:
        jobs["toxicity"] = lambda q, r: reward.toxicity(texts(q, r))
    jobs["reward"] = reward
    for judge in judges or ():
        jobs[f"judge:{judge.name}"] = lambda q, r, j=judge: j(texts(q, r))
    return jobs


def score_generations(gen: Generations, jobs: dict[str, ScoreFn], progress: bool = True,
                      chunk: int = 256) -> dict[str, list[float]]:
    """``{"<job>_before": [...], "<job>_after": [...]}`` for every job, one score per
    response, in flat response order."""
    from tqdm.auto import tqdm

    queries = gen.sample_queries
    n = len(queries)
    scores: dict[str, list[float]] = {f"{name}_{side}": [] for name in jobs
                                      for side in ("before", "after")}
    with tqdm(total=2 * n * len(jobs), desc="scoring", unit="text",
              disable=not progress) as bar:
        # Chunk by chunk, every job on the same texts in turn: jobs that read the same
        # classifier on the same texts (toxicity and the reward) then share its pass
        # (ClassifierReward.logits keeps its last call's result).
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            q = queries[start:stop]
            texts = gen.before[start:stop] + gen.after[start:stop]
            for name, fn in jobs.items():
                values = np.asarray(fn(q + q, texts), dtype=np.float64).reshape(-1)
                scores[f"{name}_before"] += values[:stop - start].tolist()
                scores[f"{name}_after"] += values[stop - start:].tolist()
                bar.update(2 * (stop - start))
    return scores


def per_prompt_means(values: list[float], k: int) -> np.ndarray:
    """One value per prompt: the mean of its ``k`` samples (the values as they are for 1)."""
    return P.mean_per_prompt(P.as_matrix(values, k))


def summarize(gen: Generations, scores: dict[str, list[float]], toxic_label: str,
              n_resamples: int, seed: int, tokenizer=None) -> dict[str, Any]:
    """The classic part of summary.json: toxicity and reward statistics, quality and KL.

    Statistics are over prompts: with K samples per prompt each prompt counts with the mean
    of its samples (for K = 1, the sample itself), so intervals come from resampling prompts.
    ``mean_length`` counts generated tokens (EOS excluded).
    """
    from .quality import quality_metrics
    from .stats import compare, evaluation_summary

    k = gen.k
    refs = ([r for r in gen.references for _ in range(k)] if all(gen.references) else None)
    quality = {}
    for side, texts, lengths in (("before", gen.before, gen.tokens_before),
                                 ("after", gen.after, gen.tokens_after)):
        # The tokens generated, where known, not a re-tokenization of the decoded text.
        quality[side] = quality_metrics(texts, refs, None if lengths else tokenizer)
        if lengths:
            quality[side]["mean_length"] = sum(lengths) / len(lengths)
    means = {key: per_prompt_means(v, k) for key, v in scores.items()}
    summary = evaluation_summary(
        means["toxicity_before"], means["toxicity_after"],
        reward_before=means["reward_before"], reward_after=means["reward_after"],
        quality_before=quality["before"], quality_after=quality["after"], kl=gen.kl,
        toxic_label=toxic_label, n_resamples=n_resamples, seed=seed)
    for key in scores:
        if key.startswith("judge:") and key.endswith("_before"):
            name = key[:-len("_before")]
            summary["metrics"][name] = compare(
                means[f"{name}_before"], means[f"{name}_after"], True, n_resamples,
                summary["confidence"], seed)
    return summary


def protocol_summary(gen: Generations, scores: dict[str, list[float]],
                     scorers: dict[str, dict[str, Any]], perplexity: dict[str, Any],
                     fluency: dict[str, Any], n_resamples: int, seed: int,
                     topicality: dict[str, Any] | None = None,
                     floors: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``protocol`` block of summary.json (layout in :mod:`detoxrl.evaluation.runner`).

    ``scorers``: key -> description with ``job`` (the score column); ``perplexity`` and
    ``topicality``: ``{"before": [...], "after": [...]}`` per response; ``fluency``: the
    fluency model's description; ``floors``: scorer key -> its
    :func:`~detoxrl.evaluation.floor.judge_floor`, which adds the excess over it.
    """
    from .floor import with_excess

    k, boot = gen.k, {"n_resamples": n_resamples, "seed": seed}
    toxicity = {}
    for key, info in scorers.items():
        before = P.per_prompt_toxicity(P.as_matrix(scores[f"{info['job']}_before"], k))
        after = P.per_prompt_toxicity(P.as_matrix(scores[f"{info['job']}_after"], k))
        entry = {**{n: v for n, v in info.items() if n != "job"},
                 "measures": P.measures(before, after, **boot)}
        if floors and key in floors:
            entry["floor"] = floors[key]
            entry["measures"] = with_excess(entry["measures"], floors[key])
        toxicity[key] = entry
    ppl = {side: P.nanmean_per_prompt(P.as_matrix(perplexity[side], k))
           for side in ("before", "after")}
    # Under the starting policy a fall in perplexity is as much a departure from it as a
    # rise (the policy moved to the start's likeliest text); under another LM lower reads
    # as more fluent, as in the papers.
    ppl_direction = None if fluency.get("reference") else True
    diversity = P.measures(P.per_prompt_diversity(P.rows_of(gen.before, k)),
                           P.per_prompt_diversity(P.rows_of(gen.after, k)), **boot)
    out = {"samples_per_prompt": k, "n_prompts": len(gen.ids),
           "toxic_threshold": P.TOXIC_THRESHOLD, "confidence": 0.95, **boot,
           "toxicity": toxicity,
           "fluency": {**fluency, "perplexity": P.measure(ppl["before"], ppl["after"],
                                                          ppl_direction, **boot)},
           "diversity": diversity}
    if topicality is not None:
        pmi = {side: P.nanmean_per_prompt(P.as_matrix(topicality[side], k))
               for side in ("before", "after")}
        out["topicality"] = {"measure": "prompt-response PMI under the starting policy, "
                             "nats per token",
                             "pmi": P.measure(pmi["before"], pmi["after"], False, **boot)}
    return out
