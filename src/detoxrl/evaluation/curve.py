"""The over-optimization curve: proxy reward and independent judges against sqrt(KL).

After Gao et al. 2022 ("Scaling laws for reward model overoptimization", arXiv:2210.10760),
who plot a gold reward and the proxy reward a policy is trained on against
``sqrt(KL(policy || initial policy))``: the proxy keeps rising while the gold peaks and
turns down. Here the gold is the judges (:mod:`detoxrl.evaluation.judges`), classifiers
the policy never saw; the step where a judge was best is where more optimisation of the
reward stopped lowering the toxicity it measures.

With ``eval_every: N`` the policy answers a fixed validation set before the first step,
every N steps and after the last: ``validation.num_prompts`` prompts (a seeded subset of
``validation.path``, or of the RL prompt pool), ``validation.samples_per_prompt`` samples
each, drawn by the rollout sampler with the same seeds every time, so two points differ by
the weights alone. Every process evaluates the same prompts with the same seeds (the
figures agree; only the main process writes). Sampling runs under a forked RNG: a run
trains the same with and without the curve.

Metrics of one point (:func:`curve_metrics`), logged to ``metrics.jsonl`` with the step
and to ``eval_curve.jsonl`` (:data:`CURVE_FILE`), one line per point:

* ``eval/reward/mean``: the run's reward (every reward function, weighted), mean over samples;
* ``eval/judge/<name>/mean_toxicity``: the judge's mean toxicity over samples (the average
  toxicity of Liu et al. 2021);
* ``eval/judge/<name>/toxicity_probability``: the share of prompts with at least one
  sample scored >= 0.5 (Gehman et al. 2020);
* ``eval/kl``: the mean over samples of ``sum_t log pi(y_t) - log pi_ref(y_t)``, at the
  sampling temperature and under the sampler's EOS block, as the training KL;
* ``eval/sqrt_kl``: ``sqrt(max(eval/kl, 0))`` (the sampled estimate can dip below 0 by noise
  near the start, where the KL itself is 0);
* ``eval/distinct_2``: unique / all word bigrams of each prompt's samples, averaged over
  prompts (the protocol's distinct-2; a policy collapsing to one phrasing lowers it);
* ``eval/response_length``: generated tokens per sample.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import ConfigError, DataError, DetoxError
from . import protocol as P
from .figures import read_metrics

CURVE_FILE = "eval_curve.jsonl"
JUDGE_PREFIX = "eval/judge/"


def curve_metrics(rewards: Sequence[float], judge_scores: dict[str, Sequence[float]],
                  kl: Sequence[float], responses: Sequence[str], k: int,
                  lengths: Sequence[int] | None = None) -> dict[str, float]:
    """One point of the curve from per-sample values, prompt i's K samples at rows
    ``i*K .. i*K + K-1`` (see the module docstring for each metric)."""
    mean_kl = float(np.mean(np.asarray(kl, dtype=np.float64)))
    out = {"eval/reward/mean": float(np.mean(np.asarray(rewards, dtype=np.float64))),
           "eval/kl": mean_kl, "eval/sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
           "eval/distinct_2": float(P.distinct_n_per_prompt(P.rows_of(responses, k), 2).mean())}
    if lengths is not None:
        out["eval/response_length"] = float(np.mean(lengths))
    for name, scores in judge_scores.items():
        matrix = P.as_matrix(scores, k)
        out[f"{JUDGE_PREFIX}{name}/mean_toxicity"] = float(P.mean_per_prompt(matrix).mean())
        out[f"{JUDGE_PREFIX}{name}/toxicity_probability"] = P.toxicity_probability(matrix)
    return out


def judge_names(row: dict[str, Any]) -> list[str]:
    """The judges of a curve point, in logged order."""
    suffix = "/mean_toxicity"
    return [k[len(JUDGE_PREFIX):-len(suffix)] for k in row
            if k.startswith(JUDGE_PREFIX) and k.endswith(suffix)]


def default_judges() -> list[str]:
    """``profanity-check`` when its package is installed, else none."""
    from .judges import PROFANITY_CHECK

    return [PROFANITY_CHECK] if importlib.util.find_spec("profanity_check") else []


def load_validation_judges(cfg: TrainConfig, device: Any = None) -> list:
    """The judges ``validation.judges`` names, loaded; errors name the option and the fix."""
    from .judges import load_judge

    specs = cfg.validation.judges
    if specs is None:
        specs = default_judges()
        if not specs:
            warnings.warn("The validation curve has no judge (alt-profanity-check is not "
                          "installed), so it shows the reward alone. pip install "
                          "\"detoxrl[judges]\", or name judges in validation.judges.",
                          stacklevel=2)
    if len(set(specs)) != len(specs):
        raise ConfigError("validation.judges names the same judge twice; name each once.")
    judges = []
    for spec in specs:
        try:
            judges.append(load_judge(spec, None, cfg.reward.batch_size, device))
        except DetoxError as exc:
            raise type(exc)(f"validation.judges: {exc} Fix the judge's name, install what "
                            "it needs, or leave it out of validation.judges (eval_every: 0 "
                            "turns the curve off).") from None
    return judges


def validation_prompts(cfg: TrainConfig, pool, tokenizer):
    """``validation.num_prompts`` prompts of ``validation.path`` (read with the run's data
    recipe) or, without a path, of ``pool`` (the RL prompts), chosen with the run's seed."""
    v = cfg.validation
    source = "the RL prompt pool"
    if v.path is not None:
        from .setup import file_prompts

        source = f"validation.path {v.path!r}"
        try:
            pool = file_prompts(cfg, v.path, tokenizer)
        except DataError as exc:
            raise DataError(f"The validation set is empty or unreadable: {exc} (read from "
                            f"{source} with the run's data recipe). Point validation.path "
                            "at a prompt file, leave it unset to draw the prompts from the "
                            "RL prompt pool, or set eval_every: 0.") from None
    if pool is None or len(pool) == 0:
        raise DataError(f"The validation set is empty: {source} holds no prompts. Point "
                        "validation.path at a prompt file, or set eval_every: 0.")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))
    return pool.select(sorted(order[:v.num_prompts].tolist()))


