"""ClassifierReward: labels by name, logit/prob outputs, batching, truncation, the contract."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from detoxrl.config import RewardConfig
from detoxrl.errors import ConfigError, ModelLoadError
from detoxrl.models.reward import ClassifierReward, RewardSet

PROMPTS = ["Summarize the following conversation.\n\n#Person1#: Hi.\n\nSummary:\n"] * 4
RESPONSES = ["They talk about the weather.", "I can't stand the meeting any more.",
             "#Person1# asks #Person2# about dinner and the new office.", "Sure, no problem."]


def _manual_logits(path, tokenizer, texts, max_length=None) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    enc = tokenizer(texts, padding=True, truncation=max_length is not None,
                    max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _copy_classifier(src, dst, tokenizer, id2label=None, bias=None):
    """Save a copy of the tiny classifier with other label names or a shifted head bias."""
    model = AutoModelForSequenceClassification.from_pretrained(src)
    if id2label is not None:
        model.config.id2label = id2label
        model.config.label2id = {name: i for i, name in id2label.items()}
    if bias is not None:
        with torch.no_grad():
            model.classifier.out_proj.bias.copy_(torch.tensor(bias))
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def reward(tiny_classifier_path):
    return ClassifierReward(str(tiny_classifier_path), device="cpu")


def test_reward_is_the_named_label_logit(reward, tiny_classifier_path, tokenizer):
    logits = _manual_logits(tiny_classifier_path, tokenizer, RESPONSES)
    index = reward.model.config.label2id["nothate"]
    scores = reward(PROMPTS, RESPONSES)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, logits[:, index], atol=1e-5, rtol=0)
    torch.testing.assert_close(reward.label_scores(RESPONSES, "hate", "logit"),
                               logits[:, reward.model.config.label2id["hate"]], atol=1e-5, rtol=0)


def test_label_is_read_even_when_the_other_label_wins(tiny_classifier_path, tokenizer, tmp_path):
    # Shift the head so that 'hate' wins on every input: the tutorial's "top label" would
    # then have returned the hate logit as the reward.
    path = _copy_classifier(tiny_classifier_path, tmp_path / "hateful", tokenizer,
                            bias=[0.0, 5.0])
    logits = _manual_logits(path, tokenizer, RESPONSES)
    assert (logits.argmax(-1) == 1).all()
    scores = ClassifierReward(str(path), device="cpu")(PROMPTS, RESPONSES)
    torch.testing.assert_close(scores, logits[:, 0], atol=1e-5, rtol=0)
    assert (scores < logits.max(-1).values).all()


def test_name_not_position_decides(reward, tiny_classifier_path, tokenizer, tmp_path):
    swapped = _copy_classifier(tiny_classifier_path, tmp_path / "swapped", tokenizer,
                               id2label={0: "hate", 1: "nothate"})
    scores = ClassifierReward(str(swapped), device="cpu")(PROMPTS, RESPONSES)
    # Same weights, names swapped: 'nothate' is now column 1, the original 'hate' column.
    torch.testing.assert_close(scores, reward.label_scores(RESPONSES, "hate"), atol=1e-5, rtol=0)


def test_prob_is_the_softmax(reward, tiny_classifier_path, tokenizer):
    probs = _manual_logits(tiny_classifier_path, tokenizer, RESPONSES).softmax(-1)
    torch.testing.assert_close(reward.label_scores(RESPONSES, "nothate", "prob"), probs[:, 0],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(reward.toxicity(RESPONSES), probs[:, 1], atol=1e-6, rtol=0)
    total = reward.toxicity(RESPONSES) + reward.label_scores(RESPONSES, "nothate", "prob")
    torch.testing.assert_close(total, torch.ones(4))


def test_wrong_label_names_the_real_ones(reward, tiny_classifier_path):
    with pytest.raises(ConfigError, match="'nothate', 'hate'"):
        ClassifierReward(str(tiny_classifier_path), label="toxic", device="cpu")
    with pytest.raises(ConfigError, match="'nothate', 'hate'"):
        reward.label_scores(RESPONSES, "NOTHATE")


def test_bad_choices_are_config_errors(tiny_classifier_path):
    with pytest.raises(ConfigError, match=r"reward\.output"):
        ClassifierReward(str(tiny_classifier_path), output="score")
    with pytest.raises(ConfigError, match=r"reward\.score_on"):
        ClassifierReward(str(tiny_classifier_path), score_on="prompt")


def test_batch_size_does_not_change_scores(tiny_classifier_path):
    texts = [" ".join(["word"] * n) + " the meeting" for n in range(1, 40, 3)] + [""]
    small = ClassifierReward(str(tiny_classifier_path), batch_size=2, device="cpu")
    large = ClassifierReward(str(tiny_classifier_path), batch_size=64, device="cpu")
    torch.testing.assert_close(small.label_scores(texts, "nothate"),
                               large.label_scores(texts, "nothate"), atol=1e-5, rtol=0)


def test_long_texts_are_truncated_to_max_length(reward, tiny_classifier_path, tokenizer):
    long_text = "I can't stand the meeting any more. " * 2000
    assert reward.max_length == 512  # tokenizer 512, positions 513 - (pad 0 + 1)
    assert reward.label_scores([long_text], "nothate").isfinite().all()
    short = ClassifierReward(str(tiny_classifier_path), max_length=16, device="cpu")
    expected = _manual_logits(tiny_classifier_path, tokenizer, [long_text], max_length=16)
    torch.testing.assert_close(short.label_scores([long_text], "nothate"), expected[:, 0],
                               atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="exceeds"):
        capped = ClassifierReward(str(tiny_classifier_path), max_length=100_000, device="cpu")
    assert capped.max_length == 512


def test_query_plus_response_scores_the_concatenation(tiny_classifier_path, reward):
    joint = ClassifierReward(str(tiny_classifier_path), score_on="query+response", device="cpu")
    scores = joint(PROMPTS, RESPONSES)
    assert not torch.allclose(scores, reward(PROMPTS, RESPONSES))
    concatenated = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    torch.testing.assert_close(scores, reward.label_scores(concatenated, "nothate"))


def test_model_is_frozen_and_scores_are_plain_tensors(reward):
    assert not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    scores = reward(PROMPTS, RESPONSES)
    assert not scores.requires_grad
    scores -= 1.0  # in-place edits (penalties) work: not an inference-mode tensor
    assert reward([], []).shape == (0,)


def test_any_callable_is_a_reward(reward):
    def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(len(r.split())) for r in responses]

    for fn in (length_reward, lambda p, r: torch.zeros(len(r)), reward):
        scores = RewardSet([fn])(PROMPTS, RESPONSES)  # what the learner calls
        assert scores.shape == (4,) and scores.dtype == torch.float32
    assert RewardSet([length_reward])(PROMPTS, RESPONSES).tolist() == [5.0, 7.0, 9.0, 3.0]
    with pytest.raises(ValueError, match="one score per completion"):
        RewardSet([lambda p, r: torch.zeros(len(r), 2)])(PROMPTS, RESPONSES)


def test_from_config_and_load_errors(tiny_classifier_path, tmp_path):
    cfg = RewardConfig(model=str(tiny_classifier_path), output="prob", batch_size=3)
    built = ClassifierReward.from_config(cfg, device="cpu")
    assert (built.output, built.batch_size, built.label) == ("prob", 3, "nothate")
    missing = tmp_path / "no-such-classifier"
    with pytest.raises(ModelLoadError, match=r"no-such-classifier.*local folder"):
        ClassifierReward(str(missing), device="cpu")


def test_toxicity_and_reward_of_the_same_texts_share_one_classifier_pass(tiny_classifier_path):
    from detoxrl.evaluation.sampling import Generations
    from detoxrl.evaluation.scoring import score_generations, scoring_jobs

    reward = ClassifierReward(str(tiny_classifier_path), batch_size=2, device="cpu")
    reward.toxic_label = "hate"
    passes = []
    hook = reward.model.register_forward_hook(lambda *_: passes.append(1))
    gen = Generations(["a", "b"], PROMPTS[:2], [[], []], RESPONSES[:2], RESPONSES[2:])
    try:
        scores = score_generations(gen, scoring_jobs(reward, [], "response"), progress=False)
        assert len(passes) == 2  # 4 distinct texts in batches of 2, scored once for both jobs
    finally:
        hook.remove()
    fresh = ClassifierReward(str(tiny_classifier_path), batch_size=2, device="cpu")
    fresh.toxic_label = "hate"
    assert scores["toxicity_before"] + scores["toxicity_after"] == fresh.toxicity(
        RESPONSES).tolist()
    assert scores["reward_before"] + scores["reward_after"] == fresh(PROMPTS, RESPONSES).tolist()
    # The kept result is handed out as a copy, and other texts are scored anew.
    first = reward(PROMPTS, RESPONSES)
    first -= 100.0
    assert reward(PROMPTS, RESPONSES).tolist() == fresh(PROMPTS, RESPONSES).tolist()
    assert reward(PROMPTS[:1], RESPONSES[:1]).tolist() == fresh(PROMPTS[:1],
                                                                RESPONSES[:1]).tolist()
