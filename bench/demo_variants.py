#!/usr/bin/env python
"""RL settings of the demo side by side: each variant reruns stages 3-5 on a built demo.

Every variant copies the data, reward and policy stages (0-2) of a built ``detoxrl demo``
and runs ``detoxrl demo`` in its own folder with its own stage overrides, so only RL and
the evaluation run again; ``--jobs`` variants at a time, one torch thread each, CPU only
(``CUDA_VISIBLE_DEVICES=""``: the figures match the CPU demo's code path). The evaluation
is the demo's own (held-out prompts, k samples, the independent judge), on the first
``--eval-prompts`` non-toxic prompts.

Beside the demo's figures, each row has the judge's expected maximum toxicity *with every
flagged sample (judge >= 0.5) removed*: what the EMT would be if the policy never wrote one
flagged sample (toxicity probability 0). Where even that is above half the starting EMT,
the judge's -50% EMT target is out of reach by removing toxic text; only a shift of the
judge's scores on benign text, or fewer distinct samples, can meet it.

    python bench/demo_variants.py --base runs/demo --jobs 2 \\
        --out bench/results/demo_variants.json            # every variant of the YAML file
    python bench/demo_variants.py --base runs/demo --only ppo-preset ppo-steps120 ...
    python bench/demo_variants.py --frontier bench/results/demo_variants-*.json

Results are rewritten after every variant, so a stopped sweep keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import yaml

from detoxrl.demo.cache import MARKER
from detoxrl.evaluation.protocol import TOXIC_THRESHOLD, as_matrix, expected_max_toxicity
from detoxrl.runs.io import atomic_write_json, atomic_write_text
from detoxrl.runs.run_folder import versions

VARIANTS = Path(__file__).with_name("configs") / "demo-variants.yaml"
REUSED = ("0-data", "1-reward", "2-policy")
JUDGE = "profanity-check"


def emt_without_flagged(generations: Path, k: int) -> dict[str, float]:
    """Judge EMT before and after RL, leaving out every sample the judge flags."""
    rows = [json.loads(line) for line in generations.open()]
    out = {}
    for side in ("before", "after"):
        scores = as_matrix([r[f"judge:{JUDGE}_{side}"] for r in rows], k)  # (prompts, k)
        # Scores are >= 0, so a flagged sample set to 0 drops out of its prompt's maximum.
        out[side] = expected_max_toxicity(np.where(scores >= TOXIC_THRESHOLD, 0.0, scores))
    return out


def figures(folder: Path, k: int) -> dict:
    """The non-toxic set's headline figures of one finished variant."""
    summary = json.loads((folder / "demo_summary.json").read_text())
    by_name = {m["metric"]: m for m in summary["figures"]["nontoxic"]}
    pick = ("before", "after", "relative", "ci_low", "ci_high")
    out = {name: {key: by_name[name][key] for key in pick if key in by_name[name]}
           for name in (f"{JUDGE} expected_max_toxicity", f"{JUDGE} toxicity_probability",
                        "reward_classifier average_toxicity", "perplexity", "distinct_2")}
    generations = folder / "4-eval-nontoxic" / "generations.jsonl"
    out[f"{JUDGE} expected_max_toxicity, flagged samples removed"] = emt_without_flagged(
        generations, k)
    last = (folder / "3-rl" / "metrics.jsonl").read_text().splitlines()[-1]
    out["final_kl"] = json.loads(last)["objective/kl"]
    out["rl_wall_s"] = next(s["wall_s"] for s in summary["stages"] if s["name"] == "rl")
    return out


