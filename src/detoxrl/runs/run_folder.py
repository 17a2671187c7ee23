"""The run folder on disk: refusing to mix runs, run files, final weights, metric lines.

Layout (``transformers.Trainer`` conventions): the RL adapter in peft format,
``value_head.safetensors`` (PPO only), the tokenizer and a model card (``README.md``) at the
top; ``config.yaml`` and ``run_info.json`` (algorithm, versions, seed, command, rewards);
``metrics.jsonl`` (one line per step); ``samples.jsonl``; ``checkpoints/step-N``. Only the
main process writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from ..config import PPOConfig, TrainConfig, to_dict
from ..errors import ConfigError
from .checkpoint import list_checkpoints
from .io import atomic_write_json, atomic_write_text, check_writable, remove_leftovers, to_jsonable

# What a run writes at the top of its folder; --overwrite removes these and nothing else.
RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "eval_curve.jsonl", "samples.md",
               "checkpoints", "eval",
               "report.html", "README.md", "config.yaml", "run_info.json",
               "adapter_config.json", "adapter_model.safetensors", "value_head.safetensors",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "detoxrl")


# Options a resumed run may change: they extend or log the run, not its result.
RESUME_MAY_CHANGE = ("steps", "save_every", "log_with", "num_samples_logged", "output_dir",
                     "max_skipped_steps", "eval_every")
# Sizes finalize() derives for this machine and process count, not options of the run.
_DERIVED = tuple(f"ppo.{f.name}" for f in dataclasses.fields(PPOConfig)
                 if f.metadata.get("derived"))


def precheck_output_dir(out: Path, resume: bool, overwrite: bool,
                        cfg: TrainConfig | None = None) -> None:
    """Refuse, before anything loads or is written, what would mix two runs in ``out``."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite deletes "
                          "it; pass only one of them.")
    check_writable(out, "output_dir")
    if resume and not list_checkpoints(out):
        raise ConfigError(f"Nothing to resume in {str(out)!r}: it holds no checkpoints/"
                          "step-N folder. Set save_every to write checkpoints, or start "
                          "without --resume.")
    if not resume and not overwrite and holds_results(out):
        raise ConfigError(f"{str(out)!r} already holds a run. Pass --resume to continue it, "
                          "--overwrite to start again, or choose another --output-dir.")
    if resume and cfg is not None:
        check_resume_config(out, cfg)


def holds_results(out: Path) -> bool:
    """A run that wrote a checkpoint or its final weights; one killed before its first
    checkpoint left only logs, which a new start replaces."""
    return bool(list_checkpoints(out)) or (out / "adapter_model.safetensors").exists()


