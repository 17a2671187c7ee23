"""The accelerator a run trains under, and everything that depends on the process group.

:func:`make_accelerator` builds the ``Accelerator`` (mixed precision, launch checks, batch
sizes per process, DeepSpeed settings); :func:`whole_weights`, :func:`gathered_trainable`
and :func:`refuse_tied_t5_head` handle ZeRO-3's sharded weights. The statistics
(:func:`global_sum`, :func:`global_mean`, ...) reduce sums and counts with
``accelerator.reduce`` (an all-reduce; a no-op in a single process) and return the same
numbers on every rank, so that every rank normalises and controls identically.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from ..config import TrainConfig
from ..errors import ConfigError
from .sharding import is_fsdp, local, process_group_kwargs, setup_sharding, whole_trainable


def global_sum(accelerator, x: Tensor) -> Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return x
    return accelerator.reduce(x.contiguous(), reduction="sum")


def global_mean(accelerator, values: Tensor) -> Tensor:
    """Mean of ``values`` (any shape) over every element on every rank."""
    stats = torch.stack([values.float().sum(), torch.tensor(float(values.numel()),
                                                            device=values.device)])
    total, count = global_sum(accelerator, stats)
    return total / count


def global_masked_moments(accelerator, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, unbiased variance, count) of ``x`` over ``mask == 1`` on every rank."""
    mask = mask.to(x.dtype)
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    total, total_sq, count = global_sum(accelerator, stats)
    mean = total / count
    var = (total_sq / count - mean * mean) * count / (count - 1).clamp(min=1)
    return mean.to(x.dtype), var.clamp(min=0).to(x.dtype), count


def all_finite(accelerator, *tensors: Tensor) -> bool:
    """True only if every tensor is finite on every rank (so all ranks skip together)."""
    # A sharded tensor (FSDP) is checked on this rank's slice; the sum covers the rest.
    bad = sum(int(not torch.isfinite(local(t)).all()) for t in tensors)
    device = tensors[0].device
    return int(global_sum(accelerator, torch.tensor(bad, device=device))) == 0


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage the run was launched with; 0 without DeepSpeed."""
    state = getattr(accelerator, "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


def shards_parameters(accelerator) -> bool:
    """True when every forward is a collective (ZeRO-3, FSDP): ranks must step together."""
    return zero_stage(accelerator) == 3 or is_fsdp(accelerator)


def make_accelerator(cfg: TrainConfig, resume: bool = False):
    """The ``Accelerator`` a run trains under, ready for ``detoxrl.rl.assembly.build_learner``.

    Public so that other entry points (the benchmark) get the run's mixed precision and
    checks rather than a copy of them. It refuses a broken multi-process launch, finalizes
    ``cfg`` for the number of processes (per-rank batch sizes) and, under DeepSpeed, fills
    the batch sizes ``prepare`` needs or refuses what is unsupported (``resume`` included),
    all before a model is loaded.
    """
    from accelerate import Accelerator

    precision = mixed_precision(cfg)
    forget_other_precision(precision)
    accelerator = Accelerator(mixed_precision=precision, log_with=cfg.log_with or None,
                              project_dir=cfg.output_dir, kwargs_handlers=process_group_kwargs())
    setup_sharding(accelerator, cfg.eval_every)
    check_launch(accelerator)
    cfg.finalize(accelerator.num_processes, accelerator.device.type)
    setup_deepspeed(cfg, accelerator, resume)
    return accelerator


def forget_other_precision(precision: str) -> None:
    """Drop an accelerator state that fixed another mixed precision in this process.

    accelerate keeps one state per process and refuses to change its precision. A
    ``Trainer`` run earlier in the process (the demo trains the reward and the LM in fp32
    before RL in bf16 on a GPU) leaves one; transformers' ``TrainingArguments`` drops it
    the same way before each ``Trainer``. The process group (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if (state and state.get("_mixed_precision") != precision
            and state.get("distributed_type") != DistributedType.DEEPSPEED):
        AcceleratorState._reset_state()


def mixed_precision(cfg: TrainConfig) -> str:
    if not torch.cuda.is_available() or cfg.model.dtype == "float32":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


def check_launch(accelerator) -> None:
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


def setup_deepspeed(cfg: TrainConfig, accelerator, resume: bool) -> None:
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
def whole_weights(accelerator):
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
    ``model``: a loaded model, or (before loading) its config, which is refused outright
    under ZeRO-3 when it records an untied head: the load would tie it.
    """
    config = getattr(model, "config", model)
    if stage != 3 or getattr(config, "scale_decoder_outputs", True) is not False:
        return
    loaded = hasattr(model, "get_output_embeddings")
    if not loaded or model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        import transformers

        raise ConfigError(f"Under DeepSpeed ZeRO-3, transformers {transformers.__version__} "
                          f"loads this {config.model_type} checkpoint with its lm_head tied "
                          "to the embeddings (its own lm_head is dropped). Train it with DDP "
                          "(configs/accelerate/ddp-multi-gpu.yaml) or ZeRO-2 "
                          "(configs/accelerate/deepspeed-zero2.yaml) instead; every FLAN-T5 "
                          "size fits on one 40 GB GPU in bf16.")


def gathered_trainable(accelerator, policy):
    """Under ZeRO-3 or FSDP, the full LoRA and value-head weights on every rank, to save
    them (a collective: every rank must enter)."""
    if is_fsdp(accelerator):
        return whole_trainable(policy)
    if zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    params = [q for q in policy.parameters() if q.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
