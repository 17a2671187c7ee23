"""Evaluate a trained adapter against its reference on held-out prompts.

The reference is the *starting* policy (``Policy.reference()``: the base model, or base +
the starting adapter ``model.adapter``), so "before" means exactly what PPO started from.
Both models answer the same test prompts in the same batches with the same seeds
(``torch.manual_seed(seed + batch_index)`` before each batch's ``generate``), so a
difference comes from the weights, not the dice. :func:`generate_before_after` is the one
generation loop; ``detoxrl evaluate`` and ``detoxrl compare`` both call it.

Outputs (``run_dir/eval`` by default, each written atomically): ``generations.jsonl``
(one row per prompt), ``toxicity.json`` (``{"before": [...], "after": [...]}``),
``summary.json`` (:func:`detoxrl.evaluation.stats.evaluation_summary` plus a ``settings``
block that records what was evaluated and how); ``detoxrl compare`` adds
``compare.{csv,md,html}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import SamplingConfig, TrainConfig, load_config, to_dict
from ..errors import ConfigError, DataError, DetoxError, ModelLoadError
from ..io import atomic_write_json, atomic_write_text, to_jsonable

EVAL_DIR = "eval"
DEFAULT_MAX_NEW_TOKENS = 100  # the tutorial evaluated toxicity on 100-token responses
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Settings that decide the generations and rewards; compare reuses evaluate's rows only when
# all of them match.
GENERATION_KEYS = ("model", "adapter_sha256", "data", "data_seed", "seed", "batch_size",
                   "sampling", "max_new_tokens", "reward")


@dataclass
class EvalOptions:
    """How to evaluate; ``None`` fields take their value from the run config."""

    n: int | None = 500              # test prompts; None: the whole test split
    seed: int | None = None          # default: the run's seed
    greedy: bool = False
    max_new_tokens: int | None = None  # default: min(max_new_tokens_draw, 100)
    batch_size: int = 16
    score_on: str = "response"
    toxic_label: str = "hate"
    judge: str | None = None
    judge_label: str = "hate"
    n_resamples: int = 10_000
    device: str | None = None
    progress: bool = True


@dataclass
class Target:
    """What is evaluated: the run config, the trained adapter, and where results go."""

    cfg: TrainConfig
    adapter: Path
    out_dir: Path


@dataclass
class Generations:
    """Before/after responses for a list of prompts, in prompt order."""

    ids: list[str]
    queries: list[str]
    references: list[list[str]]
    before: list[str]
    after: list[str]
    kl: list[float] | None = None    # per response: sum_t logp_after - logp_ref
    tokens_before: list[int] = dataclasses.field(default_factory=list)  # generated, no EOS
    tokens_after: list[int] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- set-up

def resolve_target(run_dir: str | None, config: str | None, adapter: str | None,
                   overrides: Sequence[str] = (), output: str | None = None) -> Target:
    """The config and adapter of ``RUN_DIR``, or of ``--config`` + ``--adapter``."""
    if run_dir is None and (config is None or adapter is None):
        raise ConfigError("Give a run folder (detoxrl evaluate runs/detoxrl), or --config "
                          "YAML together with --adapter FOLDER for an adapter trained elsewhere.")
    if run_dir is not None and config is not None:
        raise ConfigError("Give either RUN_DIR (its config.yaml is used) or --config, not both; "
                          "change single options with dotted overrides, e.g. --reward.model X.")
    if run_dir is not None:
        root = Path(run_dir)
        if not (root / "config.yaml").is_file():
            raise ConfigError(f"{str(root)!r} is not a training run folder: it has no "
                              "config.yaml. Pass the output_dir of 'detoxrl train'.")
        config = str(root / "config.yaml")
    adapter_dir = Path(adapter) if adapter is not None else Path(run_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(
            f"No trained adapter in {str(adapter_dir)!r} (no {ADAPTER_WEIGHTS}). A run "
            "folder holds one once training has finished; for a checkpoint pass "
            "--adapter RUN_DIR/checkpoints/step-N/adapter.")
    cfg = load_config(config, list(overrides))
    # An explicit --adapter (a checkpoint, say) keeps its results apart from the run's own.
    out = Path(output) if output else (adapter_dir if adapter else Path(run_dir)) / EVAL_DIR
    return Target(cfg, adapter_dir, out)


def check_options(opts: EvalOptions) -> None:
    from ..reward import SCORE_ON

    for name in ("n", "batch_size", "max_new_tokens", "n_resamples"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if opts.score_on not in SCORE_ON:
        raise ConfigError(f"--score-on is {opts.score_on!r}; choose one of {', '.join(SCORE_ON)}.")


def eval_sampling(cfg: TrainConfig, opts: EvalOptions) -> tuple[SamplingConfig, int, int, float]:
    """(sampling config, max new tokens, seed, temperature of the KL log-probs)."""
    sampling = dataclasses.replace(cfg.generation)
    if opts.greedy:  # no sampling filters either, so transformers has nothing to warn about
        sampling = dataclasses.replace(sampling, do_sample=False, top_k=None, top_p=1.0,
                                       temperature=1.0)
    if sampling.do_sample and sampling.temperature <= 0:
        raise ConfigError(f"generation.temperature must be > 0, got {sampling.temperature}.")
    max_new = opts.max_new_tokens or min(cfg.generation.max_new_tokens_draw,
                                         DEFAULT_MAX_NEW_TOKENS)
    seed = cfg.seed if opts.seed is None else opts.seed
    # Greedy decoding has no temperature; its log-probs are those of the untempered model.
    return sampling, max_new, seed, sampling.temperature if sampling.do_sample else 1.0


def settings(target: Target, opts: EvalOptions, n_test: int) -> dict[str, Any]:
    """Everything that decides the results, recorded in summary.json (and used for reuse)."""
    cfg = target.cfg
    sampling, max_new, seed, kl_t = eval_sampling(cfg, opts)
    n = n_test if opts.n is None else min(opts.n, n_test)
    sampling_keys = ("do_sample", "temperature", "top_k", "top_p", "min_length", "num_beams")
    return {
        "n": n, "test_prompts": n_test, "seed": seed, "batch_size": opts.batch_size,
        "decoding": "sampling" if sampling.do_sample else "greedy",
        "max_new_tokens": max_new,
        "sampling": {k: getattr(sampling, k) for k in sampling_keys},
        "kl_temperature": kl_t, "score_on": opts.score_on, "toxic_label": opts.toxic_label,
        "judge": opts.judge, "judge_label": opts.judge_label if opts.judge else None,
        "model": to_dict(cfg.model), "adapter": str(target.adapter.resolve()),
        "adapter_sha256": file_sha256(target.adapter / ADAPTER_WEIGHTS),
        "data": to_dict(cfg.data), "data_seed": cfg.seed, "reward": to_dict(cfg.reward),
        "detoxrl": __version__,
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def device_for(opts: EvalOptions) -> torch.device:
    return torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_policy(target: Target, device: torch.device):
    """Base + trained adapter (frozen); ``policy.reference()`` gives the starting policy."""
    from ..policy import Policy

    cfg = target.cfg
    # Evaluation needs no value head, whichever algorithm trained the adapter.
    return Policy.from_pretrained(cfg.model, cfg.lora, trained_adapter=str(target.adapter),
                                  trainable=False, device=device, value_head=False)


def held_out_prompts(cfg: TrainConfig, tokenizer):
    """The run's test split: the prompts training never saw."""
    from ..data import build_prompts

    # The run's own seed gives the same split as training, whatever --seed says.
    test = build_prompts(cfg.data, tokenizer, seed=cfg.seed).test
    if len(test) == 0:
        raise DataError("The test split is empty (data.test_fraction is 0): the run trained "
                        "on every prompt, so none is held out. Evaluate on other data with "
                        "--data.path FILE --data.test_fraction 0.2 (its test split is used).")
    return test


