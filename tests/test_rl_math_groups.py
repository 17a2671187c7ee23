"""Critic-free math (RLOO, GRPO, Dr. GRPO) against hand values and slow per-group loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from detoxrl.rl.kl import kl_penalty
from detoxrl.rl.math import (
    aggregate_loss,
    clipped_pg_losses,
    group_advantages,
    policy_loss,
    rloo_advantages,
    sequence_to_tokens,
)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=tol)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------- RLOO

def test_rloo_advantages_by_hand():
    # K = 2: the baseline is the other sample's reward.
    assert close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2), [-1, 1, -3, 3])
    # K = 3: 1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2.
    assert close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])


def test_rloo_advantages_match_loop(gen):
    k, groups = 4, 5
    rewards = torch.randn(k * groups, generator=gen, dtype=torch.float64)
    expected = []
    for i, r in enumerate(rewards.tolist()):
        g = i // k
        others = [rewards[j].item() for j in range(g * k, g * k + k) if j != i]
        expected.append(r - sum(others) / len(others))
    got = rloo_advantages(rewards, k)
    assert close(got, expected, tol=1e-12)
    # The closed form K / (K - 1) (R - mean), and zero sum per prompt.
    g = rewards.reshape(groups, k)
    assert close(got, (k / (k - 1) * (g - g.mean(1, keepdim=True))).reshape(-1), tol=1e-12)
    assert close(got.reshape(groups, k).sum(1), torch.zeros(groups), tol=1e-12)


def test_group_functions_refuse_partial_groups():
    for fn in (rloo_advantages, group_advantages):
        with pytest.raises(ValueError, match="whole groups"):
            fn(torch.zeros(5), 2)
        with pytest.raises(ValueError, match="at least 2"):
            fn(torch.zeros(4), 1)


# ----------------------------------------------------------------------- GRPO / Dr. GRPO

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])            # two prompts, K = 3
    # Group 1: mean 3, unbiased std sqrt((4 + 1 + 9) / 2) = sqrt(7); group 2: all alike.
    s7 = math.sqrt(7.0) + 1e-4
    assert close(group_advantages(r, 3), [-2 / s7, -1 / s7, 3 / s7, 0, 0, 0])
    assert close(group_advantages(r, 3, "none"), [-2, -1, 3, 0, 0, 0])       # Dr. GRPO
    assert close(group_advantages(r, 3, "batch", batch_std=2.0),
                 [-2 / 2.0001, -1 / 2.0001, 3 / 2.0001, 0, 0, 0])
    batch_std = statistics.stdev(r.tolist()) + 1e-4                       # local batch std
    assert close(group_advantages(r, 3, "batch"), [x / batch_std for x in (-2, -1, 3, 0, 0, 0)])
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        group_advantages(r, 3, "rank")


def test_group_advantages_match_loop(gen):
    k, groups = 3, 4
    rewards = torch.randn(k * groups, generator=gen, dtype=torch.float64)
    expected = []
    for i in range(k * groups):
        group = rewards[i // k * k:i // k * k + k].tolist()
        expected.append((rewards[i].item() - statistics.fmean(group))
                        / (statistics.stdev(group) + 1e-4))
    assert close(group_advantages(rewards, k), expected, tol=1e-12)


# ----------------------------------------------------------------------- losses

def test_aggregate_loss_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])               # lengths 3 and 1; NaN is padding
    assert close(aggregate_loss(losses, mask, "grpo"), (2.0 + 4.0) / 2)
    assert close(aggregate_loss(losses, mask, "bnpo"), 10.0 / 4)
    assert close(aggregate_loss(losses, mask, "dr_grpo", max_length=5), 10.0 / (2 * 5))
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(losses, mask, "dr_grpo")
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo'"):
        aggregate_loss(losses, mask, "dapo")


def test_aggregate_loss_matches_loop_and_gradients(gen):
    b, t, max_length = 5, 7, 10
    lengths = [1, 7, 3, 4, 2]
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).double()
    x = torch.randn(b, t, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = [x[i, :n].tolist() for i, n in enumerate(lengths)]
    expected = {"grpo": statistics.fmean(statistics.fmean(r) for r in rows),
                "bnpo": sum(map(sum, rows)) / sum(lengths),
                "dr_grpo": sum(map(sum, rows)) / (b * max_length)}
    for loss_type, value in expected.items():
        loss = aggregate_loss(x, mask, loss_type, max_length)
        assert close(loss, value, tol=1e-12), loss_type
        (grad,) = torch.autograd.grad(loss, x)
        # dr_grpo weighs every token alike, whatever its sequence's length; grpo does not.
        want = {"grpo": mask / torch.tensor(lengths)[:, None] / b, "bnpo": mask / sum(lengths),
                "dr_grpo": mask / (b * max_length)}[loss_type]
        assert close(grad, want, tol=1e-12), loss_type


def test_clipped_pg_losses_give_policy_loss(gen):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = torch.randn(2, 3, generator=gen) * 0.3
    old = torch.randn(2, 3, generator=gen) * 0.3
    adv = torch.randn(2, 3, generator=gen)
    per_token, stats = clipped_pg_losses(logp, old, adv, mask, 0.2)
    assert per_token[0, 2] == 0
    loss, stats2 = policy_loss(logp, old, adv, mask, 0.2)
    assert close(aggregate_loss(per_token, mask, "bnpo"), loss)
    assert all(close(stats[k], stats2[k]) for k in stats)
    ratio = (logp - old).exp()
    by_hand = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert close(per_token[mask.bool()], by_hand[mask.bool()])


def test_grpo_token_loss_by_hand():
    """One token, A = 1, rho = e^0.1 (clipped to 1.2 would not bind), k3 KL with beta 0.5."""
    logp, old, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.1]]), torch.tensor([[-1.3]])
    mask = torch.ones(1, 1)
    pg, _ = clipped_pg_losses(logp, old, torch.ones(1, 1), mask, 0.2)
    kl = kl_penalty(logp, ref, "k3")
    r = -0.3                                                   # log ref - log pi
    assert close(pg, [[-math.exp(0.1)]])
    assert close(kl, [[math.exp(r) - 1 - r]])
    assert close(aggregate_loss(pg + 0.5 * kl, mask, "grpo"),
                 -math.exp(0.1) + 0.5 * (math.exp(r) - 1 - r))


def test_sequence_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert close(sequence_to_tokens(torch.tensor([2.0, -1.0]), mask), [[2, 2, 0], [-1, 0, 0]])
