"""What an evaluation evaluates and how: options, decoding, prompts, the recorded settings.

``--protocol rtp`` is the decoding of Gehman et al. 2020 as Liu et al. 2021 and Lu et al.
2022 ran it: nucleus sampling with p = 0.9 (top-k off), temperature 1, at most 20 new
tokens, K = 25 samples per prompt. Explicit options (``--max-new-tokens``,
``--samples-per-prompt``, ``--generation.top_p`` ...) still win over the protocol.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import SamplingConfig, TrainConfig, load_config, to_dict
from ..errors import ConfigError, DataError, ModelLoadError
from ..runs.io import check_writable, file_sha256

EVAL_DIR = "eval"
DEFAULT_MAX_NEW_TOKENS = 100  # the tutorial evaluated toxicity on 100-token responses
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROTOCOLS = ("rtp",)
RTP_SAMPLING = {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 1.0,
                "num_beams": 1, "min_length": 0}
RTP_MAX_NEW_TOKENS, RTP_SAMPLES = 20, 25
# Settings that decide the generations and rewards; compare reuses evaluate's rows only when
# all of them match.
GENERATION_KEYS = ("model", "adapter_sha256", "data", "data_seed", "seed", "batch_size",
                   "sampling", "max_new_tokens", "reward", "samples_per_prompt", "prompts",
                   "best_of")


@dataclass
class EvalOptions:
    """How to evaluate; ``None`` fields take their value from the run config."""

    n: int | None = 500              # prompts; None: all of them
    seed: int | None = None          # default: the run's seed
    greedy: bool = False
    max_new_tokens: int | None = None  # default: min(max_new_tokens_draw, 100); rtp: 20
    batch_size: int = 16             # prompts per generate call
    samples_per_prompt: int | None = None  # default: 25 for data.kind rtp or --protocol, else 1
    protocol: str | None = None
    explicit_generation: frozenset[str] = frozenset()  # generation.* keys given explicitly
    prompts: str | None = None       # a prompt file instead of the run's test split
    score_on: str = "response"
    toxic_label: str | None = None   # None: the reward's label named like hate/offensive
    judges: list[str] = field(default_factory=list)
    judge_label: str | None = None
    fluency_model: str | None = None  # None: the reference policy
    judge_floor: list[str] = field(default_factory=list)  # files of clean human texts
    best_of: int | None = None       # "after" = the reference's best of N by the reward
    topicality: bool = True          # the prompt-response PMI: two more reference passes
    n_resamples: int = 10_000
    device: str | None = None
    progress: bool = True


@dataclass
class Target:
    """What is evaluated: the run config, the trained adapter, and where results go.

    ``adapter`` None: no trained adapter, for the best-of-N baseline only (``best_of``),
    whose both sides are the starting policy; it needs no RL run.
    """

    cfg: TrainConfig
    adapter: Path | None
    out_dir: Path


@dataclass
class Decoding:
    """How the responses are drawn."""

    sampling: SamplingConfig
    max_new_tokens: int
    seed: int
    kl_temperature: float            # the temperature of the KL log-probs
    samples_per_prompt: int


def resolve_target(run_dir: str | None, config: str | None, adapter: str | None,
                   overrides: Sequence[str] = (), output: str | None = None,
                   best_of: bool = False) -> Target:
    """The config and adapter of ``RUN_DIR``, or of ``--config`` + ``--adapter``; with
    ``best_of``, ``--config`` alone: the baseline of its model before any training."""
    baseline = run_dir is None and config is not None and adapter is None and best_of
    if baseline and output is None:
        raise ConfigError("--config with --best-of and no adapter evaluates the baseline "
                          "before any training, which has no run folder to write into; "
                          "give --output DIR.")
    if run_dir is None and (config is None or (adapter is None and not baseline)):
        raise ConfigError("Give a run folder (detoxrl evaluate runs/detoxrl), or --config "
                          "YAML together with --adapter FOLDER for an adapter trained "
                          "elsewhere (or with --best-of N alone, for the baseline before any "
                          "training).")
    if run_dir is not None and config is not None:
        raise ConfigError("Give either RUN_DIR (its config.yaml is used) or --config, not both; "
                          "change single options with dotted overrides, e.g. --reward.model X.")
    if run_dir is not None:
        root = Path(run_dir)
        if not (root / "config.yaml").is_file():
            raise ConfigError(f"{str(root)!r} is not a training run folder: it has no "
                              "config.yaml. Pass the output_dir of 'detoxrl train'.")
        config = str(root / "config.yaml")
    adapter_dir = None if baseline else Path(adapter) if adapter is not None else Path(run_dir)
    if adapter_dir is not None and not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(
            f"No trained adapter in {str(adapter_dir)!r} (no {ADAPTER_WEIGHTS}). A run "
            "folder holds one once training has finished; for a checkpoint pass "
            "--adapter RUN_DIR/checkpoints/step-N/adapter.")
    cfg = load_config(config, list(overrides))
    # An explicit --adapter (a checkpoint, say) keeps its results apart from the run's own.
    out = Path(output) if output else (adapter_dir if adapter else Path(run_dir)) / EVAL_DIR
    check_writable(out, "--output")
    return Target(cfg, adapter_dir, out)


def check_options(opts: EvalOptions) -> None:
    from ..models.reward import SCORE_ON

    for name in ("n", "batch_size", "max_new_tokens", "n_resamples", "samples_per_prompt",
                 "best_of"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if opts.seed is not None and not 0 <= opts.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, {2**32 - 1}], got {opts.seed}.")
    if opts.score_on not in SCORE_ON:
        raise ConfigError(f"--score-on is {opts.score_on!r}; choose one of {', '.join(SCORE_ON)}.")
    if opts.protocol is not None and opts.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol is {opts.protocol!r}; choose one of "
                          f"{', '.join(PROTOCOLS)}.")
    if opts.greedy:
        _check_greedy(opts)
    if len(set(opts.judges)) != len(opts.judges):
        raise ConfigError("The same --judge is given twice; name each judge once.")
    if opts.prompts is not None and not Path(opts.prompts).is_file():
        raise DataError(f"--prompts {opts.prompts!r} is not a file. Give a .jsonl/.json/.csv/"
                        ".parquet prompt file in the run's data format (data.kind).")


def _check_greedy(opts: EvalOptions) -> None:
    if opts.protocol:
        raise ConfigError("--greedy contradicts --protocol rtp, which samples (top_p 0.9); "
                          "drop one of them.")
    if (opts.samples_per_prompt or 1) > 1:
        raise ConfigError("--greedy gives the same response K times; use "
                          "--samples-per-prompt 1 with --greedy, or sample.")
    if opts.best_of is not None:
        raise ConfigError("--best-of N reranks N different samples; greedy decoding gives "
                          "the same one N times. Drop --greedy.")


def eval_sampling(cfg: TrainConfig, opts: EvalOptions) -> Decoding:
    """The decoding: the run's sampling, or greedy, or the protocol's."""
    sampling = dataclasses.replace(cfg.generation)
    if opts.greedy:  # no sampling filters either, so transformers has nothing to warn about
        sampling = dataclasses.replace(sampling, do_sample=False, top_k=None, top_p=1.0,
                                       temperature=1.0)
    if opts.protocol == "rtp":
        sampling = dataclasses.replace(sampling, **{
            k: v for k, v in RTP_SAMPLING.items() if k not in opts.explicit_generation})
    if sampling.do_sample and sampling.temperature <= 0:
        raise ConfigError(f"generation.temperature must be > 0, got {sampling.temperature}.")
    default_max = (RTP_MAX_NEW_TOKENS if opts.protocol == "rtp"
                   else min(cfg.generation.max_new_tokens_draw, DEFAULT_MAX_NEW_TOKENS))
    k = opts.samples_per_prompt or (
        RTP_SAMPLES if opts.protocol == "rtp" or cfg.data.kind == "rtp" else 1)
    seed = cfg.seed if opts.seed is None else opts.seed
    # Greedy decoding has no temperature; its log-probs are those of the untempered model.
    return Decoding(sampling, opts.max_new_tokens or default_max, seed,
                    sampling.temperature if sampling.do_sample else 1.0, k)


def prompt_source(opts: EvalOptions) -> dict[str, Any]:
    if opts.prompts is None:
        return {"source": "test split"}
    path = Path(opts.prompts)
    return {"source": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}


def settings(target: Target, opts: EvalOptions, n_available: int) -> dict[str, Any]:
    """Everything that decides the results, recorded in summary.json (and used for reuse)."""
    cfg = target.cfg
    dec = eval_sampling(cfg, opts)
    n = n_available if opts.n is None else min(opts.n, n_available)
    sampling_keys = ("do_sample", "temperature", "top_k", "top_p", "min_length", "num_beams")
    return {
        "n": n, "test_prompts": n_available, "prompts": prompt_source(opts),
        "samples_per_prompt": dec.samples_per_prompt, "protocol": opts.protocol,
        "seed": dec.seed, "batch_size": opts.batch_size,
        "decoding": "sampling" if dec.sampling.do_sample else "greedy",
        "max_new_tokens": dec.max_new_tokens,
        "sampling": {k: getattr(dec.sampling, k) for k in sampling_keys},
        "kl_temperature": dec.kl_temperature, "score_on": opts.score_on,
        "toxic_label": opts.toxic_label, "judges": list(opts.judges),
        "judge_label": opts.judge_label, "fluency_model": opts.fluency_model,
        "judge_floor": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)}
                        for p in opts.judge_floor],
        "best_of": opts.best_of, "topicality": opts.topicality,
        "output": str(target.out_dir.resolve()),
        "model": to_dict(cfg.model),
        "adapter": None if target.adapter is None else str(target.adapter.resolve()),
        "adapter_sha256": (None if target.adapter is None
                           else file_sha256(target.adapter / ADAPTER_WEIGHTS)),
        "data": to_dict(cfg.data), "data_seed": cfg.seed, "reward": to_dict(cfg.reward),
        "detoxrl": __version__,
    }


def device_for(opts: EvalOptions) -> torch.device:
    return torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_policy(target: Target, device: torch.device):
    """Base + trained adapter (frozen); ``policy.reference()`` gives the starting policy.
    Without a trained adapter, a fresh one that ``policy.reference()`` switches off."""
    from ..models.policy import Policy

    cfg = target.cfg
    adapter = None if target.adapter is None else str(target.adapter)
    # Evaluation needs no value head, whichever algorithm trained the adapter.
    return Policy.from_pretrained(cfg.model, cfg.lora, trained_adapter=adapter,
                                  trainable=False, device=device, value_head=False)


def held_out_prompts(cfg: TrainConfig, tokenizer):
    """The run's test split: the prompts training never saw."""
    from ..data.prompts import build_prompts

    # The run's own seed gives the same split as training, whatever --seed says.
    test = build_prompts(cfg.data, tokenizer, seed=cfg.seed).test
    if len(test) == 0:
        raise DataError("The test split is empty (data.test_fraction is 0): the run trained "
                        "on every prompt, so none is held out. Evaluate on other data with "
                        "--prompts FILE.")
    return test


