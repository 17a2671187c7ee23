"""The next-token sampler: its draws follow the exact filtered distribution.

Each statistical test draws many tokens (one row per draw, one call) from a small
vocabulary with a fixed seed, and compares the frequencies with the distribution a slow
reference computes token by token: softmax at the temperature, EOS blocked, top-k with its
ties, then the nucleus as transformers' sorting warper defines it, with every token tied to
the last kept one kept. A chi-square test must not reject (p > 1e-3) and no token outside
the set may appear.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from detoxrl.models.sampler import (
    BLOCK,
    categorical,
    mass_above,
    nucleus_mask_sorted,
    sample_next,
)

DRAWS = 200_000


def reference(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, eos=None,
              blocked=False) -> list[float]:
    """The filtered, renormalised distribution, by loops over a Python list."""
    scored = [x / temperature for x in logits]
    if blocked:
        scored[eos] = -math.inf
    top = max(scored)
    probs = [math.exp(x - top) for x in scored]
    if top_k:
        floor = sorted(scored, reverse=True)[top_k - 1]
        probs = [p if x >= floor else 0.0 for p, x in zip(probs, scored, strict=True)]
    total = sum(probs)
    probs = [p / total for p in probs]
    if top_p < 1.0:
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept, before = [], 0.0
        for i in order:
            if before >= top_p and kept:
                break
            kept.append(i)
            before += probs[i]
        least = probs[kept[-1]]
        probs = [p if p >= least else 0.0 for p in probs]
    total = sum(probs)
    return [p / total for p in probs]


def frequencies(logits: list[float], seed: int = 0, draws: int = DRAWS,
                **settings) -> torch.Tensor:
    rows = torch.tensor(logits).repeat(draws, 1)                              # (N, V)
    drawn = sample_next(rows, generator=torch.Generator().manual_seed(seed), **settings)
    return torch.bincount(drawn.tokens, minlength=len(logits)).double()


def assert_matches(counts: torch.Tensor, expected: list[float]) -> None:
    expected = torch.tensor(expected, dtype=torch.float64)
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token outside the filtered set"
    observed = counts[support].numpy()
    test = chisquare(observed, expected[support].numpy() * observed.sum())
    assert test.pvalue > 1e-3, (observed / observed.sum(), expected[support])


LOGITS = [2.0, 1.5, 1.5, 0.3, -0.2, 1.0, -1.0, 0.8, 0.0, -3.0, 0.5, 1.9, -0.7, 0.1]


@pytest.mark.parametrize("settings", [
    {},
    {"top_p": 0.9},
    {"top_p": 0.5, "temperature": 0.7},
    {"top_p": 0.95, "temperature": 1.6},
    {"top_k": 5},
    {"top_k": 3, "temperature": 1.3},        # the k-th value is tied: both copies stay
    {"top_k": 6, "top_p": 0.8, "temperature": 0.8},
    {"top_p": 0.9, "eos": 0, "blocked": True},
])
def test_draws_follow_the_exact_filtered_distribution(settings):
    expected = reference(LOGITS, **settings)
    args = dict(settings)
    eos, blocked = args.pop("eos", None), args.pop("blocked", False)
    counts = frequencies(LOGITS, eos_token_id=eos, eos_blocked=blocked, **args)
    assert_matches(counts, expected)


def test_tokens_tied_with_the_last_kept_one_are_all_kept():
    """probabilities .3 .2 .2 .2 .1, top_p .45: the mass before the second token is .3, so
    the nucleus ends at a probability of .2, and all three tokens of .2 are in it."""
    logits = [math.log(p) for p in (0.3, 0.2, 0.2, 0.2, 0.1)]
    expected = reference(logits, top_p=0.45)
    assert [p > 0 for p in expected] == [True, True, True, True, False]
    assert_matches(frequencies(logits, top_p=0.45), expected)


def test_a_nucleus_ending_exactly_at_top_p_keeps_the_next_token_out():
    """.5 and .25 make .75 before the third token: top_p .75 stops there (mass before must
    be *below* top_p); 0.7500001 lets the third in."""
    logits = [math.log(p) for p in (0.5, 0.25, 0.125, 0.125)]
    assert_matches(frequencies(logits, top_p=0.75), [2 / 3, 1 / 3, 0.0, 0.0])
    assert_matches(frequencies(logits, top_p=0.7500001), [0.5, 0.25, 0.125, 0.125])


def test_a_small_nucleus_that_most_first_draws_miss():
    """A flat row where the nucleus is 2 of 300 tokens: most rows are rejected every round
    and take the sorting fallback; the draws still follow the nucleus."""
    logits = [3.0, 2.9] + [0.0] * 298
    expected = reference(logits, top_p=0.1)
    assert sum(p > 0 for p in expected) == 2
    assert_matches(frequencies(logits, draws=20_000, top_p=0.1), expected)


def test_categorical_never_draws_zero_weight_tokens_across_blocks():
    """Weights over three blocks, the last one short, with zeros at the block edges and a
    whole empty block: the draws match the weights."""
    vocab = 2 * BLOCK + 37
    weights = torch.zeros(vocab, dtype=torch.float64)
    positive = [1, BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 5, vocab - 1]
    weights[positive] = torch.tensor([1.0, 3.0, 0.5, 2.0, 1e-3], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    u = 1.0 - torch.rand(DRAWS // 4, generator=gen, dtype=torch.float64)
    drawn = categorical(weights.float().repeat(DRAWS // 4, 1), u)
    counts = torch.bincount(drawn, minlength=vocab).double()
    assert_matches(counts, (weights / weights.sum()).tolist())
    assert categorical(weights.float()[None], torch.ones(1, dtype=torch.float64)) == vocab - 1


def test_nucleus_mask_is_transformers_top_p_set():
    """The sorting reference keeps the same set as transformers' ``TopPLogitsWarper`` on
    rows from flat to peaked (no ties), with a token already at -inf."""
    from transformers import TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    for top_p in (0.5, 0.9, 0.99):
        for scale in (0.3, 3.0, 12.0):
            scores = torch.randn(64, 500, generator=gen) * scale
            scores[:, 1] = float("-inf")
            expected = ~torch.isinf(TopPLogitsWarper(top_p)(None, scores.clone()))
            assert torch.equal(nucleus_mask_sorted(scores.softmax(-1), top_p), expected)


def test_the_membership_test_agrees_with_the_sorting_reference():
    """``mass_above(w, c) < top_p * sum(w)`` for every token c is the sorted nucleus."""
    gen = torch.Generator().manual_seed(2)
    weights = (torch.randn(16, 300, generator=gen) * 2).softmax(-1)
    weights[:, :3] = weights[:, 3:4]                                           # ties
    for top_p in (0.3, 0.9):
        kept = nucleus_mask_sorted(weights, top_p)
        for token in range(0, 300, 7):
            column = torch.full((16,), token)
            assert torch.equal(mass_above(weights, column) < top_p * weights.sum(-1),
                               kept[:, token])


def test_logprobs_are_the_scored_distributions_and_greedy_takes_the_first_maximum():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50, generator=gen) * 4
    logits[0, [7, 9]] = 30.0                                                   # a tie at the max
    for temperature, blocked in ((1.0, False), (0.6, True)):
        drawn = sample_next(logits, temperature, top_k=10, top_p=0.8, eos_token_id=7,
                            eos_blocked=blocked, generator=gen)
        scored = logits / temperature
        if blocked:
            scored[:, 7] = torch.finfo(torch.float32).min
        expected = scored.log_softmax(-1).gather(1, drawn.tokens[:, None]).squeeze(1)
        torch.testing.assert_close(drawn.logprobs, expected, atol=1e-6, rtol=0)
    greedy = sample_next(logits, do_sample=False, eos_token_id=7, eos_blocked=False)
    assert torch.equal(greedy.tokens, logits.argmax(-1)) and greedy.tokens[0] == 7
    assert sample_next(logits, do_sample=False, eos_token_id=7, eos_blocked=True).tokens[0] == 9


def test_underflowing_probabilities_still_give_exact_logprobs():
    """A token drawn at greedy with EOS blocked, next to a huge logit, has a probability
    below float32's range; its log-prob comes from log_softmax instead."""
    logits = torch.tensor([[200.0, 0.0, -5.0]])
    drawn = sample_next(logits, do_sample=False, eos_token_id=0, eos_blocked=True)
    assert drawn.tokens.item() == 1
    expected = torch.tensor([[float(torch.finfo(torch.float32).min), 0.0, -5.0]])
    torch.testing.assert_close(drawn.logprobs, expected.log_softmax(-1)[:, 1])


