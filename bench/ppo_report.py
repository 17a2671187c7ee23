"""Summaries, headline ratios and output files (JSON + Markdown) of ``ppo_step.py``."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from statistics import median

PHASES = ("rollout", "score", "forward", "optimize")
LABELS = {"detoxrl": "detoxrl (Learner.step)", "tutorial": "tutorial-style",
          "floor": "floor (bare transformers/peft)"}


def summarize(args, spec: dict, raw: dict, data_source: str, load_before, wall_s: float
              ) -> dict:
    import torch

    modes = {m: _mode_summary(r) for m, r in raw.items()}
    prompts = spec["prompts"]
    return {
        "benchmark": "ppo_step", "shape": spec["shape"], "device": _device_name(torch),
        "config": {"batch": spec["batch"], "mini_batch": spec["mini_batch"],
                   "detoxrl_grad_accum": spec["grad_accum"],
                   "detoxrl_gradient_checkpointing": spec["gradient_checkpointing"],
                   "ppo_epochs": 1, "new_tokens": spec["new_tokens"],
                   "new_tokens_fixed": True, "prompt_tokens_max": args.prompt_tokens,
                   "prompt_tokens_actual": {k: prompts[k] for k in
                                            ("tokens_min", "tokens_mean", "tokens_max")},
                   "lora_r": spec["lora_r"], "score_on": spec["score_on"],
                   "sampling": "top_k=0, top_p=1.0, temperature=1.0",
                   "steps": args.steps, "warmup": args.warmup, "seed": spec["seed"],
                   "rollout_only": spec["rollout_only"], "threads": args.threads,
                   "malloc_threshold_mib": args.malloc_threshold_mib or "glibc default",
                   "torch_threads": modes["detoxrl"]["setup"]["torch_threads"],
                   "data": data_source, "policy": spec["policy"],
                   "classifier": spec["classifier"], "command": sys.argv},
        "modes": modes, "headline": headline(modes, torch.cuda.is_available()),
        "machine": machine_info(torch, load_before), "versions": versions(),
        "wall_s": wall_s,
    }


def _mode_summary(raw: dict) -> dict:
    steps = raw["steps"]
    present = [p for p in PHASES if p in steps[0]]
    phases = {p: median(s[p] for s in steps) for p in present}
    total = median(s["total"] for s in steps)
    tokens = steps[0]["tokens"]
    return {"phases_s": phases, "total_s": total,
            "other_s": median(s["total"] - sum(s[p] for p in present) for s in steps),
            "cpu_phases_s": {p: median(s["cpu"][p] for s in steps) for p in present},
            "cpu_total_s": median(s["cpu"]["total"] for s in steps),
            "phase_peak_rss_mib": {p: max(s["rss_peak_mib"].get(p, 0.0) for s in steps)
                                   for p in present},
            "gen_tokens_per_s": tokens / phases["rollout"],
            "step_tokens_per_s": tokens / total, "tokens_per_step": tokens,
            "step_totals_s": [s["total"] for s in steps],
            "per_step": steps, "warmup": raw["warmup"], "setup": raw["setup"],
            "memory": raw["memory"]}


def headline(modes: dict, cuda: bool) -> list[dict]:
    """Target checks; time ratios from wall time and, as a cross-check, from CPU time."""
    det, tut, floor = modes["detoxrl"], modes["tutorial"], modes["floor"]

    def timed(name, a, pa, b, pb, target, check):
        return _target(name, _time(a, pa, False) / _time(b, pb, False),
                       _time(a, pa, True) / _time(b, pb, True), target, check)

    mem = det["memory"]["step_peak_rss_mib"] / tut["memory"]["step_peak_rss_mib"]
    full = "optimize" in det["phases_s"]  # False with --rollout-only
    rows = [
        timed("step speedup (tutorial / detoxrl)", tut, None, det, None, "(info)", None)
        if full else None,
        timed("step / floor (detoxrl)", det, None, floor, None, "<= 1.15",
              lambda v: v <= 1.15) if full else None,
        *[timed(f"{phase} / floor {phase}", det, phase, floor, phase, "<= 1.2",
                lambda v: v <= 1.2) for phase in PHASES if phase in floor["phases_s"]],
        _target("peak RSS during steps (detoxrl / tutorial)", mem, None, "<= 0.7",
                lambda v: v <= 0.7),
        timed("rollout speedup (tutorial / detoxrl)", tut, "rollout", det, "rollout",
              "(info)", None),
    ]
    rows = [r for r in rows if r is not None]
    if cuda:
        cuda_mem = det["memory"]["cuda_peak_mib"] / tut["memory"]["cuda_peak_mib"]
        rows.insert(2, _target("peak CUDA memory (detoxrl / tutorial)", cuda_mem, None,
                               "<= 0.7", lambda v: v <= 0.7))
    return rows


def _time(mode: dict, phase: str | None, cpu: bool) -> float:
    if phase is None:
        return mode["cpu_total_s" if cpu else "total_s"]
    return mode["cpu_phases_s" if cpu else "phases_s"][phase]


def _target(name: str, value: float, value_cpu: float | None, target: str, check) -> dict:
    row = {"name": name, "value": value, "value_cpu": value_cpu, "target": target,
           "met": None if check is None else bool(check(value))}
    if check is not None and value_cpu is not None:
        row["met_cpu"] = bool(check(value_cpu))
    return row


# --------------------------------------------------------------------------- environment

def _device_name(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info(torch, load_before) -> dict:
    import psutil

    info = {"platform": platform.platform(), "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_shapes(script: str, args, argv, run_shape, write) -> int:
    """The main loop of a per-shape bench script (``sampling.py``, ``decode_compile.py``):
    threads and device checked, then ``write(args, run_shape(args, shape, data), meta)`` for
    each ``--shape``, with the command, machine and versions in ``meta``; prints each
    Markdown table. Returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from ppo_models import data_file

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible.", file=sys.stderr)
        return 2
    data_path, data_source = data_file(args.data)
    load = os.getloadavg()
    command = f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    for shape in args.shape:
        result = run_shape(args, shape, data_path)
        meta = {"command": command, "config": {k: str(v) for k, v in vars(args).items()},
                "data": data_source, "machine": machine_info(torch, load),
                "versions": versions()}
        print(write(args, result, meta).with_suffix(".md").read_text())
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("detoxrl", "torch", "transformers", "peft", "accelerate", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["git"] = _git_revision()
    return out


def _git_revision() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- output

def write_outputs(report: dict, out_dir: Path) -> tuple[Path, Path, str]:
    from detoxrl.runs.io import atomic_write_json, atomic_write_text

    c = report["config"]
    suffix = "".join([f"-t{c['threads']}" if c["threads"] else "",
                      f"-ga{c['detoxrl_grad_accum']}" if c["detoxrl_grad_accum"] != "auto" else "",
                      "-gc" if c["detoxrl_gradient_checkpointing"] else "",
                      "-rollout" if c["rollout_only"] else ""])
    stem = f"ppo_step-{report['shape']}-{report['device']}{suffix}"
    markdown = to_markdown(report)
    json_path = atomic_write_json(Path(out_dir) / f"{stem}.json", report)
    md_path = atomic_write_text(Path(out_dir) / f"{stem}.md", markdown)
    return json_path, md_path, markdown


def _detox_memory(c: dict) -> str:
    """The detoxrl-only memory settings, when the run used any."""
    parts = []
    if c["detoxrl_grad_accum"] != "auto":
        parts.append(f"ppo.gradient_accumulation_steps {c['detoxrl_grad_accum']}")
    if c["detoxrl_gradient_checkpointing"]:
        parts.append("gradient checkpointing")
    return f" (detoxrl: {', '.join(parts)})" if parts else ""


def to_markdown(report: dict) -> str:
    c, m = report["config"], report["machine"]
    cuda = report["device"] == "cuda"
    lines = [
        f"# PPO step: `{report['shape']}` on {m.get('gpu') or m['cpu']} "
        f"({m['logical_cpus']} CPUs, {_threads(report)} torch thread(s) per mode)", "",
        f"batch {c['batch']}, mini-batch {c['mini_batch']}{_detox_memory(c)}, "
        f"{c['new_tokens']} new tokens per "
        f"response (fixed), prompts {c['prompt_tokens_actual']['tokens_min']}-"
        f"{c['prompt_tokens_actual']['tokens_max']} tokens (mean "
        f"{c['prompt_tokens_actual']['tokens_mean']:.0f}), LoRA r={c['lora_r']}, reward "
        f"on {c['score_on']}; median of {c['steps']} step(s) per mode, warm-up: "
        f"{c['warmup']}. Load average before/after: {_loads(m)}.", "",
        *_phase_table(report["modes"], cuda), "",
        "CPU seconds per phase (process CPU time, all threads), and peak RSS per phase:", "",
        *_cpu_table(report["modes"]), "",
        "| headline | wall | CPU time | target | met (wall / CPU) |", "|---|---:|---:|---|---|",
    ]
    for h in report["headline"]:
        cpu = "—" if h["value_cpu"] is None else f"{h['value_cpu']:.2f}"
        met = " / ".join(_yes(h[k]) for k in ("met", "met_cpu") if h.get(k) is not None)
        lines.append(f"| {h['name']} | {h['value']:.2f} | {cpu} | {h['target']} | {met} |")
    lines += ["", "Per-step totals (s): " + "; ".join(
        f"{k} " + ", ".join(f"{t:.1f}" for t in v["step_totals_s"])
        for k, v in report["modes"].items()), "",
        f"Versions: {_versions(report['versions'])}. Peak RSS: "
        f"{report['modes']['detoxrl']['memory']['peak_rss_source']}, per mode process.", ""]
    return "\n".join(lines)


def _phase_table(modes: dict, cuda: bool) -> list[str]:
    head = ("| mode | rollout s | score s | forward s | optimize s | other s | total s "
            "| gen tok/s | peak RSS MiB | RSS at end MiB |")
    rule = "|---|" + "---:|" * 9
    if cuda:
        head, rule = head + " peak CUDA MiB |", rule + "---:|"
    rows = [head, rule]
    for name, s in modes.items():
        cells = [f"{s['phases_s'][p]:.2f}" if p in s["phases_s"] else "—" for p in PHASES]
        mem = s["memory"]
        row = (f"| {LABELS[name]} | {' | '.join(cells)} | {s['other_s']:.2f} | "
               f"{s['total_s']:.2f} | {s['gen_tokens_per_s']:.0f} | "
               f"{mem['step_peak_rss_mib']:.0f} | {mem['rss_end_mib']:.0f} |")
        if cuda:
            row += f" {mem['cuda_peak_mib']:.0f} |"
        rows.append(row)
    return rows


def _cpu_table(modes: dict) -> list[str]:
    rows = ["| mode | rollout | score | forward | optimize | total | peak RSS by phase, MiB "
            "(rollout / score / forward / optimize) |", "|---|" + "---:|" * 5 + "---|"]
    for name, s in modes.items():
        cells = [f"{s['cpu_phases_s'][p]:.2f}" if p in s["cpu_phases_s"] else "—"
                 for p in PHASES]
        peaks = " / ".join(f"{s['phase_peak_rss_mib'][p]:.0f}" if p in s["cpu_phases_s"]
                           else "—" for p in PHASES)
        rows.append(f"| {LABELS[name]} | {' | '.join(cells)} | {s['cpu_total_s']:.2f} | "
                    f"{peaks} |")
    return rows


def _threads(report: dict) -> int:
    return report["modes"]["detoxrl"]["setup"]["torch_threads"]


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _loads(m: dict) -> str:
    return " / ".join(f"{m[k][0]:.1f}" for k in ("load_average_before", "load_average_after"))


def _versions(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft", "detoxrl", "git"))
