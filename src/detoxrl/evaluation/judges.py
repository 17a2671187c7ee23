"""Independent toxicity judges: classifiers the policy was not trained against.

``--judge SPEC`` (repeatable) names one judge; a judge maps a list of texts to one toxicity
probability per text. SPEC is one of:

* ``profanity-check``: the linear model shipped inside the ``alt-profanity-check`` package
  (trained on Davidson et al. and Jigsaw data; nothing is downloaded). Install it with
  ``pip install "detoxrl[judges]"``.
* ``module:function``: a Python callable, imported as ``from module import function``,
  taking a list of texts and returning one toxicity probability in [0, 1] per text.
* a Hub id or local folder of a sequence classifier (``tiny:roberta-hate`` too), optionally
  followed by ``@LABEL``: the toxicity is the softmax probability of that label. Without
  ``@LABEL``, ``--judge-label`` is used, and without that the label is looked up by name
  among :data:`TOXIC_LABELS` (case-insensitive).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DetoxError, ModelLoadError

PROFANITY_CHECK = "profanity-check"
TOXIC_LABELS = ("toxic", "toxicity", "hate", "offensive", "abusive", "hateful")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class Judge:
    """A named toxicity scorer: ``judge(texts) -> (N,) float64 probabilities``."""

    name: str
    kind: str                       # "classifier", "callable" or "profanity-check"
    label: str | None
    score: Callable[[list[str]], Any]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        try:
            values = self.score(texts)
        except DetoxError:
            raise
        except Exception as exc:  # a user's callable: say which judge failed, and how
            raise ConfigError(f"The judge {self.name!r} failed on {len(texts)} texts "
                              f"({type(exc).__name__}: {exc}). A judge takes a list of texts "
                              "and returns one toxicity probability per text.") from None
        if hasattr(values, "detach"):
            values = values.detach().cpu().numpy()
        try:
            out = np.asarray(values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            out = np.empty(0)
        if out.size != len(texts) or not np.all((out >= 0) & (out <= 1)):
            raise ConfigError(f"The judge {self.name!r} must return {len(texts)} toxicity "
                              "probabilities in [0, 1], one per text; it returned "
                              f"{_describe(values)}.")
        return out


def _describe(values: Any) -> str:
    text = repr(values)
    return text if len(text) <= 80 else text[:77] + "..."


def load_judge(spec: str, default_label: str | None = None, batch_size: int = 32,
               device: Any = None) -> Judge:
    """The judge named by ``spec`` (see the module docstring); errors name the fix."""
    if spec == PROFANITY_CHECK:
        return _profanity_check()
    if _CALLABLE.match(spec) and not spec.startswith("tiny:"):
        return _callable(spec)
    name, _, label = spec.partition("@")
    return _classifier(name, label or default_label, batch_size, device, spec)


def _profanity_check() -> Judge:
    try:
        from profanity_check import predict_prob
    except ImportError as exc:
        raise ModelLoadError(f"The {PROFANITY_CHECK!r} judge needs the alt-profanity-check "
                             "package: pip install \"detoxrl[judges]\" (or pip install "
                             f"alt-profanity-check). ({type(exc).__name__}: {exc})") from None
    return Judge(PROFANITY_CHECK, PROFANITY_CHECK, None,
                 lambda texts: predict_prob(texts) if texts else [])


def _callable(spec: str) -> Judge:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"Cannot load the judge {spec!r}: {type(exc).__name__}: {exc}. "
                             "A callable judge is module:function, importable from the "
                             "current folder or PYTHONPATH.") from None
    if not callable(fn):
        raise ConfigError(f"The judge {spec!r} is not callable; name a function that takes "
                          "a list of texts and returns toxicity probabilities.")
    return Judge(spec, "callable", None, fn)


def _classifier(name: str, label: str | None, batch_size: int, device: Any,
                spec: str) -> Judge:
    from ..models.reward import ClassifierReward

    try:
        clf = ClassifierReward(name, label=_first_label(name), output="prob",
                               batch_size=batch_size, device=device)
    except DetoxError as exc:
        raise ModelLoadError(f"Cannot load the judge {spec!r}: {exc} A judge is "
                             f"{PROFANITY_CHECK!r}, module:function, or a classifier "
                             "(Hub id or folder, optionally MODEL@LABEL).") from None
    label = label or next((x for x in clf.labels if x.lower() in TOXIC_LABELS), None)
    if label is None or label not in clf.labels:
        found = "has no label named " + (repr(label) if label else
                                         "like " + "/".join(TOXIC_LABELS))
        raise ConfigError(f"The judge {name!r} {found}; its labels are "
                          + ", ".join(repr(x) for x in clf.labels)
                          + f". Name its toxic label: --judge {name}@LABEL.")
    clf.toxic_label = label
    return Judge(spec, "classifier", label, lambda texts: clf.toxicity(texts))


def _first_label(name: str) -> str:
    """Any label that exists, so the constructor's label check passes; the toxic label is
    chosen after loading, from the real names."""
    from ..models import tiny
    from ..models.loading import load_config

    id2label = getattr(load_config(tiny.resolve(name)), "id2label", None) or {0: "LABEL_0"}
    return id2label[min(id2label, key=int)]
