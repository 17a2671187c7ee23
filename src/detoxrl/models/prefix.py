"""Rows that share their query: the query read once, by a causal LM's passes and steps.

An evaluation answers every prompt K times, and GRPO/RLOO sample groups per prompt, so K
consecutive rows of their rollouts hold the same query. Scoring ``query + response`` row by
row reads each query K times; in :func:`shared_query_logits` each distinct query goes through
the model once, its KV cache is copied to the rows that share it, and only the responses are
read after it. The logits are those of the full pass up to float rounding. It is used without
gradients only (old and reference log-probs, evaluation): the copied cache would carry the
whole group's gradient into one query pass, which the training loss does not need and
gradient checkpointing does not allow.

Decoding K rows per query, the rows' steps attend to one copy of the query's keys and values
(:class:`SharedPrefix`, :func:`shared_prefix_attention`) rather than to K copies of it.
"""

from __future__ import annotations

from contextlib import contextmanager

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


# Decoding: K rows continue each distinct query, one token per step. Each step's attention
# reads the query's keys and values from one copy shared by the K rows (``SharedPrefix``), and
# only the rows' own response so far from the cache that the steps grow. transformers copies
# the query's cache to every row instead, and re-copies the whole of it at every step when it
# appends the new token (``DynamicLayer.update`` concatenates).

SHARED_PREFIX = "detoxrl_shared_prefix"  # the attention implementation's registered name
# Architectures whose layers hand a forward's keyword arguments down to the attention
# function, with their ``layer_idx`` (checked by the tests on tiny models of each).
SHARED_PREFIX_MODELS = ("gpt2", "llama", "qwen2")


def can_share_prefix(model, device: torch.device) -> bool:
    """Whether the decoding steps of this causal LM may read a shared prefix: a verified
    architecture with scaled-dot-product attention and no sliding window, on the CPU (on a
    GPU decoding runs over a static cache, :mod:`detoxrl.models.graphs`)."""
    config = model.config
    return (device.type == "cpu" and config.model_type in SHARED_PREFIX_MODELS
            and config._attn_implementation == "sdpa"
            and not getattr(config, "sliding_window", None))


class SharedPrefix:
    """The cached keys and values of G distinct queries, each continued by K rows."""

    def __init__(self, cache, query_mask: Tensor) -> None:
        self.keys = [layer.keys for layer in cache.layers]                      # (G, Hkv, Q, D)
        self.values = [layer.values for layer in cache.layers]
        blocked = torch.zeros(query_mask.shape, dtype=self.keys[0].dtype,
                              device=query_mask.device)
        self.bias = blocked.masked_fill(query_mask == 0, float("-inf"))[:, None, None]  # (G,1,1,Q)
        self.reads = 0  # layers that read the prefix in the last step

    @contextmanager
    def step(self, model):
        """One decoding step of ``model`` with the shared-prefix attention; every layer must
        read the prefix, or the step attended to the response alone."""
        _register()
        config, self.reads = model.config, 0
        before = config._attn_implementation
        config._attn_implementation = SHARED_PREFIX
        try:
            yield
        finally:
            config._attn_implementation = before
        if self.reads != len(self.keys):
            raise RuntimeError(f"{self.reads} of {len(self.keys)} attention layers of this "
                               f"{config.model_type!r} model read the shared prefix.")


def shared_prefix_attention(module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None,
                            shared_prefix: SharedPrefix | None = None, **kwargs):
    """``(N, 1, H, D)``: each row's new token attending to its group's query (the shared
    prefix) and to its own response so far (``key``/``value``, (N, Hkv, t, D)).

    One softmax over both parts, with the maximum and the normaliser of the two, as the
    attention over their concatenation gives it up to float rounding (the prefix/suffix split
    of Juravsky et al. 2024, "Hydragen"). Any pass without a shared prefix (the query's own)
    is transformers' scaled-dot-product attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[2] != 1 or dropout:
        raise ValueError("The shared-prefix attention reads one new token per row, without "
                         "dropout.")
    prefix_keys = shared_prefix.keys[module.layer_idx]
    prefix_values = shared_prefix.values[module.layer_idx]
    shared_prefix.reads += 1
    groups, kv_heads, _, dim = prefix_keys.shape
    rows, heads, t = query.shape[0], query.shape[1], key.shape[2]
    k, rep = rows // groups, heads // kv_heads  # rows per group, query heads per key head
    scale = dim ** -0.5 if scaling is None else scaling
    # Row-major views of the step's tensors, (G, K, Hkv, ...): a row's own keys need no copy.
    q = query.view(groups, k, kv_heads, rep, dim)                           # (G, K, Hkv, R, D)
    own_keys = key.view(groups, k, kv_heads, t, dim)
    own_values = value.view(groups, k, kv_heads, t, dim)
    # The prefix part in group-major order, (G, Hkv, K*R, ...): one product per key head.
    by_group = q.transpose(1, 2).reshape(groups, kv_heads, k * rep, dim)
    shared = (by_group @ prefix_keys.transpose(-1, -2)) * scale + shared_prefix.bias
    own = (q @ own_keys.transpose(-1, -2)) * scale                          # (G, K, Hkv, R, t)

    def row_major(x: Tensor) -> Tensor:  # (G, Hkv, K*R) -> (G, K, Hkv, R, 1)
        return x.view(groups, kv_heads, k, rep).transpose(1, 2).unsqueeze(-1)

    top = torch.maximum(row_major(shared.amax(-1)), own.amax(-1, keepdim=True))
    own = (own - top).exp()
    shared = (shared - top.transpose(1, 2).reshape(groups, kv_heads, k * rep, 1)).exp()
    total = own.sum(-1, keepdim=True) + row_major(shared.sum(-1))
    out_shared = (shared @ prefix_values).view(groups, kv_heads, k, rep, dim).transpose(1, 2)
    out = (out_shared + own @ own_values) / total                            # (G, K, Hkv, R, D)
    return out.reshape(rows, 1, heads, dim), None


def _register() -> None:
    """Make the attention and its masks (the scaled-dot-product ones) known to transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SHARED_PREFIX, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX, sdpa_mask)
