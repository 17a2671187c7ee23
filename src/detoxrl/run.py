"""Assembling a run: the accelerator and the PPO trainer, built from a config.

:class:`detoxrl.DetoxTrainer` (``detoxrl/detox_trainer.py``) runs the loop and writes the run
folder; :func:`train` is its shortest call. :func:`make_accelerator` and
:func:`build_trainer` are public so that the benchmark times exactly what a run runs.

Data order and sampling are pure functions of (seed, step, rank), and each checkpoint holds
the weights, optimizer, KL controller, score moments, scheduler and RNG, so a resumed run
ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tiny
from .config import TrainConfig
from .distributed import zero_stage
from .errors import ConfigError
from .trainer import PPOTrainer


@dataclass
class RunResult:
    output_dir: Path
    metrics: list[dict]
    trainer: PPOTrainer


def train(cfg: TrainConfig, reward_fn: Any = None, resume: bool = False,
          overwrite: bool = False, quiet: bool = False) -> RunResult:
    """Train as ``cfg`` says; ``reward_fn`` (callable, classifier name or a list of them)
    overrides ``cfg.reward``. The shortest form of :class:`detoxrl.DetoxTrainer`."""
    from .detox_trainer import DetoxTrainer
    from .run_folder import precheck_output_dir

    precheck_output_dir(Path(cfg.output_dir), resume, overwrite, cfg)  # before any model loads
    trainer = DetoxTrainer(args=cfg, reward_funcs=reward_fn, quiet=quiet)
    metrics = trainer.train(resume_from_checkpoint=resume, overwrite_output_dir=overwrite)
    return RunResult(Path(cfg.output_dir), metrics, trainer.ppo)


def make_accelerator(cfg: TrainConfig, resume: bool = False):
    """The ``Accelerator`` a run trains under, ready for ``build_trainer``.

    Public so that other entry points (the benchmark) get the run's mixed precision and
    checks rather than a copy of them. It refuses a broken multi-process launch, finalizes
    ``cfg`` for the number of processes (per-rank batch sizes) and, under DeepSpeed, fills
    the batch sizes ``prepare`` needs or refuses what is unsupported (``resume`` included),
    all before a model is loaded.
    """
    from accelerate import Accelerator

    mixed_precision = _mixed_precision(cfg)
    _forget_other_precision(mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=cfg.log_with or None,
                              project_dir=cfg.output_dir)
    _check_launch(accelerator)
    cfg.finalize(accelerator.num_processes, accelerator.device.type)
    _setup_deepspeed(cfg, accelerator, resume)
    return accelerator


def _forget_other_precision(mixed_precision: str) -> None:
    """Drop an accelerator state that fixed another mixed precision in this process.

    accelerate keeps one state per process and refuses to change its precision. A
    ``Trainer`` run earlier in the process (the demo trains the reward and the LM in fp32
    before RL in bf16 on a GPU) leaves one; transformers' ``TrainingArguments`` drops it
    the same way before each ``Trainer``. The process group (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if (state and state.get("_mixed_precision") != mixed_precision
            and state.get("distributed_type") != DistributedType.DEEPSPEED):
        AcceleratorState._reset_state()


def build_trainer(cfg: TrainConfig, accelerator, reward_fn: Any = None, quiet: bool = True, *,
                  model: Any = None, tokenizer: Any = None, peft_config: Any = None,
                  reward_weights: list[float] | None = None) -> PPOTrainer:
    """A ``PPOTrainer`` at step 0: policy, rewards, optimizer and scheduler, prepared.

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

    from .reward import build_reward_set

    resolve_tiny_names(cfg, accelerator, reward_fn)
    set_seed(cfg.seed)                        # LoRA and value-head initialisation
    policy = _build_policy(cfg, accelerator.device, model, tokenizer, peft_config)
    refuse_tied_t5_head(zero_stage(accelerator), policy.model)
    if accelerator.is_main_process and not quiet:
        print_parameter_report(policy)
    with _whole_weights(accelerator):  # no engine wraps a classifier: never shard it
        rewards = build_reward_set(reward_fn, reward_weights, cfg.reward, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=cfg.ppo.learning_rate, weight_decay=cfg.ppo.weight_decay)
    scheduler = _scheduler(cfg, optimizer)
    prepared, optimizer = accelerator.prepare(policy, optimizer)
    return PPOTrainer(cfg, prepared, rewards, accelerator, optimizer, scheduler)


def _build_policy(cfg: TrainConfig, device, model, tokenizer, peft_config):
    from .policy import Policy

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


def resolve_tiny_names(cfg: TrainConfig, accelerator, reward_funcs: Any = None) -> None:
    """Build the ``tiny:`` models and data a run names, once per machine."""
    names = [cfg.model.name_or_path, cfg.data.path, cfg.reward.model]
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    names += [f for f in funcs if isinstance(f, str)]
    with accelerator.local_main_process_first():
        for name in names:
            tiny.resolve(name)


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


def _check_launch(accelerator) -> None:
    """Refuse N launched processes that each think they are alone (and would all be rank 0)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but they did "
            "not join one process group: each would train alone and all would write the same "
            "run folder. On a machine without GPUs, launch with ACCELERATE_USE_CPU=true "
            "accelerate launch --multi_gpu --num_processes N -m detoxrl train ... (see "
            "docs/scaling.md).")
    if (accelerator.num_processes == 1 and "MASTER_PORT" in os.environ
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")):
        # accelerate's simple launcher sets MASTER_* only when asked for more than one
        # process, yet starts one (it spawns several only under mpirun).
        warnings.warn("accelerate launch --cpu --num_processes N started ONE process; this "
                      "run trains on 1 process. For N CPU processes use ACCELERATE_USE_CPU=true "
                      "accelerate launch --multi_gpu --num_processes N (docs/scaling.md).",
                      stacklevel=2)


def _setup_deepspeed(cfg: TrainConfig, accelerator, resume: bool) -> None:
    """Fill the DeepSpeed batch sizes ``prepare`` needs; refuse what is not supported yet."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    p, ds = cfg.ppo, plugin.deepspeed_config
    if p.gradient_accumulation_steps == "auto":  # DeepSpeed runs on GPUs: no accumulation
        p.micro_batch_size = p.local_mini_batch_size
    accumulates = p.micro_batch_size != p.local_mini_batch_size
    if accumulates or ds.get("gradient_accumulation_steps") not in (1, "auto", None):
        # accelerator.backward runs engine.step() after every backward (we never clear
        # sync_gradients), so accumulation would step on every micro-batch.
        raise ConfigError("Under DeepSpeed use ppo.gradient_accumulation_steps: 1 and "
                          "gradient_accumulation_steps: 1 in the accelerate config; raise "
                          "ppo.mini_batch_size instead (it is split over the processes).")
    if cfg.save_every or resume:
        # The optimizer state is partitioned over ranks and only rank 0 writes checkpoints.
        raise ConfigError("Checkpoints and --resume are not supported under DeepSpeed yet: "
                          "set save_every: 0, or train with DDP (configs/accelerate/"
                          "ddp-multi-gpu.yaml).")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = p.micro_batch_size  # no dataloader to read it


@contextmanager
def _whole_weights(accelerator):
    """Load models unsharded while the ZeRO-3 config is active (accelerate makes every
    ``from_pretrained`` after ``Accelerator()`` use ``zero.Init``, whatever zero3_init_flag
    says); for models that no DeepSpeed engine will wrap."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def refuse_tied_t5_head(stage: int, model) -> None:
    """Refuse a T5 v1.1 / FLAN-T5 whose separate ``lm_head`` was tied to the embeddings.

    transformers 5 marks every T5 config tied and keeps a checkpoint's own ``lm_head`` only
    where it can compare the two matrices at load; under ZeRO-3 they are partitioned, it
    cannot, and the model would train and sample with its embeddings as output layer.
    ``scale_decoder_outputs`` False is how the config records an untied checkpoint.
    """
    config = model.config
    if stage != 3 or getattr(config, "scale_decoder_outputs", True) is not False:
        return
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        import transformers

        raise ConfigError(f"Under DeepSpeed ZeRO-3, transformers {transformers.__version__} "
                          f"loads this {config.model_type} checkpoint with its lm_head tied "
                          "to the embeddings (its own lm_head is dropped). Train it with DDP "
                          "(configs/accelerate/ddp-multi-gpu.yaml) or ZeRO-2 "
                          "(configs/accelerate/deepspeed-zero2.yaml) instead; every FLAN-T5 "
                          "size fits on one 40 GB GPU in bf16.")


def _gathered_trainable(accelerator, policy):
    """Under ZeRO-3, the full LoRA and value-head weights on every rank (a collective)."""
    if zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    params = [q for q in policy.parameters() if q.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _mixed_precision(cfg: TrainConfig) -> str:
    if not torch.cuda.is_available() or cfg.model.dtype == "float32":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


def _scheduler(cfg: TrainConfig, optimizer):
    from transformers import get_scheduler

    p = cfg.ppo
    total = cfg.steps * p.ppo_epochs * p.num_mini_batches
    return get_scheduler(p.lr_scheduler, optimizer, num_warmup_steps=p.warmup_steps,
                         num_training_steps=total)


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
