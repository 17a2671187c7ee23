"""Rewards: callables that score generated responses, and the classifier that is the default one.

A reward is any callable ``f(prompts=..., completions=..., **kwargs) -> list[float]`` (or a
tensor), one float per completion, called with keywords as TRL's trainers call theirs: the
prompt dataset's other columns (``references``, ``id``, any column of your own) arrive as
keyword arguments, one value per completion. :class:`RewardSet` combines several rewards
with weights; a string stands for a classifier (:class:`ClassifierReward`). The older
positional form ``f(prompts, responses)`` is still recognised, with a warning (see
:func:`as_reward_function`). :class:`ClassifierReward` is the tutorial's reward done right:
the score of the ``nothate`` label of ``facebook/roberta-hate-speech-dynabench-r4-target``,
looked up *by name* in the classifier's ``id2label``. The tutorial read
``pipeline(top_k=None)[i][0]``, which is the *top-scoring* label, so its reward silently
switched meaning whenever ``hate`` won.

The same object measures toxicity for evaluation (:meth:`ClassifierReward.toxicity`): the
softmax probability of the ``hate`` label, which is what the ``evaluate`` library's
"toxicity" measurement computes with this classifier.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..config import RewardConfig
from ..config.choices import CHOICES, check_choice
from ..errors import ConfigError, ModelLoadError
from . import tiny

RewardFn = Callable[..., "Tensor | list[float]"]
OUTPUTS = CHOICES[("reward", "output")]
SCORE_ON = CHOICES[("reward", "score_on")]
# RoBERTa-family models number positions from pad_token_id + 1, so that many fewer tokens fit.
_OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert",
                           "longformer", "roberta-prelayernorm", "data2vec-text", "ibert")
_FALLBACK_MAX_LENGTH = 512


class ClassifierReward:
    """The score of one label of a sequence classifier, as a reward callable.

    Args:
        model_name_or_path: Hub id or local folder of an ``AutoModelForSequenceClassification``
            with its tokenizer; ``tiny:roberta-hate`` builds a tiny offline one.
        label: Label whose score is the reward, looked up by name in ``config.id2label``.
        output: ``'logit'`` (the raw logit, as the tutorial) or ``'prob'`` (softmax).
        score_on: ``'response'`` scores the response alone; ``'query+response'`` scores
            ``prompt + response`` concatenated, as the tutorial did.
        batch_size: Texts per forward pass.
        max_length: Truncate inputs to this many tokens; default (and upper bound): the
            classifier's own maximum.
        device: Where the classifier runs; default CUDA when available, else CPU.
        dtype: ``torch.dtype`` or its name; default float32, so scores do not drift.
        trust_remote_code: Run model code from the Hub.
        toxic_label: The label whose probability :meth:`toxicity` reports.
    """

    def __init__(self, model_name_or_path: str, label: str = "nothate", output: str = "logit",
                 score_on: str = "response", batch_size: int = 32,
                 max_length: int | None = None, device: Any = None, dtype: Any = None,
                 trust_remote_code: bool = False, toxic_label: str = "hate") -> None:
        check_choice("reward", "output", output)
        check_choice("reward", "score_on", score_on)
        if batch_size < 1:
            raise ConfigError(f"reward.batch_size must be at least 1, got {batch_size}.")
        self.name = model_name_or_path
        self.label, self.output, self.score_on = label, output, score_on
        self.toxic_label = toxic_label
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.model = _load(model_name_or_path, _as_dtype(dtype),
                                           trust_remote_code)
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = _resolve_max_length(max_length, self.tokenizer, self.model.config)
        self.label_index(label)  # fail now, not at the first PPO step
        self._last_call: tuple[tuple, Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: RewardConfig, device: Any = None) -> ClassifierReward:
        """Build the reward described by the ``reward:`` section of a run config."""
        return cls(cfg.model, label=cfg.label, output=cfg.output, score_on=cfg.score_on,
                   batch_size=cfg.batch_size, max_length=cfg.max_length, device=device)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> Tensor:
        """One score per completion, shape ``(B,)``, float32 on CPU; other columns ignored."""
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
        texts = (list(completions) if self.score_on == "response"
                 else [p + r for p, r in zip(prompts, completions, strict=True)])
        return self.label_scores(texts, self.label, self.output)

    @property
    def labels(self) -> list[str]:
        """The classifier's label names, in id order."""
        id2label = self.model.config.id2label
        return [id2label[i] for i in sorted(id2label, key=int)]

    def label_index(self, label: str) -> int:
        """The output index of ``label``; ConfigError naming the real labels if it has none."""
        for index, name in self.model.config.id2label.items():
            if name == label:
                return int(index)
        raise ConfigError(
            f"The classifier {self.name!r} has no label {label!r}; its labels are "
            + ", ".join(repr(n) for n in self.labels) + ". Set reward.label to one of them.")

    def label_scores(self, texts: Sequence[str], label: str, output: str = "logit") -> Tensor:
        """The logit or softmax probability of ``label`` for each text, ``(N,)`` float32 CPU."""
        check_choice("reward", "output", output)
        index = self.label_index(label)
        logits = self.logits(texts)
        scores = logits if output == "logit" else logits.softmax(dim=-1)
        return scores[:, index].contiguous()

    def toxicity(self, texts: Sequence[str]) -> Tensor:
        """Probability of the toxic label (``hate``) per text, as ``evaluate``'s "toxicity"."""
        return self.label_scores(texts, self.toxic_label, "prob")

    def logits(self, texts: Sequence[str]) -> Tensor:
        """All label logits, ``(N, num_labels)`` float32 on CPU, in the order of ``texts``;
        equal texts get bit-identical rows."""
        texts = list(texts)
        # The evaluation scores the same texts for toxicity and for the reward in turn: the
        # second call reuses the first's pass (equal texts, so equal batches and bits).
        key = (texts, self.batch_size, self.max_length, self.device)
        if self._last_call is not None and self._last_call[0] == key:
            return self._last_call[1].clone()
        out = self._logits(texts)
        self._last_call = (key, out.clone())
        return out

    def _logits(self, texts: list[str]) -> Tensor:
        # Each distinct text is scored once. Padding and batch shape change the last bits of
        # a score, so a text scored twice in different batches could differ from itself:
        # an unchanged response would then show a (tiny) before/after difference.
        unique = list(dict.fromkeys(texts))
        where = {text: i for i, text in enumerate(unique)}
        # Allocated outside inference mode: callers may edit scores in place (penalties),
        # which PyTorch forbids on inference tensors.
        out = torch.empty(len(unique), self.model.config.num_labels)
        # Batching texts of similar length wastes less compute on padding.
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = self._encode([unique[i] for i in rows])
            with torch.inference_mode():
                logits = self.model(**batch).logits
            out[rows] = logits.float().cpu()
        if len(unique) == len(texts):
            return out
        return out[torch.tensor([where[text] for text in texts], dtype=torch.long)]

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        if enc["input_ids"].shape[1] == 0:
            # Tokenizers without special tokens turn a batch of empty strings into zero
            # columns, which the model cannot reshape; one masked pad column scores the same.
            pad = self.tokenizer.pad_token_id or 0
            enc = {k: torch.full((len(texts), 1), pad if k == "input_ids" else 0)
                   for k in enc}
        return {k: v.to(self.device) for k, v in enc.items()}

    def __repr__(self) -> str:
        return (f"ClassifierReward({self.name!r}, label={self.label!r}, output={self.output!r}, "
                f"score_on={self.score_on!r}, max_length={self.max_length})")


