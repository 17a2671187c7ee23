"""Library messages a user cannot act on, silenced only around the calls that raise them.

Each filter matches one message of one library, so anything else those calls report still
reaches the user. Both context managers also work as decorators.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# transformers 5 marks every T5 config as tied and then, finding a checkpoint's own lm_head
# (T5 v1.1, FLAN-T5), keeps it untied, which is right, but logs that the config should say
# tie_word_embeddings=False: the config on disk already says so.
_UNTIED_HEAD = "The tied weights mapping and config for this model specifies to tie"
# peft's PeftModel reads transformers' deprecated ``is_gradient_checkpointing``.
_PEFT_DEPRECATED = r"`is_gradient_checkpointing` is deprecated"
# peft sets fan_in_fan_out itself for GPT-2's Conv1D layers, and says so, on every load.
_PEFT_CONV1D = r"fan_in_fan_out is set to False but the target module is `Conv1D`"


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextmanager
def model_loading() -> Iterator[None]:
    """Around ``from_pretrained`` of a language model."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropMessage(_UNTIED_HEAD)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's ``get_peft_model`` and ``PeftModel.from_pretrained``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_DEPRECATED, category=FutureWarning)
        warnings.filterwarnings("ignore", message=_PEFT_CONV1D, category=UserWarning)
        yield