def rerun_demo(base: Path, folder: Path, demo_args: list[str], log: Path) -> int:
    """``detoxrl demo DEMO_ARGS --output-dir FOLDER`` on a copy of ``base``'s stages 0-2,
    one torch thread, CPU only, one stage at a time (the callers run several demos side by
    side themselves); its output goes to ``log``. Returns the exit code."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in (*REUSED, MARKER):
        if not (folder / stage).exists():
            copy = shutil.copytree if (base / stage).is_dir() else shutil.copy2
            copy(base / stage, folder / stage)
    command = [sys.executable, "-m", "detoxrl", "demo", "--output-dir", str(folder), "--quiet",
               "--jobs", "1", *map(str, demo_args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    with log.open("w") as fh:
        return subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def run_variant(name: str, extra: list[str], args) -> dict:
    folder = args.runs / name
    t0 = time.perf_counter()
    rc = rerun_demo(args.base, folder, [
        "--data-dir", args.data_dir, "--eval-prompts", args.eval_prompts,
        "--toxic-prompts", args.toxic_prompts, "--samples-per-prompt",
        args.samples_per_prompt, *extra, *args.extra], args.runs / f"{name}.log")
    row = {"name": name, "overrides": extra, "rc": rc,
           "wall_s": round(time.perf_counter() - t0, 1)}
    if rc == 0:
        row.update(figures(folder, args.samples_per_prompt))
    return row


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.0%}"


def table(rows: list[dict]) -> str:
    head = ("| variant | judge EMT | judge TP | EMT, flagged removed | reward avg tox. "
            "| perplexity | distinct-2 | final KL |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['name']} | failed (rc {r['rc']}) ||||||| ")
            continue
        emt, tp = r[f"{JUDGE} expected_max_toxicity"], r[f"{JUDGE} toxicity_probability"]
        floor = r[f"{JUDGE} expected_max_toxicity, flagged samples removed"]
        lines.append(
            f"| {r['name']} | {emt['before']:.3f} → {emt['after']:.3f} ({_pct(emt['relative'])})"
            f" | {tp['before']:.2f} → {tp['after']:.2f} ({_pct(tp['relative'])})"
            f" | {floor['before']:.3f} → {floor['after']:.3f}"
            f" | {_pct(r['reward_classifier average_toxicity']['relative'])}"
            f" | {_pct(r['perplexity']['relative'])}"
            f" | {r['distinct_2']['after'] / r['distinct_2']['before']:.2f}×"
            f" | {r['final_kl']:.1f} |")
    return "\n".join(lines)


def frontier(rows: list[dict]) -> dict:
    """How the judge's EMT cut trades against distinct-2 over finished variants."""
    rows = [r for r in rows if r["rc"] == 0]
    emt = np.array([r[f"{JUDGE} expected_max_toxicity"]["relative"] for r in rows])
    kept = np.array([r["distinct_2"]["after"] / r["distinct_2"]["before"] for r in rows])
    ranks = [np.argsort(np.argsort(x)) for x in (emt, kept)]
    return {"variants": len(rows),
            "spearman_emt_change_vs_distinct2_kept": float(np.corrcoef(*ranks)[0, 1]),
            "largest_emt_cut_keeping_distinct2_0.9": float(emt[kept >= 0.9].min()),
            "most_distinct2_kept_with_emt_cut_50%": (float(kept[emt <= -0.5].max())
                                                    if (emt <= -0.5).any() else None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, default=Path("runs/demo"),
                   help="A built causal demo whose stages 0-2 every variant reuses.")
    p.add_argument("--variants", type=Path, default=VARIANTS,
                   help="YAML mapping: variant name -> list of extra `detoxrl demo` arguments.")
    p.add_argument("--only", nargs="*", help="Run only these variants.")
    p.add_argument("--runs", type=Path, default=Path("runs/variants"), help="Variant folders.")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--jobs", type=int, default=2, help="Variants at a time (one thread each).")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--toxic-prompts", type=int, default=10)
    p.add_argument("--samples-per-prompt", type=int, default=25)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="Arguments appended to every variant's, e.g. --rl.steps 2 for a check.")
    p.add_argument("--out", type=Path, default=Path("bench/results/demo_variants.json"))
    p.add_argument("--frontier", nargs="+", type=Path, metavar="RESULTS",
                   help="Only print the EMT / distinct-2 trade over these results files.")
    args = p.parse_args(argv)
    if args.frontier:
        rows = [r for f in args.frontier for r in json.loads(f.read_text())["variants"]]
        print(json.dumps(frontier(rows), indent=2))
        return 0
    variants = yaml.safe_load(args.variants.read_text())
    missing = [n for n in args.only or [] if n not in variants]
    if missing or not all((args.base / s).is_dir() for s in REUSED):
        print(f"error: unknown variants {missing} or {args.base} lacks stages {REUSED}; "
              f"build it with `detoxrl demo --output-dir {args.base}` first", file=sys.stderr)
        return 2
    names = args.only or list(variants)
    rows: list[dict] = []

    def done(row: dict) -> None:
        rows.append(row)
        atomic_write_json(args.out, {"base": str(args.base), "eval_prompts": args.eval_prompts,
                                     "samples_per_prompt": args.samples_per_prompt,
                                     "command": sys.argv, "versions": versions(),
                                     "machine": {"platform": platform.platform(),
                                                 "cpus": os.cpu_count()},
                                     "variants": rows})
        print(table([row]).splitlines()[-1], flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_variant, n, variants[n] or [], args) for n in names]
        for future in as_completed(futures):
            done(future.result())
    rows.sort(key=lambda r: names.index(r["name"]))
    atomic_write_text(args.out.with_suffix(".md"), table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
