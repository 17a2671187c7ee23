"""The decoding loop of every rollout and evaluation, for decoder-only and encoder-decoder LMs.

One cached forward pass per new token (transformers' ``DynamicCache``; an
``EncoderDecoderCache`` of two for T5/BART), one token per row from
:func:`detoxrl.models.sampler.sample_next`, and, read from the same pass, the sampled token's
log-prob and the last hidden state (PPO's old log-probs and values). What ``generate`` did
per step besides that (logits processors, stopping criteria, input preparation) is not done.
On a GPU the steps run over a ``StaticCache`` and are replayed as CUDA graphs
(:mod:`detoxrl.models.graphs`); the loop around them is the same.

Rows that sampled EOS get the pad token afterwards, as ``generate`` gives them. The loop stops
when every row has ended or ``max_new_tokens`` is reached; under ZeRO-3 every forward is a
collective, so with ``synced_gpus`` a process keeps stepping (on pad tokens) until all have
stopped, as ``generate(synced_gpus=True)`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .generation import last_logit_only, real_positions
from .graphs import Step, causal_steps, seq2seq_steps
from .sampler import sample_next


class Decoded(NamedTuple):
    tokens: Tensor              # (B, T) new tokens, pad after EOS; T <= max_new_tokens
    logprobs: Tensor | None     # (B, T) each token's log-prob at the temperature, EOS blocked
    hidden: Tensor | None       # (B, T, H) the last hidden state that predicted each token
    unblocked_logprobs: Tensor | None = None  # (B, T) the log-probs with nothing blocked


@torch.no_grad()
def decode(model, query_ids: Tensor, query_mask: Tensor, sampling, max_new_tokens: int,
           eos_blocked: int, eos_token_id: int | None, pad_token_id: int,
           encoder_hidden: Tensor | None = None, with_logprobs: bool = False,
           with_hidden: bool = False, synced_gpus: bool = False, graphs: bool = False,
           repeats: int = 1) -> Decoded:
    """Up to ``max_new_tokens`` new tokens per query row.

    ``model``: a transformers LM (LoRA layers may sit inside it). Causal queries are
    left-padded; seq2seq queries come with their ``encoder_hidden`` (B, Q, H).
    ``sampling``: a ``SamplingConfig`` (do_sample, temperature, top_k, top_p); EOS is blocked
    at the first ``eos_blocked`` positions.
    ``graphs``: step over a static cache (:mod:`detoxrl.models.graphs`), replayed as a CUDA
    graph on a GPU and run eagerly elsewhere. Not under ``synced_gpus``, whose parameter
    gathering inside each step a graph cannot hold.
    ``repeats``: causal only, every query row is answered ``repeats`` times (rows
    ``i*repeats .. i*repeats + repeats-1`` of the output); the query is read once and its
    cache copied, where repeating the rows first would read it ``repeats`` times.
    """
    if graphs and synced_gpus:
        raise ValueError("CUDA-graph decoding cannot run with synced_gpus (ZeRO-3, FSDP).")
    if repeats > 1 and (graphs or model.config.is_encoder_decoder):
        # The static cache is sized for every row, and the encoder output comes repeated.
        query_ids = query_ids.repeat_interleave(repeats, dim=0)
        query_mask = query_mask.repeat_interleave(repeats, dim=0)
        repeats = 1
    step = _steps(model, query_ids, query_mask, encoder_hidden, max_new_tokens, with_hidden,
                  graphs, repeats)
    rows, device = query_ids.shape[0] * repeats, query_ids.device
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    padding = torch.full((rows,), pad_token_id, dtype=torch.long, device=device)
    tokens, logprobs, unblocked, hidden = [], [], [], []
    new, t = None, 0
    while True:
        logits, last_hidden = step(new)                                  # (B, V), (B, H)
        if t < max_new_tokens:
            drawn = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                eos_token_id, t < eos_blocked, sampling.do_sample,
                                inplace=True)
            new = torch.where(done, padding, drawn.tokens)                   # (B,)
            tokens.append(new)
            logprobs.append(drawn.logprobs)
            unblocked.append(drawn.unblocked_logprobs)
            hidden.append(last_hidden)
            if eos_token_id is not None:
                done = done | (new == eos_token_id)
        else:  # only under synced_gpus: stepping for the other processes
            new = padding
        t += 1
        stop = t >= max_new_tokens or bool(done.all())
        if synced_gpus:
            stop = _everyone(stop, device)
        if stop:
            break
    return Decoded(torch.stack(tokens, 1), _stacked(logprobs, with_logprobs),
                   _stacked(hidden, with_hidden), _stacked(unblocked, with_logprobs))


def _stacked(steps: list[Tensor], wanted: bool) -> Tensor | None:
    """(B, T, ...) from T per-step (B, ...) tensors, or None when not asked for."""
    return torch.stack(steps, 1) if wanted else None


def _steps(model, query_ids: Tensor, query_mask: Tensor, encoder_hidden: Tensor | None,
           max_new_tokens: int, with_hidden: bool, graphs: bool, repeats: int = 1) -> Step:
    """The step function for this architecture, over a static cache (recorded as a CUDA
    graph on a GPU) with ``graphs``, over transformers' dynamic caches otherwise."""
    record = graphs and query_ids.is_cuda
    if model.config.is_encoder_decoder:
        if graphs:
            return seq2seq_steps(model, query_mask, encoder_hidden, max_new_tokens, with_hidden,
                                 record)
        return _seq2seq_steps(model, query_mask, encoder_hidden, with_hidden)
    if graphs:
        return causal_steps(model, query_ids, query_mask, max_new_tokens, with_hidden, record)
    return _causal_steps(model, query_ids, query_mask, max_new_tokens, with_hidden, repeats)


