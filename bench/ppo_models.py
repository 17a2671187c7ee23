"""Benchmark shapes and prompts for ``bench/ppo_step.py``.

Each shape is a policy and a reward classifier with the real architecture and size but
random weights, built from configs once, saved with ``save_pretrained`` under the detoxrl
cache (``$DETOXRL_CACHE/bench`` or ``~/.cache/detoxrl/bench``) and loaded back through the
ordinary ``from_pretrained`` paths, so every mode runs the code users run.

The tokenizer is a byte-level BPE trained on the prompt data with as many tokens as the
policy's vocabulary (topped up with filler tokens if the data cannot supply that many
merges), so every sampled id decodes to text and every prompt id is a valid input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from detoxrl.models import tiny

SHAPES = ("tiny", "flan-t5-base", "gpt2")
CACHE_VERSION = "v1"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dialogsum" / "train.jsonl"
_TOKENIZER_TEXTS = 20_000


@dataclass
class Shape:
    name: str
    policy: str          # folder with the policy and its tokenizer
    classifier: str      # folder with the reward classifier and its tokenizer
    is_seq2seq: bool


def prepare_shape(name: str, data_path: Path) -> Shape:
    """The shape's model folders, built on first use (in a temp folder, then renamed)."""
    if name == "tiny":
        return Shape(name, tiny.resolve("tiny:t5"), tiny.resolve("tiny:roberta-hate"), True)
    if name not in SHAPES:
        raise ValueError(f"Unknown shape {name!r}; choose one of {', '.join(SHAPES)}.")
    root = tiny.cache_dir().parent / "bench" / f"{name}-{CACHE_VERSION}"
    if not (root / "done").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{name}-"))
        try:
            _build(name, tmp, data_path)
            (tmp / "done").write_text("ok\n")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Shape(name, str(root / "policy"), str(root / "classifier"), name != "gpt2")


def _build(name: str, out: Path, data_path: Path) -> None:
    import torch

    vocab = 32128 if name == "flan-t5-base" else 50257
    tokenizer = _tokenizer(vocab, data_path)
    torch.manual_seed(0)
    policy = _flan_t5_base(tokenizer) if name == "flan-t5-base" else _gpt2(tokenizer)
    _save(policy, tokenizer, out / "policy")
    del policy
    _save(_roberta_large_classifier(tokenizer), tokenizer, out / "classifier")


def _tokenizer(vocab: int, data_path: Path):
    texts = [row["dialogue"] for row in read_rows(data_path, _TOKENIZER_TEXTS)]
    tokenizer = tiny.train_tokenizer(texts, vocab_size=vocab)
    missing = vocab - len(tokenizer)
    if missing > 0:  # too little text for that many merges: filler tokens keep ids decodable
        tokenizer.add_tokens([f"<fill{i}>" for i in range(missing)])
    return tokenizer


def _flan_t5_base(tokenizer):
    """google/flan-t5-base's architecture (248M parameters, untied head), random weights."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, d_model=768, d_ff=2048, d_kv=64, num_heads=12,
                      num_layers=12, num_decoder_layers=12, feed_forward_proj="gated-gelu",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = T5ForConditionalGeneration(config)
    tiny.untie_lm_head(model)
    # As in detoxrl.tiny: a unit-variance random head would make sampling near-greedy.
    torch.nn.init.normal_(model.lm_head.weight, std=config.d_model ** -0.5)
    return model


def _gpt2(tokenizer):
    """GPT2Config() (124M parameters) with this tokenizer's special ids, random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def _roberta_large_classifier(tokenizer):
    """facebook/roberta-hate-speech-dynabench-r4-target's shape (roberta-large, 355M)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                           num_attention_heads=16, intermediate_size=4096,
                           max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, num_labels=2,
                           id2label={0: "nothate", 1: "hate"},
                           label2id={"nothate": 0, "hate": 1})
    return RobertaForSequenceClassification(config)


def _save(model, tokenizer, out: Path) -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------- prompts

def read_rows(path: Path, limit: int) -> list[dict]:
    """Up to ``limit`` DialogSum rows from ``path``, or synthetic ones when it is absent."""
    if not path.is_file():
        return tiny.synthetic_dialogues(min(limit, 400))
    with path.open() as fh:
        return [json.loads(line) for _, line in zip(range(limit), fh, strict=False)]


def data_file(path: Path | None) -> tuple[Path, str]:
    """The prompt file to use and where it came from (DialogSum, or synthetic rows)."""
    path = path or DEFAULT_DATA
    if path.is_file():
        return path, str(path)
    synthetic = tiny.cache_dir().parent / "bench" / "synthetic-dialogsum.jsonl"
    if not synthetic.is_file():
        tiny.write_dialogsum(synthetic)
    return synthetic, f"synthetic (detoxrl.tiny.synthetic_dialogues; {path} is absent)"


def load_prompts(shape: Shape, data_path: Path, n: int, max_tokens: int) -> dict:
    """The first ``n`` tutorial prompts (filter + template), tokenized and truncated."""
    from detoxrl.config import DataConfig
    from detoxrl.data.prompts import build_prompts
    from detoxrl.models.loading import load_tokenizer

    tokenizer = load_tokenizer(shape.policy)
    cfg = DataConfig(path=str(data_path), max_prompt_tokens=max_tokens, test_fraction=0.0,
                     max_rows=max(20 * n, 200))
    train = build_prompts(cfg, tokenizer).train
    if len(train) < n:
        raise ValueError(f"{data_path} has only {len(train)} usable prompts; need {n}.")
    rows = train.select(range(n))
    lengths = [len(ids) for ids in rows["input_ids"]]
    return {"input_ids": [list(ids) for ids in rows["input_ids"]], "query": list(rows["query"]),
            "tokens_min": min(lengths), "tokens_mean": sum(lengths) / n,
            "tokens_max": max(lengths)}
