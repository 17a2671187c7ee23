"""PPO vs RLOO vs GRPO at the same budget of generated samples, 3 seeds each.

Give one train config per algorithm; they may differ only in the algorithm's own options
(``ppo.algorithm``, ``num_generations``, ``batch_size``, ``beta``, ``loss_type``,
``scale_rewards``), so that everything else (model, data, reward, generation, learning rate)
is shared. Each config runs for as many steps as its ``batch_size x num_generations`` needs to
generate ``--samples`` responses (rounded up), once per seed, and the table reports per
algorithm (mean and spread over seeds): wall-clock seconds, seconds per step, samples
generated, final reward and final KL to the reference (``objective/kl``, the mean of the last
``--last`` steps).

With ``--eval-prompts FILE`` every run is then evaluated as ``detoxrl evaluate --protocol
rtp`` does (``--eval-k`` samples per prompt on the first ``--eval-n`` prompts of FILE, the
responses held at the protocol's 20 tokens as in the demo), judged by ``profanity-check``,
an independent judge, with the perplexity of the samples under the starting policy:

    python bench/algorithms.py --configs ppo.yaml rloo.yaml grpo.yaml --samples 2048 \
        --eval-prompts runs/demo/0-data/heldout-nontoxic.jsonl

Writes ``bench/results/algorithms.{json,md}``.
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
from detoxrl.rl.detox_trainer import train
from detoxrl.runs.io import atomic_write_json, atomic_write_text
from detoxrl.runs.run_folder import run_info

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
    ap.add_argument("--eval-prompts", default=None, help="held-out RTP prompt file to judge on")
    ap.add_argument("--eval-n", type=int, default=100, help="prompts evaluated per run")
    ap.add_argument("--eval-k", type=int, default=25, help="samples per evaluated prompt")
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
    row = {"algorithm": algorithm, "config": path, "seed": seed, "steps": cfg.steps,
            # wall_s includes loading the models; s_per_step is the steps' own time.
            "samples": cfg.steps * per_step, "wall_s": wall,
            "s_per_step": statistics.fmean(m["time/total"] for m in result.metrics),
            "final_reward": statistics.fmean(m["env/reward_mean"] for m in last),
            "final_kl": statistics.fmean(m["objective/kl"] for m in last),
            "reward": [m["env/reward_mean"] for m in result.metrics],
            "kl": [m["objective/kl"] for m in result.metrics]}
    if args.eval_prompts:
        row.update(judged(Path(cfg.output_dir), args))
    return row


JUDGE = "profanity-check"
JUDGED = ("expected_max_toxicity", "toxicity_probability", "average_toxicity")


def judged(run_dir: Path, args) -> dict:
    """The run's held-out figures: the judge's three measures and the perplexity, before
    (the starting policy) and after."""
    from detoxrl.evaluation.runner import evaluate
    from detoxrl.evaluation.setup import EvalOptions, resolve_target

    target = resolve_target(str(run_dir), None, None, ["--generation.min_length", "20"],
                            str(run_dir / "eval"))
    summary = evaluate(target, EvalOptions(
        n=args.eval_n, protocol="rtp", samples_per_prompt=args.eval_k,
        explicit_generation=frozenset({"min_length"}), prompts=args.eval_prompts,
        judges=[JUDGE], n_resamples=2000, progress=False))["protocol"]
    measures = {**summary["toxicity"][JUDGE]["measures"],
                "perplexity": summary["fluency"]["perplexity"]}
    return {name: {"before": m["before"], "after": m["after"]} for name, m in measures.items()}


def table(runs: list[dict]) -> list[dict]:
    rows = []
    for algorithm in dict.fromkeys(r["algorithm"] for r in runs):
        mine = [r for r in runs if r["algorithm"] == algorithm]
        row = {"algorithm": algorithm, "runs": len(mine), "samples": mine[0]["samples"]}
        for key in ("wall_s", "s_per_step", "final_reward", "final_kl"):
            _mean_std(row, key, [r[key] for r in mine])
        for key in (*JUDGED, "perplexity"):
            if key in mine[0]:
                _mean_std(row, key, [r[key]["after"] for r in mine])
                _mean_std(row, key + "_before", [r[key]["before"] for r in mine])
        rows.append(row)
    return rows


def _mean_std(row: dict, key: str, values: list[float]) -> None:
    row[key] = statistics.fmean(values)
    row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0


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
    judged_rows = [r for r in s["table"] if "perplexity" in r]
    if judged_rows:
        lines += ["", f"Held-out prompts, judged by {JUDGE} (before → after, mean ± std over "
                  "seeds; perplexity under the starting policy):", "",
                  "| algorithm | exp. max tox. | tox. prob. | avg tox. | perplexity |",
                  "| --- | --- | --- | --- | --- |"]
        for r in judged_rows:
            cells = [f"{r[k + '_before']:.3f} → {r[k]:.3f} ± {r[k + '_std']:.3f}"
                     for k in (*JUDGED, "perplexity")]
            lines.append(f"| {r['algorithm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
