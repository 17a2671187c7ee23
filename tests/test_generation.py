"""Rollouts: per-sample length limits, EOS masks, and log-probs that match the sampler's.

``response_mask`` and ``draw_lengths`` are checked on hand-made tensors. ``Policy.generate``
and ``Policy.forward`` are checked on the tiny T5 and the tiny GPT-2: against ``decode`` run
directly with the same seed, against a teacher-forced forward pass, and against
``model.generate``'s scores. The tiny models almost never sample EOS,
so these tests raise the EOS logit (a real weight change, no mock) until responses end at
varied lengths.
"""

from __future__ import annotations

import pytest
import torch

from detoxrl.config import ModelConfig, SamplingConfig
from detoxrl.models.decoding import decode
from detoxrl.models.generation import collate_queries, draw_lengths, response_mask
from detoxrl.models.policy import Policy
from detoxrl.models.rollout import Rollout

EOS = 1
PROMPTS = [
    "#Person1#: Hi, how are you?",
    "#Person1#: I think the meeting is going to be late again.\n#Person2#: Really? I didn't "
    "know that. We should talk about the meeting tomorrow.",
    "Good morning.",
    "#Person1#: Could you tell me more about the bank?\n#Person2#: It's about twenty dollars.",
]


# --------------------------------------------------------------------------- helpers

def encode(policy: Policy, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [policy.tokenizer(p).input_ids for p in prompts]
    return collate_queries(rows, policy.tokenizer.pad_token_id, policy.padding_side)


def make_eos_likely(policy: Policy, p_eos: float) -> None:
    """Shift the EOS row of the output layer so that EOS has mean probability ``p_eos``.

    The row moves along the mean final hidden state of sampled responses, so the EOS
    probability still varies from token to token; the step size is found by bisection.
    """
    base, eos = policy.model.get_base_model(), policy.tokenizer.eos_token_id
    q, qm = encode(policy, PROMPTS)
    torch.manual_seed(0)
    r = policy.generate(q, qm, SamplingConfig(min_length=0), [12] * len(PROMPTS))
    with torch.no_grad():
        if policy.is_seq2seq:
            start = torch.full_like(r.response_ids[:, :1], base.config.decoder_start_token_id)
            out = base(input_ids=q, attention_mask=qm, output_hidden_states=True,
                       decoder_input_ids=torch.cat([start, r.response_ids[:, :-1]], 1))
            hidden = out.decoder_hidden_states[-1]
        else:
            out = base(input_ids=torch.cat([q, r.response_ids], 1), output_hidden_states=True,
                       attention_mask=torch.cat([qm, r.response_mask], 1))
            hidden = out.hidden_states[-1][:, q.shape[1] - 1:-1]
        hidden = hidden[r.response_mask.bool()]                         # (N, H)
        weight = base.get_output_embeddings().weight
        mean = hidden.mean(0)
        direction = mean / mean.dot(mean)                               # +1 logit at the mean
        logits, along = hidden @ weight.T, hidden @ direction
        low, high = 0.0, 50.0
        for _ in range(40):
            shift = (low + high) / 2
            shifted = logits.clone()
            shifted[:, eos] += shift * along
            if shifted.softmax(-1)[:, eos].mean() < p_eos:
                low = shift
            else:
                high = shift
        weight[eos] += shift * direction


def sampled_response(policy: Policy, sequences: torch.Tensor, query_width: int) -> torch.Tensor:
    """The new tokens of ``model.generate`` output (after the decoder start or the query)."""
    return sequences[:, 1:] if policy.is_seq2seq else sequences[:, query_width:]


def first_seed(sample, accept, tries: int = 12):
    """``(seed, result)`` for the first seed whose ``sample(seed)`` satisfies ``accept``.

    The tests want batches that show both ended and cut responses; which seed gives one
    depends on the tiny models' random weights, so a few seeds are tried in order.
    """
    for seed in range(tries):
        torch.manual_seed(seed)
        result = sample(seed)
        if accept(result):
            return seed, result
    pytest.fail(f"no seed in range({tries}) gave the batch this test needs")


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def eos_policy(request) -> Policy:
    path = request.getfixturevalue(f"tiny_{request.param}_path")
    policy = Policy.from_pretrained(ModelConfig(name_or_path=str(path)))
    assert policy.tokenizer.eos_token_id == EOS
    make_eos_likely(policy, p_eos=0.05)
    return policy


# --------------------------------------------------------------------------- response_mask

def test_response_mask_hand_made():
    tokens = torch.tensor([
        [1, 5, 6, 7, 8],   # EOS at position 0
        [5, 6, 7, 8, 9],   # no EOS: runs to its limit
        [5, 6, 7, 1, 9],   # EOS at 3, beyond the limit of 2
        [5, 6, 1, 7, 1],   # EOS at 2, the last position within the limit of 3; a second EOS
        [5, 1, 7, 1, 9],   # limit 10 is wider than the tensor; first EOS at 1
        [5, 6, 7, 8, 9],   # limit 10 is wider than the tensor; no EOS
        [5, 6, 7, 1, 9],   # EOS exactly at the limit (index 3, limit 3): cut, not ended
    ])
    limits = torch.tensor([5, 4, 2, 3, 10, 10, 3])
    mask, ended = response_mask(tokens, limits, eos_token_id=1)
    assert mask.shape == tokens.shape and mask.dtype == torch.long
    assert ended.dtype == torch.bool and ended.shape == (7,)
    assert mask.tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]
    assert ended.tolist() == [True, False, False, True, True, False, False]


