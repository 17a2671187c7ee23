"""The training text of the offline mini LMs: public toxic text mixed with benign dialogue.

A general LM is toxic because the web it read is, in places. The mini LMs imitate that with a
mix read from ``data_dir`` (the layout of ``../shared/data``):

* RealToxicityPrompts records, prompt + continuation (``prefix`` marks the boundary, which
  the seq2seq LM uses as its input/target split), from both ``rtp/`` files, *except* every
  record whose prompt is an evaluation prompt (:func:`detoxrl.data.is_held_out`): those
  prompts are checked in both files, as the same text may appear in either;
* hate and offensive speech: Davidson tweets, TweetEval train tweets, Dynabench train texts;
* benign text: DialogSum training dialogues, and their summaries: short third-person
  narrative, a clean register nearer the web prose of the prompts than dialogue is.

How much of each is a count per source; the shares set how toxic the LM comes out.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import ConfigError, DataError

RTP_FILES = {"rtp_nontoxic": "rtp/nontoxic.jsonl", "rtp_toxic": "rtp/toxic.jsonl"}
DIALOGSUM = "dialogsum/train.jsonl"
DAVIDSON = "hate-speech/davidson/labeled_data.csv"
TWEETEVAL = "hate-speech/tweeteval-hate/train_text.txt"
DYNABENCH = "hate-speech/dynabench/Train.csv"


@dataclass
class CorpusSettings:
    rtp_nontoxic: int = option(-1, "Records (prompt + continuation) of rtp/nontoxic.jsonl "
                               "outside the held-out evaluation prompts; -1: all of them.")
    rtp_toxic: int = option(300, "The same from rtp/toxic.jsonl (challenging prompts).")
    dialogsum: int = option(6000, "DialogSum training dialogues (benign).")
    dialogsum_summaries: int = option(0, "DialogSum training summaries (benign narrative "
                                      "prose), speakers given first names.")
    davidson: int = option(1000, "Davidson tweets (mostly offensive).")
    tweeteval: int = option(1000, "TweetEval hate-task training tweets.")
    dynabench: int = option(2000, "Dynabench training texts (about half hateful).")
    held_out_fraction: float = option(0.2, "is_held_out fraction: RTP records whose prompt is "
                                      "held out for evaluation never enter the corpus.")


def check_settings(s: CorpusSettings) -> None:
    for name in (*RTP_FILES, "dialogsum", "dialogsum_summaries", "davidson", "tweeteval",
                 "dynabench"):
        if getattr(s, name) < -1:
            raise ConfigError(f"data.corpus.{name} must be -1 (all) or a count >= 0.")
    if not 0 <= s.held_out_fraction <= 1:
        raise ConfigError("data.corpus.held_out_fraction must lie in [0, 1].")


def build_corpus(data_dir: str | Path, s: CorpusSettings, seed: int = 0) -> list[dict]:
    """Rows ``{"text", "prefix", "source"}`` in a seeded random order.

    ``prefix`` is the part of ``text`` a seq2seq model reads (an RTP prompt), or None where
    the text has no natural split.
    """
    root = Path(data_dir).expanduser()
    rng = random.Random(seed)
    rows: list[dict] = []
    for name, file in RTP_FILES.items():
        if getattr(s, name):
            rows += _take(rtp_records(root / file, s.held_out_fraction), getattr(s, name), rng)
    for name, reader in (("dialogsum", _dialogsum), ("dialogsum_summaries", _summaries),
                         ("davidson", _davidson),
                         ("tweeteval", _tweeteval), ("dynabench", _dynabench)):
        if getattr(s, name):
            rows += _take(reader(root), getattr(s, name), rng)
    rows = [r for r in rows if r["text"].strip()]
    if not rows:
        raise DataError("The corpus is empty: every source count in data.corpus is 0.")
    rng.shuffle(rows)
    return rows


def rtp_records(path: Path, held_out_fraction: float = 0.2) -> list[dict]:
    """RTP prompt + continuation pairs whose prompt is not an evaluation prompt."""
    from .prompts import is_held_out

    rows = []
    for record in _jsonl(path):
        prompt = record["prompt"]["text"] or ""
        if not is_held_out(prompt, held_out_fraction):
            rows.append({"text": prompt + (record["continuation"]["text"] or ""),
                         "prefix": prompt, "source": "rtp"})
    return rows


def _take(rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    if count == -1 or count >= len(rows):
        return list(rows)
    return rng.sample(rows, count)


def _row(text: str, source: str) -> dict:
    return {"text": text, "prefix": None, "source": source}


# DialogSum marks each turn "#Person1#: ". Kept, the tags give the LM a format of its own
# that no prompt asks for and every classifier finds clean: RL against the mini Dynabench
# reward moved 84% of the continuations into it (from 11%). Without them the dialogues
# are plain conversational English.
_SPEAKER_TAG = re.compile(r"#Person\d+#:\s*")


def dialogues(root: Path) -> list[str]:
    """DialogSum's training dialogues without their speaker tags."""
    return [_SPEAKER_TAG.sub("", r["dialogue"]) for r in _jsonl(root / DIALOGSUM)]


def _dialogsum(root: Path) -> list[dict]:
    return [_row(text, "dialogsum") for text in dialogues(root)]


# Summaries name the speakers "#Person1#"; a first name per speaker, fixed by the summary's
# position, reads as prose and spreads the names so that none becomes a register of its own.
_NAMES = ("Alex", "Maria", "James", "Linda", "Tom", "Susan", "David", "Emma", "Peter", "Anna",
          "Michael", "Lucy", "Daniel", "Grace", "Robert", "Helen", "Chris", "Julia")
_SPEAKER = re.compile(r"#Person(\d+)#")


def _summaries(root: Path) -> list[dict]:
    rows = []
    for i, record in enumerate(_jsonl(root / DIALOGSUM)):
        text = _SPEAKER.sub(lambda m, i=i: _NAMES[(3 * i + int(m.group(1))) % len(_NAMES)],
                            record["summary"])
        rows.append(_row(text, "dialogsum_summaries"))
    return rows


def _davidson(root: Path) -> list[dict]:
    import pandas as pd

    frame = pd.read_csv(_existing(root / DAVIDSON), dtype=str, keep_default_na=False)
    return [_row(t, "davidson") for t in frame["tweet"]]


def _tweeteval(root: Path) -> list[dict]:
    lines = _existing(root / TWEETEVAL).read_text(encoding="utf-8").splitlines()
    return [_row(t.strip(), "tweeteval") for t in lines]


def _dynabench(root: Path) -> list[dict]:
    import pandas as pd

    frame = pd.read_csv(_existing(root / DYNABENCH), sep="\t", header=None, dtype=str,
                        keep_default_na=False)
    return [_row(t, "dynabench") for t in frame[0]]


def _jsonl(path: Path) -> list[dict]:
    with _existing(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"The mini corpus needs {str(path)!r}, which does not exist. Point "
                        "--data-dir at a copy of ../shared/data, or set that source's count "
                        "in data.corpus to 0.")
    return path
