"""rl.math and rl.kl against hand arithmetic and against slow per-element reference loops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from detoxrl.models.generation import block_token, entropy_from_logits, entropy_from_logprobs
from detoxrl.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from detoxrl.rl.math import (
    RunningMoments,
    best_of_n_scores,
    gae_advantages,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    penalize_missing_eos,
    policy_loss,
    prefix_shaped_scores,
    value_loss,
)

B, T = 6, 9
LN2 = math.log(2.0)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=tol)


def right_padded(gen, b=B, t=T):
    """Random right-padded 0/1 float mask with lengths in [1, t]; also the lengths."""
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = 1  # always cover a length-1 response
    lengths[1] = t  # and a full-width one
    return (torch.arange(t) < lengths[:, None]).double(), lengths.tolist()


def with_garbage(x, mask, value=1e6):
    """x with padded positions overwritten, to prove nothing reads them."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------- masked statistics

def test_masked_sum_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_sum(x, mask).item() == 7.0  # 1 + 2 + 4; the NaN is padding
    assert close(masked_mean(x, mask), 7.0 / 3.0)
    assert close(masked_sum(x, mask, dim=1), [3.0, 4.0])
    assert close(masked_mean(x, mask, dim=1), [1.5, 4.0])  # 3/2, 4/1
    assert close(masked_mean(x, mask.bool()), masked_mean(x, mask))


def test_masked_mean_matches_loop(gen):
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask, lengths = right_padded(gen)
    rows = [sum(x[i, :n].tolist()) / n for i, n in enumerate(lengths)]
    flat = [v for i, n in enumerate(lengths) for v in x[i, :n].tolist()]
    assert close(masked_mean(x, mask, dim=1), rows)
    assert close(masked_mean(x, mask), sum(flat) / len(flat))


def test_masked_var_by_hand_and_errors():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 2; squared deviations 1, 0, 1 -> biased 2/3, unbiased 2/2 = 1
    assert close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    assert close(masked_var(x, mask), 1.0)
    assert masked_var(x, torch.tensor([1, 0, 0, 0]), unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match="no element"):
        masked_var(x, torch.zeros(4))
    with pytest.raises(ValueError, match="at least two"):
        masked_var(x, torch.tensor([0, 1, 0, 0]))


def test_masked_var_matches_loop(gen):
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask, lengths = right_padded(gen)
    flat = [v for i, n in enumerate(lengths) for v in x[i, :n].tolist()]
    mean = sum(flat) / len(flat)
    ss = sum((v - mean) ** 2 for v in flat)
    assert close(masked_var(x, mask), ss / (len(flat) - 1))
    assert close(masked_var(x, mask, unbiased=False), ss / len(flat))


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased var 1 -> (x - 2) / 1; padding -> 0
    assert close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-6)
    # shift_mean=False adds the mean back: -1 + 2, 0 + 2, 1 + 2
    assert close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-6)


def test_masked_whiten_statistics(gen):
    x = 3.0 + 5.0 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask, _ = right_padded(gen)
    w = masked_whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-9
    assert close(masked_var(w, mask), 1.0, tol=1e-6)
    assert (w[mask == 0] == 0).all()
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert close(masked_mean(unshifted, mask), masked_mean(x, mask))


def test_masked_whiten_with_global_stats_equals_concatenation(gen):
    x1, x2 = (torch.randn(n, T, generator=gen, dtype=torch.float64) for n in (3, 4))
    (m1, _), (m2, _) = right_padded(gen, 3), right_padded(gen, 4)
    # what an all-reduce of (sum, sum of squares, count) over two processes would give
    n = m1.sum() + m2.sum()
    total = masked_sum(x1, m1) + masked_sum(x2, m2)
    squares = masked_sum(x1**2, m1) + masked_sum(x2**2, m2)
    mean = total / n
    var = (squares - n * mean**2) / (n - 1)
    joint = masked_whiten(torch.cat([x1, x2]), torch.cat([m1, m2]))
    parts = [masked_whiten(x, m, mean=mean, var=var) for x, m in ((x1, m1), (x2, m2))]
    assert close(torch.cat(parts), joint, tol=1e-9)
    assert not close(parts[0], masked_whiten(x1, m1), tol=1e-3)  # local stats do differ


# ----------------------------------------------------------------------- KL and rewards

