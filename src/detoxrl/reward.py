"""Rewards: callables that score generated responses, and the classifier that is the default one.

A reward is any callable ``(prompts: list[str], responses: list[str]) -> Tensor`` returning one
float per response, TRL style. :class:`ClassifierReward` is the tutorial's reward done right:
the score of the ``nothate`` label of ``facebook/roberta-hate-speech-dynabench-r4-target``,
looked up *by name* in the classifier's ``id2label``. The tutorial read
``pipeline(top_k=None)[i][0]``, which is the *top-scoring* label, so its reward silently
switched meaning whenever ``hate`` won.

The same object measures toxicity for evaluation (:meth:`ClassifierReward.toxicity`): the
softmax probability of the ``hate`` label, which is what the ``evaluate`` library's
"toxicity" measurement computes with this classifier.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import tiny
from .config import RewardConfig
from .errors import ConfigError, ModelLoadError

RewardFn = Callable[[list[str], list[str]], Tensor]
OUTPUTS = ("logit", "prob")
SCORE_ON = ("response", "query+response")
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
        _check_choice("output", output, OUTPUTS)
        _check_choice("score_on", score_on, SCORE_ON)
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

    @classmethod
    def from_config(cls, cfg: RewardConfig, device: Any = None) -> ClassifierReward:
        """Build the reward described by the ``reward:`` section of a run config."""
        return cls(cfg.model, label=cfg.label, output=cfg.output, score_on=cfg.score_on,
                   batch_size=cfg.batch_size, max_length=cfg.max_length, device=device)

    def __call__(self, prompts: list[str], responses: list[str]) -> Tensor:
        """One score per response, shape ``(B,)``, float32 on CPU."""
        if len(prompts) != len(responses):
            raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses.")
        texts = (list(responses) if self.score_on == "response"
                 else [p + r for p, r in zip(prompts, responses, strict=True)])
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
        _check_choice("output", output, OUTPUTS)
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


def compute_rewards(reward_fn: RewardFn, prompts: list[str], responses: list[str]) -> Tensor:
    """Call any reward callable and check its answer: ``(B,)`` float32 on CPU.

    Lists and arrays are accepted and converted, so a plain ``lambda`` works as a reward.
    """
    scores = torch.as_tensor(reward_fn(list(prompts), list(responses)))
    scores = scores.detach().to("cpu", torch.float32)
    if scores.shape != (len(responses),):
        raise ValueError(f"A reward must return one score per response, shape "
                         f"({len(responses)},); got shape {tuple(scores.shape)}.")
    return scores


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"reward.{name} is {value!r}; choose one of "
                          + ", ".join(repr(a) for a in allowed) + ".")


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