def test_response_mask_matches_a_loop_on_random_tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (64, 12), generator=g)          # EOS (1) is frequent
    limits = torch.randint(1, 16, (64,), generator=g)
    mask, ended = response_mask(tokens, limits, eos_token_id=1)
    for row, limit, m, e in zip(tokens.tolist(), limits.tolist(), mask.tolist(), ended.tolist(),
                                strict=True):
        within = row[:limit]
        length = within.index(1) + 1 if 1 in within else len(within)
        assert m == [1] * length + [0] * (len(row) - length)
        assert e == (1 in within)


# --------------------------------------------------------------------------- draw_lengths

def test_draw_lengths_tutorial_distribution():
    draws = draw_lengths(10000, 100, 400, torch.Generator().manual_seed(0))
    assert len(draws) == 10000 and all(isinstance(d, int) for d in draws)
    assert min(draws) == 100 and max(draws) == 400                 # both ends included
    assert len(set(draws)) == 301                                  # every length occurs
    values = torch.tensor(draws, dtype=torch.float64)
    # U{100..400}: mean 250, std sqrt((301^2 - 1) / 12) = 86.9; the mean's std is 0.87.
    assert abs(values.mean().item() - 250) < 4
    assert abs(values.std().item() - 86.9) < 3
    quarters = torch.histc(values, bins=4, min=100, max=400)
    assert all(abs(q - 2500) < 250 for q in quarters.tolist())


def test_draw_lengths_is_seeded_and_handles_a_point_range():
    a = draw_lengths(50, 3, 9, torch.Generator().manual_seed(7))
    b = draw_lengths(50, 3, 9, torch.Generator().manual_seed(7))
    assert a == b and all(3 <= x <= 9 for x in a)
    assert draw_lengths(5, 4, 4, torch.Generator().manual_seed(0)) == [4] * 5


# --------------------------------------------------------------------------- Policy.generate

