"""The measures that see a register collapse, the judge's floor, and best-of-N reranking.

Pure functions against slow loops and hand counts; best-of-N against the reference's own
N samples drawn with the same seed; ``detoxrl evaluate --best-of --judge-floor`` end to end
on a tiny GPT-2, every new figure recomputed from generations.jsonl.
"""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from detoxrl.errors import DataError
from detoxrl.evaluation import protocol as P
from detoxrl.evaluation.floor import (
    floor_of,
    judge_floor,
    max_of_k_weights,
    read_clean_texts,
    with_excess,
)
from detoxrl.evaluation.quality import distinct_n
from detoxrl.evaluation.stats import HIGHER, LOWER, NO_CHANGE, verdict
from helpers import cli
from test_evaluate_protocol import causal_run, read_jsonl, write_rtp

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "mat", "park"]


def test_set_distinct_n_means_to_the_distinct_n_of_all_samples():
    rng = random.Random(0)
    samples = [[" ".join(rng.choices(WORDS, k=rng.randint(0, 8))) for _ in range(3)]
               for _ in range(7)]
    for n in (1, 2):
        per_prompt = P.set_distinct_n_per_prompt(samples, n)
        assert per_prompt.shape == (7,)
        assert per_prompt.mean() == pytest.approx(
            distinct_n([t for row in samples for t in row], n))
    assert P.set_distinct_n_per_prompt([[""], [""]], 2).tolist() == [0.0, 0.0]


def test_one_register_is_seen_by_the_set_distinct_n_only():
    varied = [[f"w{i} x{i} y{i}", f"z{i} q{i} r{i}"] for i in range(10)]
    one_register = [["yes I am here", "no you are there"] for _ in range(10)]
    within = {name: P.distinct_n_per_prompt(s, 2).mean()
              for name, s in (("varied", varied), ("one", one_register))}
    assert within["varied"] == within["one"] == 1.0   # every prompt's own samples differ
    m = P.measure(P.set_distinct_n_per_prompt(varied, 2),
                  P.set_distinct_n_per_prompt(one_register, 2), False, n_resamples=500)
    assert m["before"] == pytest.approx(1.0) and m["after"] == pytest.approx(5 / 50)
    assert m["verdict"] == "worse" and m["relative"] == pytest.approx(-0.9)


def test_perplexity_under_the_start_has_no_better_direction():
    assert verdict(-0.4, -0.1, None) == LOWER and verdict(0.1, 0.4, None) == HIGHER
    assert verdict(-0.1, 0.1, None) == NO_CHANGE
    fell = P.measure([100.0, 120.0, 90.0], [60.0, 70.0, 50.0], None, n_resamples=200)
    assert fell["verdict"] == LOWER and fell["lower_is_better"] is None
    assert fell["relative"] == pytest.approx(180 / 310 - 1)


def test_floor_is_the_expectation_over_every_group_of_k():
    scores = np.array([0.1, 0.7, 0.3, 0.3])
    k = 3
    groups = list(itertools.product(scores, repeat=k))    # every draw with replacement
    got = floor_of(scores, k)
    assert got["expected_max_toxicity"] == pytest.approx(np.mean([max(g) for g in groups]))
    assert got["toxicity_probability"] == pytest.approx(
        np.mean([max(g) >= 0.5 for g in groups]))
    assert max_of_k_weights(5, 4).sum() == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    many = rng.beta(1, 6, size=400)
    boot = judge_floor(many, 25, n_resamples=400, seed=0)
    for name in ("expected_max_toxicity", "toxicity_probability"):
        f = boot[name]
        assert f["ci_low"] <= f["value"] <= f["ci_high"]
        assert f["value"] == pytest.approx(floor_of(many, 25)[name])
    assert boot["texts"] == 400 and boot["samples_per_group"] == 25


def test_excess_over_the_floor_by_hand():
    measures = {"expected_max_toxicity": {"before": 0.5, "after": 0.3, "change": -0.2},
                "toxicity_probability": {"before": 0.2, "after": 0.25, "change": 0.05},
                "average_toxicity": {"before": 0.1, "after": 0.1, "change": 0.0}}
    floor = {"expected_max_toxicity": {"value": 0.25}, "toxicity_probability": {"value": 0.3}}
    got = with_excess(measures, floor)
    emt = got["expected_max_toxicity"]
    assert (emt["floor"], emt["excess_before"]) == (0.25, 0.25)
    assert emt["excess_after"] == pytest.approx(0.05)
    assert emt["excess_removed"] == pytest.approx(0.8)
    assert np.isnan(got["toxicity_probability"]["excess_removed"])  # starts under the floor
    assert got["average_toxicity"] == measures["average_toxicity"]
    assert "floor" not in measures["expected_max_toxicity"], "the input is left alone"
    # A start inside the floor's interval has no excess to speak of.
    unsure = {**floor, "expected_max_toxicity": {"value": 0.25, "ci_high": 0.55}}
    assert np.isnan(with_excess(measures, unsure)["expected_max_toxicity"]["excess_removed"])


def _rtp(prompt: str, text: str, toxicity) -> str:
    return json.dumps({"prompt": {"text": prompt},
                       "continuation": {"text": text, "toxicity": toxicity}}) + "\n"


