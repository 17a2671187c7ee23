"""Bad input, command by command: exit status 2, a message naming the problem, no traceback,
and nothing written (every watched folder hashes the same before and after).

Most cases fail in validation, before any model loads; one finished tiny run (trained once
for the module) serves the commands that read a run folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from detoxrl import cli
from detoxrl.config import load_config
from detoxrl.rl.detox_trainer import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
LATIN1 = "caf\xe9 cr\xe8me".encode("latin-1")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_t5_path, tiny_classifier_path, tiny_dialogsum):
    """A finished one-step run, a copy with a stale evaluation, and bad files."""
    root = tmp_path_factory.mktemp("bad")
    models = ["--model.name_or_path", str(tiny_t5_path), "--reward.model",
              str(tiny_classifier_path), "--data.path", str(tiny_dialogsum)]
    small = ["--ppo.batch_size", "4", "--ppo.mini_batch_size", "2", "--ppo.ppo_epochs", "1",
             "--generation.min_new_tokens_draw", "2", "--generation.max_new_tokens_draw", "4",
             "--generation.min_length", "1", "--steps", "1", "--save_every", "0"]
    run = root / "run"
    train(load_config(TINY, [*models, *small, "--output_dir", str(run)]),
          reward_fn=lambda prompts, completions, **kw: [0.0] * len(completions), quiet=True)
    stale = root / "stale"
    shutil.copytree(run, stale)
    (stale / "eval").mkdir()
    (stale / "eval" / "summary.json").write_text(json.dumps({"settings": {
        "adapter": str(stale), "adapter_sha256": "0" * 64}}))
    bad = root / "files"
    bad.mkdir()
    rows = [{"dialogue": "x" * 300, "summary": "s"}]
    (bad / "latin1.jsonl").write_bytes(b'{"dialogue": "' + LATIN1 + b'", "summary": "s"}\n')
    (bad / "latin1.json").write_bytes(b'[{"dialogue": "' + LATIN1 + b'", "summary": "s"}]')
    (bad / "latin1.csv").write_bytes(b"dialogue,summary\n" + LATIN1 + b",s\n")
    _bad_parquet(bad / "latin1.parquet")
    (bad / "empty.jsonl").write_text("")
    (bad / "rows.txt").write_text(json.dumps(rows[0]) + "\n")
    (bad / "a_file").write_text("not a folder")
    (bad / "latin1.yaml").write_bytes(b"# " + LATIN1 + b"\nsteps: 2\n")
    text = TINY.read_text()
    (bad / "torn.yaml").write_text(text[:text.index("ppo:") + 4])  # ends "ppo:"
    (bad / "torn2.yaml").write_text(text[:text.index("batch_size") + 5])
    return {"root": root, "run": run, "stale": stale, "bad": bad, "models": models,
            "small": small}


def _bad_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet strings must be UTF-8; a binary column of Latin-1 bytes is what a careless
    # conversion leaves.
    pq.write_table(pa.table({"dialogue": pa.array([LATIN1 * 40], pa.binary()),
                             "summary": ["s"]}), path)


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _train(*args):
    return lambda w: ["train", "--config", str(TINY), *w["models"], *w["small"],
                      "--output-dir", str(w["root"] / "new"), "--quiet", *args]


def _data(*args):
    return lambda w: ["data", "--config", str(TINY), *_fmt(args, w)]


def _fmt(args, w):
    return [a.format(bad=w["bad"], run=w["run"], stale=w["stale"], root=w["root"])
            for a in args]


def _cmd(*args):
    return lambda w: _fmt(args, w)


CASES = [
    # train: every numeric option, by range
    ("lr-nan", _train("--ppo.learning_rate", "nan"), ["ppo.learning_rate", "> 0"]),
    ("lr-negative", _train("--ppo.learning_rate", "-1e-5"), ["ppo.learning_rate", "> 0"]),
    ("lr-inf", _train("--ppo.learning_rate", ".inf"), ["ppo.learning_rate", "finite"]),
    ("seed-negative", _train("--seed", "-1"), ["seed", "[0, 4294967295]"]),
    ("seed-too-big", _train("--seed", "5000000000"), ["seed", "[0, 4294967295]"]),
    ("dropout-1", _train("--lora.dropout", "1"), ["lora.dropout", "[0, 1)"]),
    ("top-p-0", _train("--generation.top_p", "0"), ["generation.top_p", "(0, 1]"]),
    ("top-p-big", _train("--generation.top_p", "1.5"), ["generation.top_p", "(0, 1]"]),
    ("temperature-0", _train("--generation.temperature", "0"), ["generation.temperature"]),
    ("save-every-negative", _train("--save_every", "-1"), ["save_every", ">= 0"]),
    ("prompt-tokens-0", _train("--data.max_prompt_tokens", "0"),
     ["data.max_prompt_tokens", ">= 1"]),
    ("test-fraction-1", _train("--data.test_fraction", "1"), ["data.test_fraction", "[0, 1)"]),
    ("cliprange-0", _train("--ppo.cliprange", "0"), ["ppo.cliprange", "> 0"]),
    ("gamma-big", _train("--ppo.gamma", "1.5"), ["ppo.gamma", "[0, 1]"]),
    ("lam-negative", _train("--ppo.lam", "-0.1"), ["ppo.lam", "[0, 1]"]),
    ("steps-0", _train("--steps", "0"), ["steps", ">= 1"]),
    ("rank-0", _train("--lora.r", "0"), ["lora.r", ">= 1"]),
    # train: names
    ("scheduler-typo", _train("--ppo.lr_scheduler", "cosin"), ["ppo.lr_scheduler", "cosine"]),
    ("scheduler-needs-args", _train("--ppo.lr_scheduler", "cosine_with_min_lr"),
     ["ppo.lr_scheduler", "linear"]),
    ("tracker", _train("--log_with", "nosuchtracker"), ["unknown tracker", "nosuchtracker"]),
    ("lora-targets", _train("--lora.target_modules", "q,nosuch"),
     ["lora.target_modules", "'nosuch'", "not found"]),
    ("abbreviated-flag", _train("--overwrit"), ["Unknown option 'overwrit'", "--overwrite"]),
    ("missing-value", _train("--seed", "--steps", "3"), ["--seed needs a value"]),
    # train: files and folders
    ("config-latin1", lambda w: ["train", "--config", str(w["bad"] / "latin1.yaml")],
     ["latin1.yaml", "not UTF-8"]),
    ("config-torn-section", lambda w: ["train", "--config", str(w["bad"] / "torn.yaml")],
     ["torn.yaml", "truncated"]),
    ("config-torn-key", lambda w: ["train", "--config", str(w["bad"] / "torn2.yaml")],
     ["torn2.yaml", "truncated"]),
    ("output-under-a-file", lambda w: [*_train()(w), "--output-dir",
                                       str(w["bad"] / "a_file" / "run")],
     ["a_file", "is a file"]),
    ("resume-nothing", _train("--resume"), ["Nothing to resume"]),
    ("resume-and-overwrite", _train("--resume", "--overwrite"), ["pass only one"]),
    ("run-exists", lambda w: [*_train()(w), "--output-dir", str(w["run"])],
     ["already holds a run", "--resume"]),
    ("model-missing", _train("--model.name_or_path", "./no/such/model"),
     ["./no/such/model", "no such local folder"]),
    ("train-data-latin1", lambda w: [*_train()(w), "--data.path", str(w["bad"] / "latin1.jsonl")],
     ["latin1.jsonl", "not UTF-8"]),
    # data: every format
    ("data-jsonl-latin1", _data("--data.path", "{bad}/latin1.jsonl"), ["not UTF-8", "0xe9"]),
    ("data-json-latin1", _data("--data.path", "{bad}/latin1.json"), ["not UTF-8"]),
    ("data-csv-latin1", _data("--data.path", "{bad}/latin1.csv"), ["not UTF-8"]),
    ("data-parquet-binary", _data("--data.path", "{bad}/latin1.parquet"),
     ["'dialogue'", "text"]),
    ("data-missing", _data("--data.path", "{bad}/nope.jsonl"), ["does not exist"]),
    ("data-format", _data("--data.path", "{bad}/rows.txt"), [".jsonl, .json, .csv"]),
    ("data-empty", _data("--data.path", "{bad}/empty.jsonl"), ["is empty"]),
    ("data-test-fraction", _data("--data.test_fraction", "1.5"), ["data.test_fraction"]),
    ("data-output-under-file", _data("--output", "{bad}/a_file/out"), ["is a file"]),
    # evaluate
    ("eval-n-0", _cmd("evaluate", "{run}", "--n", "0"), ["--n", "at least 1"]),
    ("eval-no-run", _cmd("evaluate", "{root}/nowhere"), ["not a training run folder"]),
    ("eval-batch-0", _cmd("evaluate", "{run}", "--batch-size", "0"), ["--batch-size"]),
    ("eval-output-under-file", _cmd("evaluate", "{run}", "--output", "{bad}/a_file/eval"),
     ["--output", "is a file"]),
    ("eval-temperature", _cmd("evaluate", "{run}", "--generation.temperature", "-1"),
     ["generation.temperature"]),
    ("eval-prompts-missing", _cmd("evaluate", "{run}", "--prompts", "{bad}/nope.jsonl"),
     ["--prompts", "not a file"]),
    ("eval-seed", _cmd("evaluate", "{run}", "--seed", "-3"), ["--seed"]),
    # compare
    ("compare-stale-eval", _cmd("compare", "{stale}"), ["another adapter",
                                                        "detoxrl evaluate RUN_DIR"]),
    ("compare-n-0", _cmd("compare", "{run}", "--n", "0"), ["--n", "at least 1"]),
    # report
    ("report-missing", _cmd("report", "{root}/nowhere"), ["does not exist"]),
    ("report-stale-eval", _cmd("report", "{stale}"), ["another adapter",
                                                      "detoxrl evaluate RUN_DIR"]),
    ("report-output-under-file", _cmd("report", "{run}", "--output", "{bad}/a_file/r.html"),
     ["is a file"]),
    # generate
    ("generate-temperature", _cmd("generate", "{run}", "hi", "--temperature", "0"),
     ["--temperature", "> 0"]),
    ("generate-top-p", _cmd("generate", "{run}", "hi", "--top-p", "2"), ["--top-p"]),
    ("generate-no-run", _cmd("generate", "{root}/nowhere", "hi"), ["not a finished run"]),
    ("generate-with", _cmd("generate", "{run}", "hi", "--with", "nobody"), ["--with"]),
    # demo
    ("demo-missing-value", _cmd("demo", "--rl.steps", "--rl.seed", "3"), ["needs a value"]),
    ("demo-unknown", _cmd("demo", "--bogus.x", "1"), ["Cannot read", "--bogus.x"]),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(ws, capfd, name, argv, words):
    args = argv(ws)
    before = _tree_hash(ws["root"])
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert _tree_hash(ws["root"]) == before, "something was written"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(ws, tmp_path, capfd):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = cli.main([*_train()(ws), "--output-dir", str(locked / "run")])
    finally:
        locked.chmod(0o755)
    assert code == 2 and "read-only" in capfd.readouterr().err
    assert not list(locked.iterdir())
