#!/usr/bin/env python
"""Tokens per second of sampling, as a ratio to the cached greedy forward passes (the floor).

    python bench/sampling.py --shape mini-causal [--shape ...] [--device cpu|cuda]
        [--prompts 8] [--samples 25] [--new-tokens 20] [--top-p 0.9] [--repeats 3]

Per shape, in one process, the modes take turns (``--repeats`` rounds, the order reversed
every other round), each generating ``new-tokens`` tokens for every one of
``prompts x samples`` rows (EOS is blocked until then, so every mode makes the same tokens):

* **floor**: a bare loop of cached forward passes (transformers' ``DynamicCache``) taking the
  argmax: what any decoder must compute. **floor-static**: the same with a ``StaticCache``
  (``--static``), and **floor-static-compiled** with the step under ``torch.compile``
  (``--compile``; its compile time is reported apart and not counted).
* **rollout**: ``Policy.generate`` as the RL rollout calls it (the RL presets' sampling:
  top_p 1.0), reading log-probs and values while sampling, LoRA and value head on.
* **evaluate**: ``Policy.generate`` as ``detoxrl evaluate`` calls it: the reference policy,
  ``samples`` samples per prompt in one call, nucleus ``--top-p``, log-probs read.
* **rollout-eager**, **evaluate-eager** (on CUDA only): the same two calls with
  ``generation.cuda_graphs`` off, every decoding step launched kernel by kernel.
* **generate**: transformers' ``model.generate`` with the same nucleus (its sorting warper
  and ``torch.multinomial``), for comparison (``--no-generate`` skips it).

Shapes: the demo's mini LMs (``configs/mini/lm-{causal,seq2seq}.yaml``: model shape and a
BPE tokenizer of that size trained on DialogSum, random weights), and gpt2 / flan-t5-base
(random weights, built and cached by ``ppo_models.py``); tiny-causal and tiny-seq2seq are
the test models, for the smoke test. Prompts: the first DialogSum
dialogues, cut to ``--prompt-tokens``. Ratios use process CPU time on the CPU (robust on a
shared machine with one thread) and wall time on both; results go to
``bench/results/sampling-<shape>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

SHAPES = ("mini-causal", "mini-seq2seq", "gpt2", "flan-t5-base", "tiny-causal", "tiny-seq2seq")
MINI_PRESETS = BENCH.parent / "configs" / "mini"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=SHAPES, required=True)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=25, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--top-p", type=float, default=0.9, help="the evaluation's nucleus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--static", action="store_true", help="add the StaticCache floor")
    ap.add_argument("--compile", action="store_true", help="add the compiled static floor")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- shapes

def build_policy(shape: str, data_path: Path):
    """A ``Policy`` (fresh LoRA, value head) on the shape's random-weight LM."""
    from detoxrl.config import ModelConfig
    from detoxrl.models.policy import Policy

    if shape.startswith("mini-"):
        base, tokenizer = _mini_lm(shape.removeprefix("mini-"), data_path)
        return Policy.from_model(base, tokenizer)
    if shape.startswith("tiny-"):  # the test models, for the smoke test
        from detoxrl.models import tiny

        name = "gpt2" if shape == "tiny-causal" else "t5"
        return Policy.from_pretrained(ModelConfig(name_or_path=tiny.resolve(f"tiny:{name}")))
    from ppo_models import prepare_shape

    return Policy.from_pretrained(ModelConfig(name_or_path=prepare_shape(shape, data_path)
                                              .policy))


def _mini_lm(arch: str, data_path: Path):
    """configs/mini/lm-<arch>.yaml's model, random weights, as ``detoxrl sft`` builds it."""
    import torch
    import yaml

    from detoxrl.config import from_dict
    from detoxrl.supervised.common import SupervisedModel, train_tokenizer
    from detoxrl.supervised.sft import _scratch_lm
    from ppo_models import read_rows

    raw = yaml.safe_load((MINI_PRESETS / f"lm-{arch}.yaml").read_text())["model"]
    m = from_dict(SupervisedModel, raw)
    texts = [row["dialogue"] for row in read_rows(data_path, 5000)]
    template = "$A </s>" if m.architecture == "t5" else None
    tokenizer = train_tokenizer(texts, m.vocab_size, template, m.max_positions)
    torch.manual_seed(0)
    return _scratch_lm(m, tokenizer).eval(), tokenizer


