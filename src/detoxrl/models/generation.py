"""Architecture-independent pieces of batched rollouts.

The tutorial drew ``max_new_tokens`` per prompt from U{100..400} and called ``generate`` once
per prompt. We draw the same per-prompt limits, run one batched ``generate`` to the largest
draw, and cut each response at its own limit. Under sampling the tokens before a cut do not
depend on the limit, so each response has the tutorial's length distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor


def draw_lengths(n: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """``n`` per-prompt ``max_new_tokens`` drawn uniformly from ``[low, high]``."""
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()


def response_mask(tokens: Tensor, limits: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Mask of each response up to and including its first EOS, and within its limit.

    tokens: (B, T) generated ids; limits: (B,) per-sample max new tokens.
    Returns ``(mask (B, T) long, ended_with_eos (B,) bool)``.
    """
    _, width = tokens.shape
    positions = torch.arange(width, device=tokens.device).unsqueeze(0)   # (1, T)
    within = positions < limits.unsqueeze(1)                              # (B, T)
    is_eos = (tokens == eos_token_id) & within
    ended = is_eos.any(dim=1)                                             # (B,)
    # First EOS index, or the limit when there is none.
    first_eos = torch.where(ended, is_eos.float().argmax(dim=1), limits)
    end = torch.where(ended, first_eos + 1, limits.clamp(max=width))      # exclusive end
    mask = (positions < end.unsqueeze(1)).long()
    return mask, ended


