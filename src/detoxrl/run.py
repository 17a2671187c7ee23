"""A training run: builds the pieces from a config, loops PPO steps, writes the run folder.

Output folder (``transformers.Trainer`` conventions): the RL adapter in peft format,
``value_head.safetensors`` (PPO only) and the tokenizer at the top; ``config.yaml`` and
``run_info.json`` (algorithm, versions, seed, command); ``metrics.jsonl`` (one line per step);
``samples.jsonl`` / ``samples.md``; ``checkpoints/step-N``. Only the main process writes.

Data order and sampling are pure functions of (seed, step, rank), and each checkpoint holds
the weights, optimizer, KL controller, score moments, scheduler and RNG, so ``resume=True``
ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import __version__, tiny
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig, to_dict
from .distributed import zero_stage
from .errors import ConfigError
from .io import atomic_write_json, atomic_write_text
from .trainer import PPOTrainer, RewardFn


@dataclass
class RunResult:
    output_dir: Path
    metrics: list[dict]
    trainer: PPOTrainer


def train(cfg: TrainConfig, reward_fn: RewardFn | None = None, resume: bool = False,
          overwrite: bool = False, quiet: bool = False) -> RunResult:
    """Train a policy with PPO as ``cfg`` says; ``reward_fn`` overrides ``cfg.reward``."""
    from .data import build_prompts
    from .loading import load_tokenizer

    accelerator = make_accelerator(cfg, resume=resume)
    out = Path(cfg.output_dir)
    start = _check_output_dir(out, resume, overwrite, accelerator,  # before any model loads
                              cfg.ppo.algorithm)
    _resolve_tiny_names(cfg, accelerator)
    # Data errors surface before the models load; the prompts need only the tokenizer.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision,
                               cfg.model.trust_remote_code)
    prompts = build_prompts(cfg.data, tokenizer, seed=cfg.seed).train
    trainer = build_trainer(cfg, accelerator, reward_fn, quiet=quiet)
    if start is not None:
        state = load_checkpoint(start, trainer.policy, trainer.optimizer)
        trainer.load_state_dict(state)
        first_step = state["step"]
    else:
        first_step = 0
    if accelerator.is_main_process:
        _write_run_files(out, cfg, accelerator, first_step)
    if cfg.log_with:
        accelerator.init_trackers("detoxrl", config=_flat(to_dict(cfg)))
    metrics = _loop(cfg, trainer, prompts, first_step, accelerator, quiet)
    with _gathered_trainable(accelerator, trainer.policy):  # ZeRO-3: every rank must enter
        if accelerator.is_main_process:
            _save_final(out, trainer.policy)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, metrics, trainer)


def make_accelerator(cfg: TrainConfig, resume: bool = False):
    """The ``Accelerator`` a run trains under, ready for ``build_trainer``.

    Public so that other entry points (the benchmark) get the run's mixed precision and
    checks rather than a copy of them. It refuses a broken multi-process launch, finalizes
    ``cfg`` for the number of processes (per-rank batch sizes) and, under DeepSpeed, fills
    the batch sizes ``prepare`` needs or refuses what is unsupported (``resume`` included),
    all before a model is loaded.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), log_with=cfg.log_with or None,
                              project_dir=cfg.output_dir)
    _check_launch(accelerator)
    cfg.finalize(accelerator.num_processes)
    _setup_deepspeed(cfg, accelerator, resume)
    return accelerator


def build_trainer(cfg: TrainConfig, accelerator, reward_fn: RewardFn | None = None,
                  quiet: bool = True) -> PPOTrainer:
    """A ``PPOTrainer`` at step 0: policy, reward, optimizer and scheduler, prepared.

    The one place these are assembled, so ``train`` and the benchmark measure and run the
    same thing. ``cfg`` must be finalized (``make_accelerator`` does it). The seed is set
    just before the policy is built, so the LoRA and value-head initialisation depend on
    ``cfg.seed`` alone. ``reward_fn`` overrides ``cfg.reward``; ``quiet=False`` prints the
    parameter report on the main process. Checkpoint state is the caller's to load.
    """
    from accelerate.utils import set_seed

    from .policy import Policy

    _resolve_tiny_names(cfg, accelerator)
    set_seed(cfg.seed)                        # LoRA and value-head initialisation
    policy = Policy.from_pretrained(cfg.model, cfg.lora, device=accelerator.device,
                                    value_head=cfg.ppo.has_value_head)
    if accelerator.is_main_process and not quiet:
        print_parameter_report(policy)
    if reward_fn is None:
        from .reward import ClassifierReward

        with _whole_weights(accelerator):  # no engine wraps the classifier: never shard it
            reward_fn = ClassifierReward.from_config(cfg.reward, device=accelerator.device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=cfg.ppo.learning_rate, weight_decay=cfg.ppo.weight_decay)
    scheduler = _scheduler(cfg, optimizer)
    model, optimizer = accelerator.prepare(policy, optimizer)
    return PPOTrainer(cfg, model, reward_fn, accelerator, optimizer, scheduler)


def _resolve_tiny_names(cfg: TrainConfig, accelerator) -> None:
    with accelerator.local_main_process_first():  # tiny: names are built once per machine
        for name in (cfg.model.name_or_path, cfg.data.path, cfg.reward.model):
            tiny.resolve(name)


