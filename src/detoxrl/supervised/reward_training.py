"""``detoxrl train-reward``: fine-tune a sequence classifier to serve as the RL reward.

Plain supervised fine-tuning with ``transformers.Trainer`` (cross-entropy over the label
names, AdamW, warm-up then linear decay). The output is an ordinary HF classifier folder whose
``config.id2label`` holds the label names, so ``reward.model: <folder>`` and
``ClassifierReward(<folder>)`` find the ``nothate`` / ``hate`` scores by name. Evaluation on
the held-out split: accuracy, macro-F1 and ROC-AUC of the positive (toxic) label; with
HateCheck, the accuracy per functionality too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import option, to_dict
from ..data import labelled
from ..data.labelled import LabelledSource, LabelledTexts
from ..errors import ConfigError, DataError
from ..evaluation import validity
from ..evaluation.stats import roc_auc
from .common import SupervisedModel, TrainingSettings
from .reward_card import write_reward_card


@dataclass
class RewardData:
    train: LabelledSource = field(default_factory=LabelledSource,
                                  metadata={"help": "Training split."})
    eval: LabelledSource = field(default_factory=LabelledSource,
                                 metadata={"help": "Held-out split; with no path, "
                                           "eval_fraction of the training rows."})
    eval_fraction: float = option(0.1, "Share of training rows held out when eval.path is "
                                  "unset.")
    labels: list[str] = option(["nothate", "hate"], "Label names in class-id order, saved in "
                               "config.id2label (the names the RL reward looks up).")
    label_map: dict[str, str] = option({}, "Raw label -> label name, e.g. Davidson's "
                                       "{0: hate, 1: hate, 2: nothate}. Empty: raw labels are "
                                       "names or class ids.")
    positive_label: str = option("hate", "Label whose probability ROC-AUC ranks.")
    max_length: int = option(64, "Truncate texts to this many tokens.")
    max_train_rows: int | None = option(None, "Train on at most this many rows (quick runs).")
    hatecheck: str | None = option(None, "HateCheck test_suite_cases.csv (relative to "
                                   "data_dir): accuracy per functionality.")


@dataclass
class RewardTrainingConfig:
    model: SupervisedModel = field(default_factory=lambda: SupervisedModel(
        architecture="roberta"), metadata={"help": "Classifier to fine-tune or build."})
    data: RewardData = field(default_factory=RewardData, metadata={"help": "Labelled text."})
    training: TrainingSettings = field(default_factory=TrainingSettings,
                                       metadata={"help": "Trainer settings."})
    seed: int = option(0, "Seed of initialisation, data order and the eval split.")
    output_dir: str = option("runs/reward", "Where the classifier folder is written.")
    data_dir: str = option("../shared/data", "Folder that relative data paths start from.")
    validity: validity.ValiditySettings = field(
        default_factory=validity.ValiditySettings,
        metadata={"help": "Validity: ROC-AUC against a gold set the classifier never saw."})

    def validate(self) -> RewardTrainingConfig:
        """Check every option; raise ConfigError before anything loads or is written."""
        from .common import check_common

        check_common(self.model, self.training, ("roberta",))
        d = self.data
        if len(d.labels) < 2 or len(set(d.labels)) != len(d.labels):
            raise ConfigError(f"data.labels needs at least two distinct names, got {d.labels}.")
        if d.positive_label not in d.labels:
            raise ConfigError(f"data.positive_label {d.positive_label!r} is not one of "
                              f"data.labels {d.labels}.")
        stray = sorted(set(d.label_map.values()) - set(d.labels))
        if stray:
            raise ConfigError(f"data.label_map maps to {stray}, which are not in data.labels "
                              f"{d.labels}.")
        if d.eval.path is None and not 0 < d.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}.")
        if d.max_length < 1 or (d.max_train_rows is not None and d.max_train_rows < 1):
            raise ConfigError("data.max_length and data.max_train_rows must be at least 1.")
        for src in (d.train, d.eval):
            labelled.source_format(src)
        if d.train.path is None:
            raise ConfigError("data.train.path is not set; give the training file.")
        self.validity.validate(d.labels, d.positive_label)
        return self


def train_reward(cfg: RewardTrainingConfig, overwrite: bool = False,
                 quiet: bool = False) -> dict:
    """Train the classifier ``cfg`` describes; returns the metrics written to metrics.json."""
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from ..runs.preflight import default_cpu_threads

    default_cpu_threads()

    from .common import (
        TRAINER_DIR,
        check_output_dir,
        in_order_predictions,
        log_history_losses,
        output_folder,
        quiet_logs,
        silence,
        training_arguments,
        write_run_files,
    )

    cfg.validate()
    out = check_output_dir(cfg.output_dir, overwrite)
    quiet_logs(quiet)
    set_seed(cfg.seed)
    train, test = _read_splits(cfg)
    gold, judge, note = validity.prepare(cfg.validity, cfg.data_dir)
    tokenizer, model = _build_classifier(cfg, train.texts)
    with output_folder(out, overwrite) as folder:
        args = training_arguments(cfg.training, folder / TRAINER_DIR, cfg.seed, quiet)
        trainer = Trainer(model=model, args=args, train_dataset=_encode(train, tokenizer, cfg),
                          data_collator=DataCollatorWithPadding(tokenizer))
        silence(trainer, quiet)
        result = trainer.train()
        in_order_predictions(trainer)
        logits = trainer.predict(_encode(test, tokenizer, cfg)).predictions
        metrics = {"eval": classification_metrics(test.labels, logits,
                                                  cfg.data.labels.index(cfg.data.positive_label)),
                   "train_runtime_s": result.metrics["train_runtime"],
                   "train_rows": len(train.texts), "eval_rows": len(test.texts),
                   "train_loss": result.training_loss,
                   "losses": log_history_losses(trainer)}
        if cfg.data.hatecheck:
            metrics["hatecheck"] = _hatecheck(cfg, trainer, tokenizer)
        metrics["validity"] = gold and _validity(cfg, trainer, tokenizer, gold, judge)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_run_files(folder, cfg, metrics)
        write_reward_card(folder, out.resolve().name, to_dict(cfg), metrics, note)
    if not quiet:
        e = metrics["eval"]
        print(f"eval: accuracy {e['accuracy']:.4f}, macro-F1 {e['macro_f1']:.4f}, ROC-AUC "
              f"{e['roc_auc']:.4f} on {len(test.texts):,} rows; classifier in {out}")
        v = metrics["validity"]
        print(f"validity: {validity.describe(v)}" if v else note)
    return metrics


def _read_splits(cfg: RewardTrainingConfig) -> tuple[LabelledTexts, LabelledTexts]:
    d = cfg.data
    train = labelled.read_labelled(d.train, cfg.data_dir, d.labels, d.label_map, "train")
    if d.eval.path is not None:
        test = labelled.read_labelled(d.eval, cfg.data_dir, d.labels, d.label_map, "eval")
    else:
        train, test = _split(train, d.eval_fraction, cfg.seed)
        if not test.texts:
            raise DataError(f"Holding out {d.eval_fraction} of {len(train.texts)} rows leaves "
                            "an empty eval split. Add rows or set data.eval.path.")
    if d.max_train_rows is not None and d.max_train_rows < len(train.texts):
        order = np.random.default_rng(cfg.seed).permutation(len(train.texts))
        train = _subset(train, order[:d.max_train_rows])
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        raise DataError(f"Every training row of {train.source} has the label "
                        f"{d.labels[classes[0]]!r}: a classifier needs at least two classes. "
                        "Check data.train.label_column and data.label_map.")
    return train, test


def _split(rows: LabelledTexts, fraction: float, seed: int
           ) -> tuple[LabelledTexts, LabelledTexts]:
    order = np.random.default_rng(seed).permutation(len(rows.texts))
    n_eval = round(fraction * len(order))
    return _subset(rows, order[n_eval:]), _subset(rows, order[:n_eval])


def _subset(rows: LabelledTexts, index) -> LabelledTexts:
    return LabelledTexts([rows.texts[i] for i in index], [rows.labels[i] for i in index],
                         rows.source)


def _build_classifier(cfg: RewardTrainingConfig, texts: list[str]):
    from transformers import AutoModelForSequenceClassification

    from ..models import tiny
    from ..models.loading import load_pretrained, load_tokenizer
    from .common import check_tokenizer_fits, train_tokenizer

    m, labels = cfg.model, cfg.data.labels
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    source = tiny.resolve(m.name_or_path) if m.name_or_path else None
    tokenizer_source = tiny.resolve(m.tokenizer) if m.tokenizer else source
    if m.architecture is None:
        tokenizer = load_tokenizer(tokenizer_source, m.revision, m.trust_remote_code)
        model = load_pretrained(AutoModelForSequenceClassification, source,
                                num_labels=len(labels), id2label=id2label, label2id=label2id,
                                ignore_mismatched_sizes=True, revision=m.revision,
                                trust_remote_code=m.trust_remote_code)
    else:
        tokenizer = (load_tokenizer(tokenizer_source) if m.tokenizer else
                     train_tokenizer(texts[:m.tokenizer_texts], m.vocab_size, "<s> $A </s>",
                                     m.max_positions, m.lowercase))
        model = _scratch_roberta(m, tokenizer, id2label, label2id)
    check_tokenizer_fits(tokenizer, model, m.tokenizer or m.name_or_path or "the new model")
    return tokenizer, model


def _scratch_roberta(m: SupervisedModel, tokenizer, id2label: dict, label2id: dict):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    pad = tokenizer.pad_token_id
    config = RobertaConfig(
        vocab_size=max(len(tokenizer), m.vocab_size), hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        # RoBERTa numbers positions from pad_token_id + 1.
        max_position_embeddings=m.max_positions + pad + 1, pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout,
        num_labels=len(id2label), id2label=id2label, label2id=label2id)
    return RobertaForSequenceClassification(config)


def _encode(rows: LabelledTexts, tokenizer, cfg: RewardTrainingConfig):
    from datasets import Dataset

    from ..data.prompts import quiet

    max_length = min(cfg.data.max_length, cfg.model.max_positions
                     if cfg.model.architecture else cfg.data.max_length)
    enc = tokenizer(rows.texts, truncation=True, max_length=max_length)
    with quiet():
        return Dataset.from_dict({"input_ids": enc["input_ids"],
                                  "attention_mask": enc["attention_mask"],
                                  "labels": rows.labels})


def _hatecheck(cfg: RewardTrainingConfig, trainer, tokenizer) -> dict:
    """Accuracy per HateCheck functionality (hateful -> positive label, else the other)."""
    labels = cfg.data.labels
    if len(labels) != 2:
        raise ConfigError("data.hatecheck needs a two-label classifier.")
    negative = next(n for n in labels if n != cfg.data.positive_label)
    src = LabelledSource(path=cfg.data.hatecheck, format="csv", text_column="test_case",
                         label_column="label_gold")
    rows = labelled.read_labelled(src, cfg.data_dir, labels, {
        "hateful": cfg.data.positive_label, "non-hateful": negative}, "hatecheck")
    frame = labelled.read_table(labelled.resolve_path(cfg.data_dir, cfg.data.hatecheck),
                                 "csv", True)
    predicted = trainer.predict(_encode(rows, tokenizer, cfg)).predictions.argmax(-1)
    correct = predicted == np.asarray(rows.labels)
    per = {}
    for name in sorted(set(frame["functionality"])):
        mask = (frame["functionality"] == name).to_numpy()
        per[name] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
    return {"accuracy": float(correct.mean()), "n": len(correct), "per_functionality": per}


def _validity(cfg: RewardTrainingConfig, trainer, tokenizer, gold, judge) -> dict:
    labels = cfg.data.labels
    label = cfg.validity.reward_label(labels, cfg.data.positive_label)
    rows = LabelledTexts(gold.texts, gold.toxic.astype(int).tolist(), gold.source)
    logits = trainer.predict(_encode(rows, tokenizer, cfg)).predictions
    toxicity = validity.toxicity_direction(logits, labels.index(label), cfg.validity.output)
    return validity.measure(toxicity, gold, f"-{cfg.validity.output}({label})", judge)


def classification_metrics(labels, logits, positive: int) -> dict:
    """Accuracy, macro-F1 and ROC-AUC (of class ``positive`` against the rest)."""
    import torch

    labels = np.asarray(labels)
    logits = np.asarray(logits, dtype=np.float64)
    predicted = logits.argmax(-1)
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    f1s = []
    for c in range(logits.shape[1]):
        tp = np.sum((predicted == c) & (labels == c))
        denom = np.sum(predicted == c) + np.sum(labels == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(np.mean(f1s)),
            "roc_auc": roc_auc(labels == positive, probs[:, positive]), "n": len(labels)}

