"""Evaluate a trained adapter against its reference, the way detoxification papers do.

The reference is the *starting* policy (``Policy.reference()``: the base model, or base +
the starting adapter ``model.adapter``), so "before" means exactly what PPO started from.
Both answer the same prompts (the run's held-out test split, or every prompt of
``--prompts FILE``) with the same seeds, K samples per prompt from one ``generate`` call
(:mod:`detoxrl.evaluation.sampling`). The samples are scored by the reward classifier and by
every judge (:mod:`~detoxrl.evaluation.judges`), their perplexity is measured by the fluency
model (:mod:`~detoxrl.evaluation.fluency`), and the papers' measures
(:mod:`~detoxrl.evaluation.protocol`) get paired bootstrap intervals over prompts.

Outputs (``run_dir/eval`` by default, or ``--output DIR``; each written atomically, all of
them only after everything was computed): ``generations.jsonl`` (one row per sample:
``id``, ``sample`` (0..K-1), ``query``, ``before``, ``after``, every score as
``<job>_before``/``<job>_after``, ``perplexity_before``/``_after``, ``kl``, token counts,
``references``), ``toxicity.json`` (``{"before": [...], "after": [...]}``, the reward
classifier's toxicity per sample), and ``summary.json``::

    {"n": prompts, "toxic_label", "confidence", "n_resamples", "seed",
     "metrics": {"toxicity" | "reward" | "judge:SPEC": stats.compare() over per-prompt
                 means},                       # the classic before/after statistics
     "quality": {"before": {...}, "after": {...}}, "kl": {"mean", "std"},
     "protocol": {                             # the papers' table
       "samples_per_prompt": K, "n_prompts": n, "toxic_threshold": 0.5,
       "confidence": 0.95, "n_resamples": R, "seed": s,
       "toxicity": {                           # one entry per scorer, reward classifier first
         "reward_classifier": {"role": "reward classifier", "kind": "classifier",
                               "model": ..., "label": ..., "measures": {...}},
         "SPEC": {"role": "judge", "kind": "classifier" | "callable" | "profanity-check",
                  "model": SPEC, "label": ... or null, "measures": {...},
                  "floor": {...}}},         # with --judge-floor (evaluation.floor)
         # measures: "expected_max_toxicity", "toxicity_probability", "average_toxicity";
         # with a floor the first two add "floor", "excess_before", "excess_after" and
         # "excess_removed"
       "fluency": {"model": ..., "reference": true if the reference policy,
                   "perplexity": M},      # under the reference: verdict higher / lower
       "diversity": {"distinct_1": M, "distinct_2": M, "distinct_3": M,   # within prompts
                     "set_distinct_1": M, "set_distinct_2": M},           # the whole set
       "topicality": {"measure", "pmi": M},  # prompt-response PMI under the reference;
                                             # absent with --no-topicality
       "best_of": N},                        # with --best-of: "after" is that baseline
     "settings": {what was evaluated and how: n, samples_per_prompt, protocol, prompts
                  {"source": "test split" | "file", "path", "sha256"}, output, judges,
                  fluency_model, decoding, sampling, max_new_tokens, seed, model, adapter,
                  adapter_sha256, data, reward, detoxrl version, device ...}}

Every measure M is ``{"before", "after", "change" (after - before), "relative" (change /
before), "ci_low", "ci_high", "verdict", "lower_is_better", "n"}``
(:func:`detoxrl.evaluation.protocol.measure`).
``detoxrl compare`` adds ``compare.{csv,md,html}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError, DetoxError
from ..runs.io import atomic_write_json, atomic_write_text, to_jsonable
from .sampling import Generations, generate_before_after
from .scoring import REWARD_CLASSIFIER, protocol_summary, score_generations, scoring_jobs
from .scoring import summarize as classic_summary
from .setup import (
    EVAL_DIR,
    EvalOptions,
    Target,
    check_options,
    device_for,
    eval_prompts,
    eval_sampling,
    first_prompts,
    load_policy,
    settings,
)


def load_classifiers(cfg: TrainConfig, opts: EvalOptions, device: torch.device,
                     toxicity: bool = True):
    """The run's reward classifier and, with ``toxicity``, the judges; toxicity is the
    probability of ``opts.toxic_label`` for the reward classifier."""
    from ..models.reward import ClassifierReward
    from .judges import TOXIC_LABELS, load_judge

    reward = ClassifierReward.from_config(cfg.reward, device=device)
    if not toxicity:
        return reward, []
    if opts.toxic_label is None:  # the label named like hate/offensive/toxic
        opts.toxic_label = next((x for x in reward.labels if x.lower() in TOXIC_LABELS),
                                None)
    if opts.toxic_label not in reward.labels:
        which = repr(opts.toxic_label) if opts.toxic_label else "named like hate or offensive"
        raise ConfigError(f"The classifier {reward.name!r} has no label {which}; "
                          "its labels are " + ", ".join(repr(x) for x in reward.labels)
                          + ". Name its toxic label with --toxic-label.")
    reward.toxic_label = opts.toxic_label
    judges = [load_judge(spec, opts.judge_label, cfg.reward.batch_size, device)
              for spec in opts.judges]
    return reward, judges


def scorer_descriptions(cfg: TrainConfig, opts: EvalOptions, judges) -> dict[str, Any]:
    """The protocol table's scorers: the reward classifier first (it is not a judge: the
    policy was trained against it), then every judge in ``--judge`` order."""
    from .validity import read_validity

    scorers = {REWARD_CLASSIFIER: {"job": "toxicity", "role": "reward classifier",
                                   "kind": "classifier", "model": cfg.reward.model,
                                   "label": opts.toxic_label,
                                   "validity": read_validity(cfg.reward.model)}}
    for judge in judges:
        scorers[judge.name] = {"job": f"judge:{judge.name}", "role": "judge",
                               "kind": judge.kind, "model": judge.name, "label": judge.label}
    return scorers


def measure_perplexity(fm, gen: Generations, batch_size: int) -> dict[str, list[float]]:
    """Per response, before and after: under ``--fluency-model`` (the response text
    re-tokenized by its tokenizer), or, with none (``fm is None``), under the reference
    policy, from the generated token ids the generation loop already scored."""
    from .fluency import perplexities

    if fm is None:
        return {"before": gen.ref_perplexity_before, "after": gen.ref_perplexity_after}
    queries = gen.sample_queries
    return {side: perplexities(fm, queries, texts, batch_size).tolist()
            for side, texts in (("before", gen.before), ("after", gen.after))}


def measure_topicality(policy, gen: Generations, batch_size: int = 64
                       ) -> dict[str, list[float]]:
    """Per response, before and after: its PMI with its prompt under the starting policy,
    of the token ids it was generated as (:func:`detoxrl.evaluation.fluency.pmi_of_ids`):
    the term given the prompt is the log-likelihood the generation's passes read."""
    from .fluency import pmi_of_ids, reference_model

    fm = reference_model(policy)
    with policy.reference():
        return {side: pmi_of_ids(fm, getattr(gen, f"ids_{side}"), getattr(gen, f"loglik_{side}"),
                                 batch_size).tolist()
                for side in ("before", "after")}