def first_prompts(test, n: int | None):
    """The first ``n`` prompts of ``test`` (all of them for ``None``)."""
    return test.select(range(len(test) if n is None else min(n, len(test))))


def load_classifiers(cfg: TrainConfig, opts: EvalOptions, device: torch.device,
                     toxicity: bool = True):
    """The run's reward classifier and, with ``toxicity``, the judge (if any); toxicity is
    the probability of ``opts.toxic_label`` / ``opts.judge_label``."""
    from ..reward import ClassifierReward

    reward = ClassifierReward.from_config(cfg.reward, device=device)
    if not toxicity:
        return reward, None
    _check_label(reward, opts.toxic_label, "--toxic-label")
    reward.toxic_label = opts.toxic_label
    if not opts.judge:
        return reward, None
    try:
        judge = ClassifierReward(opts.judge, label=opts.judge_label, output="prob",
                                 batch_size=cfg.reward.batch_size, device=device,
                                 toxic_label=opts.judge_label)
    except ConfigError as exc:
        raise ConfigError(f"Judge: {exc} (for the judge, choose its toxic label with "
                          "--judge-label).") from None
    return reward, judge


def _check_label(clf, label: str, option: str) -> None:
    if label not in clf.labels:
        raise ConfigError(f"The classifier {clf.name!r} has no label {label!r}; its labels are "
                          + ", ".join(repr(x) for x in clf.labels)
                          + f". Name its toxic label with {option}.")


