"""Topicality: the evaluation's prompt-response PMI against one forward pass per response,
and bench/topicality.py (which recomputes it) end to end on a hand-made generations file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import load_bench

PROMPTS = ["#Person1#: Did you hear about dinner?", "Good morning.", "Hello."]
RESPONSES = ["I think dinner is going to be late again.", "Sure, no problem.", ""]


def mean_nll(model, context: list[int], target: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([context + target])).logits[0], -1)
    return -sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(target)) / len(target)


def test_pmi_is_what_the_prompt_saves_per_token(tiny_gpt2_path):
    from detoxrl.evaluation.fluency import load_fluency_model, pmi

    fm = load_fluency_model(str(tiny_gpt2_path), torch.device("cpu"))
    got = pmi(fm, PROMPTS, RESPONSES, batch_size=2)
    tok = fm.tokenizer
    start = next(t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None)
    for i in range(2):
        target = tok(RESPONSES[i], add_special_tokens=False)["input_ids"]
        context = tok(PROMPTS[i], add_special_tokens=False)["input_ids"]
        expected = mean_nll(fm.model, [start], target) - mean_nll(fm.model, context, target)
        assert got[i] == pytest.approx(expected, abs=1e-4)
    assert np.isnan(got[2])


def test_topicality_script_compares_prompt_means(tiny_gpt2_path, tmp_path):
    topicality = load_bench("topicality")
    rows = [{"id": str(i // 2), "sample": i % 2, "query": PROMPTS[i // 2],
             "before": RESPONSES[i % 2], "after": RESPONSES[(i + 1) % 2]} for i in range(4)]
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "topicality.json"
    assert topicality.main([str(generations), "--model", str(tiny_gpt2_path),
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["responses"], result["prompts"]) == (4, 2)
    assert result["change"] == pytest.approx(result["after"] - result["before"])
    assert result["ci95"][0] <= result["change"] <= result["ci95"][1]
    assert result["verdict"] in ("improved", "worse", "no significant change")
