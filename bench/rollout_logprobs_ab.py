"""Does reading log-probs and values while sampling cost rollout time? One process, A/B.

Alternates ``Policy.generate`` without and with ``with_logprobs``/``with_values`` on a
benchmark shape and prints process CPU and wall seconds of each call:

    python bench/rollout_logprobs_ab.py --shape gpt2 --new-tokens 32 --rounds 2
"""

from __future__ import annotations

import argparse
import time

import torch

from ppo_step import parse_args, spec_from_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from detoxrl.config import ModelConfig, SamplingConfig
    from detoxrl.models.generation import collate_queries
    from detoxrl.models.policy import Policy

    torch.set_num_threads(1)
    spec, _ = spec_from_args(parse_args(["--shape", args.shape]))
    pol = Policy.from_pretrained(ModelConfig(name_or_path=spec["policy"]))
    ids, mask = collate_queries(spec["prompts"]["input_ids"], pol.tokenizer.pad_token_id,
                                pol.padding_side)
    n = args.new_tokens
    sampling = SamplingConfig(min_new_tokens_draw=n, max_new_tokens_draw=n, min_length=n)
    pol.generate(ids[:4], mask[:4], sampling, [4] * 4)                       # warm-up
    for _ in range(args.rounds):
        for read in (False, True):
            torch.manual_seed(0)
            c0, t0 = time.process_time(), time.perf_counter()
            pol.generate(ids, mask, sampling, with_logprobs=read, with_values=read)
            print(f"with_logprobs={read}: CPU {time.process_time() - c0:.2f} s, "
                  f"wall {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()