def test_clean_texts_are_perspective_clean_continuations_or_lines(tmp_path):
    records = tmp_path / "rtp.jsonl"
    records.write_text(_rtp("A", " clean one", 0.0) + _rtp("B", " rude", 0.6)
                       + _rtp("C", " unscored", None) + "\n" + _rtp("D", " edge", 0.1)
                       + _rtp("E", " clean two", 0.09))
    lines = tmp_path / "clean.txt"
    lines.write_text("first text\n\n  second text \n")
    assert read_clean_texts([records, lines]) == [
        ("A", " clean one"), ("E", " clean two"), ("", "first text"), ("", "second text")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_rtp("A", " ok", 0.0) + '{"prompt": {"text": "x"}}\n')
    with pytest.raises(DataError, match="line 2"):
        read_clean_texts([bad])
    none = tmp_path / "none.jsonl"
    none.write_text(_rtp("A", " rude", 0.9))
    with pytest.raises(DataError, match="no clean text"):
        read_clean_texts([none])
    with pytest.raises(DataError, match="is not a file"):
        read_clean_texts([tmp_path / "missing.txt"])


def _length_reward(queries, responses):
    """Higher for longer responses: easy to recompute by hand."""
    return [len(r) + 0.01 * len(q) for q, r in zip(queries, responses, strict=True)]


def test_best_of_n_keeps_the_top_scored_of_each_group(tiny_gpt2_path):
    from detoxrl.config import ModelConfig, SamplingConfig
    from detoxrl.evaluation.sampling import best_of_n
    from detoxrl.models.generation import collate_queries
    from detoxrl.models.policy import Policy

    policy = Policy.from_pretrained(ModelConfig(name_or_path=str(tiny_gpt2_path)),
                                    trainable=False, value_head=False)
    sampling = SamplingConfig(min_new_tokens_draw=6, max_new_tokens_draw=6, min_length=2)
    queries = ["Hello there", "The weather is"]
    ids = [policy.tokenizer(q)["input_ids"] for q in queries]
    q, qm = collate_queries(ids, policy.tokenizer.pad_token_id, policy.padding_side)
    k, n = 2, 3
    torch.manual_seed(5)
    with policy.reference():
        drawn = policy.generate(q, qm, sampling, [6, 6], queries, num_return_sequences=k * n)
    torch.manual_seed(5)
    best = best_of_n(policy, q, qm, sampling, [6, 6], queries, k, n, _length_reward)
    assert len(best) == len(queries) * k and best.queries == [queries[0]] * 2 + [queries[1]] * 2
    for g in range(len(queries) * k):
        group = drawn.responses[g * n:(g + 1) * n]
        scores = _length_reward(drawn.queries[g * n:(g + 1) * n], group)
        assert best.responses[g] == group[int(np.argmax(scores))]


def test_evaluate_best_of_with_the_judge_floor(tmp_path, cache):
    train = [f"Prompt number {i} says that the meeting" for i in range(8)]
    run = causal_run(tmp_path, write_rtp(tmp_path / "train.jsonl", train))
    prompts = write_rtp(tmp_path / "eval.jsonl", ["You are not", "I can't stand",
                                                 "Did you hear", "We should"])
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(_rtp(f"P{i}", f" a calm sentence number {i}", 0.01)
                             for i in range(30)) + _rtp("Q", " you idiot", 0.9))
    out, k = tmp_path / "bestof", 3
    code, printed = cli("evaluate", str(run), "--n", "all", "--prompts", str(prompts),
                        "--max-new-tokens", "6", "--samples-per-prompt", str(k),
                        "--bootstrap", "300", "--quiet", "--judge", "profanity-check",
                        "--judge-floor", str(clean), "--best-of", "3", "--output", str(out))
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    proto, rows = summary["protocol"], read_jsonl(out / "generations.jsonl")
    assert proto["best_of"] == 3 and summary["settings"]["best_of"] == 3
    assert "kl" not in rows[0] and "kl" not in summary, "reranking has no KL"
    # Reranked by the run's reward: after beats before on it in every prompt's mean.
    reward = {s: np.array([r[f"reward_{s}"] for r in rows]).reshape(-1, k).mean(1)
              for s in ("before", "after")}
    assert (reward["after"] >= reward["before"] - 1e-6).mean() >= 0.75
    judge = proto["toxicity"]["profanity-check"]
    assert judge["floor"]["texts"] == 30 and judge["floor"]["samples_per_group"] == k
    emt = judge["measures"]["expected_max_toxicity"]
    assert emt["floor"] == judge["floor"]["expected_max_toxicity"]["value"]
    assert emt["excess_before"] == pytest.approx(emt["before"] - emt["floor"])
    if emt["excess_before"] > 0:
        assert emt["excess_removed"] == pytest.approx(-emt["change"] / emt["excess_before"])
    for side in ("before", "after"):
        texts = [[r[side] for r in rows[i:i + k]] for i in range(0, len(rows), k)]
        assert proto["diversity"]["set_distinct_2"][side] == pytest.approx(
            distinct_n([t for row in texts for t in row], 2))
    pmi = proto["topicality"]["pmi"]
    assert np.isfinite(pmi["before"]) and pmi["ci_low"] <= pmi["change"] <= pmi["ci_high"]
    assert proto["fluency"]["perplexity"]["verdict"] in (HIGHER, LOWER, NO_CHANGE)
    assert "after (best of 3)" in printed and "of it removed" in printed
    assert "Dist-2 set" in printed and "Topic. PMI" in printed
