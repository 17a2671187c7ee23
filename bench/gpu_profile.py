#!/usr/bin/env python
"""Where a detoxrl PPO step's time and memory go on a GPU: torch.profiler, phase by phase.

    python bench/gpu_profile.py --shape {tiny,flan-t5-base,gpt2} [--out bench/results]

Builds the detoxrl mode of ``ppo_step.py`` (same shapes, prompts and settings: batch 16,
64 new tokens), takes one warm-up step, then one step with each trainer phase (rollout,
score, forward, optimize) under its own profiler. Per phase: wall time, the time the GPU
spent in kernels, kernel launches, peak CUDA memory, and the operators that took the most
GPU (CPU without one) time. A phase whose kernels fill a small share of its wall time is
bound by the host launching them (Python, generate's per-token loop), not by the GPU.
Results: ``<out>/gpu_profile-<shape>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_phase(fn, records: dict, name: str, kernels_only: bool = False):
    """``fn`` wrapped so that each call runs under its own profiler, recorded as ``name``.

    ``kernels_only`` (on CUDA): record the GPU's kernels and the runtime calls, not every
    operator on the host, whose recording adds its own host time to each one.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = ([ProfilerActivity.CUDA] if cuda and kernels_only else
                  [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)

    def profiled(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            out = fn(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
        records[name] = summarize(prof, time.perf_counter() - t0, cuda)
        return out

    return profiled


def summarize(prof, wall_s: float, cuda: bool) -> dict:
    events = prof.key_averages()
    kernel_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {"wall_s": wall_s, "kernel_s": kernel_us / 1e6,
            "gpu_busy": kernel_us / 1e6 / wall_s if wall_s else 0.0,
            "kernel_launches": launches,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "top_ops": events.table(sort_by=sort_by, row_limit=12, max_name_column_width=60)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="generation.cuda_graphs off: every decoding step launched kernel "
                         "by kernel (results named gpu_profile-<shape>-eager)")
    ap.add_argument("--kernels-only", action="store_true",
                    help="profile GPU kernels and runtime calls only, not host operators: "
                         "less of the profiler's own time in the wall time (results named "
                         "...-kernels)")
    ap.add_argument("--warmup", choices=("short", "step"), default="short",
                    help="before the profiled step: a short step (one mini-batch, 4 tokens) "
                         "or a full one, so that no shape is new to the GPU libraries")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ppo_modes
    import ppo_step

    step_args = ppo_step.parse_args(["--shape", args.shape, "--warmup", args.warmup]
                                    + ["--no-cuda-graphs"] * args.no_cuda_graphs)
    spec, _ = ppo_step.spec_from_args(step_args)
    ppo_modes.setup("detoxrl", spec)
    ppo_modes.step(-1, True)
    trainer = ppo_modes._STATE["runner"].trainer
    records: dict = {}
    for method, name in ppo_modes._TRAINER_PHASES.items():
        setattr(trainer, method, profile_phase(getattr(trainer, method), records, name,
                                               args.kernels_only))
    t0 = time.perf_counter()
    ppo_modes.step(0, False)
    report = {"shape": args.shape, "cuda_graphs": not args.no_cuda_graphs,
              "kernels_only": args.kernels_only, "warmup": args.warmup,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__,
              "step_wall_s_under_profiler": time.perf_counter() - t0, "phases": records}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"gpu_profile-{args.shape}{'-eager' * args.no_cuda_graphs}"
                       f"{'-kernels' * args.kernels_only}")
    tables = {k: v.pop("top_ops") for k, v in records.items()}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report, tables))
    print(markdown(report, {}))
    return 0


def markdown(report: dict, tables: dict) -> str:
    lines = [f"# gpu_profile: {report['shape']} on {report['gpu'] or 'CPU'}", "",
             "| phase | wall s | kernel s | GPU busy | launches | peak CUDA MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["phases"].items():
        peak = "" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}"
        lines.append(f"| {name} | {r['wall_s']:.3f} | {r['kernel_s']:.3f} | "
                     f"{r['gpu_busy']:.0%} | {r['kernel_launches']} | {peak} |")
    for name, table in tables.items():
        lines += ["", f"## {name}: top operators", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
