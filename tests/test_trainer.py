"""The PPO trainer: one step checked by hand, learning on a controlled task, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from detoxrl.config import load_config
from detoxrl.errors import ConfigError
from detoxrl.models.rollout import Rollout
from detoxrl.rl.detox_trainer import train

TINY = ["--model.name_or_path", "tiny:t5", "--data.path", "tiny:dialogsum",
        "--reward.model", "tiny:roberta-hate", "--save_every", "0", "--seed", "0"]
SHORT = ["--generation.min_new_tokens_draw", "4", "--generation.max_new_tokens_draw", "8",
         "--generation.min_length", "2", "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4",
         "--ppo.learning_rate", "1e-3"]


def _cfg(tmp_path, *extra: str):
    return load_config(None, [*TINY, *SHORT, "--output_dir", str(tmp_path), *extra])


# --------------------------------------------------------------------------- one step by hand

def _hand_rollout() -> Rollout:
    # One response of 3 tokens and one of 2 (right-padded), with fixed numbers.
    return Rollout(
        query_ids=torch.zeros(2, 1, dtype=torch.long),
        query_mask=torch.ones(2, 1, dtype=torch.long),
        response_ids=torch.zeros(2, 3, dtype=torch.long),
        response_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), queries=["a", "b"],
        responses=["x", "y"], ended_with_eos=torch.tensor([True, True]),
        scores=torch.tensor([1.0, -0.5]),
        logprobs=torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]]),
        ref_logprobs=torch.tensor([[-1.5, -2.0, -1.0], [-0.8, -1.0, 0.0]]),
        values=torch.tensor([[0.5, 0.2, -0.1], [0.0, 0.4, 0.0]]),
    )


def test_one_step_matches_hand_computation(tmp_path):
    """KL, rewards, GAE, returns and both losses of the trainer's steps 4-5, by hand."""
    from detoxrl.rl.learner import Learner

    cfg = _cfg(tmp_path, "--ppo.kl_controller", "fixed", "--ppo.init_kl_coef", "0.1",
               "--ppo.whiten_advantages", "false", "--ppo.lam", "0.95").finalize()
    from accelerate import Accelerator

    trainer = Learner(cfg, torch.nn.Module(), reward_fn=None,
                         accelerator=Accelerator(cpu=True), optimizer=None)
    batch, kl = trainer.algorithm.rewards(_hand_rollout())
    # k1 KL per token: logp - ref.
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.5], [-0.2, 0.0, 0.0]]))
    # rewards = -0.1 * kl, plus the score on the last real token.
    assert torch.allclose(batch.rewards, torch.tensor([[-0.05, 0.0, 0.95], [0.02, -0.5, 0.0]]))
    batch = trainer.algorithm.advantages(batch)
    # Row 0, gamma 1, lam 0.95, bootstrap 0 after the last token:
    #   d2 = 0.95 - (-0.1) = 1.05                  A2 = 1.05
    #   d1 = 0 + (-0.1) - 0.2 = -0.3               A1 = -0.3 + 0.95 * 1.05 = 0.6975
    #   d0 = -0.05 + 0.2 - 0.5 = -0.35             A0 = -0.35 + 0.95 * 0.6975 = 0.312625
    # Row 1: d1 = -0.5 - 0.4 = -0.9 = A1;  d0 = 0.02 + 0.4 - 0 = 0.42, A0 = 0.42 - 0.855
    expected_adv = torch.tensor([[0.312625, 0.6975, 1.05], [-0.435, -0.9, 0.0]])
    assert torch.allclose(batch.advantages, expected_adv, atol=1e-6)
    assert torch.allclose(batch.returns, expected_adv + batch.values * batch.response_mask,
                          atol=1e-6)

    from detoxrl.rl import math as rl_math

    new_logprobs = batch.logprobs + torch.tensor([[0.1, -0.3, 0.0], [0.0, 0.0, 0.0]])
    loss, stats = rl_math.policy_loss(new_logprobs, batch.logprobs, batch.advantages,
                                      batch.response_mask, cfg.ppo.cliprange)
    # ratio e^0.1 = 1.10517 (inside the clip), e^-0.3 = 0.74082 (below 0.8, but with A > 0
    # the unclipped term is the larger loss, so it is kept); row 1 has ratio 1.
    per_token = [-0.312625 * math.exp(0.1), -0.6975 * math.exp(-0.3), -1.05, 0.435, 0.9]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0
    new_values = batch.values + 0.5
    vloss, _ = rl_math.value_loss(new_values, batch.values, batch.returns,
                                       batch.response_mask, cfg.ppo.cliprange_value)
    # The clipped prediction moves only 0.2; the loss keeps the larger squared error per token.
    ret, old = batch.returns, batch.values
    errs = []
    for i, j in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        unclipped = (old[i, j].item() + 0.5 - ret[i, j].item()) ** 2
        clipped = (old[i, j].item() + 0.2 - ret[i, j].item()) ** 2
        errs.append(max(unclipped, clipped))
    assert vloss.item() == pytest.approx(0.5 * sum(errs) / 5, abs=1e-6)


# --------------------------------------------------------------------------- step 3

