"""``detoxrl evaluate`` and ``detoxrl compare`` on a tiny trained run, end to end.

A 2-step tiny PPO run is trained once per module; the commands run through
``detoxrl.cli.main`` as a user would call them. The "before" responses are checked against
``generate`` on the bare base model (no peft at all), with the same prompts and seeds, so
the reference really is the starting policy. The HTML report is rendered in headless
Chromium when one is installed (``apt-get install chromium``), else that test is skipped.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from detoxrl.cli import main
from detoxrl.commands.evaluate import split_run_dir
from detoxrl.config import load_config
from detoxrl.errors import ConfigError
from detoxrl.evaluation.stats import IMPROVED, NO_CHANGE, WORSE
from detoxrl.models import tiny
from detoxrl.models.generation import collate_queries
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
N, BATCH, MAX_NEW = 16, 8, 8
EVAL_ARGS = ["--n", str(N), "--batch-size", str(BATCH), "--max-new-tokens", str(MAX_NEW),
             "--bootstrap", "2000", "--quiet"]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the
    thread synchronisation makes generation about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache) -> Path:
    from detoxrl.rl.detox_trainer import train

    out = tmp_path_factory.mktemp("eval") / "run"
    train(load_config(ROOT / "configs" / "tiny.yaml", [
        "--steps", "2", "--output_dir", str(out), "--save_every", "0",
        "--generation.max_new_tokens_draw", "8", "--generation.min_new_tokens_draw", "4",
        "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4"]), quiet=True)
    return out


@pytest.fixture(scope="module")
def evaluated(run_dir) -> str:
    code, printed = cli("evaluate", str(run_dir), *EVAL_ARGS)
    assert code == 0
    return printed


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_evaluate_writes_summary_toxicity_and_generations(run_dir, evaluated):
    ev = run_dir / "eval"
    summary = json.loads((ev / "summary.json").read_text())
    tox = summary["metrics"]["toxicity"]
    assert summary["n"] == N and tox["before"]["n"] == N and tox["after"]["n"] == N
    for metric in summary["metrics"].values():
        for boot in metric["bootstrap"].values():
            assert boot["ci_low"] <= boot["ci_high"]
            assert boot["verdict"] in (IMPROVED, WORSE, NO_CHANGE)
    assert set(summary["metrics"]) == {"toxicity", "reward"}
    for side in ("before", "after"):  # tiny:dialogsum has summaries, so ROUGE is there
        assert {"rouge1", "rouge2", "rougeL", "distinct_1", "mean_length"} <= set(
            summary["quality"][side])
        assert 0 < summary["quality"][side]["mean_length"] <= MAX_NEW
    assert np.isfinite(summary["kl"]["mean"])
    settings = summary["settings"]
    assert (settings["n"], settings["max_new_tokens"], settings["decoding"]) == (
        N, MAX_NEW, "sampling")

    toxicity = json.loads((ev / "toxicity.json").read_text())
    assert len(toxicity["before"]) == len(toxicity["after"]) == N
    assert all(0 <= p <= 1 for p in toxicity["before"] + toxicity["after"])
    rows = read_jsonl(ev / "generations.jsonl")
    assert len(rows) == N and len({r["id"] for r in rows}) == N
    assert [r["toxicity_before"] for r in rows] == toxicity["before"]
    assert {"query", "before", "after", "reward_before", "reward_after", "kl"} <= set(rows[0])
    # The trained adapter moved the weights: the after log-probs differ from the reference.
    assert any(abs(r["kl"]) > 0 for r in rows)

    assert "verdict: " in evaluated and "95% CI of change" in evaluated
    assert "rouge1" in evaluated and "KL(trained" in evaluated
    html = (run_dir / "report.html").read_text()
    assert "rouge1" in html and "Δ mean" in html and "toxicity" in html


def test_evaluate_is_deterministic(run_dir, evaluated, tmp_path):
    """A second evaluation with the same seed, called the ad-hoc way (--config + --adapter),
    gives the same responses and rewards. It also adds a judge (the reward model itself)
    and scores query + response, which change what is measured, not what is generated."""
    out = tmp_path / "again"
    code, printed = cli("evaluate", "--reward.max_length", "512",  # an override (a no-op)
                        "--config", str(run_dir / "config.yaml"), "--adapter", str(run_dir),
                        *EVAL_ARGS, "--output", str(out), "--judge", "tiny:roberta-hate",
                        "--score-on", "query+response")
    assert code == 0 and "judge tiny roberta-hate" in printed and "report:" not in printed
    first = read_jsonl(run_dir / "eval" / "generations.jsonl")
    second = read_jsonl(out / "generations.jsonl")
    keys = ("id", "before", "after", "reward_before", "reward_after", "kl")
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["score_on"] == "query+response"
    judge, tox = summary["metrics"]["judge:tiny:roberta-hate"], summary["metrics"]["toxicity"]
    assert judge["before"]["mean"] == pytest.approx(tox["before"]["mean"])
    assert [r["judge:tiny:roberta-hate_after"] for r in second] == pytest.approx(
        [r["toxicity_after"] for r in second])


def test_greedy_ignores_the_seed(run_dir, cache):
    from detoxrl.evaluation import setup
    from detoxrl.evaluation.sampling import generate_before_after

    tgt = setup.resolve_target(str(run_dir), None, None)
    opts = setup.EvalOptions(greedy=True, max_new_tokens=MAX_NEW)
    dec = setup.eval_sampling(tgt.cfg, opts)
    assert not dec.sampling.do_sample and dec.kl_temperature == 1.0
    policy = setup.load_policy(tgt, torch.device("cpu"))
    rows = setup.first_prompts(setup.held_out_prompts(tgt.cfg, policy.tokenizer), 4)
    a, b = (generate_before_after(policy, rows, dec.sampling, dec.max_new_tokens, 4, seed,
                                  dec.kl_temperature, progress=False) for seed in (0, 123))
    assert (a.before, a.after, a.kl) == (b.before, b.after, b.kl)
    assert len(a.kl) == 4 and all(0 < n <= MAX_NEW for n in a.tokens_after)


def test_the_best_of_baseline_needs_no_trained_adapter(run_dir, tmp_path):
    """Both sides of the best-of-N baseline are the starting policy: without the run's
    adapter it draws and scores the same responses; without best_of there is nothing to
    evaluate, and evaluate says so before loading anything."""
    from detoxrl.evaluation import setup
    from detoxrl.evaluation.runner import evaluate

    tgt = setup.resolve_target(str(run_dir), None, None, output=str(tmp_path / "with"))
    opts = setup.EvalOptions(n=3, samples_per_prompt=2, max_new_tokens=MAX_NEW, best_of=2,
                             n_resamples=100, progress=False)
    evaluate(tgt, opts)
    (tmp_path / "bare").mkdir()
    bare = evaluate(setup.Target(tgt.cfg, None, tmp_path / "bare"), opts)
    for name in ("generations.jsonl", "toxicity.json"):
        assert (tmp_path / "bare" / name).read_bytes() == (tmp_path / "with" / name).read_bytes()
    assert bare["settings"]["adapter"] is None and bare["settings"]["adapter_sha256"] is None
    with pytest.raises(ConfigError, match="best_of for the best-of-N baseline"):
        evaluate(setup.Target(tgt.cfg, None, tmp_path / "none"),
                 setup.EvalOptions(n=3, progress=False))
    assert not (tmp_path / "none").exists()


def test_kl_from_sampled_logprobs_equals_the_forward_pass(run_dir, cache):
    """The evaluation reads the trained policy's log-probs while sampling instead of a
    forward pass; the KL per response is the same either way."""
    from detoxrl.evaluation import setup
    from detoxrl.evaluation.sampling import reference_logprobs, sequence_kl
    from detoxrl.models.generation import collate_queries

    tgt = setup.resolve_target(str(run_dir), None, None)
    dec = setup.eval_sampling(tgt.cfg, setup.EvalOptions(max_new_tokens=MAX_NEW))
    policy = setup.load_policy(tgt, torch.device("cpu"))
    rows = setup.first_prompts(setup.held_out_prompts(tgt.cfg, policy.tokenizer), 4)
    q, qm = collate_queries(rows["input_ids"], policy.tokenizer.pad_token_id,
                            policy.padding_side)
    torch.manual_seed(0)
    after = policy.generate(q, qm, dec.sampling, [MAX_NEW] * 4, with_logprobs=True)
    ref = reference_logprobs(policy, after, dec.sampling.temperature)
    read = sequence_kl(policy, after, dec.sampling.temperature, ref, after.logprobs)
    forward = sequence_kl(policy, after, dec.sampling.temperature, ref)
    assert forward.abs().max() > 1e-3                       # a trained adapter: KL is not 0
    torch.testing.assert_close(read, forward, atol=1e-4, rtol=1e-4)


def test_before_is_the_starting_policy(run_dir, evaluated, cache):
    """The reference responses equal the same decoding loop run on the bare base model (no
    peft wrapper at all), batch by batch, from the same seeds."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from detoxrl.evaluation.setup import first_prompts, held_out_prompts
    from detoxrl.models.decoding import decode

    cfg = load_config(run_dir / "config.yaml")
    path = tiny.resolve(cfg.model.name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = first_prompts(held_out_prompts(cfg, tok), N)
    expected = []
    for b, start in enumerate(range(0, N, BATCH)):
        ids, mask = collate_queries(rows[start:start + BATCH]["input_ids"], tok.pad_token_id,
                                    "right")
        torch.manual_seed(cfg.seed + b)
        with torch.no_grad():
            encoder = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            out = decode(model, ids, mask, cfg.generation, MAX_NEW,
                         min(cfg.generation.min_length, MAX_NEW), tok.eos_token_id,
                         tok.pad_token_id, encoder)
        expected += tok.batch_decode(out.tokens, skip_special_tokens=True)
    got = read_jsonl(run_dir / "eval" / "generations.jsonl")
    assert [r["before"] for r in got] == expected


def test_compare_writes_sorted_tables_and_report(run_dir, evaluated):
    code, printed = cli("compare", str(run_dir), "--n", "8", "--batch-size", str(BATCH),
                        "--max-new-tokens", str(MAX_NEW), "--quiet")
    assert code == 0 and "Reused the first 8 rows" in printed
    ev = run_dir / "eval"
    with (ev / "compare.csv").open(newline="") as fh:
        reused = list(csv.DictReader(fh))
    diffs = [float(r["reward_diff"]) for r in reused]
    assert len(reused) == 8 and diffs == sorted(diffs, reverse=True)
    first8 = read_jsonl(ev / "generations.jsonl")[:8]
    assert sorted(r["query"] for r in reused) == sorted(r["query"] for r in first8)
    assert (ev / "compare.md").read_text().startswith("| query | response_before |")
    assert "<table>" in (ev / "compare.html").read_text()

    # Generated afresh by the same loop: batch 0 is evaluate's batch 0, so the same rows.
    code, printed = cli("compare", str(run_dir), "--n", "8", "--batch-size", str(BATCH),
                        "--max-new-tokens", str(MAX_NEW), "--quiet", "--regenerate")
    assert code == 0 and "Reused" not in printed
    with (ev / "compare.csv").open(newline="") as fh:
        fresh = list(csv.DictReader(fh))
    # The same responses in the same order. The rewards agree to float noise only: a
    # classifier's score moves in the last bits with its batch's padding and size, and
    # evaluate scored 16 prompts per call where compare scores 8.
    text = ("query", "response_before", "response_after")
    assert [[r[k] for k in text] for r in fresh] == [[r[k] for k in text] for r in reused]
    for key in ("reward_before", "reward_after", "reward_diff"):
        assert [float(r[key]) for r in fresh] == pytest.approx(
            [float(r[key]) for r in reused], abs=1e-5)
    # An unchanged response is scored once, so its reward gain is exactly 0 (before the
    # fix, before and after were scored in different batches and differed by ~1e-7,
    # which reordered the table's ties).
    for r in fresh + reused:
        if r["response_before"] == r["response_after"]:
            assert float(r["reward_diff"]) == 0.0
    html = (run_dir / "report.html").read_text()
    assert "Responses before and after" in html and "reward_diff" in html


def test_evaluate_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path), "--n", "0"])


