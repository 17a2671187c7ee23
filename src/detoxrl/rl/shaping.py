"""Prefix scores for ``ppo.prefix_shaping``: the reward called on every prefix of each response.

A classifier's score of a whole response says how toxic it is, not which token made it so;
with the score at the last token only, every token of a toxic response shares the blame,
and the words around the offending one are pushed down with it. Scoring the prefixes gives
each token the change it made (``rl.math.prefix_shaped_scores``). Imports the rollout type
only; the reward is any ``f(prompts=..., completions=..., **columns)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..models.rollout import Rollout


def prefix_texts(tokenizer, batch: Rollout) -> tuple[list[int], list[int], list[str]]:
    """``(rows, positions, texts)``: for each response, its decoded first t tokens for t = 0
    (the empty response) up to its length - 1; the whole response is scored already."""
    lengths = batch.response_mask.sum(1).tolist()
    rows, positions, ids = [], [], []
    for row, length in enumerate(lengths):
        tokens = batch.response_ids[row].tolist()
        for t in range(int(length)):
            rows.append(row)
            positions.append(t)
            ids.append(tokens[:t])
    # Decoded as the rollout decodes whole responses, so prefix t + 1 of the last token is
    # the response text itself.
    return rows, positions, tokenizer.batch_decode(ids, skip_special_tokens=True)


def prefix_scores(reward_fn: Callable, tokenizer, batch: Rollout, columns: dict[str, list],
                  transform: Callable[[Tensor], Tensor]) -> Tensor:
    """phi(t) for every prefix, ``(B, T)`` float32 on the batch's device, 0 past each response;
    ``columns`` hold one value per response, ``transform`` is the one the scores went through.
    """
    rows, positions, texts = prefix_texts(tokenizer, batch)
    prompts = [batch.queries[r] for r in rows]
    per_prefix = {k: [v[r] for r in rows] for k, v in columns.items()}
    raw = reward_fn(prompts=prompts, completions=texts, **per_prefix)
    values = transform(torch.as_tensor(raw, dtype=torch.float32).reshape(-1))
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    out[torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)] = values
    return out.to(batch.response_ids.device)
