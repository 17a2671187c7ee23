"""``detoxrl sft``: supervised fine-tuning of the starting policy, with LoRA or in full.

Teacher-forced cross-entropy on the target tokens, with ``transformers.Trainer`` (causal) or
``Seq2SeqTrainer`` (encoder-decoder). Three kinds of data:

* ``pairs``: (prompt, target), built by the same recipe and template as ``detoxrl train``'s
  ``data:`` section (DialogSum: dialogue -> summary). Causal LMs see prompt + target and are
  scored on the target only; seq2seq models read the prompt and predict the target.
* ``text``: language modelling on a text column. Causal: next-token prediction on the whole
  text. Seq2seq: each text is split at a seeded word boundary (or at its ``prefix``) into an
  input and the continuation to predict.
* ``corpus``: ``text`` on the offline mini corpus (:mod:`detoxrl.data.lm_corpus`).

LoRA writes a peft adapter folder (``detoxrl train --model.adapter DIR`` continues it); full
fine-tuning writes a whole model folder (``--model.name_or_path DIR``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from ..config import DataConfig, LoraSettings, option
from ..data.lm_corpus import CorpusSettings
from ..errors import ConfigError, DataError
from .common import SupervisedModel, TrainingSettings

KINDS = ("pairs", "text", "corpus")


@dataclass
class SFTData:
    kind: str = option("pairs", "pairs (prompt -> target, via the prompts section), text (a "
                       "text column) or corpus (the offline mini corpus).")
    prompts: DataConfig = field(default_factory=DataConfig, metadata={
        "help": "pairs: the prompt recipe of detoxrl train's data section; the first "
                "reference is the target. Its path is relative to data_dir."})
    text_path: str | None = option(None, "text: .jsonl/.csv/.parquet/.txt file, relative to "
                                   "data_dir.")
    text_column: str = option("text", "text: column holding the text.")
    corpus: CorpusSettings = field(default_factory=CorpusSettings,
                                   metadata={"help": "corpus: rows per source."})
    max_length: int = option(128, "Truncate inputs (and causal texts) to this many tokens.")
    max_target_tokens: int = option(128, "Truncate targets to this many tokens.")
    eval_fraction: float = option(0.05, "text/corpus: share of rows held out for loss and "
                                  "perplexity (pairs use prompts.test_fraction).")
    max_eval_rows: int = option(500, "Evaluate on at most this many held-out rows.")
    rouge_examples: int = option(50, "pairs: greedy-decode this many held-out prompts for "
                                 "ROUGE (0: skip).")
    rouge_max_new_tokens: int = option(64, "pairs: length limit of those summaries.")


@dataclass
class SFTConfig:
    model: SupervisedModel = field(default_factory=SupervisedModel,
                                   metadata={"help": "Model to fine-tune or build."})
    method: str = option("lora", "lora (a peft adapter on a pretrained model) or full (every "
                         "weight; required for a model built with random weights).")
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={
        "help": "LoRA adapter (T5 default: r=32 on q,v, the tutorial's)."})
    data: SFTData = field(default_factory=SFTData, metadata={"help": "Training data."})
    training: TrainingSettings = field(default_factory=TrainingSettings,
                                       metadata={"help": "Trainer settings."})
    seed: int = option(0, "Seed of initialisation, data order, splits.")
    output_dir: str = option("runs/sft", "Where the adapter or model folder is written.")
    data_dir: str = option("../shared/data", "Folder that relative data paths start from.")

    def validate(self) -> SFTConfig:
        """Check every option; raise ConfigError before anything loads or is written."""
        from ..data.lm_corpus import check_settings
        from .common import check_common

        check_common(self.model, self.training, ("gpt2", "t5"))
        d = self.data
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method is {self.method!r}; choose 'lora' or 'full'.")
        if self.model.lowercase:
            raise ConfigError("model.lowercase is for classifiers: a language model with a "
                              "lowercasing tokenizer could never write a capital. Drop it.")
        if self.method == "lora" and self.model.architecture is not None:
            raise ConfigError("method: lora needs a pretrained base (model.name_or_path); a "
                              "model built with random weights must use method: full.")
        if d.kind not in KINDS:
            raise ConfigError(f"data.kind is {d.kind!r}; choose one of "
                              + ", ".join(repr(k) for k in KINDS) + ".")
        if d.kind == "text" and d.text_path is None:
            raise ConfigError("data.kind 'text' needs data.text_path.")
        if not 0 < d.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}.")
        for name in ("max_length", "max_target_tokens", "max_eval_rows",
                     "rouge_max_new_tokens"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1.")
        check_settings(d.corpus)
        return self


def sft(cfg: SFTConfig, overwrite: bool = False, quiet: bool = False) -> dict:
    """Fine-tune as ``cfg`` says; returns the metrics written to metrics.json."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Trainer, set_seed

    from ..runs.preflight import default_cpu_threads

    default_cpu_threads()

    from .common import (
        TRAINER_DIR,
        check_output_dir,
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
    rows = _read_rows(cfg)
    tokenizer, model = _build_lm(cfg, rows)
    seq2seq = bool(model.config.is_encoder_decoder)
    train, test, references = _encode(cfg, rows, tokenizer, seq2seq)
    with output_folder(out, overwrite) as folder:
        args = training_arguments(cfg.training, folder / TRAINER_DIR, cfg.seed, quiet, seq2seq)
        trainer = (Seq2SeqTrainer if seq2seq else Trainer)(
            model=model, args=args, train_dataset=train, eval_dataset=test,
            data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, padding=True))
        silence(trainer, quiet)
        result = trainer.train()
        loss = trainer.evaluate()["eval_loss"]
        metrics = {"eval": {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                            "n": len(test)},
                   "train_runtime_s": result.metrics["train_runtime"], "train_rows": len(train),
                   "train_loss": result.training_loss, "losses": log_history_losses(trainer)}
        if references:
            metrics["eval"].update(_rouge(cfg, model, tokenizer, test, references, seq2seq))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_run_files(folder, cfg, metrics)
    if not quiet:
        e = metrics["eval"]
        print(f"eval: loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f} on {e['n']:,} "
              f"rows; {'adapter' if cfg.method == 'lora' else 'model'} in {out}")
    return metrics