def test_best_of_before_any_training_needs_only_a_config(run_dir, tmp_path, capsys):
    """``--config YAML --best-of N`` without an adapter: the baseline of the config's model,
    the same responses as the run folder's best-of evaluation; it needs --output."""
    common = ["--best-of", "2", "--n", "3", "--samples-per-prompt", "2", "--max-new-tokens",
              str(MAX_NEW), "--bootstrap", "100", "--quiet"]
    config = str(run_dir / "config.yaml")
    assert main(["evaluate", str(run_dir), *common, "--output", str(tmp_path / "run")]) == 0
    assert main(["evaluate", "--config", config, *common, "--output",
                 str(tmp_path / "config")]) == 0
    read = {name: read_jsonl(tmp_path / name / "generations.jsonl") for name in ("run", "config")}
    assert [(r["before"], r["after"]) for r in read["config"]] == \
        [(r["before"], r["after"]) for r in read["run"]]
    summary = json.loads((tmp_path / "config" / "summary.json").read_text())
    assert summary["settings"]["adapter"] is None and summary["settings"]["best_of"] == 2
    capsys.readouterr()
    assert main(["evaluate", "--config", config, *common]) == 2
    assert "give --output DIR" in capsys.readouterr().err
    assert main(["evaluate", "--config", config, "--n", "3"]) == 2
    assert "--best-of N alone" in capsys.readouterr().err


def test_run_dir_and_overrides_in_any_order():
    assert split_run_dir(["--reward.model", "m", "runs/x", "--n=3", "steps=2"]) == (
        "runs/x", ["--reward.model", "m", "--n=3", "steps=2"])
    assert split_run_dir(["--data.path", "d.jsonl"]) == (None, ["--data.path", "d.jsonl"])
    with pytest.raises(ConfigError, match="one RUN_DIR"):
        split_run_dir(["a", "b"])


def chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def test_report_renders_in_headless_chromium(run_dir, evaluated, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium binary (apt-get install -y --no-install-recommends chromium)")
    from PIL import Image

    png = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'p'}",
         f"--screenshot={png}", "--window-size=1200,2000",
         (run_dir / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (2000, 1200)
    colors = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colors) > 16 and pixels.std() > 10  # text and figures, not a blank page