def _everyone(stop: bool, device: torch.device) -> bool:
    """Whether every process has stopped (an all-reduce of the processes still going)."""
    import torch.distributed as dist

    going = torch.tensor(0.0 if stop else 1.0, device=device)
    dist.all_reduce(going)
    return going.item() == 0.0


def _causal_steps(model, query_ids: Tensor, query_mask: Tensor, max_new_tokens: int,
                  with_hidden: bool, repeats: int = 1) -> Step:
    """The step of a decoder-only LM: the whole query first, then one token per call.

    Position ids count real tokens only (left padding), as ``Policy.forward`` counts them, so
    a prompt's log-probs do not depend on the longest prompt in the batch. With ``repeats``
    the query's pass and cache are copied to its rows after the first call.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    width = query_ids.shape[1]
    mask = torch.cat([query_mask, query_mask.new_ones(query_mask.shape[0], max_new_tokens)], 1)
    mask = mask.repeat_interleave(repeats, dim=0)                              # (B*K, Q+T)
    positions = real_positions(query_mask)                                        # (B, Q)
    keep = last_logit_only(model)
    state = {"seen": width, "position": positions[:, -1:].repeat_interleave(repeats, dim=0)}

    def step(new: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if new is None:
            ids, pos, seen = query_ids, positions, query_mask
        else:
            ids, pos = new.unsqueeze(1), state["position"] + 1
            state["seen"] += 1
            state["position"] = pos
            seen = mask[:, :state["seen"]]
        out = model(input_ids=ids, attention_mask=seen, position_ids=pos, cache=cache,
                    use_cache=True, output_hidden_states=with_hidden, **keep)
        logits = out.logits[:, -1]                                               # (B, V)
        last = out.hidden_states[-1][:, -1] if with_hidden else None
        if new is None and repeats > 1:
            cache.batch_repeat_interleave(repeats)
            logits = logits.repeat_interleave(repeats, dim=0)                    # (B*K, V)
            last = None if last is None else last.repeat_interleave(repeats, dim=0)
        return logits, last

    return step


def _seq2seq_steps(model, query_mask: Tensor, encoder_hidden: Tensor,
                   with_hidden: bool) -> Step:
    """The step of an encoder-decoder LM: the decoder start token, then one token per call,
    every call reading the given encoder output."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    cache = EncoderDecoderCache(DynamicCache(config=model.config),
                                DynamicCache(config=model.config))
    encoder = BaseModelOutput(last_hidden_state=encoder_hidden)
    start = torch.full((encoder_hidden.shape[0], 1), model.config.decoder_start_token_id,
                       dtype=torch.long, device=encoder_hidden.device)

    def step(new: Tensor | None) -> tuple[Tensor, Tensor | None]:
        ids = start if new is None else new.unsqueeze(1)
        out = model(encoder_outputs=encoder, attention_mask=query_mask, decoder_input_ids=ids,
                    cache=cache, use_cache=True, output_hidden_states=with_hidden)
        last = out.decoder_hidden_states[-1][:, -1] if with_hidden else None
        return out.logits[:, -1], last

    return step
