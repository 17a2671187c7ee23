"""Architecture-independent pieces of batched rollouts: length limits, masks, beams.

The tutorial drew ``max_new_tokens`` per prompt from U{100..400} and called ``generate`` once
per prompt. We draw the same per-prompt limits, decode one batch to the largest draw, and
cut each response at its own limit. Under sampling the tokens before a cut do not depend on
the limit, so each response has the tutorial's length distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor


def real_positions(mask: Tensor) -> Tensor:
    """(B, L) position ids counting real tokens only, for left-padded rows: a prompt's
    positions (and log-probs) then do not depend on the longest prompt in its batch."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def last_logit_only(model) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it: a decoding step needs the
    last position's logits only, and the LM head is the costliest layer per position."""
    import inspect

    return ({"logits_to_keep": 1} if "logits_to_keep" in
            inspect.signature(model.forward).parameters else {})


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


def beam_search(model, tokenizer, query_ids: Tensor, query_mask: Tensor, sampling,
                max_new_tokens: int, min_new_tokens: int, **kwargs) -> Tensor:
    """``model.generate``'s raw output with ``sampling.num_beams`` beams (evaluation only).

    Beam search keeps transformers' own loop; every other decoding is
    :func:`detoxrl.models.decoding.decode`. ``kwargs`` go to ``generate`` (``encoder_outputs``).
    """
    # Without sampling, sampling options would only draw a warning.
    drawing = ({"top_k": sampling.top_k, "top_p": sampling.top_p,
                "temperature": sampling.temperature} if sampling.do_sample else {})
    return model.generate(
        input_ids=query_ids, attention_mask=query_mask, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=sampling.do_sample, **drawing,
        num_beams=sampling.num_beams, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, **kwargs)


def block_token(logits: Tensor, token_id: int, first_n: int, inplace: bool = False
                ) -> Tensor:
    """The logits of the distribution a sampler with ``min_new_tokens=first_n`` draws from.

    ``generate`` makes ``token_id`` (EOS) impossible at the first ``first_n`` response
    positions. Log-probs scored without that block belong to another distribution: PPO's
    gradient then moves mass onto the never-sampled EOS, the sampled tokens' log-probs fall
    while the reference's do not, and the k1 KL estimate turns strongly negative (seen: -53
    nats a response). Here the blocked logits get the dtype's minimum (not -inf, so that
    entropies stay finite). ``logits``: (B, T, V) or (B, V) with ``first_n`` 0 or 1.
    ``inplace``: write into ``logits`` (the caller's own, outside autograd) instead of a copy.
    """
    if first_n <= 0 or token_id is None:
        return logits
    # One column written: a broadcast masked_fill took several times as long.
    blocked = logits if inplace else logits.clone()
    if logits.dim() == 3:
        blocked[:, :first_n, token_id] = torch.finfo(logits.dtype).min
    else:
        blocked[:, token_id] = torch.finfo(logits.dtype).min
    return blocked


def unblock(logprobs: Tensor, token_logits: Tensor, eos_logits: Tensor) -> Tensor:
    """The log-probs of tokens drawn under :func:`block_token` in the model's own, unblocked
    distribution: what a language model scores them as, for measures that use the LM itself.

    With EOS blocked, log p_b(y) = z_y - log Z_b, where Z_b sums e^z over every token but EOS.
    Unblocked, log p(y) = z_y - log(Z_b + e^{z_EOS}) = log p_b(y) - softplus(z_EOS - log Z_b),
    and log Z_b = z_y - log p_b(y): no second pass over the vocabulary. ``logprobs`` are the
    blocked log-probs of tokens other than EOS, ``token_logits`` their logits z_y and
    ``eos_logits`` z_EOS, at the same temperature and of one shape.
    """
    log_z = token_logits - logprobs
    return logprobs - torch.nn.functional.softplus(eos_logits - log_z)


def blocked_columns(logits: Tensor, tokens: Tensor, token_id: int | None, first_n: int
                    ) -> tuple[Tensor, Tensor] | None:
    """What :func:`unblock_columns` needs from ``logits`` (B, T, V) before
    :func:`block_token`: the (B, N) logits of ``tokens`` (B, T) and of ``token_id`` at the
    first N = ``first_n`` positions; None when nothing is blocked."""
    if first_n <= 0 or token_id is None:
        return None
    # copies, not views: a view would keep the whole (B, T, V) logits alive
    picked = logits[:, :first_n].gather(-1, tokens[:, :first_n, None]).squeeze(-1)
    return picked, logits[:, :first_n, token_id].clone()


def unblock_columns(logprobs: Tensor, seen: tuple[Tensor, Tensor] | None) -> Tensor:
    """``logprobs`` (B, T) taken under :func:`block_token`, with the first positions, where
    the token was blocked, scored without the block from ``seen`` (:func:`blocked_columns`)."""
    if seen is None:
        return logprobs
    n = seen[0].shape[1]
    return torch.cat([unblock(logprobs[:, :n], *seen), logprobs[:, n:]], dim=1)


def entropy_from_logprobs(logprobs: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v from log-probs (..., V) -> (...): one pass over a log_softmax
    already computed, about a quarter of the cost of :func:`entropy_from_logits`.

    -inf log-probs (p = 0) are clamped to the dtype's minimum, so they add 0 * min = 0.
    """
    logprobs = logprobs.clamp(min=torch.finfo(logprobs.dtype).min)
    return -(logprobs.exp() * logprobs).sum(-1)


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
