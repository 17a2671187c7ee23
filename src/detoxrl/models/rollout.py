"""The rollout batch: what one PPO step generates, scores and learns from.

Queries are kept apart from responses for both architectures. A seq2seq policy feeds the
query to its encoder and the response to its decoder; a causal policy concatenates them. The
policy (``detoxrl.models.policy``) is the only place that knows the difference.

Padding: queries are left-padded (causal models generate from the right edge) or
right-padded (seq2seq encoders); responses are always right-padded, and every position
after a response's EOS, or past its own length draw, is padding with ``response_mask == 0``.
A mini-batch drops the columns that are padding in all of its rows, on either side: that is
exact for both paddings (padded keys are masked, causal position ids count real tokens) and
saves the compute the batch-wide padding would cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

PER_TOKEN_FIELDS = ("response_ids", "response_mask", "token_scores", "logprobs",
                    "unblocked_logprobs", "ref_logprobs", "values", "rewards", "advantages",
                    "returns")
QUERY_FIELDS = ("query_ids", "query_mask", "encoder_hidden")


@dataclass
class Rollout:
    query_ids: Tensor                 # (B, Q) prompt token ids, padded
    query_mask: Tensor                # (B, Q) 1 on real prompt tokens
    response_ids: Tensor              # (B, T) generated token ids, right-padded
    response_mask: Tensor             # (B, T) 1 on generated tokens up to and incl. EOS
    queries: list[str]                # B decoded prompts
    responses: list[str]              # B decoded responses (no special tokens)
    ended_with_eos: Tensor            # (B,) bool, response stopped on EOS before its limit
    # Seq2seq only: the encoder's output for the queries under the rollout policy, kept so
    # the old log-probs need no second encoder pass. None for causal LMs and once used.
    encoder_hidden: Tensor | None = None  # (B, Q, H) last encoder hidden state
    # EOS was impossible at the first eos_blocked positions (min_new_tokens): every log-prob
    # of this rollout is taken under that same block (models.generation.block_token).
    eos_blocked: int = 0
    # Filled in by the trainer after generation; None until then.
    scores: Tensor | None = None          # (B,) reward-model score per response
    # ppo.prefix_shaping: the change each token made to the score, rl.math.prefix_shaped_scores
    token_scores: Tensor | None = None    # (B, T)
    logprobs: Tensor | None = None        # (B, T) log-probs under the rollout policy
    # The same tokens' log-probs with EOS allowed everywhere: the bare LM's (evaluation).
    unblocked_logprobs: Tensor | None = None  # (B, T)
    ref_logprobs: Tensor | None = None    # (B, T) log-probs under the reference policy
    values: Tensor | None = None          # (B, T) value predictions under the rollout policy
    rewards: Tensor | None = None         # (B, T) KL-shaped per-token rewards
    advantages: Tensor | None = None      # (B, T) GAE advantages (whitened if configured)
    returns: Tensor | None = None         # (B, T) advantages + values, the value targets

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, index: Tensor | list[int]) -> Rollout:
        """The rollouts at ``index`` (a mini-batch), trimmed to their longest query and response."""
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
        """Drop response and query columns that are padding in every row."""
        width = int(self.response_mask.sum(1).max().item()) if len(self) else 0
        width = max(width, 1)
        changes = {}
        if width < self.response_ids.shape[1]:
            changes = {name: getattr(self, name)[:, :width] for name in PER_TOKEN_FIELDS
                       if getattr(self, name) is not None}
        real = self.query_mask.any(0).nonzero().flatten().tolist()   # columns with a token
        if real and (real[0], real[-1] + 1) != (0, self.query_mask.shape[1]):
            cols = slice(real[0], real[-1] + 1)
            changes.update({name: getattr(self, name)[:, cols] for name in QUERY_FIELDS
                            if getattr(self, name) is not None})
        return dataclasses.replace(self, **changes) if changes else self

    def to(self, device: torch.device | str) -> Rollout:
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        })
