"""The next-token sampler of every rollout and evaluation: temperature, min-length, top-k,
nucleus (top-p), over a whole batch per step, without sorting the vocabulary.

Semantics are transformers' ``generate`` with our processors, in its order: logits / T, EOS
blocked before the minimum length, top-k (every token at least as large as the k-th largest
is kept, ties included: ``TopKLogitsWarper``), then nucleus (Holtzman et al. 2020, "The
Curious Case of Neural Text Degeneration"): with probabilities p_(1) >= p_(2) >= ..., keep
the tokens whose mass *before* them is below ``top_p``, at least one, and every token tied
with the last one kept. Equivalently, token j is kept iff the mass of the tokens strictly
more probable than j is below ``top_p``:

    keep(j)  <=>  M(p_j) < top_p,   M(v) = sum_{i: p_i > v} p_i.

That test needs no sort: one masked sum per candidate. So the sampler draws a candidate from
the (top-k) distribution and accepts it iff it is kept; rejected rows draw again. This is
rejection sampling (von Neumann 1951) from the nucleus, whose mass is at least ``top_p``:
one round accepts with probability >= top_p, and the accepted token has exactly the
renormalised nucleus distribution. Rows still rejected after a few rounds (small ``top_p``)
fall back to the exact sort of those rows only.

A candidate is drawn by inverting the CDF, not by ``torch.multinomial`` (on the CPU ~5x a
softmax) or a Gumbel race (one random number per vocabulary entry): the vocabulary is cut
into blocks of ``BLOCK`` tokens, one pass sums each block, the block is found in the float64
cumulative sum of the block sums and the token in the float64 cumulative sum of that block.
So float32 rounding never accumulates over more than one block.

The log-prob of the sampled token is read from the same logits (at the temperature, with
EOS blocked, not top-k/top-p filtered): what ``Policy.forward`` gives for that token. So is
its log-prob with nothing blocked, the bare language model's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .generation import block_token, unblock

BLOCK = 256          # tokens per block of the CDF inversion
REJECTION_ROUNDS = 4  # nucleus draws before the sorting fallback (rows left: <= (1-p)^4)


class Draw(NamedTuple):
    tokens: Tensor      # (B,) sampled ids
    logprobs: Tensor    # (B,) their log-probs at the temperature, EOS blocked as sampled
    unblocked_logprobs: Tensor  # (B,) the same with nothing blocked: the bare LM's


def warp(logits: Tensor, temperature: float, eos_token_id: int | None,
         eos_blocked: bool, inplace: bool = False) -> Tensor:
    """The scored distribution's logits, (B, V) float32: / temperature, EOS blocked.
    ``inplace``: ``logits`` are the caller's to overwrite (no copy to block EOS)."""
    scored = logits.float()
    if temperature != 1.0:
        scored = scored / temperature
    # A cast or a division already made a new tensor: no caller sees it, so no copy either.
    return block_token(scored, eos_token_id, int(eos_blocked),
                       inplace=inplace or scored is not logits)


