"""Assembling a run: the :class:`~detoxrl.rl.learner.Learner` at step 0, built from a config.

:func:`build_learner` is the one place the policy, rewards, optimizer and scheduler are put
together: :class:`detoxrl.DetoxTrainer` calls it (and so do ``detoxrl train``, the demo and
:func:`detoxrl.rl.detox_trainer.train`, all through ``DetoxTrainer``), and the benchmark
calls it with ``detoxrl.rl.distributed.make_accelerator`` to time exactly what a run runs.

Data order and sampling are pure functions of (seed, step, rank), and each checkpoint holds
the weights, optimizer, KL controller, score moments, scheduler and RNG, so a resumed run
ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from .distributed import refuse_tied_t5_head, whole_weights, zero_stage
from .learner import Learner
from .sharding import wrap_layers


def build_learner(cfg: TrainConfig, accelerator, reward_fn: Any = None, quiet: bool = True, *,
                  model: Any = None, tokenizer: Any = None, peft_config: Any = None,
                  reward_weights: list[float] | None = None) -> Learner:
    """A ``Learner`` at step 0: policy, rewards, optimizer and scheduler, prepared.

    The one place these are assembled, so ``DetoxTrainer`` and the benchmark run the same
    thing. ``cfg`` must be finalized (``make_accelerator`` does it). The seed is set just
    before the policy is built, so the LoRA and value-head initialisation depend on
    ``cfg.seed`` alone. ``reward_fn`` (a callable, a classifier name or a list of them, with
    ``reward_weights``) overrides ``cfg.reward``; ``model`` (a loaded ``PreTrainedModel``),
    ``tokenizer`` and ``peft_config`` (a ``peft.LoraConfig``) override ``cfg.model`` and
    ``cfg.lora``. ``quiet=False`` prints the parameter report on the main process.
    Checkpoint state is the caller's to load.
    """
    from accelerate.utils import set_seed

    from ..models.reward import build_reward_set

    if model is None and zero_stage(accelerator) == 3:  # before the sharded, slow load
        from ..models import tiny
        from ..models.loading import load_config

        refuse_tied_t5_head(3, load_config(tiny.resolve(cfg.model.name_or_path),
                                           cfg.model.revision, cfg.model.trust_remote_code))
    set_seed(cfg.seed)                        # LoRA and value-head initialisation
    policy = _build_policy(cfg, accelerator.device, model, tokenizer, peft_config)
    refuse_tied_t5_head(zero_stage(accelerator), policy.model)
    if accelerator.is_main_process and not quiet:
        print_parameter_report(policy)
    with whole_weights(accelerator):  # no engine wraps a classifier: never shard it
        rewards = build_reward_set(reward_fn, reward_weights, cfg.reward, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=cfg.ppo.learning_rate, weight_decay=cfg.ppo.weight_decay)
    scheduler = _scheduler(cfg, optimizer)
    wrap_layers(accelerator, policy)
    prepared, optimizer = accelerator.prepare(policy, optimizer)
    return Learner(cfg, prepared, rewards, accelerator, optimizer, scheduler)


def _build_policy(cfg: TrainConfig, device, model, tokenizer, peft_config):
    from ..models.policy import Policy

    lora = peft_config if peft_config is not None else cfg.lora
    value_head = cfg.ppo.has_value_head  # critic-free algorithms build none
    if model is None:
        policy = Policy.from_pretrained(cfg.model, lora, device=device, value_head=value_head)
        if tokenizer is not None:
            policy.tokenizer = tokenizer
        return policy
    if hasattr(model, "peft_config"):
        raise ConfigError("Pass the base model and the LoRA settings (peft_config=LoraConfig"
                          "(...)) rather than a PeftModel; to continue an existing adapter set "
                          "model.adapter in the config.")
    policy = Policy.from_model(model, tokenizer, lora, cfg.model.adapter, value_head=value_head)
    if cfg.model.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy.to(device)


def batch_indices(step: int, n: int, cfg: TrainConfig, rank: int) -> list[int]:
    """This rank's prompt indices for ``step``: epochs of seeded permutations, sharded."""
    if n < cfg.ppo.batch_size:
        raise ConfigError(f"The training split has {n} prompts, fewer than ppo.batch_size "
                          f"({cfg.ppo.batch_size}). Lower the batch size or add data.")
    size = cfg.ppo.batch_size
    positions = range(step * size + rank * cfg.ppo.local_batch_size,
                      step * size + (rank + 1) * cfg.ppo.local_batch_size)
    perms: dict[int, list[int]] = {}
    indices = []
    for pos in positions:
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(
                cfg.seed * 7919 + epoch)).tolist()
        indices.append(perms[epoch][pos % n])
    return indices


def step_seed(seed: int, step: int, rank: int) -> int:
    """Each (run seed, step, rank) samples with its own seed, independent of history."""
    return (seed * 1_000_003 + step * 1_009 + rank * 100_000_007) % (2**63 - 1)


def print_parameter_report(policy) -> None:
    trainable, total, pct = policy.parameter_report()
    print(f"trainable model parameters: {trainable}\nall model parameters: {total}\n"
          f"percentage of trainable model parameters: {pct:.2f}%", flush=True)








def _scheduler(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    p = cfg.ppo
    total = cfg.steps * p.ppo_epochs * p.num_mini_batches
    return get_scheduler(p.lr_scheduler, optimizer, num_warmup_steps=p.warmup_steps,
                         num_training_steps=total)
