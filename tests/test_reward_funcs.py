"""TRL-style rewards: keyword calls with dataset columns, weighted sets, the positional form."""

from __future__ import annotations

import pytest
import torch

from detoxrl.config import RewardConfig
from detoxrl.errors import ConfigError
from detoxrl.models.reward import ClassifierReward, RewardSet, as_reward_function, build_reward_set

PROMPTS = ["Summarize: a.", "Summarize: b.", "Summarize: c."]
COMPLETIONS = ["the cat sat", "a dog", "the end of the story"]


def overlap(prompts, completions, references, **kwargs):
    """Share of each completion's words found in its first reference summary."""
    out = []
    for completion, refs in zip(completions, references, strict=True):
        words, ref = completion.split(), set(refs[0].split())
        out.append(sum(w in ref for w in words) / len(words))
    return out


def length(prompts, completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def test_a_trl_reward_receives_the_dataset_columns():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts)
        return overlap(prompts, completions, **kwargs)

    rewards = RewardSet([spy])
    refs = [["the cat sat down"], ["no dog here"], ["story"]]
    total = rewards(PROMPTS, COMPLETIONS, references=refs, id=["1", "2", "3"])
    assert seen["references"] == refs and seen["id"] == ["1", "2", "3"]
    assert seen["prompts"] == PROMPTS
    torch.testing.assert_close(total, torch.tensor([1.0, 0.5, 0.2]))
    assert rewards.names == ["spy"]


def test_two_weighted_rewards_sum_and_are_kept_apart():
    rewards = RewardSet([overlap, length], weights=[2.0, -0.5])
    refs = [["the cat sat down"], ["no dog here"], ["story"]]
    total = rewards(PROMPTS, COMPLETIONS, references=refs)
    torch.testing.assert_close(total, torch.tensor([2 * 1.0 - 1.5, 2 * 0.5 - 1.0,
                                                    2 * 0.2 - 2.5]))
    assert set(rewards.last) == {"overlap", "length"}
    torch.testing.assert_close(rewards.last["length"], torch.tensor([3.0, 2.0, 5.0]))
    with pytest.raises(ConfigError, match="one weight per reward"):
        RewardSet([overlap, length], weights=[1.0])


def test_none_means_does_not_apply_and_columns_repeat_per_sample():
    def only_short(prompts, completions, **kwargs):
        return [1.0 if len(c) < 8 else None for c in completions]

    def constant(prompts, completions, topic, **kwargs):
        assert topic == ["x", "x", "y", "y"]  # one value per prompt, two samples each
        return [0.5] * len(completions)

    rewards = RewardSet([only_short, constant])
    total = rewards(["p", "p", "q", "q"], ["short", "much longer text", "tiny", "a b c d e f"],
                    topic=["x", "y"])
    torch.testing.assert_close(total, torch.tensor([1.5, 0.5, 1.5, 0.5]))
    assert torch.isnan(rewards.last["only_short"][1])
    with pytest.raises(ValueError, match="Every reward returned None"):
        RewardSet([only_short])(["p"], ["a long completion"])


def test_positional_rewards_are_adapted_with_a_warning_and_bad_ones_refused():
    with pytest.warns(FutureWarning, match=r"prompts, completions, \*\*kwargs"):
        fn = as_reward_function(lambda p, r: [len(x) for x in r])
    assert fn(prompts=PROMPTS, completions=COMPLETIONS, references=[]) == [11, 5, 20]
    with pytest.raises(ConfigError, match="cannot be called as f"):
        as_reward_function(lambda a, b, c: 0)
    with pytest.raises(ConfigError, match="callable or a classifier name"):
        RewardSet([3])


def test_strings_are_classifiers_with_the_config_settings(tiny_classifier_path):
    cfg = RewardConfig(model="unused", output="prob", label="hate")
    rewards = build_reward_set([str(tiny_classifier_path), length], [1.0, 0.0], cfg, "cpu")
    classifier = rewards.funcs[0]
    assert isinstance(classifier, ClassifierReward)
    assert (classifier.output, classifier.label) == ("prob", "hate")
    assert rewards.names == ["roberta-hate", "length"]
    total = rewards(PROMPTS, COMPLETIONS, references=[["x"]] * 3)
    # ClassifierReward is itself a TRL-style reward: keywords in, extra columns ignored.
    direct = classifier(prompts=PROMPTS, completions=COMPLETIONS, references=[["x"]] * 3)
    torch.testing.assert_close(total, direct)
    assert ((direct > 0) & (direct < 1)).all()
    described = rewards.describe()
    assert described[0]["kind"] == "classifier" and described[1]["weight"] == 0.0
