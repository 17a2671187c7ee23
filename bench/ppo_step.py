#!/usr/bin/env python
"""Wall time and memory of one PPO step: detoxrl vs. the tutorial's loop vs. its floor.

    python bench/ppo_step.py --shape {tiny,flan-t5-base,gpt2} [--steps N] [--batch 16]
        [--new-tokens 64] [--out bench/results]

Each mode runs in its own spawned worker process (so its peak RSS is its own); the workers
take turns, one step each (detoxrl, tutorial, floor, then the reverse order), after one
warm-up step each. The floor mode (ppo_floor.py) does each phase's computation bare,
outside detoxrl; detoxrl's step and phases are reported as ratios to it.
Results: ``<out>/ppo_step-<shape>-<device>.json`` and ``.md``.
See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # worker processes import ppo_modes by name
    sys.path.insert(0, str(BENCH))

import ppo_modes  # noqa: E402
from detoxrl.runs.io import atomic_write_json  # noqa: E402
from ppo_models import SHAPES, data_file, load_prompts, prepare_shape  # noqa: E402
from ppo_report import summarize, write_outputs  # noqa: E402

MODES = ("detoxrl", "tutorial", "floor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, required=True)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per mode (median)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per PPO step")
    ap.add_argument("--mini-batch", type=int, default=4, help="PPO mini-batch (TRL's 4)")
    ap.add_argument("--grad-accum", type=_accum, default="auto",
                    help="detoxrl only: micro-batches per mini-batch "
                         "(ppo.gradient_accumulation_steps; the same update, less memory); "
                         "default 'auto', detoxrl's default")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="detoxrl only: model.gradient_checkpointing (less memory, more compute)")
    ap.add_argument("--new-tokens", type=int, default=64,
                    help="response length; fixed (min = max), so EOS cannot end it early")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt truncation")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--score-on", choices=("response", "query+response"), default="response",
                    help="what the classifier reads, in both modes")
    ap.add_argument("--warmup", choices=("step", "short", "none"), default="step",
                    help="before measuring, each mode runs a full step, a short one "
                         "(one mini-batch, 4 new tokens) or none")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="detoxrl only: generation.cuda_graphs off (each decoding step "
                         "launched kernel by kernel on a GPU)")
    ap.add_argument("--rollout-only", action="store_true",
                    help="time only the rollout phase (cheap; more repeats fit); results go "
                         "to ppo_step-<shape>-<device>-rollout.*")
    ap.add_argument("--data", type=Path, default=None,
                    help="DialogSum JSONL (default ../shared/data/dialogsum/train.jsonl; "
                         "synthetic dialogues when absent)")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per worker (default: torch's choice, one per core)")
    ap.add_argument("--malloc-threshold-mib", type=int, default=32,
                    help="glibc mmap threshold for the workers (trim threshold: twice it); "
                         "0 keeps glibc's dynamic default. See bench/README.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.new_tokens < 1:
        ap.error("--steps, --batch and --new-tokens must be at least 1")
    if args.batch % args.mini_batch:
        ap.error("--batch must be a multiple of --mini-batch")
    if args.grad_accum != "auto" and (args.grad_accum < 1 or args.mini_batch % args.grad_accum):
        ap.error("--mini-batch must be a multiple of --grad-accum (at least 1)")
    return args


def _accum(text: str) -> int | str:
    return text if text == "auto" else int(text)


def spec_from_args(args: argparse.Namespace) -> tuple[dict, str]:
    """The workers' spec (models built on first use, prompts loaded) and the data source."""
    data_path, data_source = data_file(args.data)
    shape = prepare_shape(args.shape, data_path)
    prompts = load_prompts(shape, data_path, args.batch, args.prompt_tokens)
    return make_spec(args, shape, prompts), data_source


def make_spec(args: argparse.Namespace, shape, prompts: dict) -> dict:
    short = args.warmup == "short"
    return {"shape": shape.name, "policy": shape.policy, "classifier": shape.classifier,
            "is_seq2seq": shape.is_seq2seq, "prompts": prompts, "batch": args.batch,
            "mini_batch": args.mini_batch, "grad_accum": args.grad_accum,
            "gradient_checkpointing": args.gradient_checkpointing, "new_tokens": args.new_tokens,
            "lora_r": args.lora_r, "score_on": args.score_on, "seed": args.seed,
            "threads": args.threads, "rollout_only": args.rollout_only,
            "cuda_graphs": not args.no_cuda_graphs,
            "warmup_rows": args.mini_batch if short else args.batch,
            "warmup_tokens": min(4, args.new_tokens) if short else args.new_tokens}


def run_modes(spec: dict, steps: int, warmup: str, partial: Path | None = None) -> dict:
    """Set every mode up (in parallel), then alternate their steps; returns raw results.

    After each step the raw results so far go to ``partial`` (if given), so that a run
    stopped by a time limit or a crash still leaves its measured steps.
    """
    ctx = mp.get_context("spawn")
    pools = {m: ProcessPoolExecutor(max_workers=1, mp_context=ctx) for m in MODES}
    raw: dict = {m: {"warmup": [], "steps": []} for m in MODES}
    try:
        pending = {m: pools[m].submit(ppo_modes.setup, m, spec) for m in MODES}
        for m, future in pending.items():
            raw[m]["setup"] = future.result()
            _log(f"{m}: loaded in {raw[m]['setup']['load_s']:.1f} s (pid {raw[m]['setup']['pid']})")
        schedule = [(True, -1)] * (warmup != "none") + [(False, i) for i in range(steps)]
        for k, (is_warmup, index) in enumerate(schedule):
            for m in MODES if k % 2 == 0 else MODES[::-1]:
                result = pools[m].submit(ppo_modes.step, index, is_warmup).result()
                raw[m]["warmup" if is_warmup else "steps"].append(result)
                if partial is not None:
                    atomic_write_json(partial, raw)
                _log(f"{m}: {'warm-up' if is_warmup else f'step {index + 1}/{steps}'} "
                     f"{result['total']:.2f} s")
        for m in MODES:
            raw[m]["memory"] = pools[m].submit(ppo_modes.finish).result()
    finally:
        for pool in pools.values():
            pool.shutdown(cancel_futures=True)
    return raw


def _log(msg: str) -> None:
    print(f"[ppo_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    spec, data_source = spec_from_args(args)
    if args.malloc_threshold_mib:  # read by glibc when each worker starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_threshold_mib * 2**20)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(2 * args.malloc_threshold_mib * 2**20)
    load_before = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"ppo_step-{args.shape}-partial.json"
    raw = run_modes(spec, args.steps, args.warmup, partial)
    report = summarize(args, spec, raw, data_source, load_before,
                       time.perf_counter() - started)
    json_path, md_path, markdown = write_outputs(report, args.out)
    partial.unlink(missing_ok=True)
    print(markdown)
    _log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
