"""What PPO, RLOO and GRPO do differently: rewards, advantages and the loss.

The learner (``detoxrl.rl.learner``) rolls out, scores, computes the old and reference
log-probs and runs the mini-batch epochs the same way for all three; it asks the algorithm
for steps 4 (rewards), 5 (advantages) and the loss of step 7. The math is in ``rl.math``.

* :class:`PPO`: the RLHF variant of Ziegler et al. 2019 (see ``rl.math``): per-token rewards
  with the KL penalty, GAE with a value head, clipped policy and value losses, token means.
* :class:`RLOO`: Ahmadian et al. 2024. K samples per prompt; the sequence reward is the
  score minus the KL coefficient times the summed per-token KL; the advantage subtracts the mean
  reward of the prompt's other K - 1 samples. The whole response is one action, so the
  loss sums over its tokens (divided by the constant ``max_new_tokens_draw``). The ratio
  is clipped as in PPO, which only matters when a batch is reused (``ppo_epochs`` or
  several mini-batches); with one epoch and one mini-batch this is plain REINFORCE.
* :class:`GRPO`: Shao et al. 2024. The advantage is the score normalised within the
  prompt's K samples; the KL to the reference is not in the reward but a k3 loss term
  weighted by the KL coefficient; the clipped ratio lets a batch be reused across epochs. Dr. GRPO
  (Liu et al. 2025) is ``loss_type: dr_grpo`` with ``scale_rewards: none``.

A prompt's K samples are consecutive rows on one process (``Policy.generate``), so group
statistics need no communication; only ``scale_rewards: batch`` reduces over processes.

The KL coefficient is ``kl_ctl.value`` in all three, chosen once by
``detoxrl.rl.kl.kl_controller`` (``ppo.init_kl_coef`` for PPO, ``ppo.beta`` for RLOO and GRPO).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..config import TrainConfig
from ..models.policy import PolicyOutput
from ..models.rollout import Rollout
from . import distributed as dist
from . import math as rl_math
from .kl import kl_penalty


class PPO:
    """Per-token KL-shaped rewards, GAE with a learned value, clipped policy + value loss."""

    kl_in_reward = True  # False: the KL is a loss term, weighted by kl_ctl.value

    def __init__(self, cfg: TrainConfig, accelerator, kl_ctl):
        self.cfg, self.p, self.accelerator, self.kl_ctl = cfg, cfg.ppo, accelerator, kl_ctl

    @property
    def reward_kl_coef(self) -> float:
        """The coefficient of the KL inside the reward (0 when the KL is a loss term)."""
        return self.kl_ctl.value if self.kl_in_reward else 0.0

    def rewards(self, batch: Rollout) -> tuple[Rollout, Tensor]:
        """Step 4: r_t = -coef * KL_t, plus the score at the last token (or each token's share
        of it, with ``ppo.prefix_shaping``); also KL_t (B, T)."""
        scores = batch.scores if batch.token_scores is None else batch.token_scores
        rewards, kl = rl_math.kl_shaped_rewards(scores, batch.logprobs, batch.ref_logprobs,
                                                batch.response_mask, self.reward_kl_coef,
                                                self.p.kl_estimator)
        if self.p.whiten_rewards:
            mean, var, _ = dist.global_masked_moments(self.accelerator, rewards,
                                                      batch.response_mask)
            rewards = rl_math.masked_whiten(rewards, batch.response_mask, shift_mean=False,
                                            mean=mean, var=var)
        return replace(batch, rewards=rewards), kl

    def advantages(self, batch: Rollout) -> Rollout:
        """Step 5: GAE advantages and returns, whitened over all processes if configured."""
        p, mask = self.p, batch.response_mask
        advantages, returns = rl_math.gae_advantages(batch.rewards, batch.values, mask,
                                                     p.gamma, p.lam)
        if p.whiten_advantages:
            mean, var, _ = dist.global_masked_moments(self.accelerator, advantages, mask)
            advantages = rl_math.masked_whiten(advantages, mask, mean=mean, var=var)
        return replace(batch, advantages=advantages, returns=returns)

    def loss(self, out: PolicyOutput, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        p, mask = self.p, mb.response_mask
        pg_loss, pg_stats = rl_math.policy_loss(out.logprobs.float(), mb.logprobs,
                                                mb.advantages, mask, p.cliprange)
        vf_loss, vf_stats = rl_math.value_loss(out.values.float(), mb.values, mb.returns, mask,
                                               p.cliprange_value)
        loss = pg_loss + p.vf_coef * vf_loss
        return loss, {"loss/total": loss.detach(), "loss/policy": pg_loss.detach(),
                      "loss/value": vf_loss.detach(), "policy/clipfrac": pg_stats["clipfrac"],
                      "policy/approxkl": pg_stats["approxkl"],
                      "val/clipfrac": vf_stats["clipfrac"], "val/vpred": vf_stats["vpred"]}


class _CriticFree(PPO):
    """K samples per prompt, one advantage per sample spread over its tokens, no value."""

    def rewards(self, batch: Rollout) -> tuple[Rollout, Tensor]:
        # The per-token rewards sum to the sequence reward: score - coef * sum_t KL_t.
        rewards, kl = rl_math.kl_shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs,
                                                batch.response_mask, self.reward_kl_coef,
                                                self.p.kl_estimator)
        return replace(batch, rewards=rewards), kl

    def sequence_advantages(self, rewards: Tensor) -> Tensor:
        raise NotImplementedError

    def advantages(self, batch: Rollout) -> Rollout:
        """Step 5: one advantage per sample, from its sequence reward, on each of its tokens."""
        advantages = self.sequence_advantages(batch.rewards.sum(1))  # (B,)
        return replace(batch, advantages=rl_math.sequence_to_tokens(advantages,
                                                                    batch.response_mask))

    def _loss(self, out: PolicyOutput, mb: Rollout, loss_type: str, kl_coef: float
              ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate (+ kl_coef * k3 KL to the reference), reduced as ``loss_type``."""
        mask = mb.response_mask
        logprobs = out.logprobs.float()
        pg_losses, pg_stats = rl_math.clipped_pg_losses(logprobs, mb.logprobs, mb.advantages,
                                                        mask, self.p.cliprange)   # (B, T)
        max_length = self.cfg.generation.max_new_tokens_draw
        pg_loss = rl_math.aggregate_loss(pg_losses, mask, loss_type, max_length)
        stats = {"loss/policy": pg_loss.detach(), "policy/clipfrac": pg_stats["clipfrac"],
                 "policy/approxkl": pg_stats["approxkl"]}
        loss = pg_loss
        if kl_coef:
            kl = torch.where(mask.bool(), kl_penalty(logprobs, mb.ref_logprobs, "k3"),
                             0)                                                    # (B, T)
            kl_loss = rl_math.aggregate_loss(kl, mask, loss_type, max_length)
            loss = pg_loss + kl_coef * kl_loss
            stats["loss/kl"] = kl_loss.detach()
        stats["loss/total"] = loss.detach()
        return loss, stats