# --------------------------------------------------------------------------- generation

@torch.no_grad()
def generate_before_after(policy, rows, sampling: SamplingConfig, max_new_tokens: int,
                          batch_size: int, seed: int, kl_temperature: float | None = None,
                          progress: bool = True) -> Generations:
    """Responses of the reference (before) and the trained policy (after) to ``rows``.

    ``rows``: a prompt dataset (``id``, ``query``, ``input_ids``, ``references``). Batch ``b``
    is generated twice, each time right after ``torch.manual_seed(seed + b)``. With
    ``kl_temperature``, also the per-response KL(trained || reference) on the after responses.
    """
    from tqdm.auto import tqdm

    from ..data import collate_queries

    device = next(policy.parameters()).device
    out = Generations(list(rows["id"]), list(rows["query"]), list(rows["references"]), [], [],
                      [] if kl_temperature is not None else None)
    starts = range(0, len(rows), batch_size)
    for b, start in enumerate(tqdm(starts, desc="generating", unit="batch",
                                   disable=not progress)):
        batch = rows[start:start + batch_size]
        q, qm = collate_queries(batch["input_ids"], policy.tokenizer.pad_token_id,
                                policy.padding_side)
        q, qm, limits = q.to(device), qm.to(device), [max_new_tokens] * q.shape[0]
        torch.manual_seed(seed + b)
        with policy.reference():
            before = policy.generate(q, qm, sampling, limits, batch["query"])
        torch.manual_seed(seed + b)
        after = policy.generate(q, qm, sampling, limits, batch["query"])
        out.before += before.responses
        out.after += after.responses
        out.tokens_before += _lengths(before)
        out.tokens_after += _lengths(after)
        if out.kl is not None:
            out.kl += sequence_kl(policy, after, kl_temperature).tolist()
    return out


def _lengths(rollout) -> list[int]:
    """Generated tokens per response, EOS not counted."""
    return (rollout.response_mask.sum(1) - rollout.ended_with_eos.long()).tolist()


@torch.no_grad()
def sequence_kl(policy, rollout, temperature: float) -> torch.Tensor:
    """Per response, sum over its tokens of log p_trained - log p_reference, ``(B,)`` CPU."""
    args = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
            temperature)
    logp = policy(*args, with_values=False).logprobs
    with policy.reference():
        ref = policy(*args, with_values=False).logprobs
    return ((logp - ref) * rollout.response_mask).sum(1).float().cpu()


# --------------------------------------------------------------------------- scoring

ScoreFn = Callable[[list[str], list[str]], torch.Tensor]


def scoring_jobs(reward, judge, score_on: str, with_toxicity: bool = True
                 ) -> dict[str, ScoreFn]:
    """Name -> ``fn(queries, responses)``: toxicity (``score_on``), the training reward
    (the run's own ``reward.score_on``), and the judge's toxicity when there is a judge."""

    def texts(queries: list[str], responses: list[str]) -> list[str]:
        if score_on == "response":
            return list(responses)
        return [q + r for q, r in zip(queries, responses, strict=True)]

    jobs: dict[str, ScoreFn] = {}
    if with_toxicity:
        jobs["toxicity"] = lambda q, r: reward.toxicity(texts(q, r))
    jobs["reward"] = reward
    if judge is not None:
        jobs["judge_toxicity"] = lambda q, r: judge.toxicity(texts(q, r))
    return jobs