def top_k_floor(logits: Tensor, k: int) -> Tensor:
    """(B, 1) the k-th largest logit of each row: top-k keeps every logit >= it."""
    k = min(max(k, 1), logits.shape[-1])
    return logits.topk(k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values


def categorical(weights: Tensor, u: Tensor) -> Tensor:
    """(B,) one index per row drawn with probability weights / row sum, by inverting the CDF.

    weights: (B, V) >= 0, contiguous, every row with a positive entry; u: (B,) in (0, 1].
    Block sums in float32 (one pass), then float64 cumulative sums of the block sums and of
    the chosen block only. Zero-weight tokens are never drawn.
    """
    rows, vocab = weights.shape
    size = min(BLOCK, vocab)
    full = vocab // size
    sums = weights[:, :full * size].view(rows, full, size).sum(-1)             # (B, NB)
    if vocab % size:
        sums = torch.cat([sums, weights[:, full * size:].sum(-1, keepdim=True)], dim=1)
    cdf = sums.double().cumsum(-1)                                              # (B, NB)
    target = u.double().unsqueeze(1) * cdf[:, -1:]                              # (B, 1)
    block = torch.searchsorted(cdf, target).clamp(max=cdf.shape[1] - 1)         # (B, 1)
    rest = target - (cdf.gather(1, block) - sums.gather(1, block).double())     # (B, 1)
    index = block * size + torch.arange(size, device=weights.device)            # (B, size)
    inside = index < vocab
    local = weights.gather(1, index.clamp(max=vocab - 1)).double() * inside    # (B, size)
    local_cdf = local.cumsum(-1)
    # Rounding between the float32 block sum and this float64 sum: stay on a positive token.
    rest = torch.minimum(rest.clamp(min=torch.finfo(torch.float64).tiny), local_cdf[:, -1:])
    return (index.gather(1, torch.searchsorted(local_cdf, rest))).squeeze(1)


def mass_above(weights: Tensor, candidates: Tensor) -> Tensor:
    """(B,) the weight of the tokens strictly heavier than each row's candidate.

    A candidate is in the nucleus iff this is below ``top_p`` times the row's total; tokens
    tied with it share its verdict, as in the sorting definition. Computed as
    w_c * sum(threshold(w / w_c, 1)): two elementwise passes, where a compare-and-select
    takes three (the division maps exact ties to exactly 1, so they stay out).
    """
    w = weights.gather(1, candidates.unsqueeze(1))                              # (B, 1) > 0
    ratio = torch.nn.functional.threshold_(weights / w, 1.0, 0.0)              # (B, V)
    return ratio.sum(-1) * w.squeeze(1)


def nucleus_mask_sorted(weights: Tensor, top_p: float) -> Tensor:
    """(B, V) the nucleus by sorting each row: the exact fallback, and the tests' reference.

    The kept count is the number of sorted positions whose mass before them is below
    ``top_p`` (at least one); every token at least as likely as the last kept one is kept.
    """
    probs = weights / weights.sum(-1, keepdim=True)
    ordered = probs.sort(dim=-1, descending=True).values                        # (B, V)
    mass_before = ordered.cumsum(dim=-1) - ordered
    kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)         # (B, 1)
    return probs >= ordered.gather(-1, kept - 1)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = 0,
                top_p: float = 1.0, eos_token_id: int | None = None, eos_blocked: bool = False,
                do_sample: bool = True, generator: torch.Generator | None = None,
                inplace: bool = False) -> Draw:
    """One token per row from raw next-token ``logits`` (B, V), and its log-prob.

    ``do_sample=False`` is greedy (the first maximum, as ``torch.argmax``); top-k/top-p
    cannot change the maximum. Random numbers come from ``generator`` (default: torch's
    global one, so ``torch.manual_seed`` fixes the draws). ``inplace``: the caller will not
    read ``logits`` again, so EOS may be blocked in them rather than in a (B, V) copy.
    """
    blocked = eos_blocked and eos_token_id is not None
    # Read before an in-place block overwrites it: the unblocked log-prob needs it.
    eos = logits[:, eos_token_id].float() / temperature if blocked else None   # (B,)
    scored = warp(logits, temperature, eos_token_id, eos_blocked, inplace)      # (B, V)
    probs = scored.softmax(dim=-1)                                              # (B, V)
    if not do_sample:
        tokens = scored.argmax(dim=-1)
    else:
        weights = probs
        if top_k:
            weights = probs.masked_fill(scored < top_k_floor(scored, top_k), 0.0)
        tokens = draw(weights, top_p, generator)
    logprobs = token_logprobs(scored, probs, tokens)
    if not blocked:
        return Draw(tokens, logprobs, logprobs)
    picked = scored.gather(1, tokens.unsqueeze(1)).squeeze(1)                   # (B,)
    return Draw(tokens, logprobs, unblock(logprobs, picked, eos))


def token_logprobs(scored: Tensor, probs: Tensor, tokens: Tensor) -> Tensor:
    """(B,) log softmax(scored) at ``tokens``: the log of the softmax's probability (within
    ~1e-7 of log_softmax), or log_softmax itself where that probability is below float32's
    normal range and has lost its precision."""
    picked = probs.gather(1, tokens.unsqueeze(1)).squeeze(1)                    # (B,)
    logprobs = picked.log()
    tiny = picked < 1e-30
    if tiny.any():
        rows = scored[tiny].log_softmax(-1)
        logprobs[tiny] = rows.gather(1, tokens[tiny].unsqueeze(1)).squeeze(1)
    return logprobs


def draw(weights: Tensor, top_p: float = 1.0, generator: torch.Generator | None = None
         ) -> Tensor:
    """(B,) one token per row from ``weights`` (B, V) >= 0 restricted to its nucleus."""
    rows = weights.shape[0]

    def uniform(n: int) -> Tensor:  # in (0, 1]: a zero would land on a zero-weight token
        return 1.0 - torch.rand(n, generator=generator, device=weights.device,
                                dtype=torch.float64)

    tokens = categorical(weights, uniform(rows))                                # (B,)
    if top_p >= 1.0:
        return tokens
    limit = top_p * weights.sum(-1)                                             # (B,)
    pending = (mass_above(weights, tokens) >= limit).nonzero().squeeze(1)       # (R,)
    for _ in range(REJECTION_ROUNDS - 1):
        if pending.numel() == 0:
            return tokens
        rest = weights[pending]                                                 # (R, V)
        again = categorical(rest, uniform(pending.numel()))
        tokens[pending] = again
        pending = pending[mass_above(rest, again) >= limit[pending]]
    if pending.numel():
        rest = weights[pending]
        kept = torch.where(nucleus_mask_sorted(rest, top_p), rest, 0.0)
        tokens[pending] = categorical(kept, uniform(pending.numel()))
    return tokens