def _call_reward(reward_fn: RewardFn, prompts: list[str], completions: list[str],
                 columns: dict) -> tuple[Tensor, Tensor]:
    """``(scores, applies)``: scores ``(B,)`` float32 CPU, NaN where the reward said None."""
    fn = as_reward_function(reward_fn)
    raw = fn(prompts=list(prompts), completions=list(completions), **columns)
    applies = torch.ones(len(completions), dtype=torch.bool)
    if isinstance(raw, (list, tuple)):
        applies = torch.tensor([v is not None for v in raw], dtype=torch.bool)
        raw = [float("nan") if v is None else v for v in raw]
    scores = torch.as_tensor(raw).detach().to("cpu", torch.float32)
    if scores.shape != (len(completions),):
        raise ValueError(f"The reward {reward_name(reward_fn)!r} must return one score per "
                         f"completion, shape ({len(completions)},); got shape "
                         f"{tuple(scores.shape)}.")
    return scores, applies


_POSITIONAL_HINT = ("Rewards are called TRL-style, with keywords: f(prompts=..., "
                    "completions=..., **kwargs), where kwargs are the prompt dataset's other "
                    "columns. Rename its parameters, e.g. `def {name}(prompts, completions, "
                    "**kwargs)`.")


def as_reward_function(fn: Any) -> RewardFn:
    """``fn`` as a keyword-called reward; the old positional form is adapted, with a warning.

    A callable whose parameters cannot take ``prompts=`` and ``completions=`` by keyword but
    can take two positional arguments (``lambda p, r: ...``, ``def f(prompts, responses)``)
    is the positional form of detoxrl 0.1: it is wrapped to receive (prompts, completions)
    and no other columns, and a FutureWarning says how to convert it.
    """
    if not callable(fn):
        raise ConfigError(f"A reward must be a callable or a classifier name (str); got "
                          f"{type(fn).__name__}.")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: assume the TRL form
        return fn
    if _takes_keyword(signature, "prompts") and _takes_keyword(signature, "completions"):
        return fn
    name = reward_name(fn)
    if not _binds(signature, ([], [])):
        raise ConfigError(f"The reward {name!r} cannot be called as f(prompts=..., "
                          "completions=...). " + _POSITIONAL_HINT.format(name=name))
    warnings.warn(f"The reward {name!r} takes positional (prompts, responses); it is adapted "
                  "for now. " + _POSITIONAL_HINT.format(name=name), FutureWarning, stacklevel=3)

    def positional(prompts, completions, **_columns):
        return fn(prompts, completions)

    positional.__name__ = name
    return positional