def test_kl_penalty_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    # logp - ref = [ln 2, -ln 2]; k3 with r = ref - logp: e^-ln2 - 1 + ln2 = ln2 - 1/2,
    # e^ln2 - 1 - ln2 = 1 - ln2
    assert close(kl_penalty(logp, ref, "k1"), [[LN2, -LN2]])
    assert close(kl_penalty(logp, ref, "abs"), [[LN2, LN2]])
    assert close(kl_penalty(logp, ref, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])
    assert close(kl_penalty(logp, ref, "k3"), [[LN2 - 0.5, 1.0 - LN2]])


def test_kl_penalty_zero_at_equal_and_k3_nonnegative(gen):
    logp = torch.randn(B, T, generator=gen) - 3.0
    ref = torch.randn(B, T, generator=gen) - 3.0
    for estimator in ("k1", "k2", "k3", "abs"):
        assert (kl_penalty(logp, logp.clone(), estimator) == 0).all(), estimator
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert torch.isfinite(kl_penalty(torch.tensor([0.0]), torch.tensor([-1e4]), "k3")).all()
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3', 'abs'"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    g = torch.Generator().manual_seed(1)
    pi = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = (pi * (pi / ref).log()).sum()  # KL(pi || ref) ~= 0.1064
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    logp, ref_logp = pi.log()[tokens], ref.log()[tokens]
    assert close(kl_penalty(logp, ref_logp, "k1").mean(), exact, tol=5e-3)
    assert close(kl_penalty(logp, ref_logp, "k3").mean(), exact, tol=5e-3)


