"""Statistics over all processes, so that every rank normalises and controls identically.

Each function reduces sums and counts with ``accelerator.reduce`` (an all-reduce; a no-op
in a single process) and returns the same numbers on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor


def global_sum(accelerator, x: Tensor) -> Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return x
    return accelerator.reduce(x.contiguous(), reduction="sum")


def global_mean(accelerator, values: Tensor) -> Tensor:
    """Mean of ``values`` (any shape) over every element on every rank."""
    stats = torch.stack([values.float().sum(), torch.tensor(float(values.numel()),
                                                            device=values.device)])
    total, count = global_sum(accelerator, stats)
    return total / count


def global_masked_moments(accelerator, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, unbiased variance, count) of ``x`` over ``mask == 1`` on every rank."""
    mask = mask.to(x.dtype)
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    total, total_sq, count = global_sum(accelerator, stats)
    mean = total / count
    var = (total_sq / count - mean * mean) * count / (count - 1).clamp(min=1)
    return mean.to(x.dtype), var.clamp(min=0).to(x.dtype), count


def all_finite(accelerator, *tensors: Tensor) -> bool:
    """True only if every tensor is finite on every rank (so all ranks skip together)."""
    bad = sum(int(not torch.isfinite(t).all()) for t in tensors)
    device = tensors[0].device
    return int(global_sum(accelerator, torch.tensor(bad, device=device))) == 0


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage the run was launched with; 0 without DeepSpeed."""
    state = getattr(accelerator, "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0
