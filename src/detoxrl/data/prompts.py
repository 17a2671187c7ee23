"""Prompt datasets: read rows, keep the usable ones, fill the template, tokenize, split.

Two recipes, chosen by ``data.kind``:

* ``dialogsum`` (the tutorial's): keep rows with ``min_chars < len(text) <= max_chars``, fill
  the instruction template from the row's columns, keep the reference summaries for ROUGE.
* ``rtp``: RealToxicityPrompts records; the query is ``prompt.text`` as it is, optionally only
  the prompts with ``prompt.toxicity >= toxicity_threshold``.

Every output row has ``id``, ``query`` (the decoded prompt), ``input_ids`` and ``references``.
Problems a user can fix raise :class:`DataError` naming the fix; errors from ``datasets`` or
``pyarrow`` never escape raw.
"""

from __future__ import annotations

import hashlib
import re
import string
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset, Features, Sequence, Value

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..models import tiny

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_EXPECTED = {".jsonl": "JSON Lines (one JSON object per line)",
             ".json": "a JSON list of objects, or JSON Lines",
             ".csv": "UTF-8 CSV with a header row", ".parquet": "a Parquet table"}
_LOCAL_HINT = ("Point data.path at a local .jsonl/.json/.csv/.parquet copy, e.g. "
               "--data.path ../shared/data/dialogsum/train.jsonl.")
_FEATURES = Features({"id": Value("string"), "query": Value("string"),
                      "input_ids": Sequence(Value("int32")),
                      "references": Sequence(Value("string"))})


@dataclass
class PromptData:
    """The prompts of a run: the train and test splits, and what building them saw.

    ``stats``: ``rows_read``, ``rows_kept``, ``train``, ``test``, ``filter`` (the rule in
    words), ``text_chars_min`` / ``text_chars_max`` (over the rows read), and
    ``prompt_tokens_max`` / ``prompts_at_token_limit`` (over the kept prompts).
    """

    train: Dataset
    test: Dataset
    stats: dict = field(default_factory=dict)


@contextmanager
def quiet() -> Iterator[None]:
    """Silence ``datasets``' progress bars and log lines, then restore the caller's settings."""
    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def exception_summary(exc: BaseException) -> str:
    """The innermost cause of ``exc`` on one short line, to quote inside a friendly error."""
    while exc.__cause__ is not None:  # datasets wraps the informative pyarrow error
        exc = exc.__cause__
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- reading

def load_rows(cfg: DataConfig) -> Dataset:
    """Read the source rows: a local file or folder, or a Hub dataset (split ``cfg.split``)."""
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise ConfigError(f"data.max_rows must be at least 1, got {cfg.max_rows}.")
    source = tiny.resolve(cfg.path)
    path = Path(source).expanduser()
    with quiet():
        if path.is_file():
            rows = _read_file(path)
        elif path.exists() or not _looks_local(source):
            rows = _read_named(source, cfg.split)
        else:
            raise DataError(f"Data file {source!r} does not exist. Check data.path (relative "
                            f"paths start from the current folder). {_LOCAL_HINT}")
    if len(rows) == 0:
        raise DataError(f"{source!r} holds no rows. Point data.path at a file with data.")
    if cfg.max_rows is not None:
        rows = rows.select(range(min(cfg.max_rows, len(rows))))
    return rows


def _looks_local(source: str) -> bool:
    # Hub ids are 'name' or 'owner/name' and may contain dots, so only a data-file suffix or
    # an unmistakable path shape marks a local path.
    return (Path(source).suffix.lower() in _FORMATS or source.startswith((".", "/", "~"))
            or "\\" in source or source.count("/") > 1)


def _read_file(path: Path) -> Dataset:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"Cannot read {str(path)!r}: data.path takes .jsonl, .json, .csv or "
                        ".parquet files. Convert it to one of these (e.g. with pandas).")
    if path.stat().st_size == 0:
        raise DataError(f"Data file {str(path)!r} is empty. Point data.path at a file with "
                        "data.")
    if fmt in ("json", "csv"):
        _check_utf8(path)
    # A throwaway cache: the rows are kept in memory, so nothing is left in ~/.cache.
    with tempfile.TemporaryDirectory(prefix="detoxrl-data-") as cache:
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train",
                                         cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # datasets and pyarrow raise many types for a bad file
            raise DataError(f"Cannot read {str(path)!r}: {exception_summary(exc)}. A "
                            f"{path.suffix} file must be {_EXPECTED[path.suffix.lower()]}; "
                            "fix or convert it.") from None