def file_prompts(cfg: TrainConfig, path: str, tokenizer):
    """Every prompt of ``path``, read with the run's recipe (``data.kind``, template,
    columns, length filter); no split, no row limit, and no ``toxicity_threshold`` (the
    file is the selection)."""
    from ..data.prompts import build_prompts

    data = dataclasses.replace(cfg.data, path=path, test_fraction=0.0, max_rows=None,
                               toxicity_threshold=None)
    return build_prompts(data, tokenizer, seed=cfg.seed).train


def eval_prompts(cfg: TrainConfig, opts: EvalOptions, tokenizer):
    """``--prompts FILE`` when given, else the run's held-out test split."""
    if opts.prompts is not None:
        return file_prompts(cfg, opts.prompts, tokenizer)
    return held_out_prompts(cfg, tokenizer)


def first_prompts(test, n: int | None):
    """The first ``n`` prompts of ``test`` (all of them for ``None``)."""
    return test.select(range(len(test) if n is None else min(n, len(test))))


def check_evaluation_current(out_dir: Path, adapter_dir: Path | None = None) -> None:
    """Refuse an evaluation in ``out_dir`` made for another adapter than the one on disk.

    summary.json records the SHA-256 of the adapter it evaluated; after the run is trained
    again (``--overwrite``, ``--resume``) it describes weights that are gone. ``adapter_dir``
    defaults to the adapter the summary names.
    """
    path = Path(out_dir) / "summary.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).get("settings") or {}
    except (OSError, ValueError, AttributeError):
        return  # nothing readable: the report says so itself
    recorded = settings.get("adapter_sha256")
    adapter = Path(adapter_dir or settings.get("adapter") or "")
    weights = adapter / ADAPTER_WEIGHTS
    if not recorded or not weights.is_file():
        return
    on_disk = file_sha256(weights)
    if on_disk != recorded:
        raise ConfigError(
            f"{str(path)!r} evaluated another adapter than {str(weights)!r} (SHA-256 "
            f"{recorded[:12]}… recorded, {on_disk[:12]}… on disk): the run was "
            "trained again after it was evaluated. Refresh the evaluation with `detoxrl "
            "evaluate RUN_DIR` (with the same --adapter/--output, if you used them).")
