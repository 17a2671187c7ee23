"""What ``DetoxTrainer`` is given, made usable: prompt datasets, the tokenizer, names.

A user's ``datasets.Dataset`` becomes training prompts (:func:`prompt_dataset`); loaded
objects are recorded in the config by what they stand for (:func:`record_names`), so the
run folder's config.yaml tells the truth; :func:`named_resources` lists the Hub names a run
will fetch, for the offline check before anything loads.
"""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError, DataError

# Columns that are the prompt itself; every other column is passed to the rewards.
NOT_REWARD_COLUMNS = ("query", "prompt", "input_ids")


def reward_columns(rows: dict[str, list]) -> dict[str, list]:
    """The columns of a batch of prompt rows that the rewards receive."""
    return {k: v for k, v in rows.items() if k not in NOT_REWARD_COLUMNS}


def prompt_dataset(dataset: Any, tokenizer, max_tokens: int):
    """A user's ``datasets.Dataset`` as training prompts: ``query`` and ``input_ids`` added.

    Takes the TRL layout (a ``prompt`` text column) or detoxrl's (``query``, with or without
    ``input_ids``); other columns are kept for the rewards.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise DataError(f"train_dataset/eval_dataset must be a datasets.Dataset, got "
                        f"{type(dataset).__name__}; e.g. Dataset.from_dict({{'prompt': [...]}}).")
    columns = dataset.column_names
    if "input_ids" in columns and "query" in columns:
        return dataset
    text = "prompt" if "prompt" in columns else "query" if "query" in columns else None
    if text is None:
        raise DataError("The dataset needs a 'prompt' column of text (TRL's layout); its "
                        f"columns are: {', '.join(columns)}.")
    if len(dataset) and not isinstance(dataset[0][text], str):
        raise DataError(f"Column {text!r} must hold plain text; conversational prompts "
                        "(lists of messages) are not supported yet.")

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch[text], truncation=True, max_length=max_tokens)["input_ids"]
        return {"input_ids": ids, "query": batch[text]}

    return dataset.map(encode, batched=True, keep_in_memory=True)


def record_names(args: TrainConfig, model: Any, peft_config: Any) -> None:
    """Write what loaded objects stand for into ``args``, so config.yaml tells the truth."""
    if isinstance(model, str):
        args.model.name_or_path = model
    elif model is not None:
        args.model.name_or_path = getattr(model.config, "_name_or_path", "") or type(
            model).__name__
    if peft_config is not None:
        if getattr(peft_config, "task_type", None) is None and model is not None and not \
                isinstance(model, str):
            from peft import TaskType

            peft_config.task_type = (TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder
                                     else TaskType.CAUSAL_LM)
        targets = peft_config.target_modules
        args.lora.r, args.lora.alpha = peft_config.r, peft_config.lora_alpha
        args.lora.dropout = peft_config.lora_dropout
        args.lora.target_modules = sorted(targets) if isinstance(targets, (set, list)) else None


def named_resources(args, model, reward_funcs, train_dataset, processing_class) -> list:
    m = args.model
    found = []
    if model is None or isinstance(model, str):
        found.append(("model.name_or_path", m.name_or_path, "model", m.revision))
    if m.adapter:
        found.append(("model.adapter", m.adapter, "adapter", None))
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if reward_funcs is None:
        funcs = [args.reward.model]
    found += [("reward_funcs" if reward_funcs is not None else "reward.model", f, "model", None)
              for f in funcs if isinstance(f, str)]
    if isinstance(processing_class, str):
        found.append(("processing_class", processing_class, "model", None))
    if train_dataset is None:
        found.append(("data.path", args.data.path, "dataset", None))
    return found


def policy_tokenizer(args: TrainConfig, model: Any, processing_class: Any):
    from ..models import tiny
    from ..models.loading import load_tokenizer

    if processing_class is not None and not isinstance(processing_class, str):
        return processing_class
    if isinstance(processing_class, str):
        return load_tokenizer(tiny.resolve(processing_class))
    if model is not None and not isinstance(model, str) and not args.model.name_or_path:
        raise ConfigError("Pass processing_class= (the tokenizer) with a loaded model.")
    try:
        return load_tokenizer(tiny.resolve(args.model.name_or_path), args.model.revision,
                              args.model.trust_remote_code)
    except Exception as exc:
        if model is None or isinstance(model, str):
            raise
        raise ConfigError("Could not find the tokenizer of the loaded model; pass "
                          "processing_class=AutoTokenizer.from_pretrained(...).") from exc


def build_tiny_first(accelerator, args: TrainConfig, *named: Any) -> None:
    """Build the ``tiny:`` models and data once per machine, on its main process first.

    Only the build: each name is resolved where it is loaded (``models.tiny.resolve``).
    """
    from ..models import tiny

    names = [args.model.name_or_path, args.data.path, args.reward.model]
    for item in named:
        names += item if isinstance(item, (list, tuple)) else [item]
    if any(isinstance(n, str) and n.startswith("tiny:") for n in names):
        with accelerator.local_main_process_first():
            tiny.build_cache()
