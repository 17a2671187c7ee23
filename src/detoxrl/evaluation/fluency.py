"""Fluency: the conditional perplexity of each response given its prompt.

As in Liu et al. 2021 (DExperts) and Lu et al. 2022 (Quark): the response is re-tokenized
by the fluency model's tokenizer (no special tokens), scored given its prompt, and its
perplexity is ``exp(mean negative log-likelihood of its tokens)``. A causal LM reads
``prompt + response`` and only the response positions count; a seq2seq model encodes the
prompt and scores the response as the decoder's target. An empty response has no
perplexity (NaN), and the per-prompt means skip it.

This module serves ``--fluency-model``, any causal LM or seq2seq model. The default fluency
model is the reference policy (the run's starting model, adapter off); it scores the very
token ids it and the trained policy sampled (``evaluation.sampling.perplexity`` of
``reference_logprobs``, or of the log-probs read while it sampled), which needs no
re-tokenization: the perplexity of the generated tokens, as the KL is.

Topicality asks whether a response is about its prompt: a policy can lower a toxicity
classifier's score with generic lines that ignore the prompt, which neither the length,
distinct-n nor the perplexity catches (a generic line is *likely*). Under the starting
policy, per response,

    PMI = (log p(response | prompt) - log p(response | nothing)) / n_tokens   (nats/token)

the log perplexity without the prompt minus the log perplexity with it (Church & Hanks
1990's pointwise mutual information, per token; "nothing" is the empty prompt as the
tokenizer encodes it, T5's EOS, or one start token where that is empty). Near 0: the
prompt does not help predict the response. The evaluation takes it of the token ids that
were generated (:func:`pmi_of_ids`), as the perplexity and the KL: the term given the prompt
is what its sampling and reference passes read (nothing blocked), the term without it one
more pass. :func:`pmi` takes it of texts, re-tokenized (responses kept without their ids).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

REFERENCE = "reference policy (adapter off)"


@dataclass
class FluencyModel:
    """A language model that scores responses."""

    name: str
    model: Any
    tokenizer: Any
    is_seq2seq: bool


def load_fluency_model(name: str, device: torch.device) -> FluencyModel:
    """Any causal LM or seq2seq model by Hub id or folder, in fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..errors import DetoxError, ModelLoadError
    from ..models import tiny
    from ..models.loading import load_config, load_pretrained, load_tokenizer

    try:
        source = tiny.resolve(name)
        config = load_config(source)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = load_pretrained(auto, source, dtype=torch.float32)
        tokenizer = load_tokenizer(source)
    except (DetoxError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load the fluency model {name!r}: {exc} --fluency-model "
                             "takes a causal LM or a seq2seq model (Hub id or folder); leave "
                             "it out to use the reference policy.") from None
    return FluencyModel(name, model.to(device).eval(), tokenizer, config.is_encoder_decoder)


def reference_model(policy) -> FluencyModel:
    """The policy's own network as a fluency model; it is the starting policy only inside
    ``with policy.reference():``."""
    return FluencyModel(REFERENCE, policy.model, policy.tokenizer, policy.is_seq2seq)


def pmi(fm: FluencyModel, prompts: Sequence[str], responses: Sequence[str],
        batch_size: int = 64) -> np.ndarray:
    """``(N,)`` per-token PMI of each response text with its prompt; NaN for an empty one."""
    targets = encode_responses(fm.tokenizer, responses, fm.name)
    with_prompt = _perplexities(fm, _encode_prompts(fm, prompts), targets, batch_size)
    without = _perplexities(fm, _no_prompt(fm, len(targets)), targets, batch_size)
    return np.log(without) - np.log(with_prompt)


def pmi_of_ids(fm: FluencyModel, ids: Sequence[Sequence[int]], loglik: Sequence[float],
               batch_size: int = 64) -> np.ndarray:
    """``(N,)`` per-token PMI of generated token ids, given each one's log p(ids | prompt)
    under this model; NaN for an empty response."""
    n = np.array([len(x) for x in ids], dtype=float)
    without = _perplexities(fm, _no_prompt(fm, len(ids)), [list(x) for x in ids], batch_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, np.log(without) + np.asarray(loglik, dtype=float) / n, np.nan)


def encode_responses(tokenizer, responses: Sequence[str], name: str) -> list[list[int]]:
    """Token ids of each response, or a ConfigError when the tokenizer cannot encode them
    (unknown tokens, or nothing at all for a non-empty text)."""
    # verbose=False: _batch_nll cuts every sequence to the model's positions itself
    ids = tokenizer(list(responses), add_special_tokens=False, verbose=False)["input_ids"]
    unk = tokenizer.unk_token_id
    bad = [i for i, (text, seq) in enumerate(zip(responses, ids, strict=True))
           if (text.strip() and not seq) or (unk is not None and unk in seq)]
    if bad:
        example = responses[bad[0]]
        raise ConfigError(
            f"The fluency model {name!r} cannot encode {len(bad)} of {len(responses)} "
            f"responses: its tokenizer maps text such as {example[:60]!r} to unknown tokens. "
            "Its perplexity would be meaningless; pick a fluency model whose tokenizer covers "
            "the policy's output (a byte-level one such as GPT-2's), or leave --fluency-model "
            "out to use the reference policy.")
    return ids


