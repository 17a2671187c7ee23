"""Atomic, pickle-free checkpoints that resume a run exactly.

A checkpoint folder ``checkpoints/step-N`` holds the RL adapter (peft format), the value head
(PPO only), the optimizer state as safetensors plus JSON, and ``trainer_state.json`` with the
step, the KL controller, running score moments, LR scheduler and the RNG states. It is
written into a temporary sibling and renamed into place, so a folder that exists was complete
when written. ``manifest.json``, written last, lists every file with its size and SHA-256: a
checkpoint damaged later (a file deleted, truncated or corrupted) is detected before anything
is loaded from it, and resuming falls back to the newest intact one. A run without a value
head (RLOO, GRPO) simply has none in its manifest; one that had it must find it again.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from .io import atomic_dir, atomic_write_json, file_sha256, to_jsonable

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
VALUE_HEAD = "adapter/value_head.safetensors"
# What every checkpoint holds; checkpoints written before manifests are checked against it.
REQUIRED = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer_state.json")


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
    """Write ``run_dir/checkpoints/step-{step}`` atomically; keep the newest ``keep``.

    ``optimizer``: the optimizer, or its (whole, not sharded) ``state_dict()``."""
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    opt_tensors, opt_meta = optimizer_state_to_tensors(state)
    rng_tensors, rng_meta = rng_state()
    with atomic_dir(final) as tmp:
        policy.save(tmp / "adapter")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors, tmp / "rng.safetensors")
        atomic_write_json(tmp / "optimizer.json", opt_meta)
        atomic_write_json(tmp / "trainer_state.json",
                          {**to_jsonable(trainer_state), "step": step, "rng": rng_meta})
        atomic_write_json(tmp / MANIFEST, {"files": _file_list(tmp)})
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, policy, optimizer) -> dict:
    """Restore weights, optimizer and RNG from ``path``; return the trainer state.

    The checkpoint is verified first, so a damaged one raises ConfigError with nothing
    loaded.
    """
    path = Path(path)
    problem = checkpoint_problem(path, expects_value_head=_has_trainable_head(policy))
    if problem:
        raise ConfigError(f"Checkpoint {str(path)!r} is damaged: {problem}. Resume from "
                          "another checkpoint, or start again with --overwrite.")
    return _load(path, policy, optimizer)


def _load(path: Path, policy, optimizer) -> dict:
    policy.load_trained(path / "adapter")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(
        optimizer_state_from_tensors(load_file(path / "optimizer.safetensors"), meta))
    state = json.loads((path / "trainer_state.json").read_text())
    set_rng_state(load_file(path / "rng.safetensors"), state.pop("rng"))
    return state


def load_latest(run_dir: Path, policy, optimizer, announce: bool = True) -> dict:
    """Load the newest intact checkpoint of ``run_dir``; damaged ones are named and skipped.

    A checkpoint that passes the manifest check but still fails to load is skipped too:
    every load restores the adapter, value head, optimizer and RNG in full, so the next
    one replaces whatever the failed attempt had set.
    """
    damaged = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path, expects_value_head=_has_trainable_head(policy))
        if problem is None:
            try:
                state = _load(path, policy, optimizer)
            except Exception as exc:  # safetensors, JSON, peft and torch raise their own
                problem = f"it cannot be loaded ({_short(exc)})"
        if problem is not None:
            damaged.append(path.name)
            if announce:
                warnings.warn(f"Checkpoint {path} is damaged, skipping it: {problem}.",
                              stacklevel=2)
            continue
        if damaged and announce:
            warnings.warn(f"Resuming from {path}, the newest intact checkpoint (skipped: "
                          f"{', '.join(damaged)}).", stacklevel=2)
        return state
    raise ConfigError(f"No intact checkpoint in {str(Path(run_dir) / 'checkpoints')!r} "
                      f"(damaged: {', '.join(damaged) or 'none found'}). Start again with "
                      "--overwrite.")


def checkpoint_problem(path: Path, expects_value_head: bool = False) -> str | None:
    """What is wrong with checkpoint folder ``path``, or None if it is intact."""
    manifest = path / MANIFEST
    if not manifest.is_file():  # written before manifests: the files must at least exist
        needed = [*REQUIRED, *([VALUE_HEAD] if expects_value_head else [])]
        missing = [name for name in needed if not (path / name).is_file()]
        return f"missing {', '.join(missing)}" if missing else None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} cannot be read"
    for name, entry in files.items():
        target = path / name
        if not target.is_file():
            return f"{name} is missing"
        if target.stat().st_size != entry["bytes"]:
            return (f"{name} has {target.stat().st_size} bytes, {entry['bytes']} were "
                    "written (truncated?)")
        if file_sha256(target) != entry["sha256"]:
            return f"{name} does not match the checksum written with it (corrupted)"
    return None


def _file_list(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _has_trainable_head(policy) -> bool:
    head = getattr(policy, "value_head", None)
    return head is not None and any(p.requires_grad for p in head.parameters())


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
