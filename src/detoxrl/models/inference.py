"""Text in, text out from a trained run: the trained adapter and the reference it started from.

:func:`load_policy` rebuilds the run's policy from its folder (``config.yaml`` names the base
model; the adapter and tokenizer are read from the folder), and :func:`generate` answers
prompts with the trained adapter, the reference (base, or base + the starting adapter), or
both, with the same seed per prompt so the two differ only by their weights.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DetoxError

WHICH = ("trained", "reference", "both")


def load_policy(run_dir: str | Path, device: str | None = None):
    """The run's policy (frozen) with its trained adapter loaded from ``run_dir``."""
    import torch

    from ..config import load_config
    from ..runs.preflight import default_cpu_threads
    from .policy import Policy

    run_dir = Path(run_dir)
    if not (run_dir / "adapter_config.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise DetoxError(f"{str(run_dir)!r} is not a finished run folder (it needs config.yaml "
                         "and adapter_config.json, written when training ends). Pass the "
                         "output_dir of a training run.")
    cfg = load_config(run_dir / "config.yaml")
    default_cpu_threads()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Policy.from_pretrained(cfg.model, trained_adapter=str(run_dir), trainable=False,
                                  device=device, value_head=False), cfg


def generate(run_dir: str | Path, prompts: list[str], which: str = "trained",
             max_new_tokens: int = 64, greedy: bool = False, seed: int = 0,
             template: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             device: str | None = None) -> list[dict]:
    """One dict per prompt: ``prompt`` and the ``trained`` and/or ``reference`` response.

    ``template=True`` wraps each prompt in the run's ``data.template`` (the text goes into
    the ``data.text_column`` placeholder), as the training prompts were built.
    """
    import torch

    from ..config import SamplingConfig
    from .generation import collate_queries

    if which not in WHICH:
        raise DetoxError(f"--with is {which!r}; choose one of {', '.join(WHICH)}.")
    if max_new_tokens < 1:
        raise DetoxError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    from ..config.validation import SEED_MAX, in_range

    for option, value, spec in (("--temperature", temperature, "> 0"),
                                ("--top-p", top_p, "(0, 1]"), ("--seed", seed, f"[0, {SEED_MAX}]")):
        if not in_range(value, spec):
            raise DetoxError(f"{option} must be {spec}, got {value}.")
    policy, cfg = load_policy(run_dir, device)
    if template:
        prompts = [cfg.data.template.format(**{cfg.data.text_column: p}) for p in prompts]
    sampling = SamplingConfig(min_new_tokens_draw=max_new_tokens,
                              max_new_tokens_draw=max_new_tokens, min_length=1,
                              do_sample=not greedy, temperature=temperature, top_p=top_p)
    tok = policy.tokenizer
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tok([prompt], truncation=True, max_length=cfg.data.max_prompt_tokens)["input_ids"]
        query_ids, query_mask = collate_queries(ids, tok.pad_token_id, policy.padding_side)
        query_ids, query_mask = query_ids.to(policy_device(policy)), query_mask.to(
            policy_device(policy))
        row = {"prompt": prompt}
        for name in (("trained", "reference") if which == "both" else (which,)):
            torch.manual_seed(seed + i)  # the same dice for both models
            if name == "reference":
                with policy.reference():
                    out = policy.generate(query_ids, query_mask, sampling, queries=[prompt])
            else:
                out = policy.generate(query_ids, query_mask, sampling, queries=[prompt])
            row[name] = out.responses[0]
        rows.append(row)
    return rows


def policy_device(policy):
    return next(policy.parameters()).device
