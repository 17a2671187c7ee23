"""Decoding steps over a static KV cache, replayed as CUDA graphs on a GPU.

A decoding step is small work cut into many kernels: on an H200 at the gpt2 shape a rollout
launched 444 kernels per new token and the GPU was busy 7% of the time, waiting for the
host (``bench/results/gpu-h200.md``). A CUDA graph records one step's kernels once and
replays them with a single launch. Replaying needs every step to have the same shapes and
to read the same addresses, so these steps keep:

- transformers' ``StaticCache`` (an ``EncoderDecoderCache`` of two for T5/BART), sized for
  the whole decode, whose layers track their own length on the device;
- the new token and its position in fixed buffers, copied in before each replay;
- a 4D additive attention mask over the whole cache, opened one column per step, which
  transformers takes as given: its own mask building reads values back to the host, and
  that cannot happen inside a recording.

The first step after the prompt runs eagerly (it warms up the kernels a recording may not
load); the second is recorded and every later one replayed. Each ``decode`` call records
its own graph, so a graph never outlives the cache, batch or adapter setting it saw.
With ``record=False`` the same steps run eagerly: on the CPU, and in the tests that check
these steps give the dynamic cache's tokens and log-probs. Imports torch, transformers and
:mod:`detoxrl.models.generation`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .generation import last_logit_only, real_positions

Step = Callable[[Tensor | None], tuple[Tensor, Tensor | None]]
Run = Callable[[], tuple[Tensor, Tensor | None]]


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``allowed``, the dtype's lowest value elsewhere: the 4D mask transformers adds
    to attention scores (a fully masked row stays finite, as transformers' own masks do)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def replayed(run: Run, record: bool) -> Run:
    """``run`` as it will be called from the second call on: recorded into a CUDA graph on
    that call and replayed after, when ``record``; called as is otherwise.

    ``run`` must read and write only tensors that keep their addresses between calls. The
    returned logits are the graph's own buffer (read them before the next call); the hidden
    state is copied out, since the loop keeps every step's.
    """
    if not record:
        return run
    state: dict = {"calls": 0}

    def call() -> tuple[Tensor, Tensor | None]:
        state["calls"] += 1
        if state["calls"] == 1:
            return run()
        if "graph" not in state:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = run()
            state["graph"] = graph
        state["graph"].replay()
        logits, hidden = state["out"]
        return logits, None if hidden is None else hidden.clone()

    return call


def causal_steps(model, query_ids: Tensor, query_mask: Tensor, max_new_tokens: int,
                 with_hidden: bool, record: bool) -> Step:
    """The step of a decoder-only LM (left-padded queries) over a ``StaticCache``: the whole
    query first, then one token per call. Position ids count real tokens only, as
    ``Policy.forward`` counts them."""
    from transformers import StaticCache

    rows, width = query_ids.shape
    length = width + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=length)
    dtype = model.get_input_embeddings().weight.dtype
    keys = torch.cat([query_mask.bool(), query_mask.new_zeros(rows, max_new_tokens).bool()], 1)
    causal = torch.ones(width, length, dtype=torch.bool, device=keys.device).tril()   # (Q, L)
    prefill_mask = additive_mask(causal[None, None] & keys[:, None, None], dtype)    # (B,1,Q,L)
    positions = real_positions(query_mask)                                            # (B, Q)
    ids = query_ids.new_zeros(rows, 1)                                                # (B, 1)
    position = positions[:, -1:].clone()                                              # (B, 1)
    mask = additive_mask(keys[:, None, None], dtype)                                  # (B,1,1,L)
    seen = {"n": width}
    keep = last_logit_only(model)

    def forward(input_ids, attention_mask, position_ids) -> tuple[Tensor, Tensor | None]:
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, cache=cache, use_cache=True,
                    output_hidden_states=with_hidden, **keep)
        return out.logits[:, -1], out.hidden_states[-1][:, -1] if with_hidden else None

    run = replayed(lambda: forward(ids, mask, position), record)

    def step(new: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if new is None:
            return forward(query_ids, prefill_mask, positions)
        ids.copy_(new.unsqueeze(1))
        position.add_(1)
        mask[:, :, :, seen["n"]] = 0.0
        seen["n"] += 1
        return run()

    return step


def seq2seq_steps(model, query_mask: Tensor, encoder_hidden: Tensor, max_new_tokens: int,
                  with_hidden: bool, record: bool) -> Step:
    """The step of an encoder-decoder LM over static self- and cross-attention caches: the
    decoder start token, then one token per call, every call reading the encoder output."""
    from transformers import EncoderDecoderCache, StaticCache
    from transformers.modeling_outputs import BaseModelOutput

    rows, width = query_mask.shape
    cache = EncoderDecoderCache(StaticCache(config=model.config, max_cache_len=max_new_tokens),
                                StaticCache(config=model.config, max_cache_len=width))
    encoder = BaseModelOutput(last_hidden_state=encoder_hidden)
    dtype = encoder_hidden.dtype
    encoder_mask = additive_mask(query_mask.bool()[:, None, None], dtype)            # (B,1,1,Q)
    opened = torch.zeros(rows, 1, 1, max_new_tokens, dtype=torch.bool,
                         device=query_mask.device)
    mask = additive_mask(opened, dtype)                                               # (B,1,1,T)
    ids = torch.full((rows, 1), model.config.decoder_start_token_id, dtype=torch.long,
                     device=query_mask.device)
    seen = {"n": 0}

    def forward() -> tuple[Tensor, Tensor | None]:
        out = model(encoder_outputs=encoder, attention_mask=encoder_mask, decoder_input_ids=ids,
                    decoder_attention_mask=mask, cache=cache, use_cache=True,
                    output_hidden_states=with_hidden)
        return out.logits[:, -1], out.decoder_hidden_states[-1][:, -1] if with_hidden else None

    run = replayed(forward, record)

    def step(new: Tensor | None) -> tuple[Tensor, Tensor | None]:
        mask[:, :, :, seen["n"]] = 0.0
        seen["n"] += 1
        if new is None:  # the cross-attention cache is filled here, outside any recording
            return forward()
        ids.copy_(new.unsqueeze(1))
        return run()

    return step