class RLOO(_CriticFree):
    """Leave-one-out baseline over K samples; KL summed into the sequence reward."""

    def sequence_advantages(self, rewards: Tensor) -> Tensor:
        return rl_math.rloo_advantages(rewards, self.p.num_generations)

    def loss(self, out: PolicyOutput, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        # The response is one action: its summed log-prob times its advantage.
        return self._loss(out, mb, "dr_grpo", kl_coef=0.0)


class GRPO(_CriticFree):
    """Group-normalised scores as advantages; KL to the reference as a k3 loss term."""

    kl_in_reward = False

    def sequence_advantages(self, rewards: Tensor) -> Tensor:
        batch_std = None
        if self.p.scale_rewards == "batch":
            _, var, _ = dist.global_masked_moments(self.accelerator, rewards,
                                                   torch.ones_like(rewards))
            batch_std = var.sqrt()
        return rl_math.group_advantages(rewards, self.p.num_generations, self.p.scale_rewards,
                                        batch_std)

    def loss(self, out: PolicyOutput, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        return self._loss(out, mb, self.p.loss_type, kl_coef=self.kl_ctl.value)


def make_algorithm(cfg: TrainConfig, accelerator, kl_ctl) -> PPO:
    """The algorithm ``cfg.ppo.algorithm`` names."""
    kinds = {"ppo": PPO, "rloo": RLOO, "grpo": GRPO}
    return kinds[cfg.ppo.algorithm](cfg, accelerator, kl_ctl)
