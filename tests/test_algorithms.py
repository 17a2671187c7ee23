"""PPO, RLOO and GRPO through the one trainer: a step by hand, learning, exact resume, files.

The learning task is the controlled one of test_trainer.py: the reward is minus the share of
"forbidden" tokens, the most frequent tokens of the starting policy's own samples, covering
half of them. Prompts are cut to 48 tokens so that each run takes seconds.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from detoxrl.config import load_config
from detoxrl.errors import ConfigError
from detoxrl.models.policy import VALUE_HEAD_FILE, PolicyOutput
from detoxrl.models.rollout import Rollout
from detoxrl.rl.detox_trainer import train
from detoxrl.rl.learner import Learner

TINY = ["--data.path", "tiny:dialogsum", "--reward.model", "tiny:roberta-hate",
        "--save_every", "0", "--seed", "0", "--data.max_prompt_tokens", "48"]
SHORT = ["--generation.min_new_tokens_draw", "4", "--generation.max_new_tokens_draw", "8",
         "--generation.min_length", "2", "--ppo.learning_rate", "1e-3"]
TARGETS = {"t5": "[q, v, lm_head]", "gpt2": "[c_attn, c_proj, c_fc, lm_head]"}


def _cfg(out, arch: str, algorithm: str, *extra: str):
    k = "1" if algorithm == "ppo" else "2"
    return load_config(None, [*TINY, *SHORT, "--model.name_or_path", f"tiny:{arch}",
                              "--ppo.algorithm", algorithm, "--ppo.num_generations", k,
                              "--ppo.batch_size", "4", "--ppo.mini_batch_size", "4",
                              "--output_dir", str(out), *extra])


# --------------------------------------------------------------------------- a step by hand

def _group_rollout() -> Rollout:
    # Two prompts x K = 2 samples; responses of 2, 1, 2 and 2 tokens.
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    return Rollout(
        query_ids=torch.zeros(4, 1, dtype=torch.long), query_mask=torch.ones(4, 1).long(),
        response_ids=torch.zeros(4, 2, dtype=torch.long), response_mask=mask,
        queries=["a", "a", "b", "b"], responses=["w", "x", "y", "z"],
        ended_with_eos=torch.ones(4, dtype=torch.bool), scores=torch.tensor([1.0, 0.0, 2.0, 2.0]),
        logprobs=torch.tensor([[-1.0, -2.0], [-1.0, 0.0], [-0.5, -0.5], [-1.0, -1.0]]),
        ref_logprobs=torch.tensor([[-1.5, -2.0], [-0.5, 0.0], [-0.5, -0.5], [-1.0, -2.0]]))


def _trainer(tmp_path, algorithm: str, *extra: str) -> Learner:
    cfg = _cfg(tmp_path, "t5", algorithm, "--ppo.beta", "0.1", "--ppo.batch_size", "2",
               *extra).finalize()
    return Learner(cfg, torch.nn.Module(), None, Accelerator(cpu=True), optimizer=None)


def test_rloo_step_by_hand(tmp_path):
    trainer = _trainer(tmp_path, "rloo")
    batch, kl = trainer.algorithm.rewards(_group_rollout())
    # k1 per token, summed: [0.5, -0.5, 0, 1]; R = score - 0.1 * sum KL.
    assert torch.allclose(kl.sum(1), torch.tensor([0.5, -0.5, 0.0, 1.0]))
    rewards = torch.tensor([0.95, 0.05, 2.0, 1.9])
    assert torch.allclose(batch.rewards.sum(1), rewards)
    batch = trainer.algorithm.advantages(batch)
    # K = 2: each sample's baseline is its sibling's reward.
    expected = torch.tensor([0.9, -0.9, 0.1, -0.1])
    assert torch.allclose(batch.advantages, expected[:, None] * batch.response_mask, atol=1e-6)
    assert batch.returns is None and batch.values is None
    # Loss at the rollout policy (ratio 1): -sum_i A_i |o_i| / (B * max_new_tokens_draw).
    loss, stats = trainer.algorithm.loss(PolicyOutput(batch.logprobs.clone(), None, None), batch)
    assert loss.item() == pytest.approx(-(0.9 * 2 - 0.9 * 1 + 0.1 * 2 - 0.1 * 2) / (4 * 8))
    assert "loss/kl" not in stats and stats["policy/clipfrac"] == 0


def test_grpo_step_by_hand(tmp_path):
    trainer = _trainer(tmp_path, "grpo")
    batch, kl = trainer.algorithm.rewards(_group_rollout())
    assert torch.allclose(batch.rewards.sum(1), batch.scores)        # no KL in the reward
    assert torch.allclose(kl.sum(1), torch.tensor([0.5, -0.5, 0.0, 1.0]))  # but logged
    batch = trainer.algorithm.advantages(batch)
    # Group [1, 0]: mean 0.5, std sqrt(0.5); group [2, 2]: no spread, no signal.
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    expected = torch.tensor([a, -a, 0.0, 0.0])
    assert torch.allclose(batch.advantages, expected[:, None] * batch.response_mask, atol=1e-6)
    # Policy moved by +0.2 on sample 0's first token: ratio e^0.2 > 1.2 clips (A > 0).
    new = batch.logprobs + torch.tensor([[0.2, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    loss, stats = trainer.algorithm.loss(PolicyOutput(new, None, None), batch)
    pg = [[-a * 1.2, -a], [a], [0.0, 0.0], [0.0, 0.0]]               # per token
    k3 = []                                                           # e^r - 1 - r, r = ref - new
    for i, n in enumerate([2, 1, 2, 2]):
        r = [batch.ref_logprobs[i, t].item() - new[i, t].item() for t in range(n)]
        k3.append([math.exp(x) - 1 - x for x in r])
    per_seq = [sum(p) / len(p) + 0.1 * sum(k) / len(k) for p, k in zip(pg, k3, strict=True)]
    assert loss.item() == pytest.approx(sum(per_seq) / 4, abs=1e-6)
    assert stats["loss/kl"].item() == pytest.approx(sum(sum(k) / len(k) for k in k3) / 4)


def test_dr_grpo_step_by_hand(tmp_path):
    trainer = _trainer(tmp_path, "grpo", "--ppo.loss_type", "dr_grpo",
                       "--ppo.scale_rewards", "none", "--ppo.beta", "0")
    batch = trainer.algorithm.advantages(trainer.algorithm.rewards(_group_rollout())[0])
    assert torch.allclose(batch.advantages[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    loss, stats = trainer.algorithm.loss(PolicyOutput(batch.logprobs.clone(), None, None), batch)
    # No length normalisation: sample 0 has 2 tokens, sample 1 one; / (B * L) = / (4 * 8).
    assert loss.item() == pytest.approx(-(0.5 * 2 - 0.5 * 1) / 32)
    assert "loss/kl" not in stats


# --------------------------------------------------------------------------- options

def test_config_names_validation_and_renames(tmp_path):
    with pytest.raises(ConfigError, match="num_generations to 2 or more"):
        _cfg(tmp_path, "t5", "grpo", "--ppo.num_generations", "1").finalize()
    with pytest.raises(ConfigError, match=r"\(3\) = 12 samples must be a multiple of "
                                          r"ppo.mini_batch_size \(8\)"):
        _cfg(tmp_path, "t5", "rloo", "--ppo.num_generations", "3",
             "--ppo.mini_batch_size", "8").finalize()
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        _cfg(tmp_path, "t5", "rloo", "--ppo.batch_size", "3", "--ppo.mini_batch_size",
             "2").finalize(world_size=2)
    cfg = _cfg(tmp_path, "t5", "grpo", "--ppo.num_generations", "4").finalize(world_size=2)
    # batch_size counts prompts: 4 prompts x 4 samples = 16 samples, 4 mini-batches of 4.
    p = cfg.ppo
    assert (p.local_batch_size, p.num_mini_batches, p.local_mini_batch_size) == (2, 4, 2)
    for old, new in (("target_kl", "kl_target"), ("horizon", "kl_horizon")):
        with pytest.raises(ConfigError, match=f"'ppo.{old}' was renamed 'ppo.{new}'"):
            load_config(None, [f"--ppo.{old}", "3"])
    for old, new in (("kl", "k1"), ("mse", "k2"), ("full", "k3")):
        with pytest.raises(ConfigError, match=f"'{old}' is now called '{new}'"):
            load_config(None, ["--ppo.kl_estimator", old]).finalize()
    with pytest.raises(ConfigError, match="'ppo', 'rloo', 'grpo'"):
        load_config(None, ["--ppo.algorithm", "dpo"]).finalize()


# --------------------------------------------------------------------------- it learns

def _forbidden_tokens(cfg) -> tuple[set[int], object]:
    """The most frequent tokens of the start policy's samples, covering half of them."""
    from detoxrl.data.prompts import build_prompts
    from detoxrl.models.generation import collate_queries
    from detoxrl.models.policy import Policy

    policy = Policy.from_pretrained(cfg.model, cfg.lora, value_head=False)
    prompts = build_prompts(cfg.data, policy.tokenizer).train.select(range(64))
    ids, mask = collate_queries(prompts["input_ids"], policy.tokenizer.pad_token_id,
                                policy.padding_side)
    torch.manual_seed(1)
    start = policy.generate(ids, mask, cfg.generation, queries=prompts["query"])
    counts = collections.Counter(t for r in policy.tokenizer(
        start.responses, add_special_tokens=False).input_ids for t in r)
    forbidden, covered, total = set(), 0, sum(counts.values())
    for token, n in counts.most_common():
        if covered >= total / 2:
            break
        forbidden.add(token)
        covered += n
    return forbidden, policy.tokenizer


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "arch", "extra"), [
    ("ppo", "gpt2", []),
    ("ppo", "t5", []),
    ("rloo", "t5", []),
    ("rloo", "gpt2", []),
    ("grpo", "t5", []),
    ("grpo", "gpt2", ["--ppo.loss_type", "dr_grpo", "--ppo.scale_rewards", "none"]),  # Dr. GRPO
])
def test_forbidden_token_share_falls(tmp_path, algorithm, arch, extra):
    """Same budget for all: 32 samples a step (8 per prompt for rloo/grpo), 12 steps; each
    algorithm must at least halve the share of forbidden tokens."""
    k = 1 if algorithm == "ppo" else 8
    learn = ["--generation.min_new_tokens_draw", "12", "--generation.max_new_tokens_draw", "12",
             "--generation.min_length", "12", "--ppo.batch_size", str(32 // k),
             "--ppo.num_generations", str(k), "--ppo.mini_batch_size", "32",
             "--ppo.ppo_epochs", "4", "--ppo.learning_rate", "3e-2", "--ppo.beta", "0",
             "--ppo.kl_controller", "fixed", "--ppo.init_kl_coef", "0.01",
             "--ppo.normalize_scores", "true", "--lora.r", "8",
             "--lora.target_modules", TARGETS[arch], "--steps", "12", *extra]
    cfg = _cfg(tmp_path, arch, algorithm, *learn)
    forbidden, tokenizer = _forbidden_tokens(cfg)

    def reward(prompts, responses):
        ids = tokenizer(responses, add_special_tokens=False).input_ids
        return [-sum(t in forbidden for t in x) / max(len(x), 1) for x in ids]

    result = train(cfg, reward_fn=reward, quiet=True)
    shares = [-m["env/reward_mean"] for m in result.metrics]
    first, last = shares[0], sum(shares[-3:]) / 3
    assert first > 0.35, f"the start policy should emit forbidden tokens often ({first:.2f})"
    assert last <= first / 2, f"share went {first:.3f} -> {last:.3f}: not halved: {shares}"
    assert all(math.isfinite(m["objective/kl"]) for m in result.metrics)
    out = result.output_dir
    assert (out / VALUE_HEAD_FILE).exists() == (algorithm == "ppo")
    assert json.loads((out / "run_info.json").read_text())["algorithm"] == algorithm


# --------------------------------------------------------------------------- resume, files

class _Interrupt(Exception):
    pass


@pytest.mark.parametrize(("algorithm", "arch", "extra"), [
    ("rloo", "t5", []),
    ("grpo", "gpt2", ["--ppo.scale_rewards", "batch", "--ppo.mini_batch_size", "4"]),
])
def test_resume_is_exact_and_writes_no_value_head(tmp_path, algorithm, arch, extra):
    """Stopped in step 3 and resumed from the step-2 checkpoint: the same final adapter."""
    extra = ["--steps", "4", "--save_every", "2", "--ppo.normalize_scores", "true",
             "--ppo.lr_scheduler", "linear", "--ppo.ppo_epochs", "2",
             "--ppo.num_generations", "2", "--ppo.mini_batch_size", "8", *extra]
    full = train(_cfg(tmp_path / "full", arch, algorithm, *extra), quiet=True)

    from detoxrl.models.reward import ClassifierReward

    cfg = _cfg(tmp_path / "cut", arch, algorithm, *extra)
    scorer, calls = ClassifierReward.from_config(cfg.reward), {"n": 0}

    def interrupting(prompts, responses):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt
        return scorer(prompts, responses)

    with pytest.raises(_Interrupt):
        train(cfg, reward_fn=interrupting, quiet=True)
    resumed = train(_cfg(tmp_path / "cut", arch, algorithm, *extra), resume=True, quiet=True)

    a = load_file(full.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in a.items())
    def untimed(rows):
        return [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens/"))}
                for m in rows]

    assert untimed(full.metrics[2:]) == untimed(resumed.metrics)       # steps 3 and 4
    assert "ppo/loss/value" not in full.metrics[-1]
    assert "env/frac_reward_zero_std" in full.metrics[-1]
    for run in (full.output_dir, full.output_dir / "checkpoints" / "step-2" / "adapter"):
        assert (run / "adapter_model.safetensors").exists()
        assert not (run / VALUE_HEAD_FILE).exists()
    assert resumed.learner.policy.value_head is None
    with pytest.raises(ConfigError, match=f"ppo.algorithm: '{algorithm}' in the run, 'ppo' now"):
        train(_cfg(tmp_path / "cut", arch, "ppo", *extra[:4]), resume=True, quiet=True)


def test_evaluate_and_report_a_rloo_run(tmp_path):
    from detoxrl.cli import main

    out = tmp_path / "run"
    train(_cfg(out, "t5", "rloo", "--steps", "1"), quiet=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["evaluate", str(out), "--n", "8", "--batch-size", "8",
                     "--max-new-tokens", "6", "--bootstrap", "200", "--quiet"])
        assert code == 0
        assert main(["report", str(out)]) == 0
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["n"] == 8 and math.isfinite(summary["kl"]["mean"])
    assert (out / "report.html").exists()


# --------------------------------------------------------------------------- best-of-n target

def test_best_of_n_target_ranks_each_score_among_the_references_samples(tmp_path):
    """A response's score is (n - 1) log F, F from the reference's own samples of its prompt
    (adapter off, seeded by the step), scored by the same reward with the prompt's columns."""
    from detoxrl.rl.assembly import build_learner
    from detoxrl.rl.distributed import make_accelerator

    def vowels(prompts, completions, tag, **_):
        assert set(tag) == {"column"}
        return [float(sum(c in "aeiou" for c in text)) for text in completions]

    cfg = _cfg(tmp_path, "gpt2", "rloo", "--ppo.batch_size", "2", "--ppo.mini_batch_size", "4",
               "--ppo.best_of_n_target", "4", "--ppo.reference_samples", "3")
    learner = build_learner(cfg, make_accelerator(cfg), reward_fn=vowels)
    tokenizer = learner.policy.tokenizer
    tokenizer.padding_side = learner.policy.padding_side
    queries = ["Hello there, how", "The cat sat"]
    enc = tokenizer(queries, return_tensors="pt", padding=True)
    batch = learner.rollout(enc.input_ids, enc.attention_mask, queries, step_seed=5)
    scored, raw = learner.score(batch, {"tag": ["column"] * 2}, step_seed=5)

    reference = learner.reference_rollout(batch, 5)
    assert reference.queries == [queries[0]] * 3 + [queries[1]] * 3
    ref_scores = vowels(reference.queries, reference.responses, ["column"] * 6)
    assert raw.tolist() == vowels(batch.queries, batch.responses, ["column"] * 4)
    for row, r in enumerate(raw.tolist()):
        prompt_refs = ref_scores[3 * (row // 2): 3 * (row // 2) + 3]   # 2 samples per prompt
        share = (sum(x <= r for x in prompt_refs) + 0.5) / 4
        assert scored.scores[row].item() == pytest.approx(3 * math.log(share))

    # The reference's samples do not move with the adapter; the policy's do.
    with torch.no_grad():
        for name, param in learner.policy.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    assert learner.reference_rollout(batch, 5).responses == reference.responses
    assert learner.rollout(enc.input_ids, enc.attention_mask, queries,
                           step_seed=5).responses != batch.responses


def test_best_of_n_target_refuses_what_would_rescale_the_score(tmp_path):
    with pytest.raises(ConfigError, match="grpo normalises"):
        _cfg(tmp_path, "gpt2", "grpo", "--ppo.best_of_n_target", "4").finalize()
    with pytest.raises(ConfigError, match=r"turn off ppo\.normalize_scores, ppo\.score_clip"):
        _cfg(tmp_path, "gpt2", "ppo", "--ppo.best_of_n_target", "4", "--ppo.normalize_scores",
             "true", "--ppo.score_clip", "1").finalize()
    with pytest.raises(ConfigError, match="best_of_n_target"):
        _cfg(tmp_path, "gpt2", "ppo", "--ppo.best_of_n_target", "1").finalize()


# --------------------------------------------------------------------------- prefix shaping

def test_prefix_shaping_credits_each_token_with_its_change(tmp_path):
    """Each token's score is the reward of the prefix it ends minus that of the one before
    (the rollout's own decoding); a row's scores sum to its reward less the empty one's."""
    from transformers import AutoTokenizer

    from detoxrl.models import tiny

    tokenizer = AutoTokenizer.from_pretrained(tiny.resolve("tiny:gpt2"))
    texts = [" the cat is here today", " no no no", " hello"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    response_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])

    def vowels(prompts, completions, tag, **_):
        assert set(tag) == {"column"}  # the prompt's other columns reach every prefix
        return [float(sum(c in "aeiou" for c in text)) - 0.5 * len(p)
                for p, text in zip(prompts, completions, strict=True)]

    policy = torch.nn.Module()
    policy.tokenizer = tokenizer
    cfg = _cfg(tmp_path, "gpt2", "ppo", "--ppo.batch_size", "3", "--ppo.mini_batch_size", "3",
               "--ppo.prefix_shaping", "true", "--ppo.score_clip", "3").finalize()
    learner = Learner(cfg, policy, vowels, Accelerator(cpu=True), optimizer=None)
    batch = Rollout(query_ids=torch.zeros(3, 1, dtype=torch.long),
                    query_mask=torch.ones(3, 1, dtype=torch.long), response_ids=response_ids,
                    response_mask=mask, queries=["a", "bb", "c"],
                    responses=[tokenizer.decode(row) for row in ids],
                    ended_with_eos=torch.zeros(3, dtype=torch.bool))
    scored, raw = learner.score(batch, {"tag": ["column"] * 3})
    for row, (prompt, row_ids) in enumerate(zip(batch.queries, ids, strict=True)):
        phi = [min(max(vowels([prompt], [tokenizer.decode(row_ids[:t])], ["column"])[0], -3),
                   3) for t in range(len(row_ids) + 1)]
        expected = [phi[t + 1] - phi[t] for t in range(len(row_ids))]
        assert scored.token_scores[row, :len(row_ids)].tolist() == pytest.approx(expected)
        assert scored.token_scores[row, len(row_ids):].abs().sum() == 0
        assert scored.scores[row].item() == pytest.approx(phi[-1])
    shaped, _ = learner.algorithm.rewards(replace(scored, logprobs=torch.zeros(3, width),
                                                  ref_logprobs=torch.zeros(3, width)))
    assert torch.allclose(shaped.rewards.sum(1), scored.scores - torch.tensor(
        [min(max(-0.5 * len(p), -3), 3) for p in batch.queries]))
    assert raw.tolist() == pytest.approx([vowels([p], [t], ["column"])[0] for p, t in
                                          zip(batch.queries, batch.responses, strict=True)])


def test_prefix_shaping_needs_per_token_advantages(tmp_path):
    with pytest.raises(ConfigError, match="prefix_shaping"):
        _cfg(tmp_path, "gpt2", "rloo", "--ppo.prefix_shaping", "true").finalize()
