"""Session-scoped fixtures: tiny models built from configs, saved, and loaded back.

The tokenizer is trained on DialogSum dialogues when ``../shared/data`` is present, and on
generated dialogues otherwise. Models go through ``save_pretrained`` / ``from_pretrained``,
the same path users take with Hub ids or local folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from detoxrl.models import tiny
from helpers import labelled_texts

# DETOXRL_SHARED_DATA points at another copy (a git worktree has no ../shared beside it).
SHARED_DATA = Path(os.environ.get("DETOXRL_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")
DIALOGSUM_TRAIN = SHARED_DATA / "dialogsum" / "train.jsonl"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
# threads make them many times slower.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dialogsum_texts(limit: int = 2000) -> list[str]:
    with DIALOGSUM_TRAIN.open() as fh:
        return [json.loads(line)["dialogue"] for _, line in zip(range(limit), fh, strict=False)]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder beside the project; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    if DIALOGSUM_TRAIN.exists():
        texts = _dialogsum_texts()
    else:
        texts = [r["dialogue"] for r in tiny.synthetic_dialogues(400)]
    tok = tiny.train_tokenizer(texts)
    tok.save_pretrained(tiny_dir / "tokenizer")
    return tok


@pytest.fixture(scope="session")
def tiny_t5_path(tokenizer, tiny_dir) -> Path:
    return tiny.build_seq2seq(tokenizer, tiny_dir / "t5")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tokenizer, tiny_dir) -> Path:
    return tiny.build_causal(tokenizer, tiny_dir / "gpt2")


@pytest.fixture(scope="session")
def tiny_classifier_path(tokenizer, tiny_dir) -> Path:
    return tiny.build_classifier(tokenizer, tiny_dir / "roberta-hate")


@pytest.fixture(scope="session")
def tiny_dialogsum(tiny_dir) -> Path:
    return tiny.write_dialogsum(tiny_dir / "dialogsum" / "train.jsonl", n=200)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """``tiny:`` names build into a per-session cache, never the user's home."""
    monkeypatch.setenv("DETOXRL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's tiny-model cache for module-scoped fixtures, which run before the
    per-test ``_isolated_cache`` above sets it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETOXRL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="session")
def dyna_dir(tmp_path_factory) -> Path:
    """The Dynabench layout: header-less one-column TSV + one label per line."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "dyna"
    folder.mkdir()
    for split, n, seed in (("Train", 240, 0), ("Test", 60, 1)):
        texts, labels = labelled_texts(n, seed)
        (folder / f"{split}.csv").write_text("".join(t + "\n" for t in texts))
        (folder / f"{split}_label.csv").write_text("".join(f"{v}\n" for v in labels))
    return root