def test_unblocked_logprobs_are_the_bare_distributions():
    """With EOS blocked, the draw also reports each token's log-prob with nothing blocked:
    log_softmax of the plain logits, from the blocked one without a second vocabulary pass
    (generation.unblock); with nothing blocked the two are the same tensor."""
    from detoxrl.models.generation import unblock

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(256, 40, generator=gen) * 3
    logits[:8, 3] = 12.0                                        # EOS very likely in a few rows
    for temperature in (1.0, 0.7):
        drawn = sample_next(logits, temperature, eos_token_id=3, eos_blocked=True,
                            generator=gen)
        assert not (drawn.tokens == 3).any()
        expected = (logits / temperature).log_softmax(-1).gather(1, drawn.tokens[:, None])
        torch.testing.assert_close(drawn.unblocked_logprobs, expected.squeeze(1), atol=1e-5,
                                   rtol=0)
        assert (drawn.unblocked_logprobs <= drawn.logprobs).all()
        assert (drawn.unblocked_logprobs[:8] < drawn.logprobs[:8] - 1).all()
    free = sample_next(logits, eos_token_id=3, eos_blocked=False, generator=gen)
    assert free.unblocked_logprobs is free.logprobs
    # By hand: logits (0, 0, log 2) with token 2 = EOS blocked; token 0 has p_b = 1/2 and,
    # unblocked, 1 / (1 + 1 + 2) = 1/4.
    got = unblock(torch.tensor([-math.log(2.0)]), torch.tensor([0.0]),
                  torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(got, torch.tensor([-math.log(4.0)]))


def test_inplace_draw_equals_the_copying_one():
    """``inplace=True`` (the decoding loop's own logits) blocks EOS in the caller's tensor and
    draws exactly what the copying call draws, the unblocked log-probs included."""
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(3)) * 3
    logits[:8, 3] = 12.0
    for temperature, blocked in ((1.0, True), (0.7, True), (1.0, False)):
        kept = logits.clone()
        copied = sample_next(kept, temperature, top_p=0.9, eos_token_id=3, eos_blocked=blocked,
                             generator=torch.Generator().manual_seed(1))
        assert torch.equal(kept, logits)
        owned = logits.clone()
        written = sample_next(owned, temperature, top_p=0.9, eos_token_id=3,
                              eos_blocked=blocked, generator=torch.Generator().manual_seed(1),
                              inplace=True)
        for a, b in zip(copied, written, strict=True):
            assert torch.equal(a, b)
        # At T = 1 the float32 logits themselves were the scored ones: EOS is written there.
        if blocked and temperature == 1.0:
            assert (owned[:, 3] == torch.finfo(torch.float32).min).all()
        else:
            assert torch.equal(owned, logits)
