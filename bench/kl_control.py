"""Does the adaptive KL controller hold the KL near its target? A longer tiny run.

Trains the ``tiny`` preset for many steps with the adaptive controller (Ziegler et al. 2019)
and a short horizon, so the coefficient can move within the run, and reports the per-step
KL, the coefficient, and the mean KL over the second half against the target.

    python bench/kl_control.py --steps 120 --target 1.0 --horizon 200

Writes ``bench/results/kl_control.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from detoxrl.config import load_config
from detoxrl.rl.detox_trainer import train
from detoxrl.runs.io import atomic_write_json, atomic_write_text
from detoxrl.runs.run_folder import run_info

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--target", type=float, default=1.0, help="target KL (nats per response)")
    ap.add_argument("--horizon", type=int, default=200)
    ap.add_argument("--init-kl-coef", type=float, default=0.02)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            "--steps", str(args.steps), "--save_every", "0", "--output_dir", tmp,
            "--ppo.kl_controller", "adaptive", "--ppo.kl_target", str(args.target),
            "--ppo.kl_horizon", str(args.horizon), "--ppo.init_kl_coef", str(args.init_kl_coef)])
        result = train(cfg, quiet=True)
    kls = [m["objective/kl"] for m in result.metrics]
    coefs = [m["objective/kl_coef"] for m in result.metrics]
    half = kls[len(kls) // 2:]
    summary = {
        "target_kl": args.target, "horizon": args.horizon, "steps": args.steps,
        "init_kl_coef": args.init_kl_coef,
        "mean_kl_second_half": statistics.fmean(half),
        "std_kl_second_half": statistics.pstdev(half),
        "ratio_to_target": statistics.fmean(half) / args.target,
        "final_kl_coef": coefs[-1], "kl": kls, "kl_coef": coefs,
        "run_info": run_info(cfg),
    }
    out = Path(args.out)
    atomic_write_json(out / "kl_control.json", summary)
    atomic_write_text(out / "kl_control.md", _markdown(summary))
    print(_markdown(summary))
    return 0


def _markdown(s: dict) -> str:
    rows = "\n".join(f"| {i + 1} | {k:.3f} | {c:.4f} |"
                     for i, (k, c) in enumerate(zip(s["kl"], s["kl_coef"], strict=True))
                     if i % 10 == 9 or i == 0)
    return (f"# Adaptive KL controller on the tiny preset\n\n"
            f"target {s['target_kl']}, horizon {s['horizon']}, {s['steps']} steps, initial "
            f"coefficient {s['init_kl_coef']}.\n\n"
            f"Mean KL over the second half: **{s['mean_kl_second_half']:.3f}** "
            f"(std {s['std_kl_second_half']:.3f}), {s['ratio_to_target']:.2f}x the target; "
            f"final coefficient {s['final_kl_coef']:.4f}.\n\n"
            f"| step | KL | KL coef |\n|---:|---:|---:|\n{rows}\n")


if __name__ == "__main__":
    sys.exit(main())
