"""A causal LM's teacher-forced pass over rows that share their query, the query read once.

An evaluation answers every prompt K times, and GRPO/RLOO sample groups per prompt, so K
consecutive rows of their rollouts hold the same query. Scoring ``query + response`` row by
row reads each query K times; here each distinct query goes through the model once, its KV
cache is copied to the rows that share it, and only the responses are read after it. The
logits are those of the full pass up to float rounding.

Used without gradients only (old and reference log-probs, evaluation): the copied cache
would carry the whole group's gradient into one query pass, which the training loss does not
need and gradient checkpointing does not allow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .generation import last_logit_only, real_positions


def query_groups(query_ids: Tensor, query_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first, inverse)`` when consecutive rows repeat their queries, at least two rows per
    distinct query on average: the row index of each distinct query's first copy ``(U,)``
    and each row's distinct query ``(B,)``. None otherwise, where the extra pass over the
    queries would cost more than it saves, and for one-token queries."""
    if query_ids.shape[1] < 2:
        return None
    rows = torch.cat([query_ids, query_mask], dim=1)                            # (B, 2Q)
    _, inverse, counts = torch.unique_consecutive(rows, dim=0, return_inverse=True,
                                                  return_counts=True)
    if 2 * counts.numel() > rows.shape[0]:
        return None
    return counts.cumsum(0) - counts, inverse


def shared_query_logits(model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                        response_mask: Tensor, groups: tuple[Tensor, Tensor]
                        ) -> tuple[Tensor, Tensor]:
    """``(B, T, V)`` logits predicting each response token and the ``(B, T, H)`` last hidden
    states that predict them, as ``Policy.forward``'s causal pass gives them.

    ``model``: a transformers causal LM (LoRA layers may sit inside it); queries (B, Q)
    left-padded, so their last column is a real token, and Q >= 2; responses (B, T)
    right-padded; ``groups`` from :func:`query_groups`.
    """
    from transformers import DynamicCache

    first, inverse = groups
    cache = DynamicCache(config=model.config)
    mask = torch.cat([query_mask, response_mask[:, :-1]], dim=1)                # (B, Q+T-1)
    positions = real_positions(mask)
    q = query_ids.shape[1]
    # The query but its last token, once per distinct query, into the cache ...
    model(input_ids=query_ids[first, :-1], attention_mask=query_mask[first, :-1],
          position_ids=positions[first, :q - 1], cache=cache, use_cache=True,
          **last_logit_only(model))
    cache.batch_select_indices(inverse)
    # ... then, per row, the last query token and the response: each predicts the next.
    ids = torch.cat([query_ids[:, -1:], response_ids[:, :-1]], dim=1)           # (B, T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, q - 1:],
                cache=cache, use_cache=True, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]
