#!/usr/bin/env python
"""Does a static KV cache with a compiled decode step pay on this device?

    python bench/decode_compile.py --shape mini-causal [--shape gpt2 ...] [--device cpu]
        [--prompts 16] [--samples 25] [--new-tokens 20] [--repeats 3]

One batch as ``detoxrl evaluate`` generates it (``prompts`` x ``samples`` rows, the
evaluation's batch of 16 prompts by default), greedy, ``new-tokens`` tokens. Per shape, in
one process, the modes take turns (``--repeats`` rounds, the order reversed every other
round) after one warm-up each:

* **dynamic**: cached forward passes through transformers' ``DynamicCache``, eager: the
  decoding loop's own floor (``bench/sampling.py``'s floor);
* **static**: the same through a ``StaticCache`` (fixed-size buffers, one mask shape);
* **static-compiled**: the static loop with the decode step under
  ``torch.compile(model, dynamic=False)`` (inductor; the prompt pass stays eager).

Compile cost is measured apart: seconds of the first compiled batch minus a steady one, for
the first shape and again for a second prompt width (a new shape recompiles: every batch of
an evaluation has its own prompt width unless padded to one). The break-even is the number of
such batches whose saving pays one compile. All three modes must produce the same tokens.
Results: ``bench/results/decode_compile-<shape>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

SHAPES = ("mini-causal", "mini-seq2seq", "gpt2", "flan-t5-base", "tiny-causal", "tiny-seq2seq")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=SHAPES, required=True)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    return ap.parse_args(argv)


def timed(fn, sync) -> tuple[float, float, object]:
    """(wall s, process CPU s, result) of one call."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def run_shape(args, shape: str, data_path: Path) -> dict:
    import torch

    from sampling import build_policy, floor_loop, measure, prompts, summarize

    torch.manual_seed(0)
    policy = build_policy(shape, data_path).to(args.device).eval()
    base = policy.model.get_base_model()
    ids, mask = prompts(policy, data_path, args.prompts, args.prompt_tokens)
    rows = (ids.repeat_interleave(args.samples, 0).to(args.device),
            mask.repeat_interleave(args.samples, 0).to(args.device))
    t, sync = args.new_tokens, (torch.cuda.synchronize if args.device == "cuda"
                                else (lambda: None))
    step = torch.compile(base, dynamic=False)
    compiled = lambda r=rows: floor_loop(base, *r, t, static=True, step_fn=step)  # noqa: E731
    first = timed(compiled, sync)
    steady = timed(compiled, sync)
    # A second prompt width (one column fewer): a new shape, compiled again.
    narrower = (rows[0][:, 1:], rows[1][:, 1:])
    second = timed(lambda: compiled(narrower), sync)
    again = timed(lambda: compiled(narrower), sync)
    modes = {"dynamic": lambda: floor_loop(base, *rows, t),
             "static": lambda: floor_loop(base, *rows, t, static=True),
             "static-compiled": compiled}
    same = {name: bool(torch.equal(fn(), first[2])) for name, fn in modes.items()}
    times = measure(modes, args.repeats, sync)
    tokens = rows[0].shape[0] * t
    kind = "cpu" if args.device == "cpu" else "wall"
    compile_s = {"first_shape": first[1 if kind == "cpu" else 0] - steady[1 if kind == "cpu"
                                                                          else 0],
                 "second_shape": second[1 if kind == "cpu" else 0] - again[1 if kind == "cpu"
                                                                           else 0]}
    saving = (times["dynamic"][kind]["median_s"]
              - times["static-compiled"][kind]["median_s"])  # per batch
    return {"shape": shape, "parameters": sum(p.numel() for p in base.parameters()),
            "rows": rows[0].shape[0], "tokens": tokens,
            "prompt_tokens_max": int(mask.sum(1).max()), "times": times,
            "summary": summarize({"floor": times["dynamic"], **times}, tokens),
            "same_tokens_as_compiled": same, "compile_s": compile_s,
            "saving_per_batch_s": saving,
            "break_even_batches": (compile_s["second_shape"] / saving if saving > 0
                                   else None)}


def write(args, result: dict, meta: dict) -> Path:
    from detoxrl.runs.io import atomic_write_json, atomic_write_text

    stem = args.out / f"decode_compile-{result['shape']}-{args.device}"
    atomic_write_json(stem.with_suffix(".json"), {**meta, **result})
    kind = "cpu" if args.device == "cpu" else "wall"
    be = result["break_even_batches"]
    lines = [f"# Compiled decode step: {result['shape']} on {args.device}", "",
             f"`{meta['command']}`", "",
             f"{result['parameters']:,} parameters; {result['rows']} rows ({args.prompts} "
             f"prompts x {args.samples}), {args.new_tokens} greedy tokens; {args.threads} "
             f"thread(s). {'Process CPU' if kind == 'cpu' else 'Wall'} time, medians of "
             f"{args.repeats} turns.", "",
             "| mode | tok/s | x dynamic | wall tok/s | same tokens |", "|---|---|---|---|---|"]
    for name, row in result["summary"].items():
        if name == "floor":
            continue
        lines.append(f"| {name} | {row[f'{kind}_tok_per_s']:,.0f} | "
                     f"{row[f'{kind}_ratio_to_floor']:.2f} | {row['wall_tok_per_s']:,.0f} | "
                     f"{result['same_tokens_as_compiled'][name]} |")
    c = result["compile_s"]
    lines += ["", f"Compile: {c['first_shape']:.1f} s for the first shape, "
              f"{c['second_shape']:.1f} s for a second prompt width. Saving per batch: "
              f"{result['saving_per_batch_s']:.2f} s; "
              + (f"one recompile is paid back after {be:.1f} batches of this shape."
                 if be is not None else "no saving, so a compile is never paid back."),
              "", f"Load average before / after: "
              f"{meta['machine']['load_average_before'][0]:.1f} / {os.getloadavg()[0]:.1f}.", ""]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines))
    return stem


def main(argv=None) -> int:
    from ppo_report import run_shapes

    return run_shapes("decode_compile.py", parse_args(argv), argv, run_shape, write)


if __name__ == "__main__":
    sys.exit(main())
