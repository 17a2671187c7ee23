"""Prompt datasets: the tutorial's counts on real DialogSum, other layouts, RTP, bad input."""

from __future__ import annotations

import json
import time

import datasets
import pandas as pd
import pytest
import torch

from detoxrl import cli
from detoxrl.config import DataConfig
from detoxrl.data.prompts import build_prompts, load_rows
from detoxrl.models import tiny
from detoxrl.models.generation import collate_queries

OPEN_RANGE = {"min_chars": 0, "max_chars": 10**6}  # keep every row


def run_data(capsys, *argv: str) -> tuple[int, str, str]:
    """``detoxrl data ARGV``: exit code, stdout, stderr."""
    code = cli.main(["data", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *words: str) -> None:
    """Exit 2 with one paragraph naming ``words``, and no traceback."""
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("detoxrl data: error: ") and err.strip().count("\n") == 0, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


# --------------------------------------------------------------------------- the tutorial's data

def test_cli_reports_tutorial_counts(shared_data, tiny_t5_path, capsys):
    train = shared_data / "dialogsum" / "train.jsonl"
    code, out, _ = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path", str(train))
    assert code == 0
    assert "rows read: 12,460" in out
    assert "rows kept: 10,022 (200 < len(dialogue) <= 1000)" in out
    assert "train: 8,017" in out
    assert "test: 2,005" in out


def test_api_reproduces_tutorial_split(shared_data, tokenizer):
    path = shared_data / "dialogsum" / "train.jsonl"
    data = build_prompts(DataConfig(path=str(path)), tokenizer)
    assert {k: data.stats[k] for k in ("rows_read", "rows_kept", "train", "test")} == {
        "rows_read": 12_460, "rows_kept": 10_022, "train": 8_017, "test": 2_005}
    first = json.loads(path.open().readline())
    row = data.train[0]
    assert row["id"] == first["fname"]
    assert row["query"].startswith("Summarize the following conversation.")
    assert first["dialogue"] in row["query"]
    assert row["references"] == [first["summary"]]
    assert row["query"] == tokenizer.decode(row["input_ids"], skip_special_tokens=True)
    # Unshuffled: the test split is the tail of the kept rows, in file order.
    number = lambda r: int(r["id"].removeprefix("train_"))  # noqa: E731
    assert number(data.train[-1]) < number(data.test[0])


# --------------------------------------------------------------------------- other layouts

def _hub_layout_rows(n: int = 12) -> list[dict]:
    """DialogSum rows as the Hub's CSV has them: ``id`` instead of ``fname``."""
    return [{"id": r["fname"], "dialogue": r["dialogue"], "summary": r["summary"],
             "topic": r["topic"]} for r in tiny.synthetic_dialogues(n)]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_hub_layout_files(suffix, tmp_path, tokenizer):
    rows = _hub_layout_rows()
    frame, path = pd.DataFrame(rows), tmp_path / f"dialogsum{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    data = build_prompts(DataConfig(path=str(path), **OPEN_RANGE), tokenizer)
    assert (data.stats["train"], data.stats["test"]) == (9, 3)
    out = list(data.train) + list(data.test)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert [r["references"] for r in out] == [[r["summary"]] for r in rows]
    assert all(src["dialogue"] in r["query"] for src, r in zip(rows, out, strict=True))


def test_original_test_file_has_three_references(shared_data, tokenizer):
    cfg = DataConfig(path=str(shared_data / "dialogsum" / "test.jsonl"), max_rows=10,
                     **OPEN_RANGE)
    data = build_prompts(cfg, tokenizer)
    assert data.stats["rows_read"] == 10
    assert data.train[0]["id"] == "test_0"
    assert all(len(r["references"]) == 3 for r in data.train)


def test_rows_without_id_are_numbered(tmp_path, tokenizer):
    path = tmp_path / "plain.jsonl"
    pd.DataFrame([{"dialogue": f"line {i} " * 40} for i in range(5)]).to_json(
        path, orient="records", lines=True)
    data = build_prompts(DataConfig(path=str(path), test_fraction=0.0), tokenizer)
    assert data.train["id"][:] == ["0", "1", "2", "3", "4"]
    assert data.train["references"][:] == [[]] * 5
    assert len(data.test) == 0


def test_rtp_threshold(shared_data, tokenizer):
    cfg = DataConfig(path=str(shared_data / "rtp" / "toxic.jsonl"), kind="rtp")
    everything = build_prompts(cfg, tokenizer)
    cfg.toxicity_threshold = 0.8
    toxic = build_prompts(cfg, tokenizer)
    source = load_rows(cfg)
    assert everything.stats["rows_kept"] == len(source) == 1_196
    assert 0 < toxic.stats["rows_kept"] < everything.stats["rows_kept"]
    for row in list(toxic.train) + list(toxic.test):
        record = source[int(row["id"])]["prompt"]
        assert record["toxicity"] >= 0.8
        assert row["query"] == record["text"]  # no template
        assert row["references"] == []


def test_shuffle_is_seeded(tiny_dialogsum, tokenizer):
    cfg = DataConfig(path=str(tiny_dialogsum), **OPEN_RANGE)

    def order(shuffle: bool, seed: int) -> list[str]:
        cfg.shuffle = shuffle
        data = build_prompts(cfg, tokenizer, seed=seed)
        return data.train["id"][:] + data.test["id"][:]

    plain, first, again, other = order(False, 1), order(True, 1), order(True, 1), order(True, 2)
    assert first == again
    assert first != plain and first != other
    assert sorted(first) == sorted(plain)


def test_max_rows_limits_reading(tiny_dialogsum):
    assert len(load_rows(DataConfig(path=str(tiny_dialogsum), max_rows=7))) == 7


def test_output_show_and_overwrite(tiny_dialogsum, tiny_t5_path, tmp_path, capsys):
    out = tmp_path / "prompts"
    argv = ["--tokenizer", str(tiny_t5_path), "--data.path", str(tiny_dialogsum),
            "--output", str(out), "--show", "2"]
    for _ in range(2):  # the second run replaces the first save
        code, stdout, _ = run_data(capsys, *argv)
        assert code == 0
    assert stdout.count("Summarize the following conversation.") == 2
    saved = datasets.load_from_disk(str(out))
    assert f"train: {len(saved['train']):,}" in stdout
    assert f"test: {len(saved['test']):,}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]  # no temp folders left

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    code, _, err = run_data(capsys, *argv[:-4], "--output", str(tmp_path / "notes"))
    assert_user_error(code, err, "notes", "exists")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- bad input

def test_missing_local_file(tiny_t5_path, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    code, _, err = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path",
                            str(missing))
    assert_user_error(code, err, "missing.jsonl", "does not exist", "data.path")


def test_unreachable_hub_dataset_fails_fast(tiny_t5_path, capsys):
    start = time.perf_counter()
    code, _, err = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path",
                            "nobody/no-such-dataset")
    assert time.perf_counter() - start < 10  # HF_HUB_OFFLINE=1: no network retries
    assert_user_error(code, err, "nobody/no-such-dataset", "Hub", "HF_HUB_OFFLINE", ".jsonl",
                      "data.path")


