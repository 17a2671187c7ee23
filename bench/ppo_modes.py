"""The benchmarked modes; each runs alone in its own worker process (see ``ppo_step.py``).

* ``detoxrl``: ``Learner.step``, assembled by ``detoxrl.rl.assembly.build_learner`` as
  every run assembles it.
* ``tutorial``: the tutorial's TRL loop without TRL: one ``generate`` per prompt, one
  pipeline call for the rewards, a full frozen copy of the base model for the reference
  log-probs, forward passes and PPO updates in mini-batches of 4.
* ``floor``: each phase's computation done bare with plain transformers/peft calls
  (``ppo_floor.py``): the floor of the step, phase by phase.

A worker keeps its mode in ``_STATE`` between calls: ``setup`` once, ``step`` per step,
``finish`` at the end for memory figures.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import replace

import torch

from ppo_floor import FloorRunner
from ppo_phases import (
    PEAK,
    Phases,
    mark_peak,
    param_counts,
    peak_rss_mib,
    reset_peak_rss,
    rss_mb,
    sync,
)
from ppo_tutorial import TutorialRunner

_STATE: dict = {}


# --------------------------------------------------------------------------- worker API

def setup(mode: str, spec: dict) -> dict:
    """Build the mode's models; then reset the peak-RSS mark so steps are measured alone."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_start = rss_mb()
    t0 = time.perf_counter()
    runner = _runner_class(mode)(spec)
    _STATE.update(runner=runner, spec=spec)
    info = {"load_s": time.perf_counter() - t0, "rss_imports_mib": rss_start,
            "rss_loaded_mib": rss_mb(), "load_peak_rss_mib": peak_rss_mib(),
            "parameters": runner.parameter_counts(), "pid": os.getpid(),
            "torch_threads": torch.get_num_threads()}
    PEAK["enabled"] = reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        info["cuda_loaded_mib"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    return info


def step(index: int, warmup: bool) -> dict:
    """One PPO step (only its rollout with ``rollout_only``): wall and CPU
    seconds per phase, peak RSS per phase, and the number of generated tokens."""
    spec = _STATE["spec"]
    rows = spec["warmup_rows"] if warmup else spec["batch"]
    new_tokens = spec["warmup_tokens"] if warmup else spec["new_tokens"]
    prompts = {k: spec["prompts"][k][:rows] for k in ("input_ids", "query")}
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = _STATE["runner"].step(prompts, new_tokens, spec["seed"] * 1009 + index)
    sync()
    out["total"] = time.perf_counter() - t0
    out["cpu"]["total"] = time.process_time() - c0
    if torch.cuda.is_available():  # also here: a run stopped before ``finish`` keeps it
        out["cuda_peak_mib_so_far"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def finish() -> dict:
    """Peak memory of the steps (RSS since the reset in ``setup``, CUDA) and of the process."""
    mark_peak()
    enabled = PEAK["enabled"]
    out = {"lifetime_peak_rss_mib": peak_rss_mib(), "rss_end_mib": rss_mb(),
           "step_peak_rss_mib": PEAK["max"] if enabled else peak_rss_mib(),
           "peak_rss_source": "VmHWM after loading" if enabled
           else "ru_maxrss (process lifetime, includes loading)"}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _runner_class(mode: str):
    return {"tutorial": TutorialRunner, "floor": FloorRunner}.get(mode, DetoxRunner)


# --------------------------------------------------------------------------- detoxrl

_TRAINER_PHASES = {"rollout": "rollout", "score": "score", "forward_old_and_ref": "forward",
                   "ppo_epochs": "optimize"}


class DetoxRunner:
    """``Learner`` built by ``detoxrl.rl.distributed.make_accelerator`` and
    ``detoxrl.rl.assembly.build_learner``, the functions every run calls (through
    ``DetoxTrainer``), so the benchmark times the code a run runs."""

    def __init__(self, spec: dict):
        from detoxrl.rl.assembly import build_learner
        from detoxrl.rl.distributed import make_accelerator

        cfg = train_config(spec)
        self.trainer = build_learner(cfg, make_accelerator(cfg))
        self.reward = self.trainer.reward_fn.funcs[0]  # the classifier (a RewardSet of one)
        self.rollout_only = spec["rollout_only"]
        # CPU time per phase, from wrappers around the methods the trainer's timer wraps;
        # the wall times reported are the trainer's own ``time/*`` metrics.
        self.cpu_phases = Phases()
        for method, name in _TRAINER_PHASES.items():
            self.cpu_phases.wrap(self.trainer, method, name)

    def parameter_counts(self) -> dict:
        return {"policy": param_counts(self.trainer.policy),
                "reward": param_counts(self.reward.model)["total"]}

    def step(self, prompts: dict, new_tokens: int, seed: int) -> dict:
        from detoxrl.models.generation import collate_queries

        trainer = self.trainer
        full_cfg = trainer.cfg
        g = replace(full_cfg.generation, min_new_tokens_draw=new_tokens,
                    max_new_tokens_draw=new_tokens, min_length=new_tokens)
        trainer.cfg = replace(full_cfg, generation=g)
        pol = trainer.policy
        ids, mask = collate_queries(prompts["input_ids"], pol.tokenizer.pad_token_id,
                                    pol.padding_side)
        try:
            if self.rollout_only:  # phase 1 of Learner.step alone
                rollout = trainer.rollout(ids, mask, prompts["query"], seed)
            else:
                result = trainer.step(ids, mask, prompts["query"], seed)
                rollout = result.rollout
        finally:
            trainer.cfg = full_cfg
        wall, cpu, rss = self.cpu_phases.take()
        if not self.rollout_only:  # the trainer's own time/* metrics
            wall = {k: result.metrics.get(f"time/{k}", 0.0) for k in _TRAINER_PHASES.values()}
        return {**wall, "cpu": cpu, "rss_peak_mib": rss,
                "tokens": int(rollout.response_mask.sum())}


def train_config(spec: dict):
    """The run config: the tutorial's PPO settings, fixed-length responses."""
    from detoxrl.config import (
        LoraSettings,
        ModelConfig,
        PPOConfig,
        RewardConfig,
        SamplingConfig,
        TrainConfig,
    )

    n = spec["new_tokens"]
    cfg = TrainConfig(
        model=ModelConfig(name_or_path=spec["policy"],
                          gradient_checkpointing=spec["gradient_checkpointing"]),
        lora=LoraSettings(r=spec["lora_r"], alpha=spec["lora_r"]),
        reward=RewardConfig(model=spec["classifier"], score_on=spec["score_on"],
                            batch_size=spec["batch"]),
        generation=SamplingConfig(min_new_tokens_draw=n, max_new_tokens_draw=n, min_length=n,
                                  top_k=0, top_p=1.0,
                                  cuda_graphs=spec["cuda_graphs"]),
        ppo=PPOConfig(batch_size=spec["batch"], mini_batch_size=spec["mini_batch"],
                      gradient_accumulation_steps=spec["grad_accum"], ppo_epochs=1),
        seed=spec["seed"], output_dir=os.devnull)
    return cfg.finalize(1)
