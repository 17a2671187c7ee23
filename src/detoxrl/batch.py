"""The rollout batch: what one PPO step generates, scores and learns from.

Queries are kept apart from responses for both architectures. A seq2seq policy feeds the
query to its encoder and the response to its decoder; a causal policy concatenates them. The
policy (``detoxrl.policy``) is the only place that knows the difference.

Padding: queries are left-padded (causal models generate from the right edge) or
right-padded (seq2seq encoders); responses are always right-padded, and every position
after a response's EOS, or past its own length draw, is padding with ``response_mask == 0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

PER_TOKEN_FIELDS = ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values",
                    "rewards", "advantages", "returns")


@dataclass
class Rollout:
    query_ids: Tensor                 # (B, Q) prompt token ids, padded
    query_mask: Tensor                # (B, Q) 1 on real prompt tokens
    response_ids: Tensor              # (B, T) generated token ids, right-padded
    response_mask: Tensor             # (B, T) 1 on generated tokens up to and incl. EOS
    queries: list[str]                # B decoded prompts
    responses: list[str]              # B decoded responses (no special tokens)
    ended_with_eos: Tensor            # (B,) bool, response stopped on EOS before its limit
    # Filled in by the trainer after generation; None until then.
    scores: Tensor | None = None          # (B,) reward-model score per response
    logprobs: Tensor | None = None        # (B, T) log-probs under the rollout policy
    ref_logprobs: Tensor | None = None    # (B, T) log-probs under the reference policy
    values: Tensor | None = None          # (B, T) value predictions under the rollout policy
    rewards: Tensor | None = None         # (B, T) KL-shaped per-token rewards
    advantages: Tensor | None = None      # (B, T) GAE advantages (whitened if configured)
    returns: Tensor | None = None         # (B, T) advantages + values, the value targets

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, index: Tensor | list[int]) -> Rollout:
        """The rollouts at ``index`` (a mini-batch), trimmed to their longest response."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                picked[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value
        return Rollout(**picked).trim()

    def trim(self) -> Rollout:
        """Drop response columns that are padding in every row (saves compute in PPO)."""
        width = int(self.response_mask.sum(1).max().item()) if len(self) else 0
        width = max(width, 1)
        if width == self.response_ids.shape[1]:
            return self
        return dataclasses.replace(self, **{
            name: getattr(self, name)[:, :width] for name in PER_TOKEN_FIELDS
            if getattr(self, name) is not None
        })

    def to(self, device: torch.device | str) -> Rollout:
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        })
