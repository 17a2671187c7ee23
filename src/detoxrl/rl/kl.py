"""The KL penalty to the reference: per-token estimators and the coefficient's controllers.

One coefficient weighs the KL in every algorithm; :func:`kl_controller` is the one place it
is chosen from the config: PPO starts at ``ppo.init_kl_coef`` and may adapt it (Ziegler et
al. 2019), RLOO and GRPO keep ``ppo.beta`` fixed, as in their papers. Where the KL enters
(the per-token reward, the sequence reward, or a loss term) is the algorithm's business
(``detoxrl.rl.algorithms``).
"""

from __future__ import annotations

from torch import Tensor

from ..config.choices import CHOICES

KL_ESTIMATORS = CHOICES[("ppo", "kl_estimator")]
# exp() of a larger log-ratio would overflow; at e^10 the policy has diverged anyway.
_K3_LOG_RATIO_CLAMP = 10.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs. (B, T).

    With r = log ref(y) - log pi(y) and y ~ pi (Schulman 2020, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html; names as in OpenRLHF):

    * ``k1``:  -r, unbiased, high variance, can be negative per token;
    * ``k2``:  r^2 / 2, low variance, biased;
    * ``k3``:  e^r - 1 - r, unbiased (E_pi[e^r] = 1) and >= 0 per token;
    * ``abs``: |r|.

    k3 estimates KL(pi || ref) from the sampled token alone, where TRL-classic's ``full``
    summed the exact KL over the vocabulary. r is clamped to [-10, 10] before exp (as
    OpenRLHF) so it cannot overflow. Gradients flow through ``logprobs`` (GRPO's KL loss).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        r = (-log_ratio).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
        return r.exp() - 1 - r
    if estimator == "abs":
        return log_ratio.abs()
    raise ValueError(f"Unknown KL estimator {estimator!r}; choose one of "
                     + ", ".join(repr(e) for e in KL_ESTIMATORS) + ".")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta (1 + e n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got "
                             f"target={target} and horizon={horizon}.")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient; the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def kl_controller(ppo) -> AdaptiveKLController | FixedKLController:
    """The controller of the KL coefficient that ``ppo`` (a ``PPOConfig``) asks for."""
    if not ppo.has_value_head:  # rloo, grpo: a fixed beta, as in their papers
        return FixedKLController(ppo.beta)
    if ppo.kl_controller == "adaptive":
        return AdaptiveKLController(ppo.init_kl_coef, ppo.kl_target, ppo.kl_horizon)
    return FixedKLController(ppo.init_kl_coef)
