#!/usr/bin/env python
"""What the validation curve costs: the demo's RL stage with its curve and without.

Runs stage 3 of a built ``detoxrl demo`` twice at the same time, from the same stages 0-2,
one torch thread each, CPU only: once with the preset as it is (``eval_every`` and
``validation.*`` set), once with ``--eval_every 0``. Both see the same machine load, and
the CPU time of each process (user + system, from ``os.wait4``) is the figure compared;
wall times are kept beside it. It also checks that both runs trained the same (every
training metric equal, timings aside): the curve samples under its own RNG.

    python bench/curve_cost.py --base runs/demo --arch causal \\
        --out bench/results/curve_cost-causal.json

Acceptance: the run with the curve costs at most TARGET_RATIO times the CPU time of the
run without.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detoxrl.config import load_config
from detoxrl.runs.io import atomic_write_json, atomic_write_text
from detoxrl.runs.run_folder import versions

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.10


def stage_args(base: Path, arch: str, out: Path) -> list[str]:
    """``detoxrl train`` arguments of the demo's RL stage on ``base``'s stages 0-2."""
    return ["train", "--config", str(ROOT / "configs" / "mini" / f"detox-{arch}.yaml"),
            "--model.name_or_path", str(base / "2-policy"),
            "--reward.model", str(base / "1-reward"),
            "--data.path", str(base / "0-data" / "train.jsonl"),
            "--output_dir", str(out), "--quiet"]


def run_both(base: Path, arch: str, tmp: Path) -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    runs = {"with": [], "without": ["--eval_every", "0"]}
    started, procs, out = {}, {}, {}
    for name, extra in runs.items():
        started[name] = time.perf_counter()
        with (tmp / f"{name}.log").open("w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "detoxrl", *stage_args(base, arch, tmp / name), *extra],
                env=env, stdout=subprocess.DEVNULL, stderr=log)
    while procs:
        pid, status, usage = os.wait4(-1, 0)  # this child's own CPU time
        name = next(n for n, p in procs.items() if p.pid == pid)
        procs.pop(name).returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"the run {name!r} failed; see {tmp / (name + '.log')}")
        out[name] = {"cpu_s": usage.ru_utime + usage.ru_stime,
                     "wall_s": time.perf_counter() - started[name]}
    return out


def training_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/", "eval/"))}
            for r in rows if r["step"] > 0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/demo", help="a built demo (stages 0-2 are used)")
    ap.add_argument("--arch", choices=("causal", "seq2seq"), default="causal")
    ap.add_argument("--out", default=None, help="result JSON (a .md table is written beside)")
    args = ap.parse_args(argv)
    base = Path(args.base).resolve()
    cfg = load_config(ROOT / "configs" / "mini" / f"detox-{args.arch}.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load_before = os.getloadavg()
        times = run_both(base, args.arch, tmp)
        curve = [json.loads(x) for x in (tmp / "with" / "eval_curve.jsonl").read_text()
                 .splitlines()]
        same = training_metrics(tmp / "with") == training_metrics(tmp / "without")
    ratio = times["with"]["cpu_s"] / times["without"]["cpu_s"]
    v = cfg.validation
    result = {
        "command": sys.argv, "arch": args.arch, "base": str(base), "steps": cfg.steps,
        "eval_every": cfg.eval_every, "points": [p["step"] for p in curve],
        "validation": {"num_prompts": v.num_prompts, "samples_per_prompt": v.samples_per_prompt,
                       "judges": v.judges},
        "runs": times, "cpu_ratio": ratio,
        "wall_ratio": times["with"]["wall_s"] / times["without"]["wall_s"],
        "target_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
        "training_identical": same, "curve": curve,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg()},
        "versions": versions()}
    out = Path(args.out or ROOT / "bench" / "results" / f"curve_cost-{args.arch}.json")
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0 if result["met"] and same else 1


def markdown(r: dict) -> str:
    w, wo = r["runs"]["with"], r["runs"]["without"]
    return (f"# Validation curve cost, demo RL stage ({r['arch']})\n\n"
            f"`{' '.join(r['command'])}`\n\n"
            f"{r['steps']} steps; curve points at steps {r['points']} "
            f"({r['validation']['num_prompts']} prompts x "
            f"{r['validation']['samples_per_prompt']} samples).\n\n"
            "| run | CPU s | wall s |\n|---|---:|---:|\n"
            f"| with the curve | {w['cpu_s']:.1f} | {w['wall_s']:.1f} |\n"
            f"| without | {wo['cpu_s']:.1f} | {wo['wall_s']:.1f} |\n"
            f"| ratio | {r['cpu_ratio']:.3f} | {r['wall_ratio']:.3f} |\n\n"
            f"Target: CPU ratio <= {r['target_ratio']}: "
            f"{'met' if r['met'] else 'missed'}. Training metrics identical: "
            f"{r['training_identical']}.\n")


if __name__ == "__main__":
    sys.exit(main())
