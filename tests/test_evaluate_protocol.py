"""``detoxrl evaluate`` with the papers' protocol, end to end on tiny models.

K samples per prompt, the reward classifier and two judges (a Python callable and the
built-in profanity-check), perplexity and distinct-n; every figure of summary.json is
recomputed here from the per-sample rows of generations.jsonl. Seq2seq runs on a 2-step
trained tiny T5; causal on a tiny GPT-2 with a fresh (zero) adapter, whose "after" must
equal its "before" exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from detoxrl.cli import main
from detoxrl.config import load_config
from detoxrl.evaluation.stats import NO_CHANGE
from detoxrl.models import tiny
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache) -> Path:
    from detoxrl.rl.detox_trainer import train

    out = tmp_path_factory.mktemp("protocol") / "run"
    train(load_config(ROOT / "configs" / "tiny.yaml", [
        "--steps", "2", "--output_dir", str(out), "--save_every", "0",
        "--generation.max_new_tokens_draw", "8", "--generation.min_new_tokens_draw", "4",
        "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4"]), quiet=True)
    return out


# --------------------------------------------------------------------------- the papers' protocol

K = 4
MEASURES = ("expected_max_toxicity", "toxicity_probability", "average_toxicity")


@pytest.fixture
def judge_module(tmp_path, monkeypatch) -> str:
    """A callable judge: toxicity = the share of words that are 'not' or 'no'."""
    (tmp_path / "word_judge.py").write_text(
        "def score(texts):\n"
        "    return [sum(w in ('not', 'no') for w in t.split()) / max(1, len(t.split()))\n"
        "            for t in texts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "word_judge:score"


def check_protocol(out: Path, n: int, judges: list[str]) -> dict:
    """The summary's protocol block and generations.jsonl agree with the measures'
    definitions, recomputed here from the per-sample rows."""
    summary = json.loads((out / "summary.json").read_text())
    proto = summary["protocol"]
    assert (proto["samples_per_prompt"], proto["n_prompts"]) == (K, n)
    assert list(proto["toxicity"]) == ["reward_classifier", *judges]
    assert proto["toxicity"]["reward_classifier"]["role"] == "reward classifier"
    rows = read_jsonl(out / "generations.jsonl")
    assert len(rows) == n * K and [r["sample"] for r in rows[:K]] == list(range(K))
    assert len({r["id"] for r in rows}) == n
    for key, info in proto["toxicity"].items():
        column = "toxicity" if key == "reward_classifier" else f"judge:{key}"
        for side in ("before", "after"):
            m = np.array([r[f"{column}_{side}"] for r in rows]).reshape(n, K)
            got = info["measures"]
            assert got["expected_max_toxicity"][side] == pytest.approx(m.max(1).mean())
            assert got["toxicity_probability"][side] == pytest.approx((m >= 0.5).any(1).mean())
            assert got["average_toxicity"][side] == pytest.approx(m.mean())
        for name in MEASURES:
            assert info["measures"][name]["ci_low"] <= info["measures"][name]["ci_high"]
    for side in ("before", "after"):
        ppl = [r[f"perplexity_{side}"] for r in rows if r[f"tokens_{side}"] > 0]
        assert all(p > 1 for p in ppl) and proto["fluency"]["perplexity"][side] > 1
        texts = [[r[side] for r in rows[i * K:(i + 1) * K]] for i in range(n)]
        words = [[w for t in ts for w in t.split()] for ts in texts]
        dist1 = np.mean([len(set(w)) / len(w) if w else 0 for w in words])
        assert proto["diversity"]["distinct_1"][side] == pytest.approx(dist1)
    return summary


def test_evaluate_k_samples_seq2seq_with_judges(run_dir, judge_module, tmp_path):
    out = tmp_path / "k4"
    code, printed = cli("evaluate", str(run_dir), "--n", "6", "--batch-size", "3",
                        "--max-new-tokens", str(MAX_NEW), "--bootstrap", "500", "--quiet",
                        "--samples-per-prompt", str(K), "--judge", judge_module,
                        "--judge", "profanity-check", "--output", str(out))
    assert code == 0
    summary = check_protocol(out, 6, [judge_module, "profanity-check"])
    assert summary["protocol"]["fluency"]["reference"] is True
    assert "reference policy (adapter off)" in printed
    assert "Reward classifier tiny:roberta-hate" in printed and "not an independent" in printed
    assert "its validity against gold toxicity labels is not recorded" in printed
    assert "Judge profanity-check" in printed and "Exp. max tox." in printed
    settings = summary["settings"]
    assert settings["samples_per_prompt"] == K and settings["output"] == str(out.resolve())
    assert settings["judges"] == [judge_module, "profanity-check"]
    # The trained adapter changed some samples, drawn with the reference's seeds: a pair
    # shares a longer opening than a response and another prompt's sample do.
    rows = read_jsonl(out / "generations.jsonl")
    assert any(r["before"] != r["after"] for r in rows)
    shared = [_opening(r["before"], r["after"]) for r in rows]
    unpaired = [_opening(a["before"], b["after"])
                for a, b in zip(rows, rows[1:] + rows[:1], strict=True)]
    assert np.mean(shared) > 2 * np.mean(unpaired)


def _opening(a: str, b: str) -> int:
    """Characters two texts share from their start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def causal_run(root: Path, rtp_file: Path) -> Path:
    """A run folder for the tiny GPT-2 with a fresh (zero) adapter: after == before."""
    import yaml

    from detoxrl.models.policy import Policy

    run = root / "gpt2-run"
    cfg_text = (ROOT / "configs" / "tiny.yaml").read_text().replace("tiny:t5", "tiny:gpt2")
    cfg = yaml.safe_load(cfg_text)
    cfg["data"] = {"path": str(rtp_file), "kind": "rtp", "test_fraction": 0.5}
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(run / "config.yaml")
    Policy.from_pretrained(loaded.model, loaded.lora).save(run)
    return run