class Validator:
    """Scores the policy on the validation set; one call gives one point of the curve."""

    def __init__(self, cfg: TrainConfig, prompts, judges: list, synced_gpus: bool = False):
        self.cfg, self.prompts, self.judges = cfg, prompts, judges
        self.synced_gpus = synced_gpus  # ZeRO-3: every rank steps until all are done
        v = cfg.validation
        self.k = v.samples_per_prompt
        self.max_new_tokens = v.max_new_tokens or cfg.generation.max_new_tokens_draw

    @classmethod
    def build(cls, cfg: TrainConfig, pool, tokenizer, device: Any = None,
              synced_gpus: bool = False) -> Validator | None:
        """None when ``eval_every`` is 0; prompts and judges are checked here, before the
        policy loads."""
        if not cfg.eval_every:
            return None
        prompts = validation_prompts(cfg, pool, tokenizer)
        return cls(cfg, prompts, load_validation_judges(cfg, device), synced_gpus)

    @torch.no_grad()
    def __call__(self, learner, reward_columns: Callable[[dict], dict]) -> dict[str, float]:
        """One point for the current weights of ``learner`` (an ``rl.learner.Learner``);
        ``reward_columns(rows)``: the prompt rows' columns the rewards receive."""
        device = learner.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            samples = self._sample(learner, reward_columns)
        scores = {j.name: j(samples["responses"]) for j in self.judges}
        return curve_metrics(samples["rewards"], scores, samples["kl"],
                             samples["responses"], self.k, samples["lengths"])

    def _sample(self, learner, reward_columns) -> dict[str, list]:
        from ..models.generation import collate_queries
        from .sampling import generated_lengths, reference_logprobs, sequence_kl

        policy, sampling = learner.policy, self.cfg.generation
        out: dict[str, list] = {"rewards": [], "kl": [], "responses": [], "lengths": []}
        size = self.cfg.ppo.local_batch_size or self.cfg.ppo.batch_size
        for b, start in enumerate(range(0, len(self.prompts), size)):
            rows = self.prompts[start:start + size]
            ids, mask = collate_queries(rows["input_ids"], policy.tokenizer.pad_token_id,
                                        policy.padding_side)
            torch.manual_seed(self.cfg.seed + b)  # the same draws at every point
            batch = policy.generate(ids.to(learner.accelerator.device),
                                    mask.to(learner.accelerator.device), sampling,
                                    [self.max_new_tokens] * len(rows["query"]), rows["query"],
                                    synced_gpus=self.synced_gpus, num_return_sequences=self.k,
                                    with_logprobs=True)
            with learner.accelerator.autocast():
                ref = reference_logprobs(policy, batch, sampling.temperature)
            out["kl"] += sequence_kl(policy, batch, sampling.temperature, ref.float(),
                                     batch.logprobs.float()).tolist()
            rewards = learner.reward_fn(batch.queries, batch.responses, **reward_columns(rows))
            out["rewards"] += torch.as_tensor(rewards, dtype=torch.float32).reshape(-1).tolist()
            out["responses"] += batch.responses
            out["lengths"] += generated_lengths(batch)
        return out


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    """The points of a run's curve: ``eval_curve.jsonl``, else the ``metrics.jsonl`` rows
    that carry one; sorted by step, the last line of a step kept."""
    for name in (CURVE_FILE, "metrics.jsonl"):
        path = Path(run_dir) / name
        if path.is_file():
            rows = [r for r in read_metrics(path)
                    if isinstance(r.get("step"), int) and "eval/sqrt_kl" in r]
            if rows:
                return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    return []