def _takes_keyword(signature: inspect.Signature, name: str) -> bool:
    kinds = {p.kind for p in signature.parameters.values()}
    param = signature.parameters.get(name)
    return inspect.Parameter.VAR_KEYWORD in kinds or (param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def _binds(signature: inspect.Signature, args: tuple) -> bool:
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def reward_name(fn: Any) -> str:
    """A short name for logs: a classifier's folder or repo name, else the function's name."""
    if isinstance(fn, ClassifierReward):
        return fn.name.rstrip("/").split("/")[-1].removeprefix("tiny:")
    return getattr(fn, "__name__", None) or type(fn).__name__


class RewardSet:
    """Several rewards combined as a weighted sum; the per-reward scores are kept for logs.

    Each function is called as ``f(prompts=..., completions=..., **columns)`` and must return
    one score per completion (``None`` for "does not apply"). The total is
    ``sum_i weight_i * score_i``, skipping the ``None`` ones; a completion that no reward
    applies to is an error. After each call :attr:`last` maps every reward's name to its
    ``(B,)`` scores (NaN where ``None``), which the trainer logs as ``env/reward/<name>``.

    Columns shorter than the completions (one value per prompt, K completions per prompt)
    are repeated so every completion gets its prompt's value.
    """

    def __init__(self, funcs: list[RewardFn], weights: list[float] | None = None):
        if not funcs:
            raise ConfigError("reward_funcs is empty; give at least one reward.")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ConfigError(f"reward_weights has {len(weights)} values for {len(funcs)} "
                              "reward functions; give one weight per reward.")
        self.funcs = [as_reward_function(f) for f in funcs]
        self.weights = weights
        self.names = _unique([reward_name(f) for f in funcs])
        self.last: dict[str, Tensor] = {}

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> Tensor:
        columns = {k: repeat_to(v, len(completions), k) for k, v in columns.items()}
        called = [_call_reward(f, prompts, completions, columns) for f in self.funcs]
        parts = [scores for scores, _ in called]
        self.last = dict(zip(self.names, parts, strict=True))
        stacked = torch.stack(parts)                                       # (R, B)
        applies = torch.stack([a for _, a in called])                      # (R, B)
        weights = torch.tensor(self.weights).unsqueeze(1)                  # (R, 1)
        if len(completions) and not applies.any(0).all():
            row = int((~applies.any(0)).nonzero()[0])
            raise ValueError(f"Every reward returned None for completion {row} "
                             f"({completions[row][:60]!r}); at least one must score it.")
        # A NaN score (not None) stays NaN, so the trainer sees it and skips the step.
        return torch.where(applies, stacked * weights, 0.0).sum(0)

    def describe(self) -> list[dict]:
        """Name, weight and kind of each reward, for run_info.json and the model card."""
        return [{"name": n, "weight": w, "kind": ("classifier" if isinstance(f, ClassifierReward)
                                                  else "function"),
                 **({"model": f.name, "label": f.label, "output": f.output}
                    if isinstance(f, ClassifierReward) else {})}
                for n, w, f in zip(self.names, self.weights, self.funcs, strict=True)]


def build_reward_set(reward_funcs: Any, weights: list[float] | None, cfg: RewardConfig,
                     device: Any = None) -> RewardSet:
    """The run's rewards: ``None`` is ``cfg``'s classifier; a string is a classifier id or path
    scored with ``cfg``'s label, output and batch settings; a callable is used as it is."""
    if isinstance(reward_funcs, RewardSet):
        return reward_funcs
    if reward_funcs is None:
        reward_funcs = [cfg.model]
    elif isinstance(reward_funcs, str) or callable(reward_funcs):
        reward_funcs = [reward_funcs]
    funcs = [ClassifierReward.from_config(replace(cfg, model=f), device=device)
             if isinstance(f, str) else f for f in reward_funcs]
    return RewardSet(funcs, weights)


def repeat_to(values: Any, n: int, name: str) -> list:
    """A column of one value per prompt as one value per completion (K in a row per prompt)."""
    values = list(values)
    if len(values) == n:
        return values
    if not values or n % len(values):
        raise ValueError(f"Column {name!r} has {len(values)} values for {n} completions.")
    k = n // len(values)
    return [v for v in values for _ in range(k)]


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _as_dtype(dtype: Any) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ConfigError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")


def _load(name: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tiny.resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(
            f"Could not load the reward classifier {name!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}). Give a Hub id of a "
            "sequence classifier, or, offline, a local folder holding its config.json, "
            "weights and tokenizer files (as written by save_pretrained), e.g. "
            "--reward.model /path/to/roberta-hate-speech-dynabench-r4-target; "
            "'tiny:roberta-hate' builds a tiny test classifier.") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-style classifiers ship without a pad token; batching needs one, and the model
        # needs its id to find each row's last real token.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def _resolve_max_length(requested: int | None, tokenizer, config) -> int:
    limit = _classifier_max_length(tokenizer, config)
    if requested is None:
        return limit
    if requested < 1:
        raise ConfigError(f"reward.max_length must be at least 1, got {requested}.")
    if requested > limit:
        warnings.warn(f"reward.max_length={requested} exceeds what the classifier accepts "
                      f"({limit} tokens); using {limit}.", stacklevel=3)
    return min(requested, limit)


def _classifier_max_length(tokenizer, config) -> int:
    """The longest input the classifier accepts, from its tokenizer and position table."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # huge = "unset" sentinel
        limits.append(tok_max)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", "") in _OFFSET_POSITION_MODELS:
            pad = config.pad_token_id if config.pad_token_id is not None else 1
            positions -= pad + 1  # 514 - 2 = 512 for roberta-base
        limits.append(positions)
    return min(limits) if limits else _FALLBACK_MAX_LENGTH
