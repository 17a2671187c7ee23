"""Where a detoxrl PPO step spends its time: one step in this process, for py-spy.

    py-spy record --rate 25 --format raw -o bench/results/profile-flan-t5-base.txt -- \\
        python bench/ppo_profile.py run --shape flan-t5-base
    python bench/ppo_profile.py table bench/results/profile-flan-t5-base.txt

``run`` builds the detoxrl mode of ``ppo_step.py`` (same shapes, prompts and settings;
``--threads 1``), takes one short warm-up step and then the measured step, inside
``measured_step`` so that the table can keep only its samples. ``table`` splits those
samples by trainer phase and by part of the network, read from the source line of each
stack frame (``self.encoder(``, ``lm_head(``, a backward call, the reward classifier).
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = {"Learner.rollout": "rollout", "Learner.score": "score",
          "Learner.forward_old_and_ref": "forward", "Learner.ppo_epochs": "optimize"}
PARTS = ("encoder", "decoder / body", "lm_head", "backward", "classifier", "other")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def run(shape_name: str) -> None:
    import ppo_modes
    import ppo_step

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = ppo_step.parse_args(["--shape", shape_name, "--warmup", "short", "--threads", "1"])
    spec, _ = ppo_step.spec_from_args(args)
    ppo_modes.setup("detoxrl", spec)
    ppo_modes.step(-1, True)
    print(measured_step(ppo_modes))


def measured_step(ppo_modes) -> dict:
    return ppo_modes.step(0, False)


def _part(frames: list[str], site_packages: list[Path]) -> str:
    """The network part a stack is in, from the innermost model-level call site."""
    text = ";".join(frames)
    if "backward" in text:
        return "backward"
    if "reward.py" in text or "Roberta" in text:
        return "classifier"
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        if not match:
            continue
        line = _source_line(match["file"], int(match["line"]), site_packages)
        if "lm_head(" in line:
            return "lm_head"
        if "encoder(" in line and "decoder" not in line:
            return "encoder"
        if any(k in line for k in ("decoder(", "transformer(", ".generate(")):
            return "decoder / body"
    return "other"


def _source_line(file: str, lineno: int, site_packages: list[Path]) -> str:
    for root in [Path(), *site_packages]:
        line = linecache.getline(str(root / file), lineno)
        if line:
            return line
    return ""


def table(raw_path: Path) -> str:
    import site

    roots = [Path(p) for p in site.getsitepackages()] + [Path(__file__).resolve().parents[1]
                                                         / "src"]
    counts: collections.Counter = collections.Counter()
    for row in raw_path.read_text().splitlines():
        stack, n = row.rsplit(" ", 1)
        frames = stack.split(";")
        if not any(f.startswith("measured_step ") for f in frames):
            continue
        phase = next((p for k, p in PHASES.items() for f in frames if f.startswith(k + " ")),
                     "other")
        counts[(phase, _part(frames, roots))] += int(n)
    total = sum(counts.values()) or 1
    phases = [*PHASES.values(), "other"]
    lines = [f"{total} samples in the measured step; share of the step, %", "",
             "| phase | " + " | ".join(PARTS) + " | all |", "|---|" + "---:|" * (len(PARTS) + 1)]
    for phase in phases:
        row = [counts[(phase, part)] for part in PARTS]
        lines.append(f"| {phase} | " + " | ".join(f"{100 * v / total:.1f}" for v in row)
                     + f" | {100 * sum(row) / total:.1f} |")
    sums = [sum(counts[(p, part)] for p in phases) for part in PARTS]
    lines.append("| all | " + " | ".join(f"{100 * v / total:.1f}" for v in sums) + " | 100 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one warm-up and one measured detoxrl step")
    r.add_argument("--shape", default="flan-t5-base")
    t = sub.add_parser("table", help="summarize a py-spy --format raw file")
    t.add_argument("raw", type=Path)
    args = ap.parse_args(argv)
    if args.command == "run":
        run(args.shape)
    else:
        print(table(args.raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
