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
