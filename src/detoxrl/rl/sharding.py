"""FSDP2 (``torch.distributed.fsdp.fully_shard``) through accelerate, with LoRA and a value head.

accelerate shards the prepared policy: each transformer block is one FSDP unit and the
rest (embeddings, LM head, value head) is the root unit; every parameter, frozen or not, is
a ``DTensor`` holding this rank's slice. A block gathers its weights in its own forward. What
detoxrl calls outside ``Policy.forward`` needs the root unit gathered by hand (generation),
and what reads or writes whole weights (saving, checkpoints, resuming) needs the trainable
ones gathered, or sliced again when loaded; the helpers here do both. The frozen base model
is never gathered whole. Also here: what makes FSDP and DeepSpeed launches of CPU processes
run as configured.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def process_group_kwargs() -> list:
    """Handlers for ``Accelerator``: gloo for DeepSpeed processes launched without GPUs.

    accelerate picks the process-group backend from the device and, with no GPU, none at
    all: DeepSpeed then joins its own group of N processes while accelerate counts one.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not deepspeed or launched < 2 or torch.cuda.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def setup_sharding(accelerator, eval_every: int = 0) -> None:
    """Turn a CPU launch of an FSDP config into FSDP, and refuse FSDP1 and a DeepSpeed config
    that accelerate dropped; before any model loads.

    accelerate (1.16) enables FSDP and DeepSpeed only without ``ACCELERATE_USE_CPU``: CPU
    processes launched with such a config silently train as DDP. torch's FSDP2 runs on the
    CPU over gloo, so the plugin the launcher described (its ``FSDP_*`` variables) is
    installed here instead.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def launched(kind: str) -> bool:
        return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"

    state = accelerator.state
    on_cpu = accelerator.distributed_type == DistributedType.MULTI_CPU
    if launched("DEEPSPEED") and on_cpu:
        raise ConfigError("accelerate ignores a DeepSpeed config when ACCELERATE_USE_CPU is "
                          "set, and this launch would train as plain DDP. For DeepSpeed on "
                          "the CPU, unset ACCELERATE_USE_CPU and set DS_ACCELERATOR=cpu "
                          "(docs/scaling.md).")
    if launched("FSDP") and on_cpu:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if is_fsdp(accelerator) and eval_every:
        # Its generate and forward passes alternate outside the policy's forward hooks.
        raise ConfigError("The validation curve (eval_every) does not run under FSDP yet: "
                          "set eval_every: 0, or train with DDP (configs/accelerate/"
                          "ddp-multi-gpu.yaml).")
    if is_fsdp(accelerator) and state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("detoxrl trains under FSDP2 only: set fsdp_version: 2 in the "
                          "accelerate config (configs/accelerate/fsdp.yaml). FSDP1 would "
                          "need use_orig_params and summon_full_params around generation, "
                          "which detoxrl does not do.")


def wrap_layers(accelerator, policy: nn.Module) -> None:
    """Name the base model's transformer blocks as FSDP units (accelerate reads the
    wrapped model's ``_no_split_modules``, and the policy wraps the base model)."""
    if not is_fsdp(accelerator):
        return
    base = policy.model.get_base_model()
    policy._no_split_modules = list(getattr(base, "_no_split_modules", None) or [])
    if not os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        # accelerate keeps the classes it found in the previous model of this process.
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = None


@contextmanager
def root_gathered(accelerator, policy: nn.Module):
    """The root unit's weights gathered, for calls that bypass ``Policy.forward``.

    ``generate`` calls the embeddings, the blocks and the LM head, but not the policy's
    own forward, whose hook would gather the root unit. Blocks still gather themselves.
    """
    if not is_fsdp(accelerator):
        yield
        return
    # The first FSDP state to run a forward becomes the root: a block reached by generate
    # before the policy ever ran forward would claim it. torch has no public call for this.
    policy._get_fsdp_state()._lazy_init()
    policy.unshard()
    try:
        yield
    finally:
        policy.reshard()


def _sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded tensor; any other tensor as it is."""
    return t.to_local() if _sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every rank must call it)."""
    return t.full_tensor() if _sharded(t) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, the same on every rank) sliced as ``param`` is; no communication."""
    if not _sharded(param) or _sharded(value) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


@contextmanager
def whole_trainable(policy: nn.Module):
    """Within the block the trainable parameters are whole, ordinary tensors, for saving
    (read-only: nothing written to them reaches the shards). Every rank must enter: it
    gathers. Frozen parameters stay sharded."""
    owners = dict(policy.named_modules())
    sharded = [(name, p) for name, p in policy.named_parameters()
               if p.requires_grad and _sharded(p)]
    whole = {name: nn.Parameter(p.full_tensor().detach(), requires_grad=True)
             for name, p in sharded}
    for name, param in whole.items():
        _set(owners, name, param)
    try:
        yield
    finally:
        for name, p in sharded:
            _set(owners, name, p)


@contextmanager
def sliced_loads(accelerator, policy: nn.Module):
    """Within the block, ``load_state_dict`` of whole tensors into sharded parameters keeps
    this rank's slice of each (FSDP2 loads only sharded values); nothing else changes."""
    if not is_fsdp(accelerator):
        yield
        return

    def slice_incoming(module, state_dict, prefix, *args):
        for name, param in module.named_parameters(recurse=False):
            if prefix + name in state_dict:
                state_dict[prefix + name] = shard_like(state_dict[prefix + name], param)

    handles = [m.register_load_state_dict_pre_hook(slice_incoming) for m in policy.modules()
               if any(_sharded(p) for p in m.parameters(recurse=False))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _set(owners: dict, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    owners[module_name]._parameters[attr] = param


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered (a collective)."""
    state = optimizer.state_dict()
    return {**state, "state": {i: {k: full(v) if isinstance(v, torch.Tensor) else v
                                   for k, v in slot.items()}
                               for i, slot in state["state"].items()}}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a whole state: slice each moment as its parameter is."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            slot = optimizer.state.get(p, {})
            for k, v in slot.items():
                if isinstance(v, torch.Tensor):
                    slot[k] = shard_like(v, p)
