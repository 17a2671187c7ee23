#!/usr/bin/env python
"""The demo's two evaluation stages, run by two checkouts of detoxrl back to back.

    python bench/eval_speed.py --run runs/demo --before-src /tmp/before/src \
        [--after-src src] [--rounds 1] [--nontoxic all] [--toxic 100]
        [--toxic-label LABEL] [--variant ARGS ...] [--keep DIR]
        [--out bench/results/eval_speed.json]

``--run``: a demo output folder (its ``3-rl`` run and ``0-data`` held-out prompts).
Each round runs ``detoxrl evaluate`` with the demo's arguments (protocol rtp, 20 tokens, 25
samples per prompt, the profanity-check judge; every non-toxic prompt, the first 100 toxic
ones; ``--nontoxic N`` / ``--toxic N`` take fewer, for a quicker check) once with each
source tree on ``PYTHONPATH``, in alternating order, each in its own
process with one thread. Wall and CPU seconds (the child's user + system time, robust on a
shared machine) per stage; the ratio after / before of their sums is the result.
``--keep DIR`` keeps every evaluation's output folder there (``<side>-<round>-<stage>``),
e.g. to check that two trees report the same figures. ``--toxic-label`` is passed to both
trees (an older one may not name the reward classifier's toxic label itself).
``--variant ARGS`` (repeatable) adds a side: the after tree with ARGS added to its
``detoxrl evaluate`` calls, e.g. ``--variant=--no-topicality`` for the measures alone that an
older tree computed; each side's ratio to "before" is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {"nontoxic": "all", "toxic": "100"}  # demo.pipeline.eval_stage's --n per set


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--before-src", type=Path, required=True)
    ap.add_argument("--after-src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument("--samples-per-prompt", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nontoxic", default=STAGES["nontoxic"], help="prompts: N or all")
    ap.add_argument("--toxic", default=STAGES["toxic"], help="prompts: N or all")
    ap.add_argument("--toxic-label", default=None, help="passed as --toxic-label")
    ap.add_argument("--variant", action="append", default=[], metavar="ARGS",
                    help="a side: the after tree with these evaluate arguments (repeatable)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the output folders here")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def run_stage(src: Path, run: Path, part: str, n: str, samples: int, out_dir: Path,
              toxic_label: str | None = None, extra: list[str] | None = None) -> dict:
    """One ``detoxrl evaluate`` in a child process: wall and CPU seconds."""
    argv = [sys.executable, "-m", "detoxrl", "evaluate", str(run / "3-rl"), "--protocol", "rtp",
            "--generation.min_length", "20", "--n", n, "--samples-per-prompt",
            str(samples), "--judge", "profanity-check", "--prompts",
            str(run / "0-data" / f"heldout-{part}.jsonl"), "--output", str(out_dir), "--quiet"]
    if toxic_label:
        argv += ["--toxic-label", toxic_label]
    argv += extra or []
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed with {src}:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def main(argv=None) -> int:
    args = parse_args(argv)
    sides = {"before": (args.before_src, []), "after": (args.after_src, [])}
    sides.update({f"after {v}": (args.after_src, shlex.split(v)) for v in args.variant})
    runs = {side: [] for side in sides}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        for r in range(args.rounds):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                src, extra = sides[side]
                name = side.replace(" ", "_")
                stages = {part: run_stage(src, args.run, part, getattr(args, part),
                                          args.samples_per_prompt,
                                          Path(tmp) / f"{name}-{r}-{part}", args.toxic_label,
                                          extra)
                          for part in STAGES}
                runs[side].append(stages)
                print(side, json.dumps(stages), flush=True)
    total = {side: {k: sum(s[p][k] for s in rs for p in STAGES) / len(rs)
                    for k in ("wall_s", "cpu_s")} for side, rs in runs.items()}
    result = {"command": "python bench/eval_speed.py " + " ".join(argv or sys.argv[1:]),
              "sources": {k: str(v[0]) for k, v in sides.items()},
              "arguments": {k: v[1] for k, v in sides.items() if v[1]}, "runs": runs,
              "mean_total": total,
              "ratios_to_before": {side: {k: total[side][k] / total["before"][k]
                                          for k in ("wall_s", "cpu_s")}
                                   for side in sides if side != "before"},
              "load_average_before_after": [load[0], os.getloadavg()[0]]}
    print(json.dumps(result["ratios_to_before"]))
    if args.out:
        from detoxrl.runs.io import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