def _loop(cfg, trainer, prompts, first_step, accelerator, quiet) -> list[dict]:
    from tqdm.auto import tqdm

    from .data import collate_queries

    out, main = Path(cfg.output_dir), accelerator.is_main_process
    pad_id, side = trainer.policy.tokenizer.pad_token_id, trainer.policy.padding_side
    bar = tqdm(total=cfg.steps, initial=first_step, disable=quiet or not main, desc="PPO")
    history = []
    for step in range(first_step, cfg.steps):
        rows = prompts[batch_indices(step, len(prompts), cfg, accelerator.process_index)]
        query_ids, query_mask = collate_queries(rows["input_ids"], pad_id, side)
        result = trainer.step(query_ids, query_mask, rows["query"],
                              step_seed(cfg.seed, step, accelerator.process_index))
        metrics = {"step": step + 1, **result.metrics}
        history.append(metrics)
        if main:
            _append_jsonl(out / "metrics.jsonl", [metrics])
            _append_jsonl(out / "samples.jsonl", _samples(step + 1, result.rollout,
                                                          cfg.num_samples_logged))
            bar.set_postfix(reward=f"{metrics.get('env/reward_mean', float('nan')):.3f}",
                            kl=f"{metrics.get('objective/kl', float('nan')):.3f}")
        if cfg.log_with:
            accelerator.log(result.metrics, step=step + 1)
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _checkpoint(out, step + 1, trainer, accelerator)
    bar.close()
    return history


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


def _checkpoint(out: Path, step: int, trainer: PPOTrainer, accelerator) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out, step, trainer.policy, trainer.optimizer, trainer.state_dict())
    accelerator.wait_for_everyone()


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


def _check_output_dir(out: Path, resume: bool, overwrite: bool, accelerator,
                      algorithm: str = "ppo") -> Path | None:
    """The checkpoint to resume from, or None; refuses to mix two runs in one folder."""
    if resume:
        found = list_checkpoints(out)
        if not found:
            raise ConfigError(f"Nothing to resume in {str(out)!r}: it holds no checkpoints/"
                              "step-N folder. Set save_every to write checkpoints, or start "
                              "without --resume.")
        _check_world_size(out, accelerator.num_processes)
        _check_algorithm(out, algorithm)
        return found[-1]
    if (out / "metrics.jsonl").exists() and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds a run. Pass --resume to continue it, "
                          "--overwrite to start again, or choose another --output-dir.")
    if overwrite and accelerator.is_main_process:
        for name in ("metrics.jsonl", "samples.jsonl", "checkpoints"):
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


def _check_world_size(out: Path, world_size: int) -> None:
    # Each rank's data shard and sampling seed depend on (rank, world size), and the optimizer
    # state assumes the same per-rank batch: a different world size is a different run.
    recorded = recorded_world_size(out)
    if recorded is not None and recorded != world_size:
        raise ConfigError(
            f"{str(out)!r} was trained on {recorded} process(es) but this launch has "
            f"{world_size}. Resume with the same number of processes (accelerate launch "
            f"--num_processes {recorded} ...), or start a new run in another --output-dir.")


def _check_algorithm(out: Path, algorithm: str) -> None:
    info = out / "run_info.json"
    recorded = json.loads(info.read_text()).get("algorithm", "ppo") if info.exists() else None
    if recorded is not None and recorded != algorithm:
        raise ConfigError(f"{str(out)!r} was trained with ppo.algorithm {recorded!r}, not "
                          f"{algorithm!r}: its checkpoints hold another model (value head or "
                          "not). Resume with the same algorithm, or use another --output-dir.")


def _setup_deepspeed(cfg: TrainConfig, accelerator, resume: bool) -> None:
    """Fill the DeepSpeed batch sizes ``prepare`` needs; refuse what is not supported yet."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    p, ds = cfg.ppo, plugin.deepspeed_config
    if p.gradient_accumulation_steps != 1 or ds.get("gradient_accumulation_steps") not in (
            1, "auto", None):
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


def _gathered_trainable(accelerator, policy):
    """Under ZeRO-3, the full LoRA and value-head weights on every rank (a collective)."""
    if zero_stage(accelerator) != 3:
        return nullcontext()
    import deepspeed

    params = [q for q in policy.parameters() if q.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _write_run_files(out: Path, cfg: TrainConfig, accelerator, first_step: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write_json(out / "run_info.json", run_info(cfg, accelerator))
    # A resumed run continues the log from its checkpoint; later lines belonged to the
    # interrupted attempt and are dropped.
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = out / name
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln and json.loads(ln)["step"] <= first_step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def run_info(cfg: TrainConfig, accelerator=None) -> dict:
    import accelerate
    import datasets
    import peft
    import transformers

    return {
        "algorithm": cfg.ppo.algorithm, "seed": cfg.seed, "command": sys.argv,
        "detoxrl": __version__,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__, "datasets": datasets.__version__},
        "world_size": accelerator.num_processes if accelerator else 1,
        "device": str(accelerator.device) if accelerator else "cpu",
        "config": to_dict(cfg),
    }


def _save_final(out: Path, policy) -> None:
    """Adapter, value head (PPO) and tokenizer, each file moved into place atomically."""
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        policy.save(tmp)
        policy.tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _samples(step: int, rollout, n: int) -> list[dict]:
    scores = rollout.scores.tolist() if rollout.scores is not None else [None] * len(rollout)
    return [{"step": step, "query": q, "response": r, "score": s}
            for q, r, s in list(zip(rollout.queries, rollout.responses, scores, strict=True))[:n]]


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    # Appending whole lines with one write and fsync keeps the file readable after a crash.
    with path.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


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
