"""What reward training and SFT share: the model section, Trainer settings, the output folder.

Both start either from a pretrained model (Hub id or folder) or, offline, from a config with
random weights plus a byte-level BPE tokenizer trained on the training text (the ``tiny``
builders' recipe at a size chosen in the config). Both train with ``transformers.Trainer``;
the finished folder is built in a hidden sibling and renamed into place, so a failed or
stopped run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import option, to_dict
from ..errors import ConfigError
from ..runs.io import atomic_dir, atomic_write_json, atomic_write_text

ARCHITECTURES = ("roberta", "gpt2", "t5")
TRAINER_DIR = ".trainer"


@dataclass
class SupervisedModel:
    name_or_path: str | None = option(None, "Hub id or local folder of a pretrained model. "
                                      "Leave null and set 'architecture' to build a model "
                                      "with random weights instead.")
    architecture: str | None = option(None, "Build from a config with random weights: "
                                      "roberta (classifier), gpt2 (causal LM) or t5 (seq2seq, "
                                      "FLAN-T5-shaped).")
    tokenizer: str | None = option(None, "Tokenizer folder to use instead of the model's own "
                                   "(with architecture: instead of training a byte-level "
                                   "BPE on the training text).")
    vocab_size: int = option(8000, "With architecture: size of the trained tokenizer.")
    tokenizer_texts: int = option(50000, "With architecture: train the tokenizer on at most "
                                  "this many training texts.")
    lowercase: bool = option(False, "With architecture, classifiers only: the trained "
                             "tokenizer lowercases (and NFKC-normalises) every text; the rule "
                             "is saved with it, so the RL reward applies it too.")
    hidden_size: int = option(128, "With architecture: width of the model.")
    num_layers: int = option(2, "With architecture: layers (T5: in encoder and decoder each).")
    num_heads: int = option(4, "With architecture: attention heads.")
    intermediate_size: int = option(512, "With architecture: feed-forward width.")
    max_positions: int = option(128, "With architecture: longest input in tokens.")
    dropout: float = option(0.1, "With architecture: dropout while training.")
    revision: str | None = option(None, "Hub revision of a pretrained model.")
    trust_remote_code: bool = option(False, "Run model code from the Hub. Off unless you trust "
                                     "it.")


@dataclass
class TrainingSettings:
    learning_rate: float = option(5e-4, "Peak AdamW learning rate.")
    epochs: float = option(1.0, "Passes over the training split.")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    batch_size: int = option(32, "Examples per optimizer step (per device).")
    eval_batch_size: int = option(128, "Examples per evaluation forward pass.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    warmup: float = option(0.06, "Warm-up: a share of the steps if < 1, else a step count.")
    scheduler: str = option("linear", "transformers scheduler: linear, cosine, constant, ...")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    group_by_length: bool = option(True, "Batch examples of similar length (less padding).")
    logging_steps: int = option(50, "Log the training loss every N steps.")
    bf16: bool = option(False, "Train in bf16 mixed precision (GPUs that support it).")


def check_common(model: SupervisedModel, training: TrainingSettings,
                 allowed: tuple[str, ...]) -> None:
    """Validate the shared sections; ``allowed`` are the architectures this command builds."""
    if (model.name_or_path is None) == (model.architecture is None):
        raise ConfigError("Set exactly one of model.name_or_path (start from a pretrained "
                          "model) and model.architecture (random weights); got "
                          f"{model.name_or_path!r} and {model.architecture!r}.")
    if model.architecture is not None and model.architecture not in allowed:
        raise ConfigError(f"model.architecture is {model.architecture!r}; choose one of "
                          + ", ".join(repr(a) for a in allowed) + ".")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_positions", "tokenizer_texts"):
        if getattr(model, name) < 1:
            raise ConfigError(f"model.{name} must be at least 1, got {getattr(model, name)}.")
    if model.hidden_size % model.num_heads:
        raise ConfigError(f"model.hidden_size ({model.hidden_size}) must be a multiple of "
                          f"model.num_heads ({model.num_heads}).")
    t = training
    for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"training.{name} must be at least 1, got {getattr(t, name)}.")
    if t.learning_rate <= 0 or t.epochs <= 0 or t.warmup < 0:
        raise ConfigError("training.learning_rate and training.epochs must be > 0 and "
                          "training.warmup >= 0.")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"training.max_steps must be -1 or at least 1, got {t.max_steps}.")


def check_output_dir(output_dir: str, overwrite: bool) -> Path:
    """Refuse to replace a finished run unless asked; called before anything loads."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} is a file; choose a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds files. Pass --overwrite to replace "
                          "them, or choose another --output-dir.")
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, template: str | None,
                    max_length: int, lowercase: bool = False):
    """A byte-level BPE tokenizer (tiny.py's recipe); ``template`` adds special tokens, as
    ``"<s> $A </s>"`` for RoBERTa or ``"$A </s>"`` for T5, where the real tokenizers do."""
    from tokenizers import processors

    from ..models import tiny

    tokenizer = tiny.train_tokenizer(texts, vocab_size=vocab_size, lowercase=lowercase)
    if template is not None:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tokenizer.convert_tokens_to_ids(t))
                                             for t in ("<s>", "</s>")])
    tokenizer.model_max_length = max_length
    return tokenizer