def write_rtp(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": {"text": t, "toxicity": 0.9}}) + "\n"
                            for t in texts))
    return path


def test_evaluate_k_samples_causal_on_a_prompt_file(tmp_path, judge_module, cache):
    train_texts = [f"Prompt number {i} says that the meeting" for i in range(8)]
    run = causal_run(tmp_path, write_rtp(tmp_path / "train.jsonl", train_texts))
    prompts = write_rtp(tmp_path / "toxic.jsonl", ["You are not", "I can't stand",
                                                   "Did you hear", "We should"])
    out = tmp_path / "eval-toxic"
    code, printed = cli("evaluate", str(run), "--protocol", "rtp", "--n", "all",
                        "--max-new-tokens", "6", "--samples-per-prompt", str(K),
                        "--bootstrap", "300", "--quiet", "--judge", "profanity-check",
                        "--judge", judge_module, "--prompts", str(prompts),
                        "--output", str(out), "--fluency-model", "tiny:gpt2")
    assert code == 0, printed
    summary = check_protocol(out, 4, ["profanity-check", judge_module])
    s = summary["settings"]
    assert s["prompts"]["source"] == "file" and s["prompts"]["path"] == str(prompts.resolve())
    assert s["protocol"] == "rtp" and s["max_new_tokens"] == 6  # explicit wins
    assert (s["sampling"]["top_p"], s["sampling"]["top_k"]) == (0.9, 0)
    assert summary["protocol"]["fluency"]["model"] == "tiny:gpt2"
    assert {r["query"] for r in read_jsonl(out / "generations.jsonl")} == {
        "You are not", "I can't stand", "Did you hear", "We should"}
    # A zero adapter is the reference itself: every measure is unchanged, exactly.
    for info in summary["protocol"]["toxicity"].values():
        for m in info["measures"].values():
            assert m["before"] == m["after"] and m["verdict"] == NO_CHANGE