# --------------------------------------------------------------------------- data

@dataclass
class _Rows:
    """Training and held-out examples before tokenization."""

    train: list[dict]       # {"text", "prefix"} or {"prompt_ids", "target"}
    test: list[dict]
    tokenizer_texts: list[str]


def _read_rows(cfg: SFTConfig) -> _Rows:
    d = cfg.data
    if d.kind == "pairs":
        return _Rows([], [], _pair_texts(cfg))  # tokenized later, by the prompt recipe
    if d.kind == "corpus":
        from ..data.lm_corpus import build_corpus

        rows = build_corpus(cfg.data_dir, d.corpus, cfg.seed)
    else:
        rows = _read_text_rows(cfg)
    rng = random.Random(cfg.seed)
    rng.shuffle(rows)
    n_eval = min(max(1, int(len(rows) * d.eval_fraction)), d.max_eval_rows)
    if len(rows) - n_eval < 1:
        raise DataError(f"{len(rows)} text rows are too few to hold out an eval split; add "
                        "rows.")
    return _Rows(rows[n_eval:], rows[:n_eval], [r["text"] for r in rows[n_eval:]])


def _read_text_rows(cfg: SFTConfig) -> list[dict]:
    from ..data.labelled import LabelledSource, column, read_table, resolve_path, source_format

    src = LabelledSource(path=cfg.data.text_path, text_column=cfg.data.text_column)
    path = resolve_path(cfg.data_dir, src.path)
    if not path.is_file():
        raise DataError(f"data.text_path: {str(path)!r} does not exist. Relative paths start "
                        "from data_dir; point --data-dir at your copy of the data.")
    frame = read_table(path, source_format(src), True)
    text_col = column(frame, src.text_column, "data.text_column", str(path))
    rows = [{"text": str(t), "prefix": None} for t in frame[text_col] if str(t).strip()]
    if not rows:
        raise DataError(f"{str(path)!r} holds no text in column {src.text_column!r}.")
    return rows


def _prompt_config(cfg: SFTConfig) -> DataConfig:
    from ..data.labelled import resolve_path
    from ..models import tiny

    path = cfg.data.prompts.path
    local = tiny.resolve(path)
    candidate = resolve_path(cfg.data_dir, local)
    return replace(cfg.data.prompts, path=str(candidate) if candidate.exists() else local)