def score_generations(gen: Generations, jobs: dict[str, ScoreFn], progress: bool = True,
                      chunk: int = 256) -> dict[str, list[float]]:
    """``{"<job>_before": [...], "<job>_after": [...]}`` for every job, in prompt order."""
    from tqdm.auto import tqdm

    n = len(gen.queries)
    scores: dict[str, list[float]] = {}
    with tqdm(total=2 * n * len(jobs), desc="scoring", unit="text",
              disable=not progress) as bar:
        for name, fn in jobs.items():
            for side, responses in (("before", gen.before), ("after", gen.after)):
                values: list[float] = []
                for start in range(0, n, chunk):
                    stop = min(start + chunk, n)
                    values += fn(gen.queries[start:stop], responses[start:stop]).tolist()
                    bar.update(stop - start)
                scores[f"{name}_{side}"] = values
    return scores


# --------------------------------------------------------------------------- evaluate

def evaluate(target: Target, opts: EvalOptions) -> dict[str, Any]:
    """Generate, score and summarise; write ``eval/``; return the summary."""
    check_options(opts)
    cfg, device = target.cfg, device_for(opts)
    sampling, max_new, seed, kl_t = eval_sampling(cfg, opts)
    reward, judge = load_classifiers(cfg, opts, device)  # fail fast, before generating
    policy = load_policy(target, device)
    test = held_out_prompts(cfg, policy.tokenizer)
    gen = generate_before_after(policy, first_prompts(test, opts.n), sampling, max_new,
                                opts.batch_size, seed, kl_t, opts.progress)
    scores = score_generations(gen, scoring_jobs(reward, judge, opts.score_on), opts.progress)
    summary = summarize(gen, scores, opts, seed, policy.tokenizer)
    summary["settings"] = {**settings(target, opts, len(test)), "device": str(device)}
    write_evaluation(target.out_dir, gen, scores, summary)
    return summary


def summarize(gen: Generations, scores: dict[str, list[float]], opts: EvalOptions, seed: int,
              tokenizer=None) -> dict[str, Any]:
    """summary.json: toxicity, reward (and judge) statistics, quality and KL.

    ``mean_length`` counts generated tokens (EOS excluded) when ``gen`` records them.
    """
    from .quality import quality_metrics
    from .stats import compare, evaluation_summary

    refs = gen.references if all(gen.references) else None  # ROUGE only with references
    quality = {}
    for side, texts, lengths in (("before", gen.before, gen.tokens_before),
                                 ("after", gen.after, gen.tokens_after)):
        quality[side] = quality_metrics(texts, refs, tokenizer)
        if lengths:  # the tokens generated, not a re-tokenization of the decoded text
            quality[side]["mean_length"] = sum(lengths) / len(lengths)
    summary = evaluation_summary(
        scores["toxicity_before"], scores["toxicity_after"],
        reward_before=scores["reward_before"], reward_after=scores["reward_after"],
        quality_before=quality["before"], quality_after=quality["after"], kl=gen.kl,
        toxic_label=opts.toxic_label, n_resamples=opts.n_resamples, seed=seed)
    if "judge_toxicity_before" in scores:
        summary["metrics"]["judge_toxicity"] = compare(
            scores["judge_toxicity_before"], scores["judge_toxicity_after"], True,
            opts.n_resamples, summary["confidence"], seed)
    return summary


def write_evaluation(out_dir: Path, gen: Generations, scores: dict[str, list[float]],
                     summary: dict[str, Any]) -> None:
    """generations.jsonl and toxicity.json first, summary.json (what reuse checks) last."""
    lines = []
    for i, row_id in enumerate(gen.ids):
        row = {"id": row_id, "query": gen.queries[i], "before": gen.before[i],
               "after": gen.after[i], **{k: v[i] for k, v in scores.items()}}
        if gen.kl is not None:
            row["kl"] = gen.kl[i]
        if gen.tokens_before:
            row["tokens_before"], row["tokens_after"] = gen.tokens_before[i], gen.tokens_after[i]
        row["references"] = gen.references[i]
        lines.append(json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "generations.jsonl", "".join(lines))
    atomic_write_json(out_dir / "toxicity.json", {"before": scores["toxicity_before"],
                                                  "after": scores["toxicity_after"]})
    atomic_write_json(out_dir / "summary.json", summary)


# --------------------------------------------------------------------------- report

def rebuild_report(out_dir: Path) -> Path | None:
    """Rebuild ``<run>/report.html`` when results went to ``<run>/eval`` (where it reads)."""
    from .report import build_report

    if out_dir.name != EVAL_DIR:
        return None
    try:
        return build_report(out_dir.parent)
    except DetoxError:
        return None