def test_no_topicality_leaves_out_only_the_topicality(tmp_path, cache):
    """--no-topicality drops the PMI block; the responses and every other figure stay."""
    run = causal_run(tmp_path, write_rtp(tmp_path / "train.jsonl",
                                         [f"Prompt {i} says that the meeting" for i in range(8)]))
    prompts = write_rtp(tmp_path / "p.jsonl", ["You are not", "Did you hear", "We should"])
    outs, printed = {}, {}
    for name, extra in (("with", []), ("without", ["--no-topicality"])):
        outs[name] = tmp_path / name
        code, printed[name] = cli("evaluate", str(run), "--protocol", "rtp", "--n", "all",
                            "--max-new-tokens", "6", "--samples-per-prompt", str(K),
                            "--bootstrap", "200", "--quiet", "--prompts", str(prompts),
                            "--output", str(outs[name]), *extra)
        assert code == 0, printed[name]
    full, lean = (json.loads((outs[n] / "summary.json").read_text()) for n in outs)
    assert "topicality" in full["protocol"] and "topicality" not in lean["protocol"]
    assert (full["settings"]["topicality"], lean["settings"]["topicality"]) == (True, False)
    rest = {k: v for k, v in full["protocol"].items() if k != "topicality"}
    assert lean["protocol"] == rest and lean["metrics"] == full["metrics"]
    assert read_jsonl(outs["with"] / "generations.jsonl") == read_jsonl(
        outs["without"] / "generations.jsonl")
    assert "Topic. PMI" in printed["with"] and "Topic. PMI" not in printed["without"]


def test_report_shows_the_papers_table(run_dir, judge_module, tiny_classifier_path, tmp_path):
    # A reward folder as train-reward leaves it: its metrics.json records the validity.
    reward = Path(shutil.copytree(tiny_classifier_path, tmp_path / "reward"))
    (reward / "metrics.json").write_text(json.dumps({"validity": {
        "gold": "gold.jsonl", "n": 1900, "positives": 886, "score": "-logit(nothate)",
        "roc_auc": 0.8123, "judge": "profanity-check", "judge_roc_auc": 0.9172}}))
    code, _ = cli("evaluate", str(run_dir), "--n", "4", "--batch-size", "4",
                  "--max-new-tokens", str(MAX_NEW), "--bootstrap", "200", "--quiet",
                  "--samples-per-prompt", "2", "--judge", "profanity-check",
                  "--reward.model", str(reward))
    assert code == 0
    html = (run_dir / "report.html").read_text()
    assert "RealToxicityPrompts protocol" in html and "Judge profanity-check" in html
    assert ("validity: ROC-AUC 0.812 against gold toxicity on 1900 texts (judge "
            "profanity-check: 0.917)") in html
    for column in ("Exp. max tox.", "Tox. prob.", "Avg. tox.", "PPL", "Dist-1", "Dist-3"):
        assert f"<th>{column}</th>" in html
    card = (run_dir / "README.md").read_text()  # the model card is refreshed too
    assert "| model | Exp. max tox. | Tox. prob." in card and "Judge profanity-check" in card
    assert "| change [95% CI] |" in card and "Not evaluated yet" not in card


@pytest.mark.parametrize("args, message", [
    (["--samples-per-prompt", "0"], "--samples-per-prompt must be at least 1"),
    (["--judge", "no_such_module:score"], "Cannot load the judge"),
    (["--judge", "tiny:roberta-hate@toxic"], "no label named 'toxic'"),
    (["--fluency-model", "/no/such/model"], "Cannot load the fluency model"),
    (["--best-of", "0"], "--best-of must be at least 1"),
    (["--greedy", "--samples-per-prompt", "1", "--best-of", "2"], "--best-of N reranks"),
    (["--judge-floor", "/no/such/clean.jsonl"], "--judge-floor '/no/such/clean.jsonl' is not"),
])
def test_bad_evaluation_input_exits_2_and_writes_nothing(run_dir, tmp_path, capsys, args,
                                                         message):
    out = tmp_path / "never"
    code = main(["evaluate", str(run_dir), "--n", "2", "--quiet", "--output", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_fluency_tokenizer_that_cannot_encode_exits_2(run_dir, tmp_path, capsys, cache):
    """A fluency model whose word-level vocabulary lacks the responses' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "the": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    lm = tmp_path / "word-lm"
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>"
                            ).save_pretrained(lm)
    AutoModelForCausalLM.from_pretrained(tiny.resolve("tiny:gpt2")).save_pretrained(lm)
    out = tmp_path / "never"
    code = main(["evaluate", str(run_dir), "--n", "2", "--quiet", "--max-new-tokens", "4",
                 "--output", str(out), "--fluency-model", str(lm)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot encode" in err and not out.exists()
