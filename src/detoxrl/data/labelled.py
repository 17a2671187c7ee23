"""Labelled text for classifier training: one reader for the layouts hate-speech data comes in.

* a table (CSV, TSV, JSONL, Parquet) with a text and a label column (Davidson: ``tweet`` and
  ``class``; HateCheck: ``test_case`` and ``label_gold``);
* a text file beside a label file, aligned line by line: Dynabench (``Train.csv`` is a
  one-column TSV without a header, ``Train_label.csv`` one label per line) and TweetEval
  (``train_text.txt`` + ``train_labels.txt``);
* a Hub dataset, by id and split.

Raw labels are mapped to label *names* (``label_map``, e.g. Davidson's ``0: hate, 1: hate,
2: nothate``); the names' order in ``labels`` fixes the class ids the classifier is saved
with. Relative paths start from the run's ``data_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..errors import ConfigError, DataError

FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet", "lines", "hub")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
             ".parquet": "parquet", ".txt": "lines"}


@dataclass
class LabelledSource:
    path: str | None = option(None, "Data file, relative to data_dir (or absolute), or a Hub "
                              "dataset id with format: hub.")
    labels_path: str | None = option(None, "Label file aligned line by line with path "
                                     "(Dynabench's Train_label.csv, TweetEval's "
                                     "train_labels.txt); then label_column is not read.")
    format: str = option("auto", "auto (from the suffix), csv, tsv, jsonl, parquet, lines (one "
                         "text per line) or hub.")
    header: bool = option(True, "csv/tsv: the first row names the columns. Without a header "
                          "the columns are called 0, 1, ...")
    text_column: str = option("text", "Column holding the text.")
    label_column: str = option("label", "Column holding the raw label.")
    split: str = option("train", "Split of a Hub dataset.")


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[int]       # class ids, indexes into the label names
    source: str


def resolve_path(data_dir: str, path: str) -> Path:
    """``path`` if absolute, else ``data_dir / path``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(data_dir).expanduser() / p


def source_format(src: LabelledSource) -> str:
    if src.format not in FORMATS:
        raise ConfigError(f"Data format {src.format!r} is unknown; choose one of "
                          + ", ".join(FORMATS) + ".")
    if src.format != "auto":
        return src.format
    return _SUFFIXES.get(Path(src.path or "").suffix.lower(), "hub")


def read_labelled(src: LabelledSource, data_dir: str, label_names: list[str],
                  label_map: dict[str, str], what: str) -> LabelledTexts:
    """Texts and class ids of one split; DataError naming the fix for anything unusable."""
    texts, raw, where = _read_columns(src, data_dir, what)
    if not texts:
        raise DataError(f"The {what} split ({where}) holds no rows. Point it at a file with "
                        "data.")
    ids = to_class_ids(raw, label_names, label_map, f"the {what} split ({where})")
    return LabelledTexts(texts, ids, where)


def to_class_ids(raw: list[str], label_names: list[str], label_map: dict[str, str],
                 where: str) -> list[int]:
    """Map raw labels to indexes into ``label_names``.

    Without a ``label_map``, a raw label is a label name, or an integer class id.
    """
    index = {name: i for i, name in enumerate(label_names)}
    lookup: dict[str, int] = {}
    for value in sorted(set(raw)):
        name = label_map.get(value) if label_map else _default_name(value, label_names)
        if name is None or name not in index:
            shown = ", ".join(repr(v) for v in sorted(set(raw))[:10])
            raise DataError(
                f"The label {value!r} in {where} is outside the label mapping (labels "
                f"{label_names}, label_map {label_map or 'none'}); the raw labels are {shown}. "
                "Set data.label_map to map every raw label to one of data.labels, e.g. "
                "--data.label_map 0=nothate,1=hate.")
        lookup[value] = index[name]
    return [lookup[v] for v in raw]


def _default_name(value: str, label_names: list[str]) -> str | None:
    if value in label_names:
        return value
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(label_names):
        return label_names[int(value)]
    return None


def _read_columns(src: LabelledSource, data_dir: str, what: str
                  ) -> tuple[list[str], list[str], str]:
    if src.path is None:
        raise ConfigError(f"data.{what}.path is not set; give the file of the {what} split.")
    fmt = source_format(src)
    if fmt == "hub":
        frame, where = _read_hub(src), src.path
    else:
        path = resolve_path(data_dir, src.path)
        _check_file(path, f"data.{what}.path")
        frame, where = read_table(path, fmt, src.header), str(path)
    text_col = column(frame, src.text_column, f"data.{what}.text_column", where)
    texts = ["" if t is None else str(t) for t in frame[text_col].tolist()]
    if src.labels_path is not None:
        label_file = resolve_path(data_dir, src.labels_path)
        _check_file(label_file, f"data.{what}.labels_path")
        raw = _read_lines(label_file)
        if len(raw) != len(texts):
            raise DataError(f"{label_file} has {len(raw):,} labels but {where} has "
                            f"{len(texts):,} texts; the two files must align line by line.")
    else:
        label_col = column(frame, src.label_column, f"data.{what}.label_column", where)
        raw = [_label_text(v) for v in frame[label_col].tolist()]
    return texts, raw, where


def _label_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _check_file(path: Path, option_name: str) -> None:
    if not path.is_file():
        raise DataError(f"{option_name}: {str(path)!r} does not exist. Relative paths start "
                        "from data_dir; point --data-dir at your copy of the data.")


def column(frame, name: str, option_name: str, where: str) -> str:
    columns = [str(c) for c in frame.columns]
    if name not in columns:
        raise DataError(f"{where} has no column {name!r}; its columns are: "
                        f"{', '.join(columns)}. Set {option_name} to one of them.")
    return frame.columns[columns.index(name)]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in _text_lines(path)]


def read_table(path: Path, fmt: str, header: bool):
    import pandas as pd

    try:
        if fmt == "lines":
            return pd.DataFrame({"text": [ln.rstrip() for ln in _text_lines(path)]})
        if fmt in ("csv", "tsv"):
            frame = pd.read_csv(path, sep="," if fmt == "csv" else "\t",
                                header=0 if header else None, dtype=str, keep_default_na=False)
            frame.columns = [str(c) for c in frame.columns]
            return frame
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"Cannot read {str(path)!r} as {fmt}: {str(exc).splitlines()[0]}. "
                        "Fix the file or set its data.*.format.") from None


def _text_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") else lines


def _read_hub(src: LabelledSource):
    from .prompts import _read_named, quiet

    with quiet():
        return _read_named(src.path, src.split).to_pandas()