def check_tokenizer_fits(tokenizer, model, name: str) -> None:
    """A tokenizer whose ids the model's embedding cannot look up is a user error, not an
    index error in the middle of training."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(f"The tokenizer of {name!r} has {len(tokenizer):,} tokens but the "
                          f"model's embedding has only {rows:,} rows: they do not belong "
                          "together. Use the tokenizer saved with the model (drop "
                          "model.tokenizer), or resize the model.")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"The tokenizer of {name!r} has neither a pad nor an EOS token; "
                              "give it a pad token.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def training_arguments(t: TrainingSettings, output_dir: Path, seed: int, quiet: bool,
                       seq2seq: bool = False, has_eval: bool = True):
    """``TrainingArguments`` from the config; Trainer saves nothing itself (we do, atomically)."""
    import torch
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    cls = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    warmup = t.warmup if t.warmup < 1 else int(t.warmup)
    return cls(
        output_dir=str(output_dir), learning_rate=t.learning_rate, num_train_epochs=t.epochs,
        max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, warmup_steps=warmup,
        lr_scheduler_type=t.scheduler, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_strategy="no",
        eval_strategy="no", report_to=[], seed=seed, data_seed=seed, bf16=t.bf16,
        disable_tqdm=quiet, log_level="error" if quiet else "passive",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        # Pinned memory only speeds copies to an accelerator; without one torch warns.
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False)


@contextmanager
def output_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling folder to build the run in, renamed to ``out`` on success.

    ``Trainer`` gets ``TRAINER_DIR`` inside it as its output_dir; that is removed first.
    """
    check_output_dir(str(out), overwrite)
    with atomic_dir(out) as tmp:
        yield tmp
        shutil.rmtree(tmp / TRAINER_DIR, ignore_errors=True)  # Trainer's scratch folder


def write_run_files(folder: Path, cfg, metrics: dict) -> None:
    """``metrics.json``, ``config.yaml`` (the resolved config) and ``run_info.json``."""
    from ..runs.run_folder import provenance

    atomic_write_json(folder / "metrics.json", metrics)
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write_json(folder / "run_info.json", provenance(cfg))


def quiet_logs(quiet: bool) -> None:
    from transformers.utils import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def silence(trainer, quiet: bool):
    """Drop the Trainer's progress bar and log printing when ``quiet``; returns ``trainer``."""
    from transformers import PrinterCallback, ProgressCallback

    if quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer


def in_order_predictions(trainer) -> None:
    """Make ``trainer.predict`` keep the dataset's order.

    With ``train_sampling_strategy="group_by_length"``, transformers 5 also length-groups
    (shuffles) the *evaluation* sampler, so predictions come back permuted against the labels.
    """
    trainer.args.train_sampling_strategy = "random"


def log_history_losses(trainer) -> list[dict]:
    """The Trainer's logged training losses, ``[{step, loss}]``, for metrics.json."""
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history
            if "loss" in e]