def prompts(policy, data_path: Path, n: int, max_tokens: int):
    """(ids, mask) of the first ``n`` dialogues, cut to ``max_tokens``, padded the policy's way."""
    from detoxrl.models.generation import collate_queries
    from ppo_models import read_rows

    rows = [policy.tokenizer(r["dialogue"]).input_ids[:max_tokens]
            for r in read_rows(data_path, n)]
    return collate_queries(rows, policy.tokenizer.pad_token_id, policy.padding_side)


# --------------------------------------------------------------------------- modes

def floor_loop(model, ids, mask, steps: int, static: bool = False, step_fn=None):
    """``steps`` cached forward passes taking the argmax, the least any decoder computes;
    the (rows, steps) tokens. With ``static``, a ``StaticCache`` and a decode step whose
    inputs keep one shape (the whole mask every step), so a compiled ``step_fn`` traces once."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache, StaticCache

    rows, width = ids.shape
    seq2seq = model.config.is_encoder_decoder
    if static:
        self_cache = StaticCache(config=model.config, max_cache_len=steps + (0 if seq2seq
                                                                              else width))
        cache = (EncoderDecoderCache(self_cache, StaticCache(config=model.config,
                                                             max_cache_len=width))
                 if seq2seq else self_cache)
    else:
        cache = (EncoderDecoderCache(DynamicCache(config=model.config),
                                     DynamicCache(config=model.config))
                 if seq2seq else DynamicCache(config=model.config))
    forward = model if step_fn is None else step_fn
    tokens = []
    with torch.no_grad():
        if seq2seq:
            encoder = model.get_encoder()(input_ids=ids, attention_mask=mask)
            token = torch.full((rows, 1), model.config.decoder_start_token_id,
                               device=ids.device)
            for t in range(steps):
                out = forward(encoder_outputs=encoder, attention_mask=mask,
                              decoder_input_ids=token, cache=cache, use_cache=True,
                              cache_position=torch.tensor([t], device=ids.device))
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            return torch.cat(tokens, 1)
        full = torch.cat([mask, mask.new_ones(rows, steps)], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=full[:, :width], position_ids=pos,
                    cache=cache, use_cache=True, logits_to_keep=1,
                    cache_position=torch.arange(width, device=ids.device))
        pos = pos[:, -1:]
        for t in range(1, steps):
            token, pos = out.logits[:, -1].argmax(-1, keepdim=True), pos + 1
            tokens.append(token)
            # A static cache masks the positions not yet written by their cache position.
            seen = full if static else full[:, :width + t]
            out = forward(input_ids=token, attention_mask=seen, position_ids=pos,
                          cache=cache, use_cache=True,
                          cache_position=torch.tensor([width + t - 1], device=ids.device))
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, 1)


def make_modes(args, policy, ids, mask) -> dict:
    """Each mode: a callable that generates ``new-tokens`` tokens for every row."""
    import dataclasses

    from detoxrl.config import SamplingConfig

    k, t = args.samples, args.new_tokens
    base = policy.model.get_base_model()
    rows_ids, rows_mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    rl = SamplingConfig(min_length=t, top_p=1.0, top_k=0)
    ev = dataclasses.replace(rl, top_p=args.top_p)

    def rollout(sampling):
        return lambda: policy.generate(rows_ids, rows_mask, sampling, [t] * len(rows_ids),
                                       with_logprobs=True, with_values=True)

    def evaluate(sampling):
        def run():
            with policy.reference():
                policy.generate(ids, mask, sampling, [t] * len(ids), num_return_sequences=k,
                                with_logprobs=True)
        return run

    modes = {
        "floor": lambda: floor_loop(base, rows_ids, rows_mask, t),
        "rollout": rollout(rl),
        "evaluate": evaluate(ev),
    }
    if ids.is_cuda:  # the same two paths with each step launched kernel by kernel
        modes["rollout-eager"] = rollout(dataclasses.replace(rl, cuda_graphs=False))
        modes["evaluate-eager"] = evaluate(dataclasses.replace(ev, cuda_graphs=False))
    if args.static:
        modes["floor-static"] = lambda: floor_loop(base, rows_ids, rows_mask, t, static=True)
    if not args.no_generate:
        tok = policy.tokenizer

        def generate():
            with policy.reference():
                policy.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      top_p=args.top_p, top_k=0, max_new_tokens=t,
                                      min_new_tokens=t, num_return_sequences=k,
                                      pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
        modes["generate"] = generate
    return modes


def compiled_floor(base, ids, mask, t) -> tuple[callable, float]:
    """The static-cache floor with its decode step under ``torch.compile``; compile seconds."""
    import torch

    step = torch.compile(base, dynamic=False)
    start = time.perf_counter()
    floor_loop(base, ids, mask, t, static=True, step_fn=step)  # compiles
    floor_loop(base, ids, mask, t, static=True, step_fn=step)
    return (lambda: floor_loop(base, ids, mask, t, static=True, step_fn=step),
            time.perf_counter() - start)


# --------------------------------------------------------------------------- timing

def measure(modes: dict, repeats: int, sync) -> dict:
    """Median wall and CPU seconds per mode, the modes taking turns, after one warm-up each."""
    for run in modes.values():
        run()
    times = {name: {"wall": [], "cpu": []} for name in modes}
    names = list(modes)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            modes[name]()
            sync()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {kind: {"median_s": statistics.median(v), "runs_s": v}
                   for kind, v in t.items()} for name, t in times.items()}


def summarize(times: dict, tokens: int) -> dict:
    out = {}
    for name, t in times.items():
        row = {}
        for kind in ("wall", "cpu"):
            secs = t[kind]["median_s"]
            row[f"{kind}_tok_per_s"] = tokens / secs
            row[f"{kind}_ratio_to_floor"] = times["floor"][kind]["median_s"] / secs
        out[name] = row
    return out


def run_shape(args, shape: str, data_path: Path) -> dict:
    import torch

    torch.manual_seed(args.seed)
    policy = build_policy(shape, data_path).to(args.device).eval()
    ids, mask = prompts(policy, data_path, args.prompts, args.prompt_tokens)
    ids, mask = ids.to(args.device), mask.to(args.device)
    modes = make_modes(args, policy, ids, mask)
    extra = {}
    if args.compile:
        base = policy.model.get_base_model()
        rows = (ids.repeat_interleave(args.samples, 0), mask.repeat_interleave(args.samples, 0))
        modes["floor-static-compiled"], extra["compile_and_first_runs_s"] = compiled_floor(
            base, *rows, args.new_tokens)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = measure(modes, args.repeats, sync)
    tokens = args.prompts * args.samples * args.new_tokens
    params = sum(p.numel() for p in policy.model.get_base_model().parameters())
    return {"shape": shape, "parameters": params,
            "vocab": policy.model.get_base_model().config.get_text_config().vocab_size,
            "rows": args.prompts * args.samples, "tokens": tokens,
            "prompt_tokens_max": int(mask.sum(1).max()), "times": times,
            "summary": summarize(times, tokens), **extra}


def write(args, result: dict, meta: dict) -> Path:
    from detoxrl.runs.io import atomic_write_json, atomic_write_text

    stem = args.out / f"sampling-{result['shape']}-{args.device}"
    atomic_write_json(stem.with_suffix(".json"), {**meta, **result})
    kind = "cpu" if args.device == "cpu" else "wall"
    lines = [f"# Sampling: {result['shape']} on {args.device}", "",
             f"`{meta['command']}`", "",
             f"{result['parameters']:,} parameters, vocabulary {result['vocab']:,}; "
             f"{result['rows']} rows ({args.prompts} prompts x {args.samples}), "
             f"{args.new_tokens} new tokens each; {args.threads} thread(s). Ratios from "
             f"{'process CPU' if kind == 'cpu' else 'wall'} time (wall beside it), medians "
             f"of {args.repeats} turns.", "",
             "| mode | tok/s | x floor | wall tok/s | wall x floor |", "|---|---|---|---|---|"]
    for name, row in result["summary"].items():
        lines.append(f"| {name} | {row[f'{kind}_tok_per_s']:,.0f} | "
                     f"{row[f'{kind}_ratio_to_floor']:.2f} | {row['wall_tok_per_s']:,.0f} | "
                     f"{row['wall_ratio_to_floor']:.2f} |")
    if "compile_and_first_runs_s" in result:
        lines += ["", f"torch.compile + first two runs: {result['compile_and_first_runs_s']:.0f}"
                  " s (not counted above)."]
    lines += ["", f"Load average before / after: {meta['machine']['load_average_before'][0]:.1f}"
              f" / {os.getloadavg()[0]:.1f}.", ""]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines))
    return stem


def main(argv=None) -> int:
    from ppo_report import run_shapes

    return run_shapes("sampling.py", parse_args(argv), argv, run_shape, write)


if __name__ == "__main__":
    sys.exit(main())