def _check_utf8(path: Path) -> None:
    """Text data must be UTF-8; say where it is not rather than quote pyarrow's parser."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise DataError(f"Data file {str(path)!r} is not UTF-8 text (byte "
                                f"0x{block[exc.start]:02x} at offset {offset + exc.start}). "
                                f"A {path.suffix} file must be {_EXPECTED[path.suffix.lower()]}"
                                " in UTF-8; re-save it, e.g. iconv -f latin1 -t utf-8.") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"Data file {str(path)!r} ends in the middle of a UTF-8 character "
                        "(truncated?). Restore or re-save the file.") from None


def _read_named(source: str, split: str) -> Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # network, missing repo, unknown split: all told the same way
        raise DataError(
            f"Cannot load dataset {source!r} (split {split!r}): {exception_summary(exc)}. "
            "If it is a Hub id, the Hub may be unreachable (no network, or HF_HUB_OFFLINE=1) "
            f"or the id or data.split may be wrong. {_LOCAL_HINT}") from None


# --------------------------------------------------------------------------- recipes

@dataclass
class _Recipe:
    """How one ``data.kind`` turns source rows into prompts."""

    lengths: list[int]  # per source row, the length of its text in characters
    keep: list[bool]    # per source row, whether it becomes a prompt
    rule: str           # the filter in words, for the report and errors
    seen: str           # what the filter saw, for the error when nothing is kept
    fix: str            # what to change when nothing is kept
    fill: Callable[[dict], tuple[list[str], list[list[str]]]]  # batch -> prompts, references


def _dialogsum_recipe(rows: Dataset, cfg: DataConfig) -> _Recipe:
    text = _text_column(rows, cfg.text_column)
    summaries = _summary_columns(rows, cfg.summary_columns)
    fields = _template_fields(cfg.template, rows.column_names)
    lengths = [len(t or "") for t in rows[text]]

    def fill(batch: dict) -> tuple[list[str], list[list[str]]]:
        n = len(batch[text])
        prompts = [cfg.template.format(**{f: batch[f][i] for f in fields}) for i in range(n)]
        refs = [[batch[c][i] for c in summaries if batch[c][i]] for i in range(n)]
        return prompts, refs

    return _Recipe(
        lengths, [cfg.min_chars < n <= cfg.max_chars for n in lengths],
        rule=f"{cfg.min_chars} < len({text}) <= {cfg.max_chars}",
        seen=f"its {text} texts are {min(lengths):,} to {max(lengths):,} characters long",
        fix="Set data.min_chars and data.max_chars to a range that overlaps those lengths.",
        fill=fill)


def _rtp_recipe(rows: Dataset, cfg: DataConfig) -> _Recipe:
    subfields = _struct_fields(rows, "prompt")
    threshold = cfg.toxicity_threshold
    if threshold is not None and "toxicity" not in subfields:
        raise DataError(f"data.toxicity_threshold needs prompt.toxicity, but the prompt "
                        f"records only have: {', '.join(subfields)}. Unset the threshold.")
    records = list(rows["prompt"])
    scores = [r.get("toxicity") for r in records]
    scored = [s for s in scores if s is not None]
    keep = ([True] * len(records) if threshold is None
            else [s is not None and s >= threshold for s in scores])
    seen = (f"prompt.toxicity ranges from {min(scored):.3f} to {max(scored):.3f}" if scored
            else "no prompt has a toxicity score")

    def fill(batch: dict) -> tuple[list[str], list[list[str]]]:
        return [r["text"] or "" for r in batch["prompt"]], [[] for _ in batch["prompt"]]

    return _Recipe(
        [len(r["text"] or "") for r in records], keep,
        rule="all prompts" if threshold is None else f"prompt.toxicity >= {threshold}",
        seen=f"{seen} ({len(scores) - len(scored):,} rows have none)",
        fix="Lower data.toxicity_threshold.", fill=fill)


_RECIPES = {"dialogsum": _dialogsum_recipe, "rtp": _rtp_recipe}


# --------------------------------------------------------------------------- column checks

def _missing_column(rows: Dataset, name: str, option: str) -> DataError:
    return DataError(f"The data has no column {name!r}; its columns are: "
                     f"{', '.join(rows.column_names)}. Set {option} to one of them.")


def _text_column(rows: Dataset, name: str) -> str:
    if name not in rows.column_names:
        raise _missing_column(rows, name, "data.text_column")
    feature = rows.features[name]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"Column {name!r} does not hold text (its type is {feature}). Set "
                        "data.text_column to a text column.")
    return name


def _summary_columns(rows: Dataset, names: list[str] | None) -> list[str]:
    columns = rows.column_names
    if names is None:  # the Hub layout has 'summary'; the original test file summary1..3
        if "summary" in columns:
            return ["summary"]
        numbered = [c for c in columns if re.fullmatch(r"summary\d+", c)]
        return sorted(numbered, key=lambda c: int(c.removeprefix("summary")))
    for name in names:
        if name not in columns:
            raise _missing_column(rows, name, "data.summary_columns")
    return names


def _id_column(rows: Dataset, name: str | None) -> str | None:
    if name is None:  # 'id' in the Hub CSV layout, 'fname' in the original JSONL
        return next((c for c in ("id", "fname") if c in rows.column_names), None)
    if name not in rows.column_names:
        raise _missing_column(rows, name, "data.id_column")
    return name


def _template_fields(template: str, columns: list[str]) -> list[str]:
    """The columns the template's ``{name}`` placeholders read (``{a[b]}`` reads ``a``)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"data.template is not a valid format string ({exc}); write literal "
                          "braces as {{ and }}.") from None
    bases = {re.match(r"[^.\[]*", n).group() for n in names}
    for base in sorted(bases):
        if not base or base.isdigit():
            raise ConfigError("data.template has a positional placeholder ({} or {0}); name "
                              "the column instead, e.g. {dialogue}.")
        if base not in columns:
            raise DataError(f"data.template has the placeholder {{{base}}}, but the data has "
                            f"no such column; its columns are: {', '.join(columns)}. Change "
                            "data.template to use those names.")
    return sorted(bases)