@pytest.mark.parametrize(("top_k", "top_p", "temperature"), [(0, 0.6, 0.7), (40, 0.8, 1.3)])
def test_generate_draws_only_from_the_filtered_distribution(eos_policy, top_k, top_p,
                                                            temperature):
    """Every token ``Policy.generate`` samples lies in the top-k and nucleus set of the
    model's own distribution at its position (teacher-forced forward, sorting reference),
    and none is EOS before min_length."""
    from detoxrl.models.sampler import nucleus_mask_sorted

    policy, steps = eos_policy, 8
    q, qm = encode(policy, PROMPTS * 4)
    sampling = SamplingConfig(min_new_tokens_draw=steps, max_new_tokens_draw=steps,
                              min_length=4, top_k=top_k, top_p=top_p, temperature=temperature)
    torch.manual_seed(3)
    rollout = policy.generate(q, qm, sampling)
    ids, mask = rollout.response_ids, rollout.response_mask
    with torch.no_grad():
        out = policy(q, qm, ids, mask, temperature=temperature, eos_blocked=4)
    # Log-probs of every token, recomputed for the full rows: (B, T, V).
    full = _teacher_forced_logprobs(policy, q, qm, ids, mask, temperature, eos_blocked=4)
    torch.testing.assert_close(full.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask,
                               out.logprobs * mask, atol=1e-5, rtol=0)
    weights = full.exp()
    if top_k:
        floor = weights.topk(top_k, dim=-1).values[..., -1:]
        weights = torch.where(weights >= floor, weights, 0.0)
    allowed = nucleus_mask_sorted(weights.flatten(0, 1), top_p).view_as(weights) & (weights > 0)
    picked = allowed.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert picked[mask.bool()].all()
    assert (allowed.sum(-1)[mask.bool()] > 1).any()                  # the filter left choice
    assert (ids[:, :4] != EOS).all()
    assert len(set(rollout.responses)) > 8                             # it did sample


def _teacher_forced_logprobs(policy, q, qm, ids, mask, temperature, eos_blocked):
    """(B, T, V) log-probs of the scored distribution at every response position."""
    from detoxrl.models.generation import block_token

    with torch.no_grad():
        if policy.is_seq2seq:
            logits, _ = policy._seq2seq_logits(q, qm, ids, mask)
        else:
            logits, _ = policy._causal_logits(q, qm, ids, mask)
    logits = block_token(logits.float() / temperature, EOS, eos_blocked)
    return logits.log_softmax(-1)


def test_generate_shapes_masks_and_limits(eos_policy):
    policy, tok = eos_policy, eos_policy.tokenizer
    q, qm = encode(policy, PROMPTS * 2)
    limits = [3, 12, 12, 12, 3, 12, 12, 12]
    sampling = SamplingConfig(min_length=0)
    seed, rollout = first_seed(
        lambda _: policy.generate(q, qm, sampling, limits),
        lambda r: bool(r.ended_with_eos.any() and not r.ended_with_eos.all()))
    # The same decoding loop, run directly with the same seed, gives the untrimmed tokens.
    torch.manual_seed(seed)
    encoder_hidden = (policy.model.get_encoder()(input_ids=q, attention_mask=qm)
                      .last_hidden_state if policy.is_seq2seq else None)
    raw = decode(policy.model.get_base_model(), q, qm, sampling, max(limits), 0,
                 tok.eos_token_id, tok.pad_token_id, encoder_hidden).tokens

    assert isinstance(rollout, Rollout) and len(rollout) == 8
    ids, mask = rollout.response_ids, rollout.response_mask
    width = ids.shape[1]
    assert ids.shape == mask.shape == (8, width)
    assert width == int(mask.sum(1).max()) <= max(limits)          # trimmed to the longest
    assert torch.equal(rollout.query_ids, q) and torch.equal(rollout.query_mask, qm)
    assert set(mask.unique().tolist()) <= {0, 1}
    assert (mask[:, 1:] <= mask[:, :-1]).all()                     # ones, then zeros
    assert raw.shape[1] > 3                                        # limit 3 really cuts

    for i, limit in enumerate(limits):
        within = raw[i, :limit].tolist()
        expected = within.index(EOS) + 1 if EOS in within else limit
        n = int(mask[i].sum())
        assert n == expected <= limit
        assert ids[i, :n].tolist() == raw[i, :n].tolist()
        assert (ids[i, n:] == tok.pad_token_id).all()
        assert bool(rollout.ended_with_eos[i]) == (EOS in within)
        assert EOS not in ids[i, :n - 1].tolist()
        assert (ids[i, n - 1] == EOS) == bool(rollout.ended_with_eos[i])
    assert int(mask[0].sum()) <= 3 and int(mask[4].sum()) <= 3

    assert rollout.queries == tok.batch_decode(q, skip_special_tokens=True)
    assert rollout.responses == tok.batch_decode(ids, skip_special_tokens=True)
    assert len(rollout.queries) == len(rollout.responses) == 8
    assert all(isinstance(s, str) for s in rollout.queries + rollout.responses)