def check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """A resumed run must be the same run: list every option that differs from config.yaml."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return  # nothing readable to compare with; the checkpoint itself still has to load
    old, new = flatten(saved if isinstance(saved, dict) else {}), flatten(to_dict(cfg))
    diffs = [f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now"
             for k in sorted(set(old) | set(new))
             if k in old and k.split(".")[0] not in RESUME_MAY_CHANGE and k not in _DERIVED
             and old.get(k) != new.get(k)]
    if diffs:
        raise ConfigError(f"--resume would continue the run in {str(out)!r} with different "
                          "settings, which would mix two runs: " + "; ".join(diffs) + ". Resume "
                          "with the run's values (only " + ", ".join(RESUME_MAY_CHANGE[:4])
                          + " may change), or start a new run in another --output-dir.")


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"ppo": {"beta": 0.1}}`` -> ``{"ppo.beta": 0.1}``: nested sections as dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_output_dir(out: Path, resume: bool, overwrite: bool, accelerator,
                     cfg: TrainConfig | None = None) -> Path | None:
    """The checkpoint to resume from, or None; with ``overwrite``, the old run is removed."""
    precheck_output_dir(out, resume, overwrite, cfg)
    if accelerator.is_main_process:
        for folder in (out, out / "checkpoints"):
            for path in remove_leftovers(folder):
                warnings.warn(f"Removed {path}, left by a save that was killed.", stacklevel=2)
    if resume:
        check_world_size(out, accelerator.num_processes)
        return list_checkpoints(out)[-1]
    restart = (out / "metrics.jsonl").exists() and not overwrite
    if restart and accelerator.is_main_process:
        warnings.warn(f"{str(out)!r} holds a run stopped before its first checkpoint; "
                      "starting it again.", stacklevel=2)
    if (overwrite or restart) and accelerator.is_main_process:
        for name in RUN_OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return None


def recorded_world_size(out: Path) -> int | None:
    """The number of processes a run folder was trained on (run_info.json, else config.yaml)."""
    info, config = out / "run_info.json", out / "config.yaml"
    if info.exists():
        return int(json.loads(info.read_text()).get("world_size", 1))
    if config.exists():
        return int((yaml.safe_load(config.read_text()) or {}).get("ppo", {}).get("world_size", 1))
    return None


def check_world_size(out: Path, world_size: int) -> None:
    # Each rank's data shard and sampling seed depend on (rank, world size), and the optimizer
    # state assumes the same per-rank batch: a different world size is a different run.
    recorded = recorded_world_size(out)
    if recorded is not None and recorded != world_size:
        raise ConfigError(
            f"{str(out)!r} was trained on {recorded} process(es) but this launch has "
            f"{world_size}. Resume with the same number of processes (accelerate launch "
            f"--num_processes {recorded} ...), or start a new run in another --output-dir.")


def write_run_files(out: Path, cfg: TrainConfig, accelerator, first_step: int,
                    rewards: list[dict] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write_json(out / "run_info.json", run_info(cfg, accelerator, rewards))
    # A resumed run continues the log from its checkpoint; later lines belonged to the
    # interrupted attempt and are dropped.
    for name in ("metrics.jsonl", "samples.jsonl", "eval_curve.jsonl"):
        path = out / name
        if path.exists():
            kept = [ln for ln in path.read_text(errors="replace").splitlines()
                    if (row := _json_line(ln)) is not None and row.get("step", 0) <= first_step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _json_line(line: str) -> dict | None:
    """A metrics line, or None for a blank or torn one (a crash mid-write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def versions() -> dict[str, str]:
    """The versions that decide a result: Python, torch and the Hugging Face libraries."""
    import accelerate
    import datasets
    import peft
    import transformers

    return {"detoxrl": __version__, "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__}


def provenance(cfg: Any) -> dict:
    """What every output of ours records: seed, command, versions and the resolved config."""
    return {"seed": cfg.seed, "command": sys.argv, "detoxrl": __version__,
            "versions": versions(), "config": to_dict(cfg)}


def run_info(cfg: TrainConfig, accelerator=None, rewards: list[dict] | None = None) -> dict:
    """``run_info.json`` of an RL run: :func:`provenance` plus algorithm, world size, device
    and the rewards."""
    return {"algorithm": cfg.ppo.algorithm, **provenance(cfg),
            "world_size": accelerator.num_processes if accelerator else 1,
            "device": str(accelerator.device) if accelerator else "cpu",
            "rewards": rewards or []}


def save_final(out: Path, policy) -> None:
    """Adapter, value head and tokenizer, each file moved into place atomically."""
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        policy.save(tmp)
        policy.tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def samples(step: int, rollout, n: int) -> list[dict]:
    scores = rollout.scores.tolist() if rollout.scores is not None else [None] * len(rollout)
    return [{"step": step, "query": q, "response": r, "score": s}
            for q, r, s in list(zip(rollout.queries, rollout.responses, scores, strict=True))[:n]]


def append_jsonl(path: Path, rows: list[dict]) -> None:
    # Appending whole lines with one write and fsync keeps the file readable after a crash.
    with path.open("a") as fh:
        # Strict JSON: NaN and infinities are written as null.
        fh.write("".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())