def _struct_fields(rows: Dataset, name: str) -> list[str]:
    if name not in rows.column_names:
        raise DataError(f"data.kind 'rtp' reads RealToxicityPrompts records, with a column "
                        f"{name!r} holding {{text, toxicity}}; this data has only: "
                        f"{', '.join(rows.column_names)}. Use data.kind 'dialogsum' with "
                        "data.text_column for flat text files.")
    feature = rows.features[name]
    if not isinstance(feature, dict) or "text" not in feature:
        raise DataError(f"Column {name!r} must hold records with a 'text' field (as in "
                        "RealToxicityPrompts); use data.kind 'dialogsum' for flat text.")
    return list(feature)


# --------------------------------------------------------------------------- building

def build_prompts(cfg: DataConfig, tokenizer, seed: int = 0) -> PromptData:
    """Read, filter, template, tokenize and split the prompts described by ``cfg``."""
    if cfg.kind not in _RECIPES:
        raise ConfigError(f"data.kind is {cfg.kind!r}; choose 'dialogsum' or 'rtp'.")
    if not 0 <= cfg.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in [0, 1), got {cfg.test_fraction}.")
    rows = load_rows(cfg)
    recipe = _RECIPES[cfg.kind](rows, cfg)
    kept = [i for i, keep in enumerate(recipe.keep) if keep]
    if not kept:
        raise DataError(f"No rows of {cfg.path!r} pass the filter {recipe.rule}: "
                        f"{recipe.seen}. {recipe.fix}")
    with quiet():
        prompts = _encode(rows.select(kept), kept, recipe,
                          _id_column(rows, cfg.id_column), tokenizer, cfg.max_prompt_tokens)
        train, test = _split(prompts, cfg.test_fraction, cfg.shuffle, seed)
    tokens = [len(ids) for ids in prompts["input_ids"]]
    stats = {"rows_read": len(rows), "rows_kept": len(prompts), "train": len(train),
             "test": len(test), "filter": recipe.rule, "text_chars_min": min(recipe.lengths),
             "text_chars_max": max(recipe.lengths), "prompt_tokens_max": max(tokens),
             # Right truncation cuts the template's closing cue ("Summary:"), so say how often.
             "prompts_at_token_limit": sum(n >= cfg.max_prompt_tokens for n in tokens)}
    return PromptData(train, test, stats)


def _encode(rows: Dataset, row_numbers: list[int], recipe: _Recipe, id_column: str | None,
            tokenizer, max_tokens: int) -> Dataset:
    """``rows`` as ``id``, ``query``, ``input_ids``, ``references``, in the same order."""

    def encode(batch: dict, positions: list[int]) -> dict:
        prompts, references = recipe.fill(batch)
        input_ids = tokenizer(prompts, truncation=True, max_length=max_tokens)["input_ids"]
        # Without an id column, a row is named by its (0-based) row number in the source.
        ids = batch[id_column] if id_column else [row_numbers[p] for p in positions]
        # decode() per row: batch_decode type-checks every token id twice in Python.
        queries = [tokenizer.decode(seq, skip_special_tokens=True) for seq in input_ids]
        return {"id": [str(i) for i in ids], "references": references, "input_ids": input_ids,
                "query": queries}

    # Fixed fingerprint: hashing the closure (and its tokenizer) costs time and the rows
    # are kept in memory, so there is no cache to look up anyway.
    return rows.map(
        encode, batched=True, with_indices=True, remove_columns=rows.column_names,
        features=_FEATURES, keep_in_memory=True, new_fingerprint="detoxrl-prompts")


def _split(prompts: Dataset, fraction: float, shuffle: bool, seed: int
           ) -> tuple[Dataset, Dataset]:
    if fraction == 0:
        return prompts, prompts.select([])
    try:
        parts = prompts.train_test_split(test_size=fraction, shuffle=shuffle, seed=seed,
                                         keep_in_memory=True)
    except ValueError as exc:
        raise DataError(f"Cannot split {len(prompts):,} prompts with data.test_fraction "
                        f"{fraction}: {exception_summary(exc)}. Keep more rows, or set "
                        "data.test_fraction 0 to train on all of them.") from None
    return parts["train"], parts["test"]


# --------------------------------------------------------------------------- batches

def is_held_out(text: str, fraction: float = 0.2) -> bool:
    """Whether a prompt belongs to the evaluation set that no training stage may see.

    The rule depends on the text alone (its SHA-256), not on a seed, file order or row
    count, so every stage (the LM's training text, the RL prompts, the evaluation) agrees
    on it whichever copy of the data it reads and however the rows are filtered.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}.")
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return digest < fraction * 2**64