def test_kl_shaped_rewards_by_hand():
    scores = torch.tensor([1.0, 2.0])
    ref = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # row 1 is one token long
    rewards, kl = kl_shaped_rewards(scores, logp, ref, mask, kl_coef=0.5)
    # row 0: -0.5 * [0.1, 0.2, 0.3] + [0, 0, 1]; row 1: -0.5 * 0.5 + 2 at its only token
    assert close(rewards, [[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0]])
    assert close(kl, [[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])


def test_kl_shaped_rewards_matches_loop(gen):
    mask, lengths = right_padded(gen)
    logp = with_garbage(torch.randn(B, T, generator=gen, dtype=torch.float64) - 2, mask)
    ref = with_garbage(torch.randn(B, T, generator=gen, dtype=torch.float64) - 2, mask, -1e6)
    scores = torch.randn(B, generator=gen, dtype=torch.float64)
    logp.requires_grad_(True)
    rewards, kl = kl_shaped_rewards(scores, logp, ref, mask, 0.3, "k3")
    assert not rewards.requires_grad and not kl.requires_grad
    expected = [[0.0] * T for _ in range(B)]
    for i, n in enumerate(lengths):
        for t in range(n):
            r = ref[i, t].item() - logp[i, t].item()
            expected[i][t] = -0.3 * (math.exp(r) - 1 - r)
        expected[i][n - 1] += scores[i].item()
    assert close(rewards, expected, tol=1e-9)


def test_prefix_shaped_scores_by_hand():
    # phi(0..2) of row 0 = 0.5, 0.25, -1 and its whole response scores 2; row 1 has one token
    prefix = torch.tensor([[0.5, 0.25, -1.0], [3.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    shaped = prefix_shaped_scores(prefix, torch.tensor([2.0, -1.0]), mask)
    assert close(shaped, [[-0.25, -1.25, 3.0], [-4.0, 0.0, 0.0]])
    rewards, _ = kl_shaped_rewards(shaped, torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.5)
    assert close(rewards, shaped)


def test_prefix_shaped_scores_matches_loop_and_telescopes(gen):
    mask, lengths = right_padded(gen)
    prefix = with_garbage(torch.randn(B, T, generator=gen, dtype=torch.float64), mask)
    scores = torch.randn(B, generator=gen, dtype=torch.float64)
    shaped = prefix_shaped_scores(prefix, scores, mask)
    expected = [[0.0] * T for _ in range(B)]
    for i, n in enumerate(lengths):
        phi = [prefix[i, t].item() for t in range(n)] + [scores[i].item()]
        for t in range(n):
            expected[i][t] = phi[t + 1] - phi[t]
    assert close(shaped, expected, tol=1e-9)
    # The return of every row is the sparse reward's, less phi(empty response).
    assert close(masked_sum(shaped, mask, dim=1), scores - prefix[:, 0], tol=1e-9)


def test_best_of_n_scores_by_hand():
    # Reference scores 1, 2, 3: a score of 0 beats none, 2 ties one and beats one, 5 all.
    reference = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    got = best_of_n_scores(torch.tensor([0.0, 2.0, 5.0]), reference, 4)
    assert close(got, [3 * math.log(0.5 / 4), 3 * math.log(2.5 / 4), 3 * math.log(3.5 / 4)])


def test_best_of_n_scores_matches_loop(gen):
    scores = torch.randn(B, generator=gen)
    reference = torch.randn(B, 5, generator=gen)
    reference[0, 2] = scores[0]  # a tie counts as "at most as high"
    expected = [(8 - 1) * math.log((sum(r <= s for r in row) + 0.5) / 6)
                for s, row in zip(scores.tolist(), reference.tolist(), strict=True)]
    assert close(best_of_n_scores(scores, reference, 8), expected, tol=1e-5)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_scores_tilt_the_reference_into_its_best_of_n(n, gen):
    """pi_ref * exp(score), the optimum of KL-regularised RL at beta = 1, is the reference's
    best-of-n distribution: checked exactly on 2,000 equally likely outcomes."""
    m = 2000
    rewards = torch.randperm(m, generator=gen).to(torch.float64)
    scores = best_of_n_scores(rewards, rewards.expand(m, m), n).to(torch.float64)
    tilted = torch.softmax(scores, 0)                    # pi_ref uniform: exp(score), normed
    rank = rewards + 1                                   # 1 .. m, the outcome's place
    best_of_n = (rank / m) ** n - ((rank - 1) / m) ** n  # P(max of n draws is this outcome)
    assert 0.5 * (tilted - best_of_n).abs().sum() < 0.01


def test_kl_shaped_rewards_rejects_empty_response():
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"Rows \[1\]"):
        kl_shaped_rewards(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2), mask, 0.1)


def test_penalize_missing_eos():
    scores = torch.tensor([1.0, 2.0, -1.0])
    ended = torch.tensor([True, False, False])
    assert close(penalize_missing_eos(scores, ended, 3.0), [1.0, -1.0, -4.0])


# ----------------------------------------------------------------------- GAE

def gae_loop(rewards, values, lengths, gamma, lam):
    """Per-sequence GAE over plain lists, only ever looking at the first n positions."""
    adv = [[0.0] * T for _ in lengths]
    ret = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        r, v = rewards[i][:n], [*values[i][:n], 0.0]  # V after the last token is 0
        running = 0.0
        for t in reversed(range(n)):
            running = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * running
            adv[i][t], ret[i][t] = running, running + v[t]
    return adv, ret


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 100.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: 2 + 0.9*0 - 1.5 = 0.5                  A = 0.5
    # t=1: 0 + 0.9*1.5 - 1.0 = 0.35; + 0.72*0.5   A = 0.71
    # t=0: 1 + 0.9*1.0 - 0.5 = 1.4;  + 0.72*0.71  A = 1.9112
    assert close(adv, [[1.9112, 0.71, 0.5, 0.0]], tol=1e-5)
    assert close(ret, [[2.4112, 1.71, 2.0, 0.0]], tol=1e-5)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_loop_and_ignores_padding(gen, gamma, lam):
    mask, lengths = right_padded(gen)
    rewards = with_garbage(torch.randn(B, T, generator=gen, dtype=torch.float64), mask)
    values = with_garbage(torch.randn(B, T, generator=gen, dtype=torch.float64), mask, 1e9)
    values[mask == 0] = float("nan")  # NaN padding must not leak either
    values.requires_grad_(True)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert close(adv, exp_adv, tol=1e-9) and close(ret, exp_ret, tol=1e-9)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_gamma1_lam1_is_reward_to_go_minus_value(gen):
    mask, _ = right_padded(gen)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert close(adv, (to_go - values) * mask, tol=1e-9)
    assert close(ret, to_go, tol=1e-9)


def test_gae_rejects_left_padding():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="right-padded"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 3), mask, 1.0, 0.95)


# ----------------------------------------------------------------------- losses