@torch.no_grad()
def perplexities(fm: FluencyModel, prompts: Sequence[str], responses: Sequence[str],
                 batch_size: int = 16) -> np.ndarray:
    """``(N,)`` perplexity of each response given its prompt; NaN for an empty response."""
    targets = encode_responses(fm.tokenizer, responses, fm.name)
    return _perplexities(fm, _encode_prompts(fm, prompts), targets, batch_size)


def _encode_prompts(fm: FluencyModel, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the fluency model reads it; each distinct prompt is
    tokenized once (an evaluation repeats every prompt for each of its samples)."""
    distinct = list(dict.fromkeys(prompts))
    ids = fm.tokenizer(distinct, add_special_tokens=fm.is_seq2seq, verbose=False)["input_ids"]
    by_text = dict(zip(distinct, ids, strict=True))
    return [by_text[p] for p in prompts]


def _no_prompt(fm: FluencyModel, n: int) -> list[list[int]]:
    """The context of the PMI's term without the prompt, ``n`` times: the empty prompt as the
    tokenizer encodes it (``_batch_nll`` puts a start token where that is empty)."""
    return _encode_prompts(fm, [""] * n)


def _perplexities(fm: FluencyModel, contexts: list[list[int]], targets: list[list[int]],
                  batch_size: int) -> np.ndarray:
    """:func:`perplexities` of token ids: ``contexts`` and ``targets``, one of each per
    response."""
    out = np.full(len(targets), np.nan)
    device = next(fm.model.parameters()).device
    # Batches of rows with similar prompt and response lengths: a batch's width is its
    # longest row, and a causal LM's logits start at its shortest prompt, so mixed lengths
    # would mostly compute padding.
    order = sorted(range(len(targets)), key=lambda i: (len(contexts[i]), len(targets[i])))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            nll, counts = _batch_nll(fm, [contexts[i] for i in rows],
                                     [targets[i] for i in rows], device)
            ok = counts > 0
            out[np.asarray(rows)[ok]] = np.exp(nll[ok] / counts[ok])
    return out


def _batch_nll(fm: FluencyModel, contexts: list[list[int]], targets: list[list[int]],
               device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Summed negative log-likelihood of each target and its token count, ``(B,)`` each."""
    tok = fm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    limit = _max_positions(fm.model.config)
    # An empty prompt still needs one token: the encoder needs an input, and a causal LM a
    # context to predict the first response token from.
    start = next(t for t in (tok.bos_token_id, tok.eos_token_id, pad) if t is not None)
    contexts = [c or [start] for c in contexts]
    if fm.is_seq2seq:
        contexts = [c[-limit:] for c in contexts]
        q, qm = _pad_right(contexts, pad)
        t, tm = _pad_right([x[:limit] for x in targets], pad)
        # The decoder reads the targets shifted right, as with ``labels=``, but without the
        # loss the model would compute from them (a second pass over every logit).
        labels = torch.where(tm.bool(), t, -100).to(device)
        shift = getattr(fm.model, "prepare_decoder_input_ids_from_labels", None)
        target = ({"decoder_input_ids": shift(labels=labels)} if shift is not None
                  else {"labels": labels})
        logits = fm.model(input_ids=q.to(device), attention_mask=qm.to(device),
                          **target).logits.float()                          # (B, T, V)
        mask = tm
        logp = torch.log_softmax(logits, dim=-1).gather(-1, t.to(device).unsqueeze(-1))
    else:
        rows = [(c + x)[-limit:] for c, x in zip(contexts, targets, strict=True)]
        ids, am = _pad_right(rows, pad)
        n_target = [min(len(x), len(r) - 1) for x, r in zip(targets, rows, strict=True)]
        t = ids[:, 1:]
        mask = torch.zeros_like(t)
        for i, (row, n) in enumerate(zip(rows, n_target, strict=True)):
            mask[i, len(row) - 1 - n:len(row) - 1] = 1
        logp = _causal_target_logprobs(fm.model, ids.to(device), am.to(device),
                                       t.to(device), mask)                # (B, L-1, 1)
    nll = -(logp.squeeze(-1).cpu() * mask).sum(1)
    return nll.double().numpy(), mask.sum(1).double().numpy()


def _causal_target_logprobs(model, ids: torch.Tensor, attention_mask: torch.Tensor,
                            t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, L-1, 1)`` log p(t) at every position of ``mask`` (0 elsewhere).

    The logits, the bulk of a small LM's work, are computed only from the first column any
    row scores (``logits_to_keep`` as positions) rather than over the prompts as well;
    each kept position's log-prob is the one the full pass gives.
    """
    columns = mask.any(0).nonzero().squeeze(1)                                # (K,)
    first = int(columns[0]) if columns.numel() else 0
    forward = getattr(model, "get_base_model", lambda: model)().forward
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        first = 0
    keep = {} if first == 0 else {"logits_to_keep": torch.arange(first, mask.shape[1],
                                                                 device=ids.device)}
    logits = model(input_ids=ids, attention_mask=attention_mask, **keep).logits.float()
    logits = logits[:, :mask.shape[1] - first]                                # (B, L-1-f, V)
    picked = torch.log_softmax(logits, dim=-1).gather(-1, t[:, first:].unsqueeze(-1))
    return torch.cat([picked.new_zeros(t.shape[0], first, 1), picked], 1)


def _pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _max_positions(config) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024  # T5 has relative positions and no hard limit
