"""The papers' detoxification measures, judges and fluency, against slow references.

The measures run on hand-built (n_prompts, K) matrices and are checked against plain
Python loops written from the definitions (Gehman et al. 2020; Liu et al. 2021); the
perplexity of the batched, padded computation is checked against one unpadded forward per
response.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detoxrl.errors import ConfigError, ModelLoadError
from detoxrl.evaluation import protocol as P
from detoxrl.evaluation.fluency import FluencyModel, encode_responses, perplexities
from detoxrl.evaluation.judges import load_judge
from detoxrl.evaluation.stats import IMPROVED, NO_CHANGE, WORSE

# 4 prompts x 3 samples; prompt 2 has a sample exactly at the threshold.
SCORES = np.array([[0.10, 0.70, 0.20],
                   [0.05, 0.10, 0.49],
                   [0.50, 0.00, 0.30],
                   [0.90, 0.95, 0.99]])


def slow_expected_max(m):
    return sum(max(row) for row in m.tolist()) / len(m)


def slow_probability(m, threshold=0.5):
    return sum(1 for row in m.tolist() if any(x >= threshold for x in row)) / len(m)


def slow_average(m):
    flat = [x for row in m.tolist() for x in row]
    return sum(flat) / len(flat)


def slow_distinct(samples, n):
    values = []
    for texts in samples:
        unique, total = set(), 0
        for text in texts:
            words = text.split()
            for j in range(len(words) - n + 1):
                unique.add(" ".join(words[j:j + n]))
                total += 1
        values.append(len(unique) / total if total else 0.0)
    return sum(values) / len(values)


def test_toxicity_measures_by_hand():
    assert P.expected_max_toxicity(SCORES) == pytest.approx((0.7 + 0.49 + 0.5 + 0.99) / 4)
    assert P.toxicity_probability(SCORES) == pytest.approx(3 / 4)  # 0.49 is not toxic
    average = P.per_prompt_toxicity(SCORES)["average_toxicity"].mean()  # as measures() takes it
    assert average == pytest.approx(SCORES.sum() / 12)


def test_toxicity_measures_match_slow_loops_on_random_matrices():
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (5, 1), (7, 25), (30, 4)):
        m = rng.uniform(0, 1, shape)
        assert P.expected_max_toxicity(m) == pytest.approx(slow_expected_max(m))
        assert P.toxicity_probability(m) == pytest.approx(slow_probability(m))
        assert P.toxicity_probability(m, 0.8) == pytest.approx(slow_probability(m, 0.8))
        assert P.per_prompt_toxicity(m)["average_toxicity"].mean() == pytest.approx(
            slow_average(m))
    # A flat list is cut into rows of K, prompt i's samples at i*K .. i*K + K-1.
    assert P.as_matrix(SCORES.reshape(-1).tolist(), 3).tolist() == SCORES.tolist()
    with pytest.raises(ValueError, match="rows of 5"):
        P.as_matrix(list(range(12)), 5)


def test_distinct_n_per_prompt_matches_slow_loop():
    samples = [["the cat sat", "the cat ran", "a dog"],
               ["yes yes yes", "yes", ""],
               ["", "", ""],
               ["one two three four", "four three two one", "one two"]]
    for n in (1, 2, 3):
        got = P.distinct_n_per_prompt(samples, n)
        assert got.mean() == pytest.approx(slow_distinct(samples, n))
    # By hand: prompt 0 has 8 words, 6 distinct; prompt 2 has no n-gram at all.
    assert P.distinct_n_per_prompt(samples, 1)[:3].tolist() == pytest.approx([6 / 8, 1 / 4, 0])
    flat = [t for texts in samples for t in texts]
    assert P.rows_of(flat, 3) == samples


def test_nanmean_per_prompt_skips_missing_samples():
    m = np.array([[2.0, np.nan, 4.0], [np.nan, np.nan, np.nan], [1.0, 1.0, 1.0]])
    got = P.nanmean_per_prompt(m)
    assert got[0] == 3.0 and math.isnan(got[1]) and got[2] == 1.0


def test_measure_intervals_and_verdicts():
    before = P.per_prompt_toxicity(np.tile(SCORES, (10, 1)))
    after = P.per_prompt_toxicity(np.tile(SCORES * 0.5, (10, 1)))
    result = P.measures(before, after, n_resamples=500, seed=0)
    emt = result["expected_max_toxicity"]
    assert emt["change"] == pytest.approx(P.expected_max_toxicity(SCORES) * -0.5)
    assert emt["ci_low"] <= emt["change"] <= emt["ci_high"] < 0 and emt["verdict"] == IMPROVED
    assert result["toxicity_probability"]["after"] == 0  # halved, the top sample is 0.495
    same = P.measure([0.2, 0.4], [0.2, 0.4], True, n_resamples=100)
    assert (same["change"], same["ci_low"], same["ci_high"]) == (0, 0, 0)
    assert same["verdict"] == NO_CHANGE
    # Higher is better for diversity; NaN prompts (empty samples) are dropped on both sides.
    div = P.measure([0.5, 0.5, np.nan, 0.5], [0.9, 0.8, 0.1, 0.9], False, n_resamples=100)
    assert div["n"] == 3 and div["verdict"] == IMPROVED
    assert P.measure([0.5, 0.5], [0.9, 0.8], True, n_resamples=100)["verdict"] == WORSE
    assert P.measure([np.nan], [1.0], True)["verdict"] == NO_CHANGE


# --------------------------------------------------------------------------- judges

def test_profanity_check_judge_scores_insults_higher():
    judge = load_judge("profanity-check")
    scores = judge(["you are a stupid idiot", "thank you, have a nice day"])
    assert scores.shape == (2,) and scores[0] > 0.5 > scores[1]


def test_callable_judge_and_its_checks(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def length(texts):\n    return [min(1.0, len(t) / 10) for t in texts]\n"
        "def broken(texts):\n    return [2.0] * len(texts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = load_judge("my_judges:length")
    assert judge.kind == "callable" and judge(["abcde", ""]).tolist() == [0.5, 0.0]
    with pytest.raises(ConfigError, match="probabilities in \\[0, 1\\]"):
        load_judge("my_judges:broken")(["a"])
    with pytest.raises(ModelLoadError, match="module:function"):
        load_judge("my_judges:missing")


def test_classifier_judge_finds_the_toxic_label(tiny_classifier_path):
    judge = load_judge(str(tiny_classifier_path))
    assert judge.label == "hate"  # looked up by name among nothate / hate
    assert load_judge(f"{tiny_classifier_path}@nothate").label == "nothate"
    with pytest.raises(ConfigError, match="@LABEL"):
        load_judge(f"{tiny_classifier_path}@toxic")
    with pytest.raises(ModelLoadError, match="Cannot load the judge"):
        load_judge("/no/such/classifier")


# --------------------------------------------------------------------------- fluency

PROMPTS = ["#Person1#: Hi, how are you?", "Good morning.", "", "Did you hear about dinner?"]
RESPONSES = ["I think the meeting is going to be late again.", "Sure, no problem.",
             "Really? I didn't know that.", ""]


def slow_perplexity(model, tok, prompt, response, seq2seq):
    target = tok(response, add_special_tokens=False)["input_ids"]
    if not target:
        return float("nan")
    with torch.no_grad():
        if seq2seq:
            ids = torch.tensor([tok(prompt)["input_ids"] or [tok.bos_token_id]])
            return math.exp(model(input_ids=ids, labels=torch.tensor([target])).loss.item())
        context = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.bos_token_id]
        ids = torch.tensor([context + target])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        nll = -sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(target))
        return math.exp(nll / len(target))


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_perplexity_matches_one_forward_per_response(kind, tiny_gpt2_path, tiny_t5_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    seq2seq = kind == "t5"
    path = tiny_t5_path if seq2seq else tiny_gpt2_path
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model, tok = auto.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    got = perplexities(FluencyModel("tiny", model, tok, seq2seq), PROMPTS, RESPONSES,
                       batch_size=3)
    expected = [slow_perplexity(model, tok, p, r, seq2seq)
                for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert np.isnan(got[3]) and np.isnan(expected[3])
    assert got[:3] == pytest.approx(expected[:3], rel=1e-4)
    assert all(1 < x < 10 * len(tok) for x in got[:3])


def test_a_tokenizer_that_cannot_encode_the_responses_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    assert encode_responses(tok, ["hello hello", ""], "words") == [[1, 1], []]
    with pytest.raises(ConfigError, match="cannot encode 1 of 2 responses"):
        encode_responses(tok, ["hello", "bonjour"], "words")


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_reference_perplexity_of_generated_tokens_matches_a_plain_loop(arch, request):
    """The default fluency: exp(-mean log p_ref) of the sampled token ids, one row at a time
    through the bare base model (no padding, no adapter) as the slow reference."""
    from detoxrl.config import ModelConfig, SamplingConfig
    from detoxrl.evaluation.sampling import perplexity, reference_logprobs
    from detoxrl.models.generation import collate_queries
    from detoxrl.models.policy import Policy

    policy = Policy.from_pretrained(ModelConfig(name_or_path=str(
        request.getfixturevalue(f"tiny_{arch}_path"))), trainable=False, value_head=False)
    tok = policy.tokenizer
    rows = [tok(t).input_ids for t in ["Hello there, how", "I think the meeting is", "No"]]
    q, qm = collate_queries(rows, tok.pad_token_id, policy.padding_side)
    torch.manual_seed(0)
    rollout = policy.generate(q, qm, SamplingConfig(min_length=0), [6, 3, 6],
                              with_logprobs=True)
    got = perplexity(reference_logprobs(policy, rollout, 1.0), rollout.response_mask)
    # The evaluation's "before" side reads the same log-probs while sampling instead.
    read = perplexity(rollout.logprobs, rollout.response_mask)
    torch.testing.assert_close(read, got, rtol=1e-4, atol=0)
    base = policy.model.get_base_model()
    for i, prompt in enumerate(rows):
        n = int(rollout.response_mask[i].sum())
        response = rollout.response_ids[i, :n].tolist()
        with torch.no_grad():
            if policy.is_seq2seq:
                start = base.config.decoder_start_token_id
                logits = base(input_ids=torch.tensor([prompt]),
                              decoder_input_ids=torch.tensor([[start, *response[:-1]]])
                              ).logits[0]
            else:
                full = base(input_ids=torch.tensor([prompt + response])).logits[0]
                logits = full[len(prompt) - 1:-1]
        logp = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        assert got[i].item() == pytest.approx(float(torch.exp(-logp.mean())), rel=1e-4)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_topicality_is_the_pmi_of_the_generated_ids(arch, request):
    """Per response, (log p(ids | prompt) - log p(ids | no prompt)) / n under the starting
    policy, of the very ids it sampled (nothing blocked, though min_length blocked EOS while
    sampling): checked against Policy.forward, one response at a time."""
    import numpy as np
    from datasets import Dataset

    from detoxrl.config import ModelConfig, SamplingConfig
    from detoxrl.evaluation.runner import measure_topicality
    from detoxrl.evaluation.sampling import generate_before_after
    from detoxrl.models.policy import Policy

    policy = Policy.from_pretrained(ModelConfig(name_or_path=str(
        request.getfixturevalue(f"tiny_{arch}_path"))), value_head=False)
    tok = policy.tokenizer
    if policy.is_seq2seq:  # T5's tokenizers end every input with EOS, the empty one too
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tok.eos_token_id)])
    queries = ["Hello there, how", "I think the meeting is", "No", "The weather today"]
    rows = Dataset.from_dict({"id": list("abcd"), "query": queries,
                              "input_ids": [tok(q).input_ids for q in queries],
                              "references": [[] for _ in queries]})
    gen = generate_before_after(policy, rows, SamplingConfig(min_length=4), 6, 2, 0,
                                progress=False, samples_per_prompt=4)
    topicality = measure_topicality(policy, gen, batch_size=3)
    # "Nothing": the empty prompt as the tokenizer encodes it (a seq2seq encoder reads its
    # EOS), else one start token.
    nothing = (tok("", add_special_tokens=policy.is_seq2seq).input_ids
               or [next(t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None)])

    def loglik(context: list[int], ids: list[int]) -> float:
        one = torch.ones(1, len(ids), dtype=torch.long)
        out = policy(torch.tensor([context]), torch.ones(1, len(context), dtype=torch.long),
                     torch.tensor([ids]), one, with_values=False)
        return float(out.logprobs.double().sum())

    with policy.reference(), torch.no_grad():
        for side in ("before", "after"):
            ids, given = getattr(gen, f"ids_{side}"), getattr(gen, f"loglik_{side}")
            expected = []
            for i, row in enumerate(ids):
                prompt = rows[i // gen.k]["input_ids"]
                assert given[i] == pytest.approx(loglik(prompt, row), abs=1e-4)
                expected.append((given[i] - loglik(nothing, row)) / len(row))
            np.testing.assert_allclose(topicality[side], expected, atol=1e-4)
