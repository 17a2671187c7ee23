"""Tiny, locally built models and data, so that everything runs offline.

The ``tiny`` preset and the test-suite use the same builders. Each model is created from a
config with random weights (fixed seed), saved with ``save_pretrained`` and then loaded back
through the ordinary ``from_pretrained`` path, so the code under test is the code users run.

A name of the form ``tiny:NAME`` anywhere a model or dataset path is accepted is resolved by
:func:`resolve` to a folder under the cache (``$DETOXRL_CACHE`` or ``~/.cache/detoxrl``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>", "<mask>"]
TINY_NAMES = ("t5", "gpt2", "roberta-hate", "dialogsum")
TINY_VERSION = 2  # bump when the builders change, so stale caches are not reused

_PEOPLE = ["#Person1#", "#Person2#"]
_SUBJECTS = ["the meeting", "my brother", "the new office", "dinner", "the train", "your exam",
             "the weather", "our project", "the party", "the doctor", "the bank", "my car"]
_OPENERS = ["Hi, how are you?", "Excuse me, can you help me?", "Good morning.", "Hey, do you "
            "have a minute?", "Hello, I'd like to ask about {s}.", "Did you hear about {s}?"]
_LINES = ["I think {s} is going to be late again.", "Really? I didn't know that.",
          "We should talk about {s} tomorrow.", "I'm not sure, let me check my notes.",
          "That sounds great, thank you so much.", "Could you tell me more about {s}?",
          "I was worried about {s} all week.", "Don't worry, everything will be fine.",
          "How much does it cost?", "It's about twenty dollars.", "Let's meet at six then.",
          "I can't stand {s} any more.", "Maybe we can fix it together.", "Sure, no problem."]


def cache_dir() -> Path:
    """Where ``tiny:`` models are built: ``tiny-vN`` under ``$DETOXRL_CACHE`` or
    ``~/.cache/detoxrl``."""
    root = os.environ.get("DETOXRL_CACHE") or Path.home() / ".cache" / "detoxrl"
    return Path(root) / f"tiny-v{TINY_VERSION}"


def synthetic_dialogues(n: int, seed: int = 0) -> list[dict]:
    """DialogSum-shaped rows (``fname``, ``dialogue``, ``summary``, ``topic``) from templates."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(_SUBJECTS)
        turns = [rng.choice(_OPENERS)] + [rng.choice(_LINES) for _ in range(rng.randint(2, 14))]
        dialogue = "\n".join(
            f"{_PEOPLE[k % 2]}: {t.format(s=subject)}" for k, t in enumerate(turns)
        )
        summary = f"#Person1# and #Person2# talk about {subject}."
        rows.append({"fname": f"tiny_{i}", "dialogue": dialogue, "summary": summary,
                     "topic": subject})
    return rows


def train_tokenizer(texts: Iterable[str], vocab_size: int = 600, lowercase: bool = False):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers tokenizer.

    Token ids 0-4 are ``<pad> </s> <unk> <s> <mask>``, the T5 convention for pad/eos, so
    one tokenizer serves the tiny T5, GPT-2 and RoBERTa models. ``lowercase`` puts NFKC and
    lowercasing in the tokenizer's normalizer, before the merges are learned, so the saved
    tokenizer applies them to whatever text it is later given.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        bos_token="<s>", mask_token="<mask>", model_max_length=512,
    )


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def build_seq2seq(tokenizer, out_dir: str | Path, seed: int = 0) -> Path:
    """A FLAN-T5-shaped model (gated-gelu, untied ``lm_head``), tiny."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    _seed_all(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
        num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = T5ForConditionalGeneration(config)
    untie_lm_head(model)
    # T5's default init gives the untied head unit-variance weights, so logits have a std of
    # ~sqrt(d_model) and sampling is near-greedy; trained FLAN-T5 heads are far smaller.
    torch.nn.init.normal_(model.lm_head.weight, std=config.d_model ** -0.5)
    return _save(model, tokenizer, out_dir)


def build_causal(tokenizer, out_dir: str | Path, seed: int = 0) -> Path:
    """A GPT-2-shaped causal LM, tiny."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed_all(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(GPT2LMHeadModel(config), tokenizer, out_dir)


def build_classifier(tokenizer, out_dir: str | Path, seed: int = 0) -> Path:
    """A RoBERTa sequence classifier with labels ``nothate`` (0) / ``hate`` (1), tiny.

    The labels follow facebook/roberta-hate-speech-dynabench-r4-target.
    """
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    _seed_all(seed)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512 + tokenizer.pad_token_id + 1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, num_labels=2,
        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1},
    )
    model = RobertaForSequenceClassification(config)
    # With the default init the untrained logits barely differ between texts (std ~0.02), so
    # the tiny preset's reward would be flat; a larger output layer gives PPO a slope to climb.
    torch.nn.init.normal_(model.classifier.out_proj.weight, std=0.5)
    return _save(model, tokenizer, out_dir)


def untie_lm_head(model) -> None:
    """Give a T5 model its own ``lm_head``, as real FLAN-T5 checkpoints have.

    transformers 5 ties ``lm_head`` to the shared embedding for every T5 built from a config;
    FLAN-T5 is untied, which is 25M parameters more at base size.
    """
    import torch

    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _save(model, tokenizer, out_dir: str | Path) -> Path:
    from transformers.utils import logging

    logging.disable_progress_bar()  # tiny models save in milliseconds; bars are noise
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_dialogsum(path: str | Path, n: int = 400, seed: int = 0) -> Path:
    """Write ``n`` synthetic DialogSum rows as JSONL (the original layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in synthetic_dialogues(n, seed):
            fh.write(json.dumps(row) + "\n")
    return path


def build_all(out_dir: str | Path, texts: Iterable[str] | None = None, seed: int = 0) -> dict:
    """Build the tokenizer, the three tiny models and the tiny data under ``out_dir``."""
    out = Path(out_dir)
    rows = synthetic_dialogues(400, seed)
    tokenizer = train_tokenizer(texts if texts is not None else (r["dialogue"] for r in rows))
    return {
        "t5": build_seq2seq(tokenizer, out / "t5", seed),
        "gpt2": build_causal(tokenizer, out / "gpt2", seed),
        "roberta-hate": build_classifier(tokenizer, out / "roberta-hate", seed),
        "dialogsum": write_dialogsum(out / "dialogsum" / "train.jsonl", seed=seed),
    }


def resolve(name_or_path: str) -> str:
    """Turn ``tiny:NAME`` into a local path, building the tiny set once; pass others through.

    Called once per loaded object, where it is loaded (``Policy.from_pretrained``, the
    reward classifier, the prompt data, ...); the functions of ``detoxrl.models.loading``
    below them take the path or Hub id it returns.
    """
    if not name_or_path.startswith("tiny:"):
        return name_or_path
    name = name_or_path.removeprefix("tiny:")
    if name not in TINY_NAMES:
        from ..errors import ConfigError

        raise ConfigError(f"Unknown tiny model {name_or_path!r}. Choose one of: "
                          + ", ".join(f"tiny:{n}" for n in TINY_NAMES) + ".")
    path = build_cache() / name
    return str(path / "train.jsonl" if name == "dialogsum" else path)


def build_cache() -> Path:
    """The tiny models and data, built on first use (atomically: a crash leaves none)."""
    root = cache_dir()
    if not (root / "done").exists():
        # Build in a sibling folder and rename, so a crash never leaves a half-built cache.
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tiny-"))
        build_all(tmp)
        (tmp / "done").write_text("ok\n")
        if root.exists() and not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return root
