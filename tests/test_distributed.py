"""Two CPU processes (gloo) with ``accelerate launch``: the multi-process contract of a run.

Three launches of the tiny preset (small batches, short responses, 2 PPO epochs, gradient
accumulation so that DDP ``no_sync`` is exercised, score normalisation and reward whitening
on so that their global statistics are exercised):

* A: 3 steps, uninterrupted;
* B: 2 steps with ``save_every=1`` (a checkpoint after step 1), then C: ``--resume`` to 3.

Then: both ranks hold bitwise-identical adapters, value heads, KL controllers and score
moments; ``metrics.jsonl`` holds one line per step with statistics over both ranks' rollouts
(each rank's scores are dumped and compared); the resumed run ends bitwise where A ends; and
resuming on a different number of processes is refused.

The launches run one after another from one helper process that imports the stack once,
each by accelerate's own launcher with its ranks forked from the helper
(``tests/sharded_driver.py --serve``). Each rank is ``detoxrl train`` with test-only wrappers
of ``DetoxTrainer.train`` and ``Learner.score`` that dump its own state
(``sharded_driver.cli``; nothing in the package is test-specific).

On CPU, ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's
simple launcher spawns only under mpirun); ``ACCELERATE_USE_CPU=true`` with ``--multi_gpu``
starts two through torchrun, which then join a gloo group (see docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from detoxrl.config import TrainConfig
from detoxrl.errors import ConfigError
from detoxrl.rl import distributed as dist
from detoxrl.rl.kl import AdaptiveKLController
from detoxrl.rl.learner import Learner
from helpers import DRIVER, LAUNCH_MARKS, free_port, launch_env, serve_plan, why


def launches(test):
    for mark in LAUNCH_MARKS:
        test = mark(test)
    return test


ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
WORLD = 2
BATCH = 8
OPTIONS = [  # per rank: 4 rollouts, 2 mini-batches of 2, 2 micro-batches of 1, 2 epochs
    f"--ppo.batch_size={BATCH}", "--ppo.mini_batch_size=4",
    "--ppo.gradient_accumulation_steps=2", "--ppo.ppo_epochs=2",
    "--ppo.normalize_scores=true", "--ppo.whiten_rewards=true",
    "--generation.min_new_tokens_draw=4", "--generation.max_new_tokens_draw=8",
    "--generation.min_length=2", "--num_samples_logged=2",
]
LAUNCH_TIMEOUT = 240

class Launcher:
    """Launches of ``detoxrl train`` on two processes, one after another, each rank forked
    from one helper process that imported the stack once (``sharded_driver.py --serve``);
    each rank dumps its own state (``sharded_driver.cli``)."""

    def __init__(self, root: Path):
        self.root, self.env = root, launch_env(root)

    def launch(self, name: str, out: Path, steps: int, *extra: str) -> list:
        """One plan entry: ``detoxrl train`` on two processes, dumping to ``<root>/<name>``."""
        args = ["train", "--config", str(CONFIG), "--output-dir", str(out), f"--steps={steps}",
                "--quiet", *OPTIONS, *extra]
        argv = ["--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(free_port()), str(DRIVER), "--cli", *args]
        return [name, argv, {"ACCELERATE_USE_CPU": "true",
                             "DETOXRL_TEST_DUMP": str(self.root / name)}]

    def run_plan(self, plan: list[list]) -> None:
        proc, status = serve_plan(plan, self.root / "plan.json", self.env,
                                  LAUNCH_TIMEOUT * len(plan))
        failed = [name for name, *_ in plan if status.get(name, {}).get("returncode") != 0]
        assert not failed, f"launches {failed} failed:\n{why(proc.stderr)}"

    def dump(self, name: str, rank: int) -> tuple[dict, dict]:
        base = self.root / name
        return (load_file(base / f"rank{rank}.safetensors"),
                json.loads((base / f"rank{rank}.json").read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    launcher = Launcher(root)
    launcher.run_plan([launcher.launch("dump-A", root / "A", 3, "--save_every=0"),
                       launcher.launch("dump-B", root / "BC", 2, "--save_every=1"),
                       launcher.launch("dump-C", root / "BC", 3, "--save_every=1", "--resume")])
    return launcher


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def _assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    different = [k for k in a if a[k].dtype != b[k].dtype or _bits(a[k]) != _bits(b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run_dir: Path) -> dict:
    weights = {"adapter." + k: v for k, v in
               load_file(run_dir / "adapter_model.safetensors").items()}
    weights.update({"value_head." + k: v for k, v in
                    load_file(run_dir / "value_head.safetensors").items()})
    return weights


@launches
def test_ranks_hold_identical_weights(runs):
    w0, info0 = runs.dump("dump-A", 0)
    w1, info1 = runs.dump("dump-A", 1)
    assert (info0["rank"], info1["rank"], info0["world_size"]) == (0, 1, WORLD)
    _assert_bitwise_equal(w0, w1, "rank 0 vs rank 1 after 3 steps")
    # ... and they trained: LoRA B starts at zero.
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in w0.items())
    # The run folder holds rank 0's weights (written once, by the main process).
    _assert_bitwise_equal(_final_weights(runs.root / "A"), w0, "run folder vs rank 0")


@launches
def test_controllers_and_score_moments_are_global(runs):
    _, info0 = runs.dump("dump-A", 0)
    _, info1 = runs.dump("dump-A", 1)
    assert info0["kl_coef"] == info1["kl_coef"]
    assert info0["kl_coef"] != 0.1                      # the adaptive controller moved
    assert info0["score_moments"] == info1["score_moments"]
    assert info0["score_moments"]["count"] == 3 * BATCH  # every rank saw every score
    # The last update, redone from the logged global KL and the global batch size.
    last = _metrics(runs.root / "A")[-1]
    ctl = AdaptiveKLController(last["objective/kl_coef"], target=1.0, horizon=1000)
    ctl.update(last["objective/kl"], BATCH)
    assert ctl.value == info0["kl_coef"]


@launches
def test_metrics_are_written_once_per_step_over_all_ranks(runs):
    metrics = _metrics(runs.root / "A")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    _, info0 = runs.dump("dump-A", 0)
    _, info1 = runs.dump("dump-A", 1)
    differs_from_rank0 = False
    for m, s0, s1 in zip(metrics, info0["steps"], info1["steps"], strict=True):
        # Each rank rolled out its own half of the batch.
        assert len(s0["queries"]) == len(s1["queries"]) == BATCH // WORLD
        union = s0["scores"] + s1["scores"]
        mean = sum(union) / len(union)
        std = math.sqrt(sum((x - mean) ** 2 for x in union) / len(union))
        assert m["env/reward_mean"] == pytest.approx(mean, rel=1e-5, abs=1e-7)
        assert m["env/reward_std"] == pytest.approx(std, rel=1e-4, abs=1e-7)
        rank0_mean = sum(s0["scores"]) / len(s0["scores"])
        differs_from_rank0 |= abs(rank0_mean - mean) > 1e-6
    assert differs_from_rank0, "the test cannot tell global from rank-0 statistics"
    # Disjoint shards over the whole run (the tiny train split has more than 3 x 8 prompts).
    seen = [q for info in (info0, info1) for s in info["steps"] for q in s["queries"]]
    assert len(seen) == len(set(seen)) == 3 * BATCH
    info = json.loads((runs.root / "A" / "run_info.json").read_text())
    assert info["world_size"] == WORLD


@launches
def test_resume_same_world_size_is_exact(runs):
    a, bc = runs.root / "A", runs.root / "BC"
    assert (bc / "checkpoints" / "step-1").is_dir()
    _assert_bitwise_equal(_final_weights(bc), _final_weights(a), "resumed vs uninterrupted")
    for rank in range(WORLD):
        _assert_bitwise_equal(runs.dump("dump-C", rank)[0], runs.dump("dump-A", rank)[0],
                              f"rank {rank}: resumed vs uninterrupted")
        assert runs.dump("dump-C", rank)[1]["kl_coef"] == runs.dump("dump-A", rank)[1]["kl_coef"]

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/"))}
                for r in rows]

    # B's line for step 2 was dropped on resume and written again by C.
    assert untimed(_metrics(bc)) == untimed(_metrics(a))


@launches
def test_resume_with_another_world_size_is_refused(runs, capsys):
    from detoxrl.cli import main

    before = _metrics(runs.root / "BC")
    code = main(["train", "--config", str(CONFIG), "--output-dir", str(runs.root / "BC"),
                 "--steps=3", "--quiet", *OPTIONS, "--save_every=1", "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "trained on 2 process(es) but this launch has 1" in err
    assert "Traceback" not in err
    assert _metrics(runs.root / "BC") == before   # nothing written


# ----------------------------------------------------------------------------- DeepSpeed
# detoxrl's side of DeepSpeed with fakes; tests/test_deepspeed.py launches the real thing.

def _fake_accelerator(stage: int | None, **ds_config):
    plugin = None if stage is None else SimpleNamespace(
        zero_stage=stage, deepspeed_config={"train_micro_batch_size_per_gpu": "auto",
                                            "gradient_accumulation_steps": 1, **ds_config})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin),
                           device=torch.device("cpu"), unwrap_model=lambda model: model)


def test_rollout_generates_with_synced_gpus_only_under_zero3():
    cfg = TrainConfig().finalize(1)
    calls = []

    class Policy:
        def generate(self, *args, synced_gpus=False, **kwargs):
            calls.append(synced_gpus)

    ids = torch.ones(2, 3, dtype=torch.long)
    for stage in (None, 2, 3):
        trainer = Learner(cfg, Policy(), None, _fake_accelerator(stage), optimizer=None)
        trainer.rollout(ids, ids, ["a", "b"], step_seed=0)
    assert calls == [False, False, True]


def test_deepspeed_setup_fills_the_micro_batch_and_refuses_what_is_unsupported():
    def cfg(**ppo):
        c = TrainConfig(save_every=0)
        c.ppo.batch_size, c.ppo.mini_batch_size = 16, 8
        for k, v in ppo.items():
            setattr(c.ppo, k, v)
        return c.finalize(2)

    acc = _fake_accelerator(2)
    dist.setup_deepspeed(cfg(), acc, resume=False)
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    dist.setup_deepspeed(cfg(), _fake_accelerator(None), resume=True)  # DDP: nothing to do
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        dist.setup_deepspeed(cfg(gradient_accumulation_steps=2), _fake_accelerator(3), False)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        dist.setup_deepspeed(cfg(), _fake_accelerator(2, gradient_accumulation_steps=4), False)
    with pytest.raises(ConfigError, match="save_every"):
        dist.setup_deepspeed(cfg(), _fake_accelerator(2), resume=True)
    saving = cfg()
    saving.save_every = 5
    with pytest.raises(ConfigError, match="save_every"):
        dist.setup_deepspeed(saving, _fake_accelerator(2), resume=False)


def test_reward_model_loads_whole_under_zero3():
    import transformers.integrations.deepspeed as hf_ds

    class Zero3Config:  # stands in for HfDeepSpeedConfig, which needs deepspeed installed
        def is_zero3(self):
            return True

    config = Zero3Config()
    acc = _fake_accelerator(3)
    acc.state.deepspeed_plugin.set_deepspeed_weakref = (
        lambda: setattr(hf_ds, "_hf_deepspeed_config_weak_ref", weakref.ref(config)))
    acc.state.deepspeed_plugin.set_deepspeed_weakref()
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        with dist.whole_weights(acc):
            assert not hf_ds.is_deepspeed_zero3_enabled()  # from_pretrained: no zero.Init
        assert hf_ds.is_deepspeed_zero3_enabled()
        with dist.whole_weights(_fake_accelerator(2)):
            assert hf_ds.is_deepspeed_zero3_enabled()      # only stage 3 is touched
    finally:
        hf_ds.unset_hf_deepspeed_config()


def test_lora_targets_are_checked_without_zero_init_under_zero3(tiny_t5_path):
    # transformers wraps from_config in deepspeed.zero.Init under ZeRO-3, which cannot
    # partition the meta skeleton (and without deepspeed installed cannot even be imported).
    import transformers.integrations.deepspeed as hf_ds
    from transformers import AutoModelForSeq2SeqLM

    from detoxrl.models.loading import check_lora_targets, load_config

    class Zero3Config:
        def is_zero3(self):
            return True

    config, hf_config = Zero3Config(), load_config(str(tiny_t5_path))
    hf_ds._hf_deepspeed_config_weak_ref = weakref.ref(config)
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        check_lora_targets(AutoModelForSeq2SeqLM, hf_config, ["q", "v"])
        with pytest.raises(ConfigError, match="'qkv' not found"):
            check_lora_targets(AutoModelForSeq2SeqLM, hf_config, ["q", "qkv"])
    finally:
        hf_ds.unset_hf_deepspeed_config()


def test_zero3_refuses_a_t5_whose_own_lm_head_was_tied(tiny_t5_path, tiny_gpt2_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path)  # untied, as saved
    for stage in (0, 2, 3):
        dist.refuse_tied_t5_head(stage, t5)
    t5.lm_head.weight = t5.shared.weight  # what a ZeRO-3 load does to it
    dist.refuse_tied_t5_head(2, t5)
    with pytest.raises(ConfigError, match=r"ZeRO-3.*lm_head tied.*ZeRO-2"):
        dist.refuse_tied_t5_head(3, t5)
    # Before loading, the config of an untied T5 is refused outright under ZeRO-3.
    dist.refuse_tied_t5_head(2, t5.config)
    with pytest.raises(ConfigError, match=r"ZeRO-3.*lm_head tied"):
        dist.refuse_tied_t5_head(3, t5.config)
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)  # tied by design
    assert gpt2.get_output_embeddings().weight is gpt2.get_input_embeddings().weight
    dist.refuse_tied_t5_head(3, gpt2)


def test_a_run_after_a_trainer_in_the_same_process_gets_its_own_precision(monkeypatch):
    # On a GPU the demo trains the reward and the LM with Trainer (fp32) and then RL in
    # bf16, in one process: accelerate refused the second precision.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(mixed_precision="no")
    monkeypatch.setattr(dist, "mixed_precision", lambda cfg: "bf16")  # what a GPU resolves
    try:
        acc = dist.make_accelerator(TrainConfig(save_every=0))
        assert acc.mixed_precision == "bf16"
        assert dist.make_accelerator(TrainConfig(save_every=0)).mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state()


def test_cpu_launches_of_sharded_configs_run_as_configured_or_are_refused(monkeypatch):
    # accelerate (1.16) runs CPU processes launched with an FSDP or DeepSpeed config as
    # plain DDP (MULTI_CPU); detoxrl turns FSDP2 on and refuses what it cannot run.
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from detoxrl.rl import sharding

    def launched(**env):
        for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setitem(PartialState._shared_state, "distributed_type",
                            DistributedType.MULTI_CPU)
        return _CpuAccelerator()

    ddp = launched()
    sharding.setup_sharding(ddp)
    assert ddp.distributed_type == DistributedType.MULTI_CPU and not sharding.is_fsdp(ddp)
    with pytest.raises(ConfigError, match="unset ACCELERATE_USE_CPU and set DS_ACCELERATOR"):
        sharding.setup_sharding(launched(ACCELERATE_USE_DEEPSPEED="true"))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding.setup_sharding(launched(ACCELERATE_USE_FSDP="true", FSDP_VERSION="1"))
    # The launcher's FSDP2 settings become the plugin (a real launch: tests/test_sharded.py).
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    acc = launched(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    sharding.setup_sharding(acc)
    assert sharding.is_fsdp(acc) and acc.state.fsdp_plugin.fsdp_version == 2
    assert acc.state.fsdp_plugin.reshard_after_forward is False
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
    with pytest.raises(ConfigError, match="eval_every"):
        sharding.setup_sharding(launched(ACCELERATE_USE_FSDP="true"), eval_every=5)
    # DeepSpeed processes without GPUs are given gloo (else each counts itself alone).
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sharding.process_group_kwargs() == []
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert [h.backend for h in sharding.process_group_kwargs()] == (
        [] if torch.cuda.is_available() else ["gloo"])


class _CpuAccelerator:
    """What accelerate builds for CPU processes: distributed_type read from its state."""

    def __init__(self):
        from accelerate.utils import DistributedType

        self.state = SimpleNamespace(fsdp_plugin=None, distributed_type=DistributedType.MULTI_CPU)

    @property
    def distributed_type(self):
        return self.state.distributed_type