def test_policy_loss_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0]])
    logp = torch.cat([ratios[:, :4].log(), torch.tensor([[1e4]])], 1).requires_grad_(True)
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # (rho, A) -> max(-A rho, -A clip(rho)):  (1.5, +1) -> max(-1.5, -1.2) = -1.2 clipped
    # (0.5, +1) -> max(-0.5, -0.8) = -0.5;    (1.5, -1) -> max(1.5, 1.2) = 1.5
    # (0.5, -1) -> max(0.5, 0.8) = 0.8 clipped.  mean = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15
    assert close(loss, 0.15)
    assert close(stats["clipfrac"], 0.5)
    assert close(stats["ratio"], 1.0)
    assert close(stats["approxkl"], 0.5 * (2 * math.log(1.5) ** 2 + 2 * LN2**2) / 4)
    loss.backward()
    # clipped tokens get no gradient; d(-A rho)/dlogp = -A rho, over 4 tokens
    assert close(logp.grad, [[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]])
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_matches_loop(gen):
    mask, lengths = right_padded(gen)
    logp = (0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    old = 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    loss, stats = policy_loss(logp, old, with_garbage(adv, mask), mask, cliprange=0.2)
    losses, clipped = [], []
    for i, n in enumerate(lengths):
        for t in range(n):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            unclipped, clip = -a * rho, -a * min(max(rho, 0.8), 1.2)
            losses.append(max(unclipped, clip))
            clipped.append(float(clip > unclipped))
    assert close(loss, sum(losses) / len(losses), tol=1e-9)
    assert close(stats["clipfrac"], sum(clipped) / len(clipped))  # float32 stat
    assert 0 < stats["clipfrac"] < 1


def test_value_loss_by_hand():
    values = torch.tensor([[1.5, 1.5, 0.1, 3.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0, float("inf")]])
    returns = torch.tensor([[2.0, 1.0, 1.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # clipped preds: 1.2, 1.2, 0.1 (inside the range)
    # t0: max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64 clipped
    # t1: max((1.5-1)^2, (1.2-1)^2) = max(0.25, 0.04) = 0.25
    # t2: max(0.81, 0.81) = 0.81 (a tie is not clipped)
    assert close(loss, 0.5 * (0.64 + 0.25 + 0.81) / 3)
    assert close(stats["clipfrac"], 1.0 / 3.0)
    assert close(stats["vpred"], 3.1 / 3.0)
    assert close(stats["error"], (0.25 + 0.25 + 0.81) / 3.0)
    loss.backward()
    # d/dV of 0.5 (V - R)^2 / 3 = (V - R) / 3 where the unclipped term wins
    assert close(values.grad, [[0.0, 0.5 / 3, -0.9 / 3, 0.0]])


def test_value_loss_matches_loop(gen):
    mask, lengths = right_padded(gen)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    old = values + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    returns = torch.randn(B, T, generator=gen, dtype=torch.float64)
    loss, stats = value_loss(values, with_garbage(old, mask), returns, mask, 0.2)
    losses, clipped = [], []
    for i, n in enumerate(lengths):
        for t in range(n):
            v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
            vclip = o + min(max(v - o, -0.2), 0.2)
            losses.append(max((v - r) ** 2, (vclip - r) ** 2))
            clipped.append(float((vclip - r) ** 2 > (v - r) ** 2))
    assert close(loss, 0.5 * sum(losses) / len(losses), tol=1e-9)
    assert close(stats["clipfrac"], sum(clipped) / len(clipped))  # float32 stat
    assert 0 < stats["clipfrac"] < 1


def test_entropy_from_logits(gen):
    assert close(entropy_from_logits(torch.full((2, 3, 50), 7.0)), torch.full((2, 3), math.log(50)))
    # two live tokens out of four: log 2, with no NaN from the filtered ones
    assert close(entropy_from_logits(torch.tensor([0.0, 0.0, -math.inf, -math.inf])), LN2)
    assert close(entropy_from_logits(torch.tensor([1e4, -1e4])), 0.0)  # no overflow
    logits = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    for row, h in zip(logits.softmax(-1).tolist(), entropy_from_logits(logits), strict=True):
        assert close(h, -sum(p * math.log(p) for p in row), tol=1e-9)


def test_entropy_from_logprobs_matches_the_logits_form(gen):
    """What the policy logs, from the log_softmax it already has: the same entropy by hand,
    0 for -inf log-probs, finite under the EOS block, and within float32 noise of the
    logits form at the demo's vocabulary."""
    assert close(entropy_from_logprobs(torch.full((2, 3, 50), -math.log(50))),
                 torch.full((2, 3), math.log(50)))
    assert close(entropy_from_logprobs(torch.tensor([-LN2, -LN2, -math.inf, -math.inf])), LN2)
    assert close(entropy_from_logprobs(torch.tensor([0.0, -math.inf])), 0.0)
    logits = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    for row, h in zip(logits.softmax(-1).tolist(),
                      entropy_from_logprobs(logits.log_softmax(-1)), strict=True):
        assert close(h, -sum(p * math.log(p) for p in row), tol=1e-9)
    logits = block_token(torch.randn(2, 20, 8000, generator=gen) * 3, token_id=5, first_n=20)
    fast = entropy_from_logprobs(logits.log_softmax(-1))
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, entropy_from_logits(logits), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------- controllers, moments

def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(7.0, n_steps=16)  # e = 7/6 - 1 = 1/6 -> 0.2 * (1 + (1/6) * 16 / 10000)
    assert math.isclose(ctl.value, 0.2 * (1 + 16 / 60000), rel_tol=1e-12)
    before = ctl.value
    ctl.update(60.0, n_steps=100)  # e = 9, clipped to 0.2 -> * (1 + 0.2 * 100 / 10000) = 1.002
    assert math.isclose(ctl.value, before * 1.002, rel_tol=1e-12)
    ctl.update(0.0, n_steps=100)  # e = -1, clipped to -0.2 -> * 0.998
    assert math.isclose(ctl.value, before * 1.002 * 0.998, rel_tol=1e-12)
    ctl.update(6.0, n_steps=100)  # on target: unchanged
    assert math.isclose(ctl.value, before * 1.002 * 0.998, rel_tol=1e-12)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.2, target=0.0, horizon=10)


def test_fixed_kl_controller_stays_fixed():
    ctl = FixedKLController(0.3)
    for kl in (0.0, 6.0, 1e3):
        ctl.update(kl, n_steps=64)
    assert ctl.value == 0.3


def test_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(9.0, 256)
    fresh = AdaptiveKLController(0.2, 6.0, 10000)
    fresh.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert fresh.value == ctl.value != 0.2
    fixed = FixedKLController(0.0)
    fixed.load_state_dict(json.loads(json.dumps(FixedKLController(0.5).state_dict())))
    assert fixed.value == 0.5


def test_running_moments_match_concatenation(gen):
    batches = [3.0 + 2.0 * torch.randn(n, generator=gen) for n in (5, 1, 17, 8)]
    moments = RunningMoments()
    assert (moments.mean, moments.std) == (0.0, 1.0)
    for batch in batches:  # each batch by its mean, population variance and size
        x = batch.double()
        moments.update_from_moments(x.mean().item(), x.var(unbiased=False).item(), x.numel())
    seen = torch.cat(batches).double()
    assert moments.count == seen.numel()
    assert math.isclose(moments.mean, seen.mean().item(), rel_tol=1e-12)
    assert math.isclose(moments.std, seen.std().item(), rel_tol=1e-12)
    assert math.isclose(moments.var, seen.var().item(), rel_tol=1e-12)
    with pytest.raises(ValueError, match="batch_count must be > 0"):
        moments.update_from_moments(0.0, 0.0, 0)


def test_running_moments_from_global_moments_and_state(gen):
    shards = [torch.randn(n, 2, generator=gen, dtype=torch.float64) for n in (4, 6)]
    local, merged = RunningMoments(), RunningMoments()
    every = torch.cat(shards)
    local.update_from_moments(every.mean().item(), every.var(unbiased=False).item(),
                              every.numel())
    # what all-reducing count, sum and sum of squares over processes would give
    n = sum(s.numel() for s in shards)
    mean = sum(s.sum().item() for s in shards) / n
    var = sum((s**2).sum().item() for s in shards) / n - mean**2
    merged.update_from_moments(mean, var, n)
    assert math.isclose(merged.mean, local.mean, rel_tol=1e-12)
    assert math.isclose(merged.std, local.std, rel_tol=1e-9)
    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(local.state_dict())))
    assert (restored.mean, restored.var, restored.count) == (local.mean, local.var, local.count)


def test_block_token_hand_values():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])   # (1, 3, 3)
    blocked = block_token(logits, token_id=2, first_n=2)
    lowest = torch.finfo(torch.float32).min
    assert blocked[0, 0, 2] == lowest and blocked[0, 1, 2] == lowest
    assert torch.equal(blocked[0, 2], logits[0, 2])
    assert torch.equal(blocked[..., :2], logits[..., :2])
    probs = blocked.softmax(-1)
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.2689414, 0.7310586, 0.0]))
    assert torch.isfinite(entropy_from_logits(blocked)).all()
    assert block_token(logits, 2, 0) is logits                     # nothing blocked
    one_step = block_token(logits[:, 0], 2, 1)                       # (B, V) form
    assert one_step[0, 2] == lowest and torch.equal(one_step[0, :2], logits[0, 0, :2])
    assert logits[0, 0, 2] == 3.0                                    # the input untouched
    same = block_token(logits, 2, 2, inplace=True)                   # written into logits
    assert same is logits and torch.equal(logits, blocked)