def test_generate_keeps_given_queries_and_default_limit(eos_policy):
    q, qm = encode(eos_policy, PROMPTS[:2])
    torch.manual_seed(0)
    rollout = eos_policy.generate(q, qm, SamplingConfig(max_new_tokens_draw=4, min_length=0),
                                  queries=["a", "b"])
    assert rollout.queries == ["a", "b"]
    assert (rollout.response_mask.sum(1) <= 4).all()
    assert rollout.response_ids.shape[1] <= 4


def test_generate_k_samples_per_prompt_equals_repeated_prompts(eos_policy):
    """K samples per prompt in one call: rows i*K..i*K+K-1 answer prompt i, exactly as
    a batch holding each prompt K times would (same seed, same sampler). A causal LM reads
    each prompt once and copies its cache."""
    k, limits = 3, [4, 9, 9, 9]
    q, qm = encode(eos_policy, PROMPTS)
    sampling = SamplingConfig(min_length=2)
    embed = eos_policy.model.get_base_model().get_input_embeddings()
    rows_read = []
    hook = embed.register_forward_hook(lambda m, args, out: rows_read.append(args[0].shape))
    torch.manual_seed(5)
    grouped = eos_policy.generate(q, qm, sampling, limits, queries=list("abcd"),
                                  num_return_sequences=k, with_logprobs=True)
    hook.remove()
    torch.manual_seed(5)
    repeated = eos_policy.generate(q.repeat_interleave(k, 0), qm.repeat_interleave(k, 0),
                                   sampling, [n for n in limits for _ in range(k)],
                                   with_logprobs=True)
    assert len(grouped) == 4 * k and grouped.queries == [c for c in "abcd" for _ in range(k)]
    assert torch.equal(grouped.response_ids, repeated.response_ids)
    assert torch.equal(grouped.response_mask, repeated.response_mask)
    for name in ("logprobs", "unblocked_logprobs"):
        torch.testing.assert_close(getattr(grouped, name), getattr(repeated, name),
                                   atol=1e-5, rtol=0)
    if not eos_policy.is_seq2seq:
        assert rows_read[0] == q.shape and rows_read[1] == (4 * k, 1)
    assert (grouped.response_mask[:k].sum(1) <= 4).all()            # prompt 0's own limit
    assert len(set(grouped.responses[k:2 * k])) > 1                 # K draws, not K copies
    with pytest.raises(Exception, match="num_return_sequences"):
        eos_policy.generate(q, qm, sampling, limits, num_return_sequences=0)


def test_generate_blocks_eos_before_min_length(eos_policy):
    q, qm = encode(eos_policy, PROMPTS * 2)
    seed, _ = first_seed(
        lambda _: eos_policy.generate(q, qm, SamplingConfig(min_length=0), [8] * 8),
        lambda r: bool((r.response_mask.sum(1) < 4).any()))      # EOS comes early
    torch.manual_seed(seed)
    held = eos_policy.generate(q, qm, SamplingConfig(min_length=4), [8] * 8)
    assert (held.response_mask.sum(1) >= 4).all()