def _pair_texts(cfg: SFTConfig) -> list[str]:
    if cfg.model.architecture is None:
        return []  # a pretrained model brings its tokenizer
    from ..data.prompts import load_rows

    rows = load_rows(_prompt_config(cfg))
    return [str(t) for t in rows[cfg.data.prompts.text_column]]


def _encode(cfg: SFTConfig, rows: _Rows, tokenizer, seq2seq: bool):
    """Tokenized train and eval datasets, and (pairs) the eval references for ROUGE."""
    from datasets import Dataset

    from ..data.prompts import quiet

    if cfg.data.kind == "pairs":
        train, test, references = _pair_examples(cfg, tokenizer, seq2seq)
    else:
        rng = random.Random(cfg.seed)
        train = _text_examples(rows.train, tokenizer, seq2seq, cfg.data, rng)
        test = _text_examples(rows.test, tokenizer, seq2seq, cfg.data, rng)
        references = None
    if not train or not test:
        raise DataError(f"The {'training' if not train else 'eval'} split is empty after "
                        "tokenization; add rows or lower data.eval_fraction.")
    with quiet():
        return Dataset.from_list(train), Dataset.from_list(test), references


def _pair_examples(cfg: SFTConfig, tokenizer, seq2seq: bool):
    from ..data.prompts import build_prompts

    d = cfg.data
    data = build_prompts(_prompt_config(cfg), tokenizer, seed=cfg.seed)
    if len(data.test) == 0:
        raise DataError("The eval split is empty: set data.prompts.test_fraction above 0.")
    splits = []
    for part in (data.train, data.test.select(range(min(len(data.test), d.max_eval_rows)))):
        refs = part["references"]
        if not all(refs):
            raise DataError("Some prompts have no reference target; set "
                            "data.prompts.summary_columns to the target column.")
        targets = _target_ids([r[0] for r in refs], tokenizer, d.max_target_tokens)
        splits.append([_pair_example(ids, t, seq2seq)
                       for ids, t in zip(part["input_ids"], targets, strict=True)])
    return splits[0], splits[1], list(data.test["references"][:d.rouge_examples])


def _pair_example(prompt_ids: list[int], target_ids: list[int], seq2seq: bool) -> dict:
    if seq2seq:
        return _example(prompt_ids, target_ids)
    ids = list(prompt_ids) + target_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [-100] * len(prompt_ids) + target_ids}  # loss on the target only


def _text_examples(rows: list[dict], tokenizer, seq2seq: bool, d: SFTData,
                   rng: random.Random) -> list[dict]:
    """The examples of text rows, each field tokenized in one call for all rows."""
    if not seq2seq:
        return [_example(ids, ids)
                for ids in _target_ids([r["text"] for r in rows], tokenizer, d.max_length)]
    prefixes = [_prefix(r, rng) for r in rows]  # in row order: the rng's draws stay the same
    pairs = [(p, r["text"][len(p):]) for p, r in zip(prefixes, rows, strict=True)
             if p is not None]
    if not pairs:  # every row too short to split
        return []
    sources = tokenizer([p for p, _ in pairs], truncation=True, max_length=d.max_length)
    targets = _target_ids([t for _, t in pairs], tokenizer, d.max_target_tokens)
    return [_example(s, t) for s, t in zip(sources["input_ids"], targets, strict=True)]


def _prefix(row: dict, rng: random.Random) -> str | None:  # given, or 1..n-1 words drawn
    words = row["text"].split(" ")
    if row["prefix"] is not None or len(words) < 2:
        return row["prefix"]  # None: too short to split
    return " ".join(words[:rng.randint(1, len(words) - 1)])


def _target_ids(texts: list[str], tokenizer, max_tokens: int) -> list[list[int]]:
    """Tokens of each text, ending with EOS (where to stop) unless cut at ``max_tokens``."""
    if not texts:
        return []
    # verbose=False: the texts are cut below, so the tokenizer's length warning does not apply
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [ids[:max_tokens] if len(ids) >= max_tokens else [*ids, tokenizer.eos_token_id]
            for ids in encoded]


def _example(source: list[int], target: list[int]) -> dict:
    return {"input_ids": list(source), "attention_mask": [1] * len(source), "labels": target}


# --------------------------------------------------------------------------- models

