"""Prompt and text data: the RL prompts, labelled texts for the reward, LM corpora.

``prompts`` reads a dataset (local file or Hub) and builds the tokenized train/test
prompts, split by :func:`is_held_out`; ``labelled`` reads labelled texts for reward
training; ``lm_corpus`` builds language-modelling text for supervised fine-tuning.
Imports ``detoxrl.errors``, ``detoxrl.config`` and ``detoxrl.models`` (``tiny:`` data).
"""

from .prompts import PromptData, build_prompts, is_held_out, load_rows

__all__ = ["PromptData", "build_prompts", "is_held_out", "load_rows"]