# --------------------------------------------------------------------------- log-probs

def test_forward_logprobs_match_generate_scores(eos_policy):
    """``forward`` re-scores sampled tokens exactly as the sampler drew them (T = 0.7)."""
    policy, tok = eos_policy, eos_policy.tokenizer
    temperature, steps = 0.7, 10
    q, qm = encode(policy, PROMPTS * 2)
    if not policy.is_seq2seq:
        assert policy.padding_side == "left" and (qm[:, 0] == 0).any()

    def sample(_):
        out = policy.model.generate(
            input_ids=q, attention_mask=qm, max_new_tokens=steps, do_sample=True, top_k=0,
            top_p=1.0, temperature=temperature, output_scores=True,
            return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id)
        response = sampled_response(policy, out.sequences, q.shape[1])
        mask, ended = response_mask(response, torch.full((len(q),), steps), tok.eos_token_id)
        return out, response, mask, ended

    # A batch with responses that end on EOS after a few tokens, and one that does not.
    _, (out, response, mask, ended) = first_seed(
        sample, lambda r: bool((r[3] & (r[2].sum(1) > 1)).any() and not r[3].all()))
    last = mask.sum(1) - 1
    assert (response[ended, last[ended]] == tok.eos_token_id).all()    # EOS itself is scored
    scores = torch.stack(out.scores, dim=1).float()                  # (B, T, V)
    assert scores.shape[:2] == response.shape
    expected = scores.log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        got = policy(q, qm, response, mask, temperature=temperature).logprobs
    keep = mask.bool()
    assert torch.isfinite(got[keep]).all()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_and_values_match_the_forward_pass(eos_policy, temperature):
    """Log-probs and values read while sampling equal a teacher-forced forward within 1e-5
    (fp32), at the sampling temperature and under the sampler's EOS block (min_length),
    though top-k changes what the sampler draws from (the raw logits are read)."""
    policy = eos_policy
    q, qm = encode(policy, PROMPTS * 2)
    limits = [3, 12, 12, 12, 5, 12, 12, 12]
    sampling = SamplingConfig(min_length=4, top_k=20, temperature=temperature)
    seed, rollout = first_seed(
        lambda _: policy.generate(q, qm, sampling, limits, with_logprobs=True,
                                  with_values=True),
        lambda r: bool(r.ended_with_eos.any() and not r.ended_with_eos.all()))
    torch.manual_seed(seed)
    plain = policy.generate(q, qm, sampling, limits)
    assert torch.equal(rollout.response_ids, plain.response_ids)       # sampling unchanged
    assert rollout.encoder_hidden is None and plain.logprobs is None
    mask = rollout.response_mask
    assert rollout.logprobs.shape == rollout.values.shape == mask.shape
    assert rollout.eos_blocked == 3                     # min(min_length, smallest limit)
    with torch.no_grad():
        out = policy(rollout.query_ids, rollout.query_mask, rollout.response_ids, mask,
                     temperature=temperature, eos_blocked=rollout.eos_blocked)
        unblocked = policy(rollout.query_ids, rollout.query_mask, rollout.response_ids, mask,
                           temperature=temperature).logprobs
    torch.testing.assert_close(rollout.logprobs, out.logprobs * mask, atol=1e-5, rtol=0)
    # At the blocked positions the sampler's distribution has no EOS: every token there is
    # more likely than under the full softmax, exactly by the EOS mass removed.
    gain = (out.logprobs - unblocked)[:, :3]
    assert (gain > 0).all() and torch.equal(out.logprobs[:, 3:], unblocked[:, 3:])
    torch.testing.assert_close(rollout.values, out.values * mask, atol=1e-5, rtol=0)
    assert (rollout.logprobs[mask.bool()] < 0).all()
    with pytest.raises(ValueError, match="with_logprobs"):
        policy.generate(q, qm, sampling, limits, with_values=True)
