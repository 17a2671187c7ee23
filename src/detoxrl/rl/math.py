"""RL arithmetic for language models: masked statistics, KL-shaped rewards, GAE, losses.

The variant is the one of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences") and Stiennon et al. 2020 ("Learning to summarize from human feedback"), as
implemented by TRL's classic ``PPOTrainer``: a response is an episode, each token an action,
and the per-token reward is

    r_t = -beta * KL_t(pi || ref) + [t == last token] * score,

with beta adapted towards a target KL (``rl.kl.AdaptiveKLController``). Advantages come from
GAE over these rewards with a learned per-token value, and the policy is trained with the
clipped surrogate.

Differences from PPO as published (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms"):

* the KL term is to a frozen *reference* model and sits in the reward, so GAE propagates
  it; the paper's KL-penalty variant puts KL(old || new) in the objective instead;
* the environment reward is sparse (only the last token gets the score) and nothing is
  bootstrapped after a response ends;
* the value loss is clipped around the rollout values (OpenAI baselines ``ppo2``, not in
  the paper) and carries a factor 0.5;
* advantages are whitened per batch, and losses average over tokens, not sequences;
* no entropy bonus enters the loss; ``models.generation.entropy_from_logprobs`` is for logging.

Critic-free variants (no value, K samples per prompt in consecutive rows, one advantage per
sample spread over its tokens): :func:`rloo_advantages` (Ahmadian et al. 2024),
:func:`group_advantages` (GRPO, Shao et al. 2024; Dr. GRPO, Liu et al. 2025) and the token
loss reductions of :func:`aggregate_loss`.

:func:`best_of_n_scores` turns a score into one whose KL-regularised optimum is the
reference's best-of-n distribution (BOND, Sessa et al. 2024).

Masks are 0/1 float or bool and select real (response) tokens; per-token tensors are
``(B, T)``. Padded positions may hold anything: inputs are selected with ``torch.where``
rather than multiplied, so a NaN or inf in padding can reach neither outputs nor gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config.choices import CHOICES
from .kl import kl_penalty

LOSS_TYPES = CHOICES[("ppo", "loss_type")]
SCALE_REWARDS = CHOICES[("ppo", "scale_rewards")]


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i [mask_i == 1], over ``dim`` or over everything."""
    picked = torch.where(_as_bool(mask), x, 0)
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i m_i / sum_i m_i. An empty selection gives NaN (0 / 0), as in TRL."""
    m = _as_bool(mask).expand_as(x)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the mask: mean((x - mean)^2), times n / (n - 1) when ``unbiased``."""
    m = _as_bool(mask).expand_as(x)
    n = int(m.sum())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element; a variance needs at least "
                         "one (two when unbiased=True).")
    if unbiased and n == 1:
        raise ValueError("masked_var: the mask selects one element; the unbiased variance "
                         "needs at least two (or pass unbiased=False).")
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, mean: Tensor | None = None,
                  var: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the mask; the mean is added back unless ``shift_mean``.

    ``mean`` and ``var`` may be given, e.g. statistics all-reduced over processes, so that
    every process whitens with the same numbers. Padded positions of the result are 0.
    """
    m = _as_bool(mask).expand_as(x)
    if mean is None:
        mean = masked_mean(x, m)
    if var is None:
        var = masked_var(x, m)
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)  # a float is fine too
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0)


def _last_index(mask: Tensor) -> Tensor:
    """Index of the last selected token of each row, (B,); rows selecting none are an error."""
    empty = ~mask.any(1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"Rows {rows} have an all-zero response mask; every response needs "
                         "at least one token.")
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions, -1).amax(1)


@torch.no_grad()
def kl_shaped_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                      kl_coef: float, estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """r_t = -kl_coef * KL_t, plus the score (B,) at each row's last token (Ziegler 2019, eq. 2);
    per-token scores (B, T), as :func:`prefix_shaped_scores` gives, are added where they stand.

    Returns ``(rewards, kl)``, both (B, T) and 0 on padding; no gradient.
    """
    m = _as_bool(mask)
    last = _last_index(m)  # (B,)
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, estimator), 0)  # (B, T)
    rewards = -kl_coef * kl
    if scores.dim() == 2:
        return rewards + torch.where(m, scores.to(rewards.dtype), 0), kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def prefix_shaped_scores(prefix_scores: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token scores s_t = phi(t + 1) - phi(t), with phi(t) the score of the response's first
    t tokens: potential-based shaping (Ng, Harada and Russell 1999, "Policy invariance under
    reward transformations"), with gamma = 1.

    ``prefix_scores`` (B, T) holds phi(t) at column t, for t = 0 (the empty response) up to
    each row's last token; ``scores`` (B,) is phi of the whole response. A row's per-token
    scores sum to ``scores - prefix_scores[:, 0]``: the sparse reward minus a term that no
    action changes, so the optimal policy is the same, while each token is credited with the
    change it made. Returns (B, T), 0 on padding.
    """
    m = _as_bool(mask)
    last = _last_index(m)  # (B,)
    rows = torch.arange(m.shape[0], device=m.device)
    after = torch.roll(prefix_scores, -1, dims=1)            # (B, T): phi(t + 1)
    after[rows, last] = scores.to(after.dtype)
    return torch.where(m, after - prefix_scores, 0)


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation"):

        delta_t = r_t + gamma V_{t+1} - V_t,    A_t = delta_t + gamma lam A_{t+1}

    Returns ``(advantages, returns)`` with returns = A + V, both (B, T), 0 on padding.
    """
    m = _as_bool(mask)
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("gae_advantages needs right-padded masks (1...1 0...0 per row).")
    # Zeroing padding makes V after the last token 0 (the episode ends there) and keeps
    # lastgaelam at 0 through the padded tail.
    values = torch.where(m, values, 0)  # (B, T)
    rewards = torch.where(m, rewards, 0)  # (B, T)
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = advantages + values
    return torch.where(m, advantages, 0), torch.where(m, returns, 0)


def clipped_pg_losses(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                      cliprange: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate (Schulman et al. 2017, eq. 7), negated, (B, T), 0 on padding:

        l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - c, 1 + c)),  rho_t = pi / pi_old.

    Stats (detached): ``clipfrac``, ``approxkl`` = mean((log rho)^2) / 2 (TRL), ``ratio``.
    """
    m = _as_bool(mask)
    # Zero log-ratio on padding so exp() of garbage cannot give inf, nor NaN gradients.
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), 0)  # (B, T)
    advantages = torch.where(m, advantages.detach(), 0)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), m),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), m),
            "ratio": masked_mean(ratio, m),
        }
    return torch.where(m, torch.max(pg_losses, pg_losses2), 0), stats


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate averaged over tokens, L = mean_t l_t (see
    :func:`clipped_pg_losses`, whose stats it returns)."""
    pg_losses, stats = clipped_pg_losses(logprobs, old_logprobs, advantages, mask, cliprange)
    return masked_mean(pg_losses, mask), stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (OpenAI baselines ppo2; not in Schulman et al. 2017):

        L = 0.5 mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

    Stats (detached): ``clipfrac``, ``vpred`` = mean(V), ``error`` = mean((V - R)^2).
    """
    m = _as_bool(mask)
    old_values = torch.where(m, old_values.detach(), 0)
    returns = torch.where(m, returns.detach(), 0)
    vpredclipped = old_values + torch.clamp(values - old_values, -cliprange_value,
                                            cliprange_value)
    vf_losses1 = (values - returns) ** 2  # (B, T)
    vf_losses2 = (vpredclipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), m),
            "vpred": masked_mean(values, m),
            "error": masked_mean(vf_losses1, m),
        }
    return loss, stats


