"""The benchmarked modes; each runs alone in its own worker process (see ``ppo_step.py``).

* ``detoxrl``: ``PPOTrainer.step``, assembled by ``detoxrl.run.build_trainer`` as in
  ``detoxrl.run.train``.
* ``tutorial``: the tutorial's TRL loop without TRL: one ``generate`` per prompt, one
  pipeline call for the rewards, a full frozen copy of the base model for the reference
  log-probs, forward passes and PPO updates in mini-batches of 4.
* ``floor``: each phase's computation done bare with plain transformers/peft calls
  (``ppo_floor.py``): the floor of the step, phase by phase.

A worker keeps its mode in ``_STATE`` between calls: ``setup`` once, ``step`` per step,
``finish`` at the end for memory figures.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace

import torch

_STATE: dict = {}
TEMPERATURE = 1.0


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
    rss_start = _rss_mb()
    t0 = time.perf_counter()
    runner = _runner_class(mode)(spec)
    _STATE.update(runner=runner, spec=spec)
    info = {"load_s": time.perf_counter() - t0, "rss_imports_mib": rss_start,
            "rss_loaded_mib": _rss_mb(), "load_peak_rss_mib": _peak_rss_mib(),
            "parameters": runner.parameter_counts(), "pid": os.getpid(),
            "torch_threads": torch.get_num_threads()}
    _PEAK["enabled"] = _reset_peak_rss()
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
    _sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = _STATE["runner"].step(prompts, new_tokens, spec["seed"] * 1009 + index)
    _sync()
    out["total"] = time.perf_counter() - t0
    out["cpu"]["total"] = time.process_time() - c0
    if torch.cuda.is_available():  # also here: a run stopped before ``finish`` keeps it
        out["cuda_peak_mib_so_far"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def finish() -> dict:
    """Peak memory of the steps (RSS since the reset in ``setup``, CUDA) and of the process."""
    _mark_peak()
    enabled = _PEAK["enabled"]
    out = {"lifetime_peak_rss_mib": _peak_rss_mib(), "rss_end_mib": _rss_mb(),
           "step_peak_rss_mib": _PEAK["max"] if enabled else _peak_rss_mib(),
           "peak_rss_source": "VmHWM after loading" if enabled
           else "ru_maxrss (process lifetime, includes loading)"}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _runner_class(mode: str):
    if mode == "tutorial":
        from ppo_tutorial import TutorialRunner  # it imports this module's helpers

        return TutorialRunner
    if mode == "floor":
        from ppo_floor import FloorRunner

        return FloorRunner
    return DetoxRunner


# --------------------------------------------------------------------------- memory

def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


_PEAK = {"enabled": False, "max": 0.0}


def _mark_peak() -> float | None:
    """Peak RSS since the last mark (folded into ``_PEAK["max"]``), then reset the mark."""
    if not _PEAK["enabled"]:
        return None
    peak = _hwm_mib() or 0.0
    _PEAK["max"] = max(_PEAK["max"], peak)
    _reset_peak_rss()
    return peak


def _reset_peak_rss() -> bool:
    """Reset Linux's VmHWM (peak RSS) mark; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _hwm_mib() is not None
    except OSError:
        return False


def _hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def param_counts(*modules) -> dict:
    params = [p for m in modules for p in m.parameters()]
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


class Phases:
    """Per phase: wall time (``times``), process CPU time of all threads (``cpu``) and
    peak RSS (``rss``, Linux only)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.rss: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        _sync()
        _mark_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            _sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
            peak = _mark_peak()
            if peak is not None:
                self.rss[name] = max(self.rss.get(name, 0.0), peak)

    def result(self, tokens: int) -> dict:
        return {**self.times, "cpu": dict(self.cpu), "rss_peak_mib": dict(self.rss),
                "tokens": tokens}

    def take(self) -> tuple[dict, dict, dict]:
        """Wall times, CPU times and RSS peaks so far; then start afresh."""
        out = (self.times, self.cpu, self.rss)
        self.times, self.cpu, self.rss = {}, {}, {}
        return out

    def wrap(self, obj, method: str, name: str) -> None:
        """Time ``obj.method`` as phase ``name`` on every call (patched on the instance)."""
        fn = getattr(obj, method)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        setattr(obj, method, timed)


# --------------------------------------------------------------------------- detoxrl

_TRAINER_PHASES = {"rollout": "rollout", "score": "score", "forward_old_and_ref": "forward",
                   "ppo_epochs": "optimize"}


class DetoxRunner:
    """``PPOTrainer`` built by ``detoxrl.run.make_accelerator`` and ``build_trainer``, the
    functions ``detoxrl.run.train`` calls, so the benchmark times the code a run runs."""

    def __init__(self, spec: dict):
        from detoxrl.run import build_trainer, make_accelerator

        cfg = train_config(spec)
        self.trainer = build_trainer(cfg, make_accelerator(cfg))
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
        from detoxrl.data import collate_queries

        trainer = self.trainer
        full_cfg = trainer.cfg
        g = replace(full_cfg.generation, min_new_tokens_draw=new_tokens,
                    max_new_tokens_draw=new_tokens, min_length=new_tokens)
        trainer.cfg = replace(full_cfg, generation=g)
        pol = trainer.policy
        ids, mask = collate_queries(prompts["input_ids"], pol.tokenizer.pad_token_id,
                                    pol.padding_side)
        try:
            if self.rollout_only:  # phase 1 of PPOTrainer.step alone
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
                                  top_k=0, top_p=1.0),
        ppo=PPOConfig(batch_size=spec["batch"], mini_batch_size=spec["mini_batch"],
                      gradient_accumulation_steps=spec["grad_accum"], ppo_epochs=1),
        seed=spec["seed"], output_dir=os.devnull)
    return cfg.finalize(1)


# --------------------------------------------------------------------------- loading

def load_lm(path: str, is_seq2seq: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from detoxrl.loading import load_config, resolve_dtype

    device = default_device()
    dtype = resolve_dtype("auto", load_config(path).model_type, device)
    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype).to(device).eval()


def sampling_kwargs(tokenizer, new_tokens: int) -> dict:
    """The tutorial's sampling (top_k 0, top_p 1) at a fixed length: EOS cannot stop it."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": True,
            "top_k": 0, "top_p": 1.0, "temperature": TEMPERATURE,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
