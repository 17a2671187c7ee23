"""PPO vs RLOO vs GRPO at the same budget of generated samples, 3 seeds each.

Give one train config per algorithm; they may differ only in the algorithm's own options
(``ppo.algorithm``, ``num_generations``, ``batch_size``, ``beta``, ``loss_type``,
``scale_rewards``), so that everything else (model, data, reward, generation, learning rate)
is shared. Each config runs for as many steps as its ``batch_size x num_generations`` needs to
generate ``--samples`` responses (rounded up), once per seed, and the table reports per
algorithm (mean and spread over seeds): wall-clock seconds, seconds per step, samples
generated, final reward and final KL to the reference (``objective/kl``, the mean of the last
``--last`` steps).

    python bench/algorithms.py --configs ppo.yaml rloo.yaml grpo.yaml --samples 2048

Writes ``bench/results/algorithms.{json,md}``. Judge toxicity and perplexity need
``detoxrl evaluate`` on each run folder (kept with ``--keep DIR``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from detoxrl.config import load_config, to_dict
from detoxrl.errors import ConfigError
from detoxrl.io import atomic_write_json, atomic_write_text
from detoxrl.run import run_info, train

ROOT = Path(__file__).resolve().parents[1]
OWN_OPTIONS = {"algorithm", "num_generations", "batch_size", "beta", "loss_type",
               "scale_rewards"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", required=True, help="one train config per algorithm")
    ap.add_argument("--samples", type=int, default=2048, help="generated responses per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--last", type=int, default=5, help="steps averaged for final figures")
    ap.add_argument("--keep", default=None, help="keep the run folders under this folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    try:
        cfgs = [load_config(path) for path in args.configs]
        check_comparable(cfgs, args.configs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        for path, cfg in zip(args.configs, cfgs, strict=True):
            for seed in args.seeds:
                runs.append(one_run(path, cfg.ppo.algorithm, seed, args, base))
    summary = {"samples": args.samples, "seeds": args.seeds, "configs": args.configs,
               "runs": runs, "table": table(runs), "run_info": run_info(cfgs[0])}
    out = Path(args.out)
    atomic_write_json(out / "algorithms.json", summary)
    atomic_write_text(out / "algorithms.md", markdown(summary))
    print(markdown(summary))
    return 0


def check_comparable(cfgs: list, paths: list[str]) -> None:
    """Refuse configs that differ in anything but the algorithm's own options."""
    def shared(cfg) -> dict:
        d = to_dict(cfg)
        d["ppo"] = {k: v for k, v in d["ppo"].items() if k not in OWN_OPTIONS}
        return {k: v for k, v in d.items() if k not in ("steps", "seed", "output_dir")}

    first = shared(cfgs[0])
    for path, cfg in zip(paths[1:], cfgs[1:], strict=True):
        other = shared(cfg)
        diff = sorted(k for k in first if first[k] != other[k])
        if diff:
            raise ConfigError(f"{path} differs from {paths[0]} in {', '.join(diff)}; only "
                              "the algorithm's options may differ.")


def one_run(path: str, algorithm: str, seed: int, args, base: Path) -> dict:
    cfg = load_config(path, ["--seed", str(seed), "--save_every", "0",
                             "--output_dir", str(base / f"{algorithm}-seed{seed}")])
    per_step = cfg.ppo.batch_size * cfg.ppo.num_generations
    cfg.steps = math.ceil(args.samples / per_step)
    start = time.perf_counter()
    result = train(cfg, quiet=True)
    wall = time.perf_counter() - start
    last = result.metrics[-args.last:]
    return {"algorithm": algorithm, "config": path, "seed": seed, "steps": cfg.steps,
            # wall_s includes loading the models; s_per_step is the steps' own time.
            "samples": cfg.steps * per_step, "wall_s": wall,
            "s_per_step": statistics.fmean(m["time/total"] for m in result.metrics),
            "final_reward": statistics.fmean(m["env/reward_mean"] for m in last),
            "final_kl": statistics.fmean(m["objective/kl"] for m in last),
            "reward": [m["env/reward_mean"] for m in result.metrics],
            "kl": [m["objective/kl"] for m in result.metrics]}


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for algorithm in dict.fromkeys(r["algorithm"] for r in runs):
        mine = [r for r in runs if r["algorithm"] == algorithm]
        row = {"algorithm": algorithm, "runs": len(mine), "samples": mine[0]["samples"]}
        for key in ("wall_s", "s_per_step", "final_reward", "final_kl"):
            values = [r[key] for r in mine]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(s: dict) -> str:
    lines = [f"# PPO vs RLOO vs GRPO: {s['samples']} generated samples, seeds {s['seeds']}",
             "", "`python bench/algorithms.py --configs " + " ".join(s["configs"])
             + f" --samples {s['samples']}`", "",
             "| algorithm | samples | wall s | s / step | final reward | final KL |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["table"]:
        lines.append(f"| {r['algorithm']} | {r['samples']} | {r['wall_s']:.1f} ± "
                     f"{r['wall_s_std']:.1f} | {r['s_per_step']:.2f} | {r['final_reward']:.3f} ± "
                     f"{r['final_reward_std']:.3f} | {r['final_kl']:.2f} ± "
                     f"{r['final_kl_std']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
