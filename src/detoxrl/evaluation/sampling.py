"""The one generation loop of ``detoxrl evaluate`` and ``detoxrl compare``: before and after.

Both models answer the same prompts in the same batches with the same seeds
(``torch.manual_seed(seed + batch_index)`` before each batch's ``generate``), so a
difference comes from the weights, not the dice. With K samples per prompt, each batch of
prompts is answered K times by one ``generate`` call (``num_return_sequences``); prompt i's
samples sit at flat rows ``i*K .. i*K + K-1``.

With ``best_of = N`` the "after" side is no trained model but the baseline it has to beat:
reranking at inference (best-of-N sampling, as in Nakano et al. 2021, WebGPT). The starting
policy draws N responses for each of the K, and the one the reward scores highest is kept;
nothing is trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import SamplingConfig


@dataclass
class Generations:
    """Before/after responses for a list of prompts, in prompt order.

    ``before``/``after`` and the per-response lists are flat, ``len(ids) * k`` long.
    """

    ids: list[str]
    queries: list[str]
    references: list[list[str]]
    before: list[str]
    after: list[str]
    kl: list[float] | None = None    # per response: sum_t logp_after - logp_ref
    # Per response: the perplexity of its generated tokens under the reference policy (the
    # run's start, temperature 1), from the token ids themselves; NaN for an empty response.
    ref_perplexity_before: list[float] = dataclasses.field(default_factory=list)
    ref_perplexity_after: list[float] = dataclasses.field(default_factory=list)
    tokens_before: list[int] = dataclasses.field(default_factory=list)  # generated, no EOS
    tokens_after: list[int] = dataclasses.field(default_factory=list)
    # The topicality's term given the prompt, from the passes above: per response, its
    # generated token ids (EOS not counted) and their log-likelihood given the prompt under
    # the reference policy as a bare LM (nothing blocked, temperature 1).
    ids_before: list[list[int]] = dataclasses.field(default_factory=list)
    ids_after: list[list[int]] = dataclasses.field(default_factory=list)
    loglik_before: list[float] = dataclasses.field(default_factory=list)
    loglik_after: list[float] = dataclasses.field(default_factory=list)
    k: int = 1                       # samples per prompt

    @property
    def sample_queries(self) -> list[str]:
        """The prompt of every flat response row."""
        return [q for q in self.queries for _ in range(self.k)]


@torch.no_grad()
def generate_before_after(policy, rows, sampling: SamplingConfig, max_new_tokens: int,
                          batch_size: int, seed: int, kl_temperature: float | None = None,
                          progress: bool = True, samples_per_prompt: int = 1,
                          best_of: int | None = None,
                          rerank: Callable[[list[str], list[str]], Any] | None = None
                          ) -> Generations:
    """Responses of the reference (before) and the trained policy (after) to ``rows``.

    ``rows``: a prompt dataset (``id``, ``query``, ``input_ids``, ``references``). Batch ``b``
    (``batch_size`` prompts, each answered ``samples_per_prompt`` times) is generated twice,
    each time right after ``torch.manual_seed(seed + b)``. With ``kl_temperature``, also the
    per-response KL(trained || reference) on the after responses. With ``best_of``, "after"
    is the reference's best of ``best_of`` samples by ``rerank(queries, responses)``
    (higher is better; :func:`best_of_n`), and there is no KL.
    """
    from tqdm.auto import tqdm

    from ..models.generation import collate_queries

    k = samples_per_prompt
    if best_of:
        kl_temperature = None
    device = next(policy.parameters()).device
    out = Generations(list(rows["id"]), list(rows["query"]), list(rows["references"]), [], [],
                      [] if kl_temperature is not None else None, k=k)
    # Log-probs read while sampling (at the sampling temperature) replace forward passes:
    # the reference's own at T = 1 are the "before" perplexity, the policy's the KL's.
    read_before = sampling.temperature == 1.0
    read_after = kl_temperature is not None and kl_temperature == sampling.temperature
    starts = range(0, len(rows), batch_size)
    for b, start in enumerate(tqdm(starts, desc="generating", unit="batch",
                                   disable=not progress)):
        batch = rows[start:start + batch_size]
        q, qm = collate_queries(batch["input_ids"], policy.tokenizer.pad_token_id,
                                policy.padding_side)
        q, qm, limits = q.to(device), qm.to(device), [max_new_tokens] * q.shape[0]
        torch.manual_seed(seed + b)
        with policy.reference():
            before = policy.generate(q, qm, sampling, limits, batch["query"],
                                     num_return_sequences=k, with_logprobs=read_before)
        torch.manual_seed(seed + b)
        after = (best_of_n(policy, q, qm, sampling, limits, batch["query"], k, best_of, rerank,
                           read_before)
                 if best_of else policy.generate(q, qm, sampling, limits, batch["query"],
                                                 num_return_sequences=k,
                                                 with_logprobs=read_after))
        _record(out, "before", before, reference_scores(policy, before, read_before))
        ref_after = reference_scores(policy, after, bool(best_of) and read_before)
        _record(out, "after", after, ref_after)
        if out.kl is not None:  # at T = 1 the reference pass above serves the KL too
            ref = (ref_after[0] if kl_temperature == 1.0
                   else reference_logprobs(policy, after, kl_temperature))
            out.kl += sequence_kl(policy, after, kl_temperature, ref,
                                  after.logprobs if read_after else None).tolist()
    return out


def reference_scores(policy, rollout, read: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's ``(B, T)`` log-probs of the rollout's tokens at T = 1, with
    EOS blocked as sampled and with nothing blocked: ``read`` from the rollout (the
    reference sampled it at T = 1 with log-probs), else from one forward pass."""
    if read:
        return rollout.logprobs, rollout.unblocked_logprobs
    out = _reference_pass(policy, rollout, 1.0, with_unblocked=True)
    return out.logprobs, out.unblocked_logprobs