def _build_lm(cfg: SFTConfig, rows: _Rows):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..models import tiny
    from ..models.loading import load_config, load_pretrained, load_tokenizer
    from .common import check_tokenizer_fits, train_tokenizer

    m = cfg.model
    source = tiny.resolve(m.name_or_path) if m.name_or_path else None
    tokenizer_source = tiny.resolve(m.tokenizer) if m.tokenizer else source
    if m.architecture is None:
        hf = load_config(source, m.revision, m.trust_remote_code)
        auto = AutoModelForSeq2SeqLM if hf.is_encoder_decoder else AutoModelForCausalLM
        model = load_pretrained(auto, source, revision=m.revision,
                                trust_remote_code=m.trust_remote_code)
        tokenizer = load_tokenizer(tokenizer_source, m.revision, m.trust_remote_code)
    else:
        template = "$A </s>" if m.architecture == "t5" else None  # as the real tokenizers
        tokenizer = (load_tokenizer(tokenizer_source) if m.tokenizer else train_tokenizer(
            rows.tokenizer_texts[:m.tokenizer_texts], m.vocab_size, template, m.max_positions))
        model = _scratch_lm(m, tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"The tokenizer of {m.name_or_path!r} has no EOS token; SFT "
                          "targets end with one.")
    check_tokenizer_fits(tokenizer, model, m.tokenizer or m.name_or_path or "the new model")
    if not model.config.is_encoder_decoder and getattr(model, "loss_type", None) is None:
        # Named for transformers, which else picks this loss itself (GPT2LMHeadModel's class
        # name does not say "ForCausalLM") and warns on the first step that it did.
        model.loss_type = "ForCausalLM"
    if cfg.method == "lora":
        from peft import get_peft_model

        from ..models.lora import default_lora
        from ..models.quiet import peft_wrapping

        with peft_wrapping():
            model = get_peft_model(model, default_lora(
                model.config.model_type, model.config.is_encoder_decoder, cfg.lora))
    return tokenizer, model


def _scratch_lm(m: SupervisedModel, tokenizer):
    """A GPT-2- or FLAN-T5-shaped LM with random weights, sized by ``m``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    from ..models.tiny import untie_lm_head

    vocab = max(len(tokenizer), m.vocab_size)
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if m.architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_heads,
            n_inner=m.intermediate_size, n_positions=m.max_positions,
            resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
            bos_token_id=tokenizer.bos_token_id, **special))
    config = T5Config(
        vocab_size=vocab, d_model=m.hidden_size, d_ff=m.intermediate_size,
        d_kv=m.hidden_size // m.num_heads, num_heads=m.num_heads, num_layers=m.num_layers,
        num_decoder_layers=m.num_layers, feed_forward_proj="gated-gelu",
        dropout_rate=m.dropout, decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, **special)
    model = T5ForConditionalGeneration(config)
    untie_lm_head(model)  # transformers 5 ties it for T5 built from a config; FLAN-T5 is untied
    torch.nn.init.normal_(model.lm_head.weight, std=config.d_model ** -0.5)  # see models/tiny.py
    return model


def _rouge(cfg: SFTConfig, model, tokenizer, test, references, seq2seq: bool) -> dict:
    """ROUGE-1/2/L of greedy summaries of the first held-out prompts."""
    import torch

    from ..evaluation.quality import rouge
    from ..models.generation import collate_queries

    n = min(cfg.data.rouge_examples, len(test))
    if n == 0:
        return {}
    prompts = [_prompt_part(e, seq2seq) for e in test.select(range(n))]
    model.eval()
    outputs = []
    for start in range(0, n, 16):
        ids, mask = collate_queries(prompts[start:start + 16], tokenizer.pad_token_id,
                                    "right" if seq2seq else "left")
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(model.device),
                                       attention_mask=mask.to(model.device), do_sample=False,
                                       max_new_tokens=cfg.data.rouge_max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id)
        new = generated if seq2seq else generated[:, ids.shape[1]:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return rouge([o.strip() for o in outputs], references[:n])


def _prompt_part(example: dict, seq2seq: bool) -> list[int]:
    if seq2seq:
        return example["input_ids"]
    return [t for t, lab in zip(example["input_ids"], example["labels"], strict=True)
            if lab == -100]
