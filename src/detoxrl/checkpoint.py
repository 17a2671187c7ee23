"""Atomic, pickle-free checkpoints that resume a run exactly.

A checkpoint folder ``checkpoints/step-N`` holds the RL adapter (peft format), the value head
(PPO only), the optimizer state as safetensors plus JSON, and ``trainer_state.json`` with the
step, the KL controller, running score moments, LR scheduler and the RNG states. It is
written into a temporary sibling and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .io import atomic_dir, atomic_write_json, to_jsonable

STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_state_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for idx, slot in state["state"].items():
        for name, value in slot.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    meta = {"python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_meta = meta["numpy"]
    np.random.set_state((np_meta[0], np.array(np_meta[1], dtype=np.uint32), *np_meta[2:]))


def save_checkpoint(run_dir: Path, step: int, policy, optimizer, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically; keep the newest ``keep``."""
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    with atomic_dir(final) as tmp:
        policy.save(tmp / "adapter")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors, tmp / "rng.safetensors")
        atomic_write_json(tmp / "optimizer.json", opt_meta)
        atomic_write_json(tmp / "trainer_state.json",
                          {**to_jsonable(trainer_state), "step": step, "rng": rng_meta})
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, policy, optimizer) -> dict:
    """Restore weights, optimizer and RNG from ``path``; return the trainer state."""
    path = Path(path)
    policy.load_trained(path / "adapter")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(
        optimizer_state_from_tensors(load_file(path / "optimizer.safetensors"), meta))
    state = json.loads((path / "trainer_state.json").read_text())
    set_rng_state(load_file(path / "rng.safetensors"), state.pop("rng"))
    return state