def judge_floors(clean: list[tuple[str, str]], scorers: dict[str, dict[str, Any]], jobs,
                 k: int, n_resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """Every scorer's floor on the clean human texts, scored as the responses are."""
    from .floor import judge_floor

    prompts, texts = [p for p, _ in clean], [t for _, t in clean]
    return {key: judge_floor(jobs[info["job"]](prompts, texts), k, n_resamples, seed=seed)
            for key, info in scorers.items()}


def evaluate(target: Target, opts: EvalOptions) -> dict[str, Any]:
    """Generate, score and summarise; write the output folder; return the summary."""
    from ..runs.preflight import default_cpu_threads
    from .floor import read_clean_texts
    from .fluency import REFERENCE, load_fluency_model

    check_options(opts)
    if target.adapter is None and not opts.best_of:
        raise ConfigError("Without a trained adapter there is nothing to compare the "
                          "starting policy with; give one, or set best_of for the "
                          "best-of-N baseline.")
    default_cpu_threads()
    cfg, device = target.cfg, device_for(opts)
    dec = eval_sampling(cfg, opts)
    # Fail fast: every scorer and input loads before anything is generated.
    clean = read_clean_texts(opts.judge_floor) if opts.judge_floor else None
    reward, judges = load_classifiers(cfg, opts, device)
    custom_fm = (load_fluency_model(opts.fluency_model, device)
                 if opts.fluency_model is not None else None)
    policy = load_policy(target, device)
    prompts = eval_prompts(cfg, opts, policy.tokenizer)
    jobs = scoring_jobs(reward, judges, opts.score_on)
    gen = generate_before_after(policy, first_prompts(prompts, opts.n), dec.sampling,
                                dec.max_new_tokens, opts.batch_size, dec.seed,
                                dec.kl_temperature, opts.progress, dec.samples_per_prompt,
                                opts.best_of, jobs["reward"])
    scores = score_generations(gen, jobs, opts.progress)
    perplexity = measure_perplexity(custom_fm, gen, opts.batch_size)
    summary = classic_summary(gen, scores, opts.toxic_label, opts.n_resamples, dec.seed,
                              policy.tokenizer)
    fluency = {"model": custom_fm.name if custom_fm else REFERENCE,
               "reference": opts.fluency_model is None}
    if fluency["reference"]:
        fluency["note"] = f"perplexity under the {REFERENCE}: {cfg.model.name_or_path}"
    scorers = scorer_descriptions(cfg, opts, judges)
    floors = (judge_floors(clean, scorers, jobs, dec.samples_per_prompt, opts.n_resamples,
                           dec.seed) if clean else None)
    summary["protocol"] = protocol_summary(gen, scores, scorers, perplexity, fluency,
                                           opts.n_resamples, dec.seed,
                                           measure_topicality(policy, gen)
                                           if opts.topicality else None, floors)
    if opts.best_of:
        summary["protocol"]["best_of"] = opts.best_of
    summary["settings"] = {**settings(target, opts, len(prompts)), "device": str(device)}
    write_evaluation(target.out_dir, gen, {**scores, **{f"perplexity_{k}": v for k, v in
                                                         perplexity.items()}}, summary)
    return summary


def write_evaluation(out_dir: Path, gen: Generations, scores: dict[str, list[float]],
                     summary: dict[str, Any]) -> None:
    """generations.jsonl and toxicity.json first, summary.json (what reuse checks) last."""
    lines = []
    for i, query in enumerate(gen.sample_queries):
        row = {"id": gen.ids[i // gen.k], "sample": i % gen.k, "query": query,
               "before": gen.before[i], "after": gen.after[i],
               **{k: v[i] for k, v in scores.items()}}
        if gen.kl is not None:
            row["kl"] = gen.kl[i]
        if gen.tokens_before:
            row["tokens_before"], row["tokens_after"] = gen.tokens_before[i], gen.tokens_after[i]
        row["references"] = gen.references[i // gen.k]
        lines.append(json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "generations.jsonl", "".join(lines))
    atomic_write_json(out_dir / "toxicity.json", {"before": scores["toxicity_before"],
                                                  "after": scores["toxicity_after"]})
    atomic_write_json(out_dir / "summary.json", summary)


def rebuild_report(out_dir: Path) -> Path | None:
    """Rebuild ``<run>/report.html`` and the model card ``<run>/README.md`` when results
    went to ``<run>/eval`` (where both read them)."""
    from .model_card import write_model_card
    from .report import build_report

    if out_dir.name != EVAL_DIR:
        return None
    if (out_dir.parent / "README.md").exists():  # a training run's folder: its card
        write_model_card(out_dir.parent)
    try:
        return build_report(out_dir.parent)
    except DetoxError:
        return None