@pytest.mark.parametrize(("option", "value"), [("data.text_column", "dialog"),
                                               ("data.summary_columns", "abstract"),
                                               ("data.id_column", "key")])
def test_missing_column(option, value, tiny_dialogsum, tiny_t5_path, capsys):
    code, _, err = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path",
                            str(tiny_dialogsum), f"--{option}", value)
    assert_user_error(code, err, repr(value), "dialogue", "fname", option)


def test_rtp_kind_on_flat_file(tiny_dialogsum, tiny_t5_path, capsys):
    code, _, err = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path",
                            str(tiny_dialogsum), "--data.kind", "rtp")
    assert_user_error(code, err, "'prompt'", "dialogue", "data.kind")


def test_filter_that_keeps_nothing(tiny_dialogsum, tiny_t5_path, capsys):
    lengths = [len(r["dialogue"]) for r in map(json.loads, tiny_dialogsum.open())]
    code, _, err = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path",
                            str(tiny_dialogsum), "--data.min_chars", "100000",
                            "--data.max_chars", "200000")
    assert_user_error(code, err, "100000 < len(dialogue) <= 200000",
                      f"{min(lengths):,} to {max(lengths):,} characters",
                      "data.min_chars", "data.max_chars")


def test_template_placeholder_without_column(tiny_dialogsum, tiny_t5_path, capsys):
    code, _, err = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path",
                            str(tiny_dialogsum), "--data.template", "Summarize {conversation} now")
    assert_user_error(code, err, "{conversation}", "dialogue", "data.template")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("broken.jsonl", b'{"dialogue": "hi"}\n{"dialogue": \n', "JSON Lines"),
    ("broken.parquet", b"PAR1 not really parquet" * 20, "Parquet"),
    ("broken.csv", bytes(range(256)) * 8, "CSV"),
    ("notes.txt", b"some text\n", ".jsonl, .json, .csv or .parquet"),
])
def test_unreadable_file(name, content, expected, tiny_t5_path, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run_data(capsys, "--tokenizer", str(tiny_t5_path), "--data.path", str(path))
    assert_user_error(code, err, name, expected)


def test_missing_tokenizer(tiny_dialogsum, tmp_path, capsys):
    code, _, err = run_data(capsys, "--tokenizer", str(tmp_path / "no-model"), "--data.path",
                            str(tiny_dialogsum))
    assert_user_error(code, err, "tokenizer", "no-model", "--tokenizer")


# --------------------------------------------------------------------------- batching

@pytest.mark.parametrize(("side", "ids", "mask"), [
    ("left", [[1, 2, 3], [0, 0, 4]], [[1, 1, 1], [0, 0, 1]]),
    ("right", [[1, 2, 3], [4, 0, 0]], [[1, 1, 1], [1, 0, 0]]),
])
def test_collate_queries(side, ids, mask):
    got_ids, got_mask = collate_queries([[1, 2, 3], [4]], pad_token_id=0, padding_side=side)
    assert got_ids.dtype == got_mask.dtype == torch.long
    assert got_ids.tolist() == ids
    assert got_mask.tolist() == mask


def test_is_held_out_depends_on_the_text_alone():
    from detoxrl.data.prompts import is_held_out

    texts = [f"prompt number {i}" for i in range(2000)]
    picked = [t for t in texts if is_held_out(t)]
    assert 0.16 < len(picked) / len(texts) < 0.24                     # about 20%
    assert picked == [t for t in reversed(texts) if is_held_out(t)][::-1]  # order-free
    assert all(is_held_out(t, 1.0) for t in texts) and not any(is_held_out(t, 0.0) for t in texts)
    assert set(t for t in texts if is_held_out(t, 0.1)) <= set(picked)  # nested fractions
    with pytest.raises(ValueError):
        is_held_out("x", 1.5)