def _groups(x: Tensor, group_size: int) -> Tensor:
    """(N,) -> (N / K, K): row g holds the K samples of prompt g (rows gK .. gK + K - 1)."""
    if group_size < 2 or x.dim() != 1 or x.shape[0] % group_size:
        raise ValueError(f"Need whole groups of at least 2 samples: got {tuple(x.shape)} "
                         f"rewards for groups of {group_size}.")
    return x.reshape(-1, group_size)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantage (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs", sec. 3.2; Kool et
    al. 2019): each sample's baseline is the mean reward of the other K - 1 samples of its
    prompt,

        A_i = R_i - 1 / (K - 1) * sum_{j != i} R_j          (= K / (K - 1) (R_i - mean R)).

    ``rewards`` (N,) holds whole groups of K consecutive samples; returns (N,).
    """
    g = _groups(rewards, group_size)                                   # (N/K, K)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


@torch.no_grad()
def group_advantages(rewards: Tensor, group_size: int, scale: str = "group",
                     batch_std: Tensor | float | None = None, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2):

        A_i = (R_i - mean_g R) / (s + eps),

    the mean over the K samples of sample i's prompt, and with ``scale``:

    * ``group``: s = std_g R, the group's unbiased std (GRPO, as TRL);
    * ``batch``: s = ``batch_std`` (e.g. the std of every process's rewards), else the
      unbiased std of ``rewards``;
    * ``none``:  no division (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training:
      A Critical Perspective", sec. 3.1): the std reweights prompts by how hard they are.

    ``rewards`` (N,) holds whole groups of K consecutive samples; returns (N,).
    """
    g = _groups(rewards, group_size)                                   # (N/K, K)
    centred = g - g.mean(1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = g.std(1, keepdim=True)
    elif scale == "batch":
        std = torch.as_tensor(rewards.std() if batch_std is None else batch_std,
                              dtype=rewards.dtype, device=rewards.device)
    else:
        raise ValueError(f"Unknown scale {scale!r}; choose one of "
                         + ", ".join(repr(s) for s in SCALE_REWARDS) + ".")
    return (centred / (std + eps)).reshape(-1)


def sequence_to_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence value (B,) on each of the sequence's tokens, (B, T), 0 on padding."""
    return torch.where(_as_bool(mask), values[:, None], 0)


def aggregate_loss(losses: Tensor, mask: Tensor, loss_type: str,
                   max_length: int | None = None) -> Tensor:
    """Reduce per-token losses l_it (B, T) to a scalar, over sequences i of lengths |o_i|:

    * ``grpo``:    1/B sum_i 1/|o_i| sum_t l_it, each sequence's mean (Shao et al. 2024, eq. 3);
    * ``bnpo``:    sum_it l_it / sum_i |o_i|, a mean over tokens (as PPO here, and DAPO);
    * ``dr_grpo``: sum_it l_it / (B * L), L = ``max_length`` a constant (Liu et al. 2025,
      sec. 3.1): no per-sequence length normalisation, so long wrong answers are not favoured.
      A sequence's loss is then its summed log-prob times its advantage, REINFORCE on the
      whole response as one action (Ahmadian et al. 2024), scaled by 1/L.
    """
    m = _as_bool(mask)
    if loss_type == "grpo":
        return masked_mean(losses, m, dim=1).mean()
    if loss_type == "bnpo":
        return masked_mean(losses, m)
    if loss_type == "dr_grpo":
        if not max_length or max_length < 1:
            raise ValueError("aggregate_loss('dr_grpo') needs max_length >= 1.")
        return masked_sum(losses, m) / (losses.shape[0] * max_length)
    raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of "
                     + ", ".join(repr(t) for t in LOSS_TYPES) + ".")


