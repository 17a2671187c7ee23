"""``make_accelerator`` and ``build_learner``: the assembly ``train`` and the benchmark
share, checked on the tiny preset (configs/tiny.yaml, shortened)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from detoxrl.config import load_config
from detoxrl.data.prompts import build_prompts
from detoxrl.models.generation import collate_queries
from detoxrl.models.reward import ClassifierReward
from detoxrl.rl import assembly
from detoxrl.rl.distributed import make_accelerator
from detoxrl.rl.kl import AdaptiveKLController, FixedKLController

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SMALL = ["--ppo.batch_size", "4", "--ppo.mini_batch_size", "2", "--ppo.ppo_epochs", "1",
         "--generation.min_new_tokens_draw", "2", "--generation.max_new_tokens_draw", "4",
         "--generation.min_length", "1", "--steps", "3"]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(TINY, [*SMALL, "--output_dir", str(tmp_path / "run"), *extra])


def _trainable(trainer) -> list[torch.nn.Parameter]:
    return [p for p in trainer.policy.parameters() if p.requires_grad]


def test_build_learner_assembles_a_trainer_that_steps(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    accelerator = make_accelerator(cfg)
    assert (cfg.ppo.world_size, cfg.ppo.local_batch_size, cfg.ppo.num_mini_batches) == (1, 4, 2)
    trainer = assembly.build_learner(cfg, accelerator, quiet=False)
    assert "percentage of trainable model parameters" in capsys.readouterr().out

    # The optimizer holds exactly the trainable parameters (LoRA + value head), once each.
    trainable = _trainable(trainer)
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert trainable and len(held) == len(trainable)
    assert {id(p) for p in held} == {id(p) for p in trainable}
    assert len(trainable) < len(list(trainer.policy.parameters()))  # the base stays frozen
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == cfg.ppo.learning_rate and group["weight_decay"] == cfg.ppo.weight_decay
    assert isinstance(trainer.kl_ctl, AdaptiveKLController)  # tiny.yaml: the default
    assert isinstance(trainer.reward_fn.funcs[0], ClassifierReward)   # from cfg.reward
    assert not (tmp_path / "run").exists(), "assembly writes no files; train() does"

    # One step, as train()'s loop takes it: finite metrics, trainable weights updated.
    policy = trainer.policy
    prompts = build_prompts(cfg.data, policy.tokenizer, seed=cfg.seed).train
    rows = prompts[assembly.batch_indices(0, len(prompts), cfg, 0)]
    ids, mask = collate_queries(rows["input_ids"], policy.tokenizer.pad_token_id,
                                policy.padding_side)
    before = [p.detach().clone() for p in trainable]
    result = trainer.step(ids, mask, rows["query"], assembly.step_seed(cfg.seed, 0, 0))
    assert trainer.skipped_steps == 0
    numbers = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    assert {"objective/kl", "env/reward_mean", "ppo/loss/policy"} <= set(numbers)
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True))


def test_build_learner_follows_the_config_and_the_seed(tmp_path):
    def reward(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    fixed_cfg = _cfg(tmp_path, "--ppo.kl_controller", "fixed", "--ppo.lr_scheduler", "linear")
    fixed = assembly.build_learner(fixed_cfg, make_accelerator(fixed_cfg), reward_fn=reward)
    assert isinstance(fixed.kl_ctl, FixedKLController)
    assert fixed.kl_ctl.value == fixed_cfg.ppo.init_kl_coef
    assert fixed.reward_fn.funcs == [reward]  # an explicit reward replaces cfg.reward

    # The linear schedule spans every optimizer step of the run and drives the trainer's
    # optimizer: steps x ppo_epochs x mini-batches of them bring the rate to zero.
    p = fixed_cfg.ppo
    assert fixed.scheduler.optimizer is fixed.optimizer.optimizer  # accelerate wraps it
    for _ in range(fixed_cfg.steps * p.ppo_epochs * p.num_mini_batches):
        fixed.optimizer.step()  # no gradients: moves nothing, keeps torch's order check quiet
        fixed.scheduler.step()
    assert fixed.optimizer.param_groups[0]["lr"] == 0.0

    # The seed alone decides the LoRA and value-head initialisation.
    same_cfg = _cfg(tmp_path)
    same = assembly.build_learner(same_cfg, make_accelerator(same_cfg), reward_fn=reward)
    other_cfg = _cfg(tmp_path, "--seed", "1")
    other = assembly.build_learner(other_cfg, make_accelerator(other_cfg), reward_fn=reward)
    pairs = list(zip(_trainable(fixed), _trainable(same), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b)
                   for a, b in zip(_trainable(same), _trainable(other), strict=True))