def test_forward_batch_size_auto_is_one_pass_on_a_gpu_and_a_mini_batch_on_a_cpu(tmp_path):
    def chunk(device: str, *extra: str) -> int:
        return _cfg(tmp_path, *extra).finalize(1, device).ppo.forward_chunk

    sizes = ("--ppo.batch_size", "16", "--ppo.mini_batch_size", "4")
    assert chunk("cpu", *sizes) == 4
    assert chunk("cuda", *sizes) == 16
    big = ("--ppo.batch_size", "40", "--ppo.mini_batch_size", "12", "--ppo.algorithm", "rloo",
           "--ppo.num_generations", "3")                     # 120 samples, mini-batch 12
    assert chunk("cuda", *big) == 60                          # whole mini-batches, <= 64
    assert chunk("cuda", *sizes, "--ppo.forward_batch_size", "3") == 3
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match=r"ppo\.forward_batch_size"):
            chunk("cpu", "--ppo.forward_batch_size", bad)


@pytest.mark.parametrize("chunk", ["auto", "4"], ids=["mini-batches", "chunks-of-4"])
@pytest.mark.parametrize("from_rollout", [False, True], ids=["old-pass", "from-rollout"])
@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_old_and_ref_forward_matches_one_plain_pass(request, arch, from_rollout, chunk,
                                                    tmp_path):
    """Length-sorted chunks (of the mini-batch, 2, or of 4), trimmed padding and the reused
    encoder change no number; old log-probs and values read while sampling match the plain
    pass too."""
    from accelerate import Accelerator

    from detoxrl.config import ModelConfig, SamplingConfig
    from detoxrl.models.generation import collate_queries
    from detoxrl.models.policy import Policy
    from detoxrl.rl.learner import Learner

    path = request.getfixturevalue(f"tiny_{arch}_path")
    policy = Policy.from_pretrained(ModelConfig(name_or_path=str(path)))
    with torch.no_grad():  # move the adapter off zero, so policy and reference differ
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    cfg = _cfg(tmp_path, "--ppo.batch_size", "6", "--ppo.mini_batch_size", "2",
               "--ppo.forward_batch_size", chunk).finalize()
    trainer = Learner(cfg, policy, None, Accelerator(cpu=True), optimizer=None)
    assert trainer.policy.share_queries                       # unsharded: ranks need not agree
    texts = [" ".join(["word"] * n) + " end" for n in (3, 40, 7, 25, 1, 12)]
    q, qm = collate_queries([policy.tokenizer(t).input_ids for t in texts],
                            policy.tokenizer.pad_token_id, policy.padding_side)
    torch.manual_seed(0)
    batch = policy.generate(q, qm, SamplingConfig(min_length=4), [6, 3, 8, 5, 8, 2],
                            with_logprobs=from_rollout, with_values=from_rollout)
    assert (batch.logprobs is not None) == from_rollout
    got = trainer.forward_old_and_ref(batch)
    with torch.no_grad():
        args = (batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
        assert batch.eos_blocked == 2              # min(min_length 4, the smallest limit)
        old = policy(*args, eos_blocked=batch.eos_blocked)
        with policy.reference():
            ref = policy(*args, with_values=False, eos_blocked=batch.eos_blocked)
    mask = batch.response_mask.float()
    assert got.encoder_hidden is None                 # used once, then dropped
    assert (got.logprobs - got.ref_logprobs).abs().max() > 1e-3
    for mine, plain in ((got.logprobs, old.logprobs), (got.values, old.values),
                        (got.ref_logprobs, ref.logprobs)):
        torch.testing.assert_close(mine, plain * mask, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- resume, skips

class _Interrupt(Exception):
    pass


def _state(run_dir):
    return {**load_file(run_dir / "adapter_model.safetensors"),
            **{"vh." + k: v for k, v in load_file(run_dir / "value_head.safetensors").items()}}


def test_resume_is_exact(tmp_path):
    """A run stopped after step 3 and resumed from its step-2 checkpoint ends identically."""
    extra = ["--steps", "4", "--save_every", "2", "--ppo.normalize_scores", "true",
             "--ppo.lr_scheduler", "linear"]
    full = train(_cfg(tmp_path / "full", *extra), quiet=True)

    from detoxrl.models.reward import ClassifierReward

    cfg = _cfg(tmp_path / "cut", *extra)
    scorer = ClassifierReward.from_config(cfg.reward)
    calls = {"n": 0}

    def interrupting(prompts, responses):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Interrupt
        return scorer(prompts, responses)

    with pytest.raises(_Interrupt):
        train(cfg, reward_fn=interrupting, quiet=True)
    resumed = train(_cfg(tmp_path / "cut", *extra), resume=True, quiet=True)

    a, b = _state(full.output_dir), _state(resumed.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in
             (resumed.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert resumed.learner.kl_ctl.value == full.learner.kl_ctl.value


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    def sometimes_nan(prompts, responses):
        calls["n"] += 1
        return [float("nan") if calls["n"] == 2 else 0.5] * len(responses)

    result = train(_cfg(tmp_path, "--steps", "3"), reward_fn=sometimes_nan, quiet=True)
    skipped = [m for m in result.metrics if "ppo/skipped_steps" in m]
    assert [m["step"] for m in skipped] == [2]
    assert result.learner.skipped_steps == 1
    for key, value in _state(result.output_dir).items():
        assert torch.isfinite(value).all(), key


def test_refuses_to_mix_runs_and_resumes_only_with_checkpoints(tmp_path):
    from detoxrl.errors import ConfigError

    train(_cfg(tmp_path, "--steps", "1"), reward_fn=lambda p, r: [0.0] * len(r), quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(tmp_path, "--steps", "1"), reward_fn=lambda p, r: [0.0] * len(r))
    with pytest.raises(ConfigError, match="Nothing to resume"):
        train(_cfg(tmp_path, "--steps", "2"), resume=True)