def best_of_n_scores(scores: Tensor, reference_scores: Tensor, n: float) -> Tensor:
    """``(n - 1) * log F(score)``, F the share of the reference's samples for the same prompt
    that score at most as high (smoothed to (0, 1)). scores (B,), reference_scores (B, K).

    Best-of-n sampling from the reference has the density ``pi_ref(y) * n * F(r(y))**(n-1)``
    (for continuous rewards), and the optimum of ``E[score] - beta * KL(pi || pi_ref)`` is
    ``pi_ref * exp(score / beta)``; with this score and beta = 1 the two coincide: RL then
    aims at the reference's best-of-n, whose KL is at most ``log n - (n - 1) / n``
    (BOND, Sessa et al. 2024, "Aligning LLMs with Best-of-N Distillation"; Beirami et al.
    2024 for the KL). F comes from K samples, so it is an estimate with K + 1 levels.
    """
    k = reference_scores.shape[1]
    at_most = (reference_scores <= scores[:, None]).sum(1).to(torch.float32)  # (B,)
    return (n - 1) * torch.log((at_most + 0.5) / (k + 1))


def penalize_missing_eos(scores: Tensor, ended_with_eos: Tensor, penalty: float) -> Tensor:
    """score - penalty for responses cut off at their length limit (no EOS), else score."""
    return torch.where(ended_with_eos.bool(), scores, scores - penalty)


class RunningMoments:
    """Running mean and (unbiased) std of every score seen, for score normalisation.

    Batches merge with the parallel update of Chan et al. 1979 ("Updating formulae and a
    pairwise algorithm for computing sample variances"); statistics are float64. Before two
    values have been seen, ``var`` and ``std`` are 1 so that normalising is a no-op scale.
    """

    def __init__(self):
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.count = 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update_from_moments(self, batch_mean: float, batch_var: float,
                            batch_count: float) -> None:
        """Merge a batch given its mean, *population* variance (divide by n) and size."""
        batch_count = float(batch_count)
        if batch_count <= 0:
            raise ValueError(f"RunningMoments: batch_count must be > 0, got {batch_count}.")
        total = self.count + batch_count
        delta = float(batch_mean) - self.mean
        self.m2 += float(batch_var) * batch_count + delta**2 * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.count = float(state["count"])