class SampledTokenStats:
    """Log-probs (and last hidden states) of the tokens ``generate`` samples, step by step.

    The old log-probs of PPO (and of RLOO/GRPO's ratio) are the sampling policy's own, so
    they can be read while sampling instead of by a second forward pass. Hooks on the LM
    head and on the decoder keep the *raw* logits and the last hidden state of the newest
    position; generate's processed scores would not do, since top-k/top-p mask them, while
    the trainer's forward pass does not. The EOS block of ``min_new_tokens`` is applied here
    as in ``Policy.forward`` (:func:`block_token`): it is the distribution sampled from.
    Once the token is sampled, a stopping criterion that never stops (the one hook ``generate``
    calls with the sampled token) gathers its log-prob at ``temperature``. Per step only
    (B, V) is alive, never the (B, T, V) logits of the whole response.

    A cached forward differs from the teacher-forced one in float rounding only (~1e-6 in
    fp32, ~1e-2 in bf16), so the first update's ratio is 1 up to that.
    """

    def __init__(self, lm_head: torch.nn.Module, decoder: torch.nn.Module | None,
                 temperature: float, eos_token_id: int | None = None, eos_blocked: int = 0):
        self.lm_head, self.decoder, self.temperature = lm_head, decoder, temperature
        self.eos_token_id, self.eos_blocked = eos_token_id, eos_blocked
        self._logits: Tensor | None = None      # (B, V) raw logits of the newest position
        self._hidden: Tensor | None = None      # (B, H) its last hidden state
        self.logprobs: list[Tensor] = []        # T x (B,)
        self.hidden: list[Tensor] = []          # T x (B, H)

    def criterion(self):
        """The stopping criterion to pass to ``generate``; it records and never stops."""
        from transformers import StoppingCriteria

        stats = self

        class _Record(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stats._record(input_ids[:, -1])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool,
                                   device=input_ids.device)

        return _Record()

    def hooks(self) -> list:
        handles = [self.lm_head.register_forward_hook(self._keep_logits)]
        if self.decoder is not None:
            handles.append(self.decoder.register_forward_hook(self._keep_hidden))
        return handles

    def _keep_logits(self, module, args, output) -> None:
        self._logits = output[:, -1]

    def _keep_hidden(self, module, args, output) -> None:
        self._hidden = output[0][:, -1]

    def _record(self, tokens: Tensor) -> None:                            # tokens: (B,)
        logits = self._logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        step = len(self.logprobs)  # as Policy.forward: EOS blocked at the first positions
        logits = block_token(logits, self.eos_token_id, int(step < self.eos_blocked))
        logprobs = torch.log_softmax(logits, dim=-1)                        # (B, V)
        self.logprobs.append(logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        if self.decoder is not None:
            self.hidden.append(self._hidden)
        self._logits = self._hidden = None

    def result(self, width: int) -> tuple[Tensor, Tensor | None]:
        """(B, width) log-probs and (B, width, H) hidden states of the first ``width`` tokens.

        ``generate`` may sample a few steps past the end and drop them; they come last.
        """
        logprobs = torch.stack(self.logprobs[:width], dim=1)
        hidden = torch.stack(self.hidden[:width], dim=1) if self.hidden else None
        return logprobs, hidden


class NucleusFilter:
    """Nucleus (top-p) filtering (Holtzman et al. 2020), sorting with NumPy on the CPU.

    The same set as transformers' ``TopPLogitsWarper``: keep the highest-probability tokens
    whose mass *before* them (in descending order) is below ``top_p``, at least one; here
    that is every token at least as probable as the last one kept (tokens tied with it
    exactly are all kept). Only the sorted *values* are needed, and on the CPU NumPy's
    vectorised sort of a (400, 8000) batch takes ~1/18 of ``torch.sort``'s time (the
    warper's sort was 40% of the evaluation's generation time); the mini LMs' nuclei are
    too wide (median ~700 of 8000 tokens) for a ``topk`` shortcut.
    """

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:    # scores: (B, V)
        probs = scores.float().softmax(dim=-1)
        if probs.device.type == "cpu":
            import numpy as np

            ordered = torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy())[:, ::-1]))
        else:
            ordered = probs.sort(dim=-1, descending=True).values        # (B, V) descending
        mass_before = ordered.cumsum(dim=-1) - ordered                    # (B, V)
        kept = (mass_before < self.top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        least_kept = ordered.gather(-1, kept - 1)                         # (B, 1)
        return scores.masked_fill(probs < least_kept, float("-inf"))


def sample(model, tokenizer, query_ids: Tensor, query_mask: Tensor, sampling, limits: list[int],
           stats: SampledTokenStats | None = None, **kwargs) -> Tensor:
    """``model.generate``'s raw output up to the largest limit, ``stats`` recording if given.

    ``sampling``: a ``SamplingConfig``; ``kwargs`` go to ``generate`` (``synced_gpus``,
    ``encoder_outputs``).
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    warpers, decoding = _warpers(sampling)
    handles = stats.hooks() if stats is not None else []
    try:
        return model.generate(
            input_ids=query_ids, attention_mask=query_mask, max_new_tokens=max(limits),
            min_new_tokens=min(sampling.min_length, min(limits)), do_sample=sampling.do_sample,
            **decoding, num_beams=sampling.num_beams, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, logits_processor=LogitsProcessorList(warpers),
            stopping_criteria=StoppingCriteriaList(
                [stats.criterion()] if stats is not None else []), **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _warpers(sampling) -> tuple[list, dict]:
    """Logits warpers to hand ``generate``, and its own decoding options.

    Under nucleus sampling, temperature, top-k and our :class:`NucleusFilter` go in as
    custom processors, in the order generate itself applies them, and generate's own are
    switched off: it puts custom processors *before* its temperature and top-k.
    """
    if not sampling.do_sample:  # greedy: sampling options would only draw a warning
        return [], {}
    if not 0.0 < sampling.top_p < 1.0:
        return [], {"top_k": sampling.top_k, "top_p": sampling.top_p,
                    "temperature": sampling.temperature}
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    warpers = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    warpers.append(NucleusFilter(sampling.top_p))
    return warpers, {"top_k": 0, "top_p": 1.0, "temperature": 1.0}


def block_token(logits: Tensor, token_id: int, first_n: int) -> Tensor:
    """The logits of the distribution a sampler with ``min_new_tokens=first_n`` draws from.

    ``generate`` makes ``token_id`` (EOS) impossible at the first ``first_n`` response
    positions. Log-probs scored without that block belong to another distribution: PPO's
    gradient then moves mass onto the never-sampled EOS, the sampled tokens' log-probs fall
    while the reference's do not, and the k1 KL estimate turns strongly negative (seen: -53
    nats a response). Here the blocked logits get the dtype's minimum (not -inf, so that
    entropies stay finite). ``logits``: (B, T, V) or (B, V) with ``first_n`` 0 or 1.
    """
    if first_n <= 0 or token_id is None:
        return logits
    positions = torch.arange(logits.shape[-2] if logits.dim() == 3 else 1,
                             device=logits.device)
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    blocked[token_id] = True
    where = (positions < first_n)[:, None] & blocked                        # (T, V)
    if logits.dim() == 2:
        where = where[0]
    return logits.masked_fill(where, torch.finfo(logits.dtype).min)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v, (..., V) -> (...).

    -inf logits (filtered tokens) become the dtype's minimum, so 0 * -inf cannot give NaN.
    """
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def collate_queries(input_ids: list[list[int]], pad_token_id: int, padding_side: str
                    ) -> tuple[Tensor, Tensor]:
    """Pad token id lists into ``(ids, mask)``, both ``(B, Q)`` long tensors.

    Causal policies want ``"left"`` padding (generation continues from the right edge),
    seq2seq encoders ``"right"``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max((len(seq) for seq in input_ids), default=0)
    ids = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(input_ids):
        start = width - len(seq) if padding_side == "left" else 0
        ids[row, start:start + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, start:start + len(seq)] = 1
    return ids, mask
