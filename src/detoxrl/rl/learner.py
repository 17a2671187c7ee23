"""RL for text generators with a KL penalty to a frozen reference: PPO, RLOO or GRPO.

By default this is the RLHF variant of PPO (Ziegler et al. 2019; Stiennon et al. 2020) in
the style of TRL's classic trainer: one episode is one response; the reward is the
classifier's score at the last response token minus ``kl_coef * KL`` at every token;
advantages come from GAE over response tokens; the policy and value losses are clipped
(Schulman et al. 2017). Unlike the TRL code the tutorial ran, every response token is scored
(the first T5 token included), dropout is off throughout, and the reference is the starting
policy. ``ppo.algorithm`` swaps in RLOO or GRPO, which differ only in their rewards,
advantages and loss (``detoxrl.rl.algorithms``); rollout, scoring and forwards are shared.

One call of :meth:`Learner.step` is one iteration, in numbered steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..config import TrainConfig
from ..models.generation import draw_lengths
from ..models.policy import Policy
from ..models.reward import repeat_to
from ..models.rollout import Rollout
from . import distributed as dist
from . import math as rl_math
from .algorithms import make_algorithm
from .kl import kl_controller
from .shaping import prefix_scores
from .sharding import root_gathered

logger = logging.getLogger(__name__)
RewardFn = Callable[..., "Tensor | list[float]"]  # f(prompts=, completions=, **columns)


@dataclass
class StepResult:
    rollout: Rollout
    metrics: dict[str, float] = field(default_factory=dict)
    applied: bool = True


class Learner:
    """Runs steps of the configured algorithm (PPO, RLOO or GRPO) on prompt batches; knows
    nothing of files (``DetoxTrainer`` in ``detoxrl.rl.detox_trainer`` writes the run folder)."""

    def __init__(self, cfg: TrainConfig, policy: Policy, reward_fn: RewardFn, accelerator,
                 optimizer: torch.optim.Optimizer, scheduler=None):
        self.cfg, self.reward_fn, self.accelerator = cfg, reward_fn, accelerator
        self.model = policy                       # possibly DDP-wrapped by accelerate
        self.policy: Policy = accelerator.unwrap_model(policy)
        # A rank reading shared queries once makes one more forward than one that does not.
        self.policy.share_queries = not dist.shards_parameters(accelerator)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.kl_ctl = kl_controller(cfg.ppo)
        self.algorithm = make_algorithm(cfg, accelerator, self.kl_ctl)
        self.score_moments = rl_math.RunningMoments()
        self.skipped_steps = 0

    # ------------------------------------------------------------------ one step
    def step(self, query_ids: Tensor, query_mask: Tensor, queries: list[str],
             step_seed: int, columns: dict[str, list] | None = None) -> StepResult:
        """One iteration; ``columns``: the prompts' other dataset columns, for the reward."""
        timer = _PhaseTimer()
        with timer("rollout"):                                   # 1. rollout
            batch = self.rollout(query_ids, query_mask, queries, step_seed)
        with timer("score"):                                     # 2. score
            batch, raw_scores = self.score(batch, columns, step_seed)
        with timer("forward"):                                   # 3. old/ref log-probs, values
            batch = self.forward_old_and_ref(batch)
        if not dist.all_finite(self.accelerator, *[t for t in (
                batch.scores, batch.logprobs, batch.ref_logprobs, batch.values) if t is not None]):
            return self._skip(batch, timer, "non-finite scores or log-probs")
        batch, kl = self.algorithm.rewards(batch)                # 4. rewards (algorithm's)
        batch = self.algorithm.advantages(batch)                 # 5. advantages (algorithm's)
        with timer("optimize"):                                  # 6-7. epochs + steps
            train_stats = self.ppo_epochs(batch, step_seed)
        mean_kl = float(dist.global_mean(self.accelerator, kl.sum(1)))
        kl_coef = self.kl_ctl.value
        p = self.cfg.ppo
        self.kl_ctl.update(mean_kl, p.batch_size * p.num_generations)  # 8. KL controller
        metrics = self.log_metrics(batch, raw_scores, kl, kl_coef, train_stats, timer)  # 9. log
        return StepResult(batch, metrics)

    # ------------------------------------------------------------------ 1. rollout
    @torch.no_grad()
    def rollout(self, query_ids, query_mask, queries, step_seed: int) -> Rollout:
        # Sampling depends only on (run seed, step, rank): a resumed run draws the same.
        # K samples per prompt (rloo, grpo) in consecutive rows, all on this process.
        p = self.cfg.ppo
        return self._sample(query_ids, query_mask, queries, step_seed, p.num_generations,
                            with_logprobs=p.logprobs_from_rollout,
                            with_values=p.logprobs_from_rollout and p.has_value_head)

    def _sample(self, query_ids, query_mask, queries, seed: int, k: int,
                with_logprobs: bool = False, with_values: bool = False) -> Rollout:
        g = self.cfg.generation
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        limits = draw_lengths(len(queries), g.min_new_tokens_draw, g.max_new_tokens_draw, gen)
        # ZeRO-3 and FSDP shard the weights: every forward is a collective, so a rank whose
        # responses end early must keep stepping until all ranks are done (synced_gpus).
        with root_gathered(self.accelerator, self.policy):  # FSDP: generate skips forward()
            return self.policy.generate(
                query_ids.to(self.accelerator.device), query_mask.to(self.accelerator.device),
                g, limits, queries, synced_gpus=dist.shards_parameters(self.accelerator),
                num_return_sequences=k, with_logprobs=with_logprobs, with_values=with_values)

    @torch.no_grad()
    def reference_rollout(self, batch: Rollout, step_seed: int) -> Rollout:
        """``ppo.reference_samples`` samples of the reference for each prompt of ``batch``."""
        p = self.cfg.ppo
        prompts = batch.select(torch.arange(0, len(batch), p.num_generations))
        with self.policy.reference():
            # Its own seed: the policy's samples stay those of a run without this option.
            return self._sample(prompts.query_ids, prompts.query_mask, prompts.queries,
                                step_seed + 2, p.reference_samples)

    # ------------------------------------------------------------------ 2. score
    @torch.no_grad()
    def score(self, batch: Rollout, columns: dict[str, list] | None = None,
              step_seed: int = 0) -> tuple[Rollout, Tensor]:
        """Scores used for learning (penalised, normalised, clipped, or best-of-n) and the
        raw ones."""
        p = self.cfg.ppo
        reference_scores = None
        if p.best_of_n_target is not None:
            # First, so that the reward's per-component record (``last``) is the policy's.
            reference = self.reference_rollout(batch, step_seed)
            reference_scores = self._reward(reference, columns).view(
                -1, p.reference_samples).repeat_interleave(p.num_generations, 0)  # (B, K_ref)
        scores = self._reward(batch, columns)
        raw_scores = scores
        if reference_scores is not None:
            scores = rl_math.best_of_n_scores(scores, reference_scores, p.best_of_n_target)
        if p.normalize_scores:
            mean, var, count = dist.global_masked_moments(self.accelerator, scores,
                                                          torch.ones_like(scores))
            self.score_moments.update_from_moments(float(mean), float(var), float(count))
        scores = self._normalize_and_clip(scores)
        token_scores = None
        if p.prefix_shaping:
            per_response = {k: repeat_to(v, len(batch), k)
                            for k, v in (columns or {}).items()}
            prefixes = prefix_scores(self.reward_fn, self.policy.tokenizer, batch,
                                     per_response, self._normalize_and_clip)
            token_scores = rl_math.prefix_shaped_scores(prefixes, scores, batch.response_mask)
        return replace(batch, scores=scores, token_scores=token_scores), raw_scores

    def _reward(self, batch: Rollout, columns: dict[str, list] | None) -> Tensor:
        """The reward of each response of ``batch`` (B,), less ``missing_eos_penalty``."""
        p = self.cfg.ppo
        raw = self.reward_fn(prompts=batch.queries, completions=batch.responses,
                             **(columns or {}))
        scores = torch.as_tensor(raw, dtype=torch.float32).reshape(-1).to(batch.response_ids.device)
        if scores.shape[0] != len(batch):
            raise ValueError(f"The reward returned {scores.shape[0]} scores for {len(batch)} "
                             "responses; it must return one score per response.")
        if p.missing_eos_penalty is not None:
            scores = rl_math.penalize_missing_eos(scores, batch.ended_with_eos,
                                                  p.missing_eos_penalty)
        return scores

    def _normalize_and_clip(self, scores: Tensor) -> Tensor:
        p = self.cfg.ppo
        if p.normalize_scores:
            scores = (scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
        if p.score_clip is not None:
            scores = scores.clamp(-p.score_clip, p.score_clip)
        return scores

    # ------------------------------------------------------------------ 3. old + ref
    @torch.no_grad()
    def forward_old_and_ref(self, batch: Rollout) -> Rollout:
        """Reference log-probs and, unless the rollout read them while sampling
        (``ppo.logprobs_from_rollout``), old log-probs and values; in chunks of
        ``ppo.forward_batch_size`` samples.

        The order is free here, so chunks group prompts of similar length and carry little
        padding. The old pass reuses the rollout's encoder output (seq2seq), which is then
        dropped; the reference needs its own, as the adapter also changes the encoder.
        """
        t, with_values = self.cfg.generation.temperature, self.cfg.ppo.has_value_head
        old_pass = batch.logprobs is None
        logprobs, ref_logprobs, values = (torch.zeros_like(batch.response_mask, dtype=torch.float)
                                          for _ in range(3))                           # (B, T)
        order = batch.query_mask.sum(1).argsort(descending=True).cpu()
        for idx in order.split(self.cfg.ppo.forward_chunk):
            mb = batch.select(idx)
            rows, width = idx.to(logprobs.device), mb.response_ids.shape[1]
            with self._autocast():
                if old_pass:
                    out = self.policy(mb.query_ids, mb.query_mask, mb.response_ids,
                                      mb.response_mask, t, with_values=with_values,
                                      encoder_hidden=mb.encoder_hidden,
                                      eos_blocked=mb.eos_blocked)
                    logprobs[rows, :width] = out.logprobs.float()
                    if with_values:
                        values[rows, :width] = out.values.float()
                with self.policy.reference():
                    ref = self.policy(mb.query_ids, mb.query_mask, mb.response_ids,
                                      mb.response_mask, t, with_values=False,
                                      eos_blocked=mb.eos_blocked)
            ref_logprobs[rows, :width] = ref.logprobs.float()
        if not old_pass:
            logprobs, values = batch.logprobs, batch.values
        mask = batch.response_mask.float()
        return replace(batch, logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask,
                       values=values * mask if with_values else None, encoder_hidden=None)

    # ------------------------------------------------------------------ 6-7. PPO epochs
    def ppo_epochs(self, batch: Rollout, step_seed: int) -> list[dict[str, Tensor]]:
        p = self.cfg.ppo
        gen = torch.Generator().manual_seed(step_seed + 1)
        stats = []
        for _ in range(p.ppo_epochs):
            order = torch.randperm(len(batch), generator=gen)
            for idx in order.split(p.local_mini_batch_size):
                stats.append(self.optimizer_step(batch.select(idx)))
        return stats

    def optimizer_step(self, mini: Rollout) -> dict[str, Tensor]:
        """One optimizer step on a mini-batch, accumulated over micro-batches."""
        p = self.cfg.ppo
        micro_idx = torch.arange(len(mini)).split(p.micro_batch_size)
        stats = []
        for i, idx in enumerate(micro_idx):
            last = i == len(micro_idx) - 1
            sync = nullcontext() if last else self.accelerator.no_sync(self.model)
            with sync:
                loss, s = self.loss(mini.select(idx))
                self.accelerator.backward(loss / len(micro_idx))
            stats.append(s)
        grads = [q.grad for q in self.model.parameters() if q.grad is not None]
        finite = dist.all_finite(self.accelerator, *[s["loss/total"] for s in stats], *grads)
        if finite:
            if p.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]}
        out["skipped"] = torch.tensor(float(not finite))
        return out

    def loss(self, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """The algorithm's loss on a micro-batch, under the current weights."""
        mask = mb.response_mask
        with self._autocast():
            out = self.model(mb.query_ids, mb.query_mask, mb.response_ids, mask,
                             self.cfg.generation.temperature,
                             with_values=self.cfg.ppo.has_value_head, with_entropy=True,
                             eos_blocked=mb.eos_blocked)
        loss, stats = self.algorithm.loss(out, mb)
        stats["policy/entropy"] = rl_math.masked_mean(out.entropy.detach(), mask)
        return loss, stats

    # ------------------------------------------------------------------ 9. log
    def log_metrics(self, batch: Rollout, raw: Tensor, kl: Tensor, kl_coef: float,
                    train_stats: list[dict[str, Tensor]], timer) -> dict[str, float]:
        acc, mask = self.accelerator, batch.response_mask
        reward_mean = dist.global_mean(acc, raw)
        reward_var = dist.global_mean(acc, (raw - reward_mean) ** 2)
        tokens = float(dist.global_sum(acc, mask.sum().float()))
        m = {
            "objective/kl": dist.global_mean(acc, kl.sum(1)),
            "objective/kl_coef": kl_coef,
            "objective/entropy": dist.global_mean(acc, -batch.logprobs.sum(1)),
            "env/reward_mean": reward_mean,
            "env/reward_std": reward_var.sqrt(),
            "env/response_length": dist.global_mean(acc, mask.sum(1).float()),
            "env/eos_fraction": dist.global_mean(acc, batch.ended_with_eos.float()),
            "ppo/mean_non_score_reward": dist.global_mean(
                acc, (-(kl_coef if self.algorithm.kl_in_reward else 0.0) * kl).sum(1)),
            "ppo/policy/advantages_mean": _global_masked_mean(acc, batch.advantages, mask),
        }
        if batch.returns is not None:
            m["ppo/returns/mean"] = _global_masked_mean(acc, batch.returns, mask)
        k = self.cfg.ppo.num_generations
        if k > 1:  # groups whose K samples all scored alike teach rloo and grpo nothing
            groups = raw.reshape(-1, k)
            m["env/frac_reward_zero_std"] = dist.global_mean(
                acc, (groups.amax(1) == groups.amin(1)).float())
        for key in train_stats[0]:
            if key != "skipped":
                m["ppo/" + key] = dist.global_mean(acc, torch.stack([s[key] for s in
                                                                     train_stats]))
        m["ppo/skipped_updates"] = sum(float(s["skipped"]) for s in train_stats)
        m["ppo/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        m.update(timer.metrics(tokens))
        return {k: float(v) for k, v in m.items()}

    def _skip(self, batch: Rollout, timer, why: str) -> StepResult:
        """Count and report a step that is not applied; every rank skips it together."""
        logger.warning("PPO step skipped: %s (skipped so far: %d)", why, self.skipped_steps + 1)
        self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(batch, {"ppo/skipped_steps": float(self.skipped_steps),
                                  **timer.metrics(0.0)}, applied=False)

    def _autocast(self):
        return self.accelerator.autocast()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "score_moments":
                self.score_moments.state_dict(), "skipped_steps": self.skipped_steps,
                "scheduler": _scheduler_state(self.scheduler)}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.skipped_steps = state["skipped_steps"]
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])


def _global_masked_mean(accelerator, x: Tensor, mask: Tensor) -> Tensor:
    mean, _, _ = dist.global_masked_moments(accelerator, x, mask)
    return mean


def _scheduler_state(scheduler) -> dict | None:
    # LambdaLR stores only the lambdas' attributes (plain data), so this is JSON-able.
    return None if scheduler is None else scheduler.state_dict()


class _PhaseTimer:
    """Wall time per phase of a step, reported as ``time/<phase>`` and tokens/s."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self, tokens: float) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.times.items()}
        out["time/total"] = total
        if "rollout" in self.times:
            out["tokens/s"] = tokens / max(self.times["rollout"], 1e-9)
        return out