def _record(out: Generations, side: str, rollout, ref: tuple[torch.Tensor, torch.Tensor]
            ) -> None:
    """Append one side's responses, lengths, reference perplexities and log-likelihoods."""
    lengths = generated_lengths(rollout)
    ids = rollout.response_ids.cpu().tolist()
    unblocked = ref[1].cpu()                                                    # (B, T)
    getattr(out, side).extend(rollout.responses)
    getattr(out, f"tokens_{side}").extend(lengths)
    getattr(out, f"ref_perplexity_{side}").extend(
        perplexity(ref[0], rollout.response_mask).tolist())
    getattr(out, f"ids_{side}").extend(row[:n] for row, n in zip(ids, lengths, strict=True))
    getattr(out, f"loglik_{side}").extend(
        float(unblocked[i, :n].double().sum()) for i, n in enumerate(lengths))


@torch.no_grad()
def best_of_n(policy, query_ids, query_mask, sampling: SamplingConfig, limits: list[int],
              queries: list[str], k: int, n: int,
              rerank: Callable[[list[str], list[str]], Any], with_logprobs: bool = False):
    """K responses per prompt from the reference policy, each the highest-``rerank`` of N
    samples (the first on ties): rows ``i*K .. i*K + K-1`` as :meth:`Policy.generate`,
    which reads their log-probs while sampling with ``with_logprobs``."""
    with policy.reference():
        drawn = policy.generate(query_ids, query_mask, sampling, limits, queries,
                                num_return_sequences=k * n, with_logprobs=with_logprobs)
    from .stats import as_array

    groups = as_array(rerank(drawn.queries, drawn.responses)).reshape(-1, n)  # (B*K, N)
    return drawn.select(groups.argmax(axis=1) + np.arange(groups.shape[0]) * n)


def generated_lengths(rollout) -> list[int]:
    """Generated tokens per response, EOS not counted."""
    return (rollout.response_mask.sum(1) - rollout.ended_with_eos.long()).tolist()


@torch.no_grad()
def reference_logprobs(policy, rollout, temperature: float) -> torch.Tensor:
    """Log-probs of the rollout's own token ids under the reference policy, ``(B, T)``,
    under the sampler's EOS block: no decoding and re-tokenizing, response logits only."""
    return _reference_pass(policy, rollout, temperature).logprobs


@torch.no_grad()
def _reference_pass(policy, rollout, temperature: float, with_unblocked: bool = False):
    """``Policy.forward`` of the rollout under the reference policy and its EOS block."""
    with policy.reference():
        return policy(rollout.query_ids, rollout.query_mask, rollout.response_ids,
                      rollout.response_mask, temperature, with_values=False,
                      eos_blocked=rollout.eos_blocked, with_unblocked=with_unblocked)


def perplexity(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per response, exp(-mean_t log p(y_t)) over its tokens (EOS included when it was
    generated), ``(B,)`` CPU; NaN for an empty response."""
    mask = mask.float()
    count = mask.sum(1)
    nll = -(logprobs.float() * mask).sum(1)
    return torch.where(count > 0, torch.exp(nll / count.clamp(min=1)),
                       torch.full_like(count, float("nan"))).cpu()


@torch.no_grad()
def sequence_kl(policy, rollout, temperature: float, ref_logprobs: torch.Tensor | None = None,
                logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per response, sum over its tokens of log p_trained - log p_reference, ``(B,)`` CPU;
    ``ref_logprobs`` (from :func:`reference_logprobs` at ``temperature``) and ``logprobs``
    (the trained policy's at ``temperature``, e.g. read while sampling) save those passes."""
    logp = logprobs if logprobs is not None else policy(
        rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
        temperature, with_values=False, eos_blocked=rollout.eos_blocked).logprobs
    if ref_logprobs is None:
        ref_logprobs = reference_logprobs(policy, rollout, temperature)
    return ((logp - ref_logprobs) * rollout.response_mask).sum(1).float().cpu()
