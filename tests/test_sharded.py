"""Two CPU processes against one: DDP, FSDP2, ZeRO-2 and ZeRO-3 train what a single process
trains, and a two-process FSDP run with a rank killed mid-step resumes bit-identically.

The two-process runs are real ``DetoxTrainer`` runs of ``tests/sharded_driver.py``, launched
by accelerate's own launcher from the config files with gloo, several runs per launch so
that each process group starts once. One helper process imports the stack once and runs
these launches in turn, each rank forked from it (torchrun's ``--run-path --start-method
fork``; see ``sharded_driver.launch``):

* DDP: the tiny T5 and the tiny GPT-2, each with PPO and GRPO, 2 steps;
* FSDP2 (``configs/accelerate/fsdp.yaml``): the same four runs, then a fifth, the T5 PPO run
  again with a checkpoint per step, in which rank 1 kills itself (SIGKILL) after the first
  optimizer step of step 2;
* ZeRO-3 (``deepspeed-zero3.yaml``): the GPT-2 runs, then the T5, which must be refused;
* ZeRO-2 (``deepspeed-zero2.yaml``): the four runs.

A normal ``accelerate launch`` of two fresh processes then resumes the killed run. The
one-process references run in the test process: the same four runs, each replaying
the responses the DDP run sampled, so that both learn from the same samples.

For 2 to equal 1 up to float rounding, every sample must weigh the same however the batch
is split: responses have a fixed length (EOS blocked throughout, so each micro-batch's
token mean is a mean over samples) and one optimizer step takes the whole batch (PPO's
mini-batches are drawn per rank). The global statistics are on: score normalisation and
reward whitening (PPO) are computed over both ranks' samples.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from helpers import DRIVER, LAUNCH_MARKS, free_port, launch_env, serve_plan, why  # noqa: E402
from sharded_driver import merged_records, run_case  # noqa: E402

pytestmark = LAUNCH_MARKS

LENGTH = 5   # tokens per response, every response
COMMON = [
    "--steps=2", "--save_every=0", "--ppo.batch_size=4", "--ppo.mini_batch_size=4",
    "--ppo.ppo_epochs=2", f"--generation.min_new_tokens_draw={LENGTH}",
    f"--generation.max_new_tokens_draw={LENGTH}", f"--generation.min_length={LENGTH}",
    "--num_samples_logged=0",
]
ALGORITHMS = {
    "ppo": ["--ppo.normalize_scores=true", "--ppo.whiten_rewards=true"],
    # mini_batch_size counts samples: 4 prompts x 2 samples, one optimizer step per epoch.
    "grpo": ["--ppo.algorithm=grpo", "--ppo.num_generations=2", "--ppo.mini_batch_size=8"],
}
MODELS = ("t5", "gpt2")
CASES = [f"{m}-{a}" for m in MODELS for a in ALGORITHMS]
# transformers 5 loads the FLAN-T5-shaped tiny T5 under ZeRO-3 with its lm_head tied, which
# detoxrl refuses (docs/scaling.md): ZeRO-3 trains the GPT-2 only, and must refuse the T5.
ZERO3_CASES = [c for c in CASES if c.startswith("gpt2")]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NEEDS_DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
BACKENDS = [("ddp", c) for c in CASES] + [("fsdp", c) for c in CASES] + [
    pytest.param("zero3", c, marks=NEEDS_DEEPSPEED) for c in ZERO3_CASES] + [
    pytest.param("zero2", c, marks=NEEDS_DEEPSPEED) for c in CASES]
CONFIGS = {"fsdp": "fsdp.yaml", "zero3": "deepspeed-zero3.yaml",
           "zero2": "deepspeed-zero2.yaml"}
KILLED = "t5-ppo-killed"
RESUMED = f"fsdp-{KILLED}-resumed"
# The killed run and the uninterrupted one it must end equal to (the FSDP T5 PPO case).
KILL_OPTIONS = ["--save_every=1"]
# fp32 on the CPU; the two runs differ only in the order of float sums (all-reduce,
# reduce-scatter, batch composition of each forward), a few ulp per op.
ATOL = 1e-5
TIMEOUT = 600   # per launch, for a hang only (one took 321 s on a starved CPU core)


def _overrides(case: str) -> list[str]:
    model, algorithm = case.split("-")[:2]
    return [*COMMON, f"--model.name_or_path=tiny:{model}", *ALGORITHMS[algorithm]]


def _launch_args(backend: str) -> list[str]:
    config = (["--config_file", str(ROOT / "configs" / "accelerate" / CONFIGS[backend])]
              if backend in CONFIGS else ["--multi_gpu"])
    return [*config, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def _launch_env(backend: str) -> dict[str, str | None]:
    if backend.startswith("zero"):   # accelerate drops a DeepSpeed config under ACCELERATE_USE_CPU
        return {"ACCELERATE_USE_CPU": None, "DS_ACCELERATOR": "cpu"}
    return {"ACCELERATE_USE_CPU": "true"}


class Launcher:
    def __init__(self, root: Path):
        self.root, self.dump = root, root / "dump"
        self.env = launch_env(root)
        self.status: dict[str, dict] = {}   # per launch: returncode, seconds

    def case(self, backend: str, case: str, **extra) -> dict:
        overrides = _overrides(case) + extra.pop("overrides", [])
        return {"name": f"{backend}-{case}", "out": str(self.root / backend / case),
                "overrides": overrides, **extra}

    def run_plan(self, launches: list[tuple[str, list[dict]]]) -> None:
        """Every launch in turn, in one helper process (``sharded_driver.py --serve``)."""
        plan = []
        for backend, cases in launches:
            spec = self.root / f"{backend}.json"
            spec.write_text(json.dumps({"dump": str(self.dump), "cases": cases}))
            plan.append([backend, [*_launch_args(backend), str(DRIVER), str(spec)],
                         _launch_env(backend)])
        self.served, self.status = serve_plan(plan, self.root / "plan.json", self.env,
                                              TIMEOUT * len(plan))
        assert self.served.returncode == 0 and self.status, why(self.served.stderr)

    def launch_fresh(self, name: str, backend: str, cases: list[dict]) -> None:
        """One launch by ``accelerate launch``, its ranks fresh interpreters."""
        spec = self.root / f"{name}.json"
        spec.write_text(json.dumps({"dump": str(self.dump), "cases": cases}))
        env = {k: v for k, v in {**self.env, **_launch_env(backend)}.items() if v is not None}
        start = time.perf_counter()
        self.fresh = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", *_launch_args(backend),
             str(DRIVER), str(spec)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        self.status[name] = {"returncode": self.fresh.returncode,
                             "seconds": round(time.perf_counter() - start, 1)}

    def records(self, name: str) -> list[dict]:
        return merged_records(self.dump / name)

    def info(self, name: str, rank: int = 0) -> dict:
        return json.loads((self.dump / f"{name}.rank{rank}.json").read_text())

    def error(self, name: str) -> str:
        """What stopped a case, from each rank that recorded it."""
        return "\n".join(p.read_text() for p in sorted(self.dump.glob(f"{name}.rank*.error")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("sharded"))
    fsdp = [launcher.case("fsdp", c, overrides=KILL_OPTIONS if c == "t5-ppo" else [])
            for c in CASES]
    killed = launcher.case("fsdp", "t5-ppo", overrides=KILL_OPTIONS, kill={"rank": 1, "step": 1})
    killed.update(name=f"fsdp-{KILLED}", out=str(launcher.root / "fsdp" / KILLED))
    plan = [("ddp", [launcher.case("ddp", c) for c in CASES]), ("fsdp", [*fsdp, killed])]
    if HAS_DEEPSPEED:
        plan += [("zero3", [launcher.case("zero3", c) for c in ZERO3_CASES]
                  + [launcher.case("zero3", "t5-ppo")]),
                 ("zero2", [launcher.case("zero2", c) for c in CASES])]
    launcher.run_plan(plan)
    # Resumed in ranks forked from the helper after the killed launch, step 2 came out 1e-8
    # off the uninterrupted run; in fresh processes it is bit-identical, as a user's is.
    launcher.launch_fresh("resume", "fsdp", [{**killed, "name": RESUMED, "kill": None,
                                              "resume": True}])
    # One process: the same runs, learning from the samples the DDP run drew.
    cache = os.environ.get("DETOXRL_CACHE")
    os.environ["DETOXRL_CACHE"] = str(launcher.root / "cache")   # the same tiny models
    try:
        for case in CASES:
            run_case(launcher.case("single", case, replay=str(launcher.dump / f"ddp-{case}")),
                     launcher.dump)
    finally:
        if cache is None:
            os.environ.pop("DETOXRL_CACHE")
        else:
            os.environ["DETOXRL_CACHE"] = cache
    print("per launch:", launcher.status)   # shown with pytest -s
    return launcher


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights = {"adapter." + k: v for k, v in
               load_file(run_dir / "adapter_model.safetensors").items()}
    if (run_dir / "value_head.safetensors").exists():
        weights.update({"value_head." + k: v for k, v in
                        load_file(run_dir / "value_head.safetensors").items()})
    return weights


def _assert_close_samples(ours: list[dict], theirs: list[dict], what: str) -> None:
    assert len(ours) == len(theirs) == 2, what
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert sorted(a["samples"]) == sorted(b["samples"]), f"{what}: step {step + 1} prompts"
        for key, row in a["samples"].items():
            other = b["samples"][key]
            assert row["tokens"] == other["tokens"], f"{what}: step {step + 1} samples differ"
            for field in ("score", "advantages", "kl", "rewards", "values"):
                assert (field in row) == (field in other), field
                if field in row:
                    got, want = torch.tensor(row[field]), torch.tensor(other[field])
                    assert torch.allclose(got, want, rtol=0, atol=ATOL), (
                        f"{what}: step {step + 1} {field}: max diff "
                        f"{(got - want).abs().max():.2e}")
        assert a["metrics"]["objective/kl"] == pytest.approx(b["metrics"]["objective/kl"],
                                                             abs=ATOL)


@pytest.mark.parametrize(("backend", "case"), BACKENDS)
def test_two_processes_train_what_one_trains(runs, backend, case):
    if not (runs.dump / f"{backend}-{case}.rank1.json").exists():
        stopped = runs.error(f"{backend}-{case}") or why(runs.served.stderr)
        pytest.fail(f"the {backend} launch stopped before {case} ended:\n{stopped}")
    info = runs.info(f"{backend}-{case}", rank=1)
    assert info["world_size"] == 2
    assert (info["distributed_type"], info["zero_stage"]) == {
        "ddp": ("MULTI_CPU", 0), "fsdp": ("FSDP", 0), "zero3": ("DEEPSPEED", 3),
        "zero2": ("DEEPSPEED", 2)}[backend]
    two, one = runs.records(f"{backend}-{case}"), runs.records(f"single-{case}")
    _assert_close_samples(two, one, f"{backend} vs 1 process, {case}")
    # Both ranks' samples made the statistics: 4 prompts (x2 for GRPO) per step.
    assert len(two[0]["samples"]) == 4 * (2 if "grpo" in case else 1)
    a, b = _weights(runs.root / backend / case), _weights(runs.root / "single" / case)
    assert sorted(a) == sorted(b) and any("value_head" in k for k in a) == ("ppo" in case)
    trained = [k for k in a if "lora_B" in k and b[k].abs().max() > 0]
    assert trained, "the adapter did not move: the comparison would prove nothing"
    for name in a:
        diff = (a[name] - b[name]).abs().max()
        assert diff <= ATOL, f"{backend} vs 1 process, {case}: {name} differs by {diff:.2e}"


def test_a_program_trains_again_on_the_same_processes(runs):
    # Each launch trained its runs one after another in the same two processes: the end of
    # a run leaves the process group up for the next (``detoxrl train`` ends it on exit).
    assert runs.status["ddp"]["returncode"] == 0
    assert all((runs.dump / f"ddp-{c}.rank{r}.json").exists() for c in CASES for r in (0, 1))


@NEEDS_DEEPSPEED
def test_zero3_refuses_the_t5_in_two_processes(runs):
    assert runs.status["zero3"]["returncode"] != 0   # the T5 came last, after the GPT-2 runs
    assert "lm_head tied to the embeddings" in runs.error("zero3-t5-ppo")
    assert not (runs.root / "zero3" / "t5-ppo" / "adapter_model.safetensors").exists()


def test_a_rank_killed_mid_step_resumes_bit_identically(runs):
    killed, uninterrupted = runs.root / "fsdp" / KILLED, runs.root / "fsdp" / "t5-ppo"
    assert runs.status["fsdp"]["returncode"] != 0
    # Rank 1 died from the kill, not from an error (rank 0 may fail on the lost connection).
    assert not (runs.dump / f"fsdp-{KILLED}.rank1.error").exists()
    assert runs.status["resume"]["returncode"] == 0, why(runs.fresh.stderr)
    left = runs.info(RESUMED)["found"]   # what the killed launch left
    assert left["checkpoints"] == ["step-1"] and len(left["metrics"]) == 1
    assert "adapter_model.safetensors" not in left["files"]   # it never finished
    a, b = _weights(killed), _weights(uninterrupted)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    resumed = runs.records(RESUMED)   # the resumed launch ran step 2 only
    assert len(resumed) == 1
    assert resumed[0] == runs.records("fsdp-t5-ppo")[1] | {"metrics": resumed[0]["metrics"]}

    def untimed(path):
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/"))}
                for r in rows]

    assert untimed(killed) == untimed(uninterrupted)


def test_fsdp_checkpoint_holds_the_files_of_a_one_process_run(runs):
    step1 = runs.root / "fsdp" / "t5-ppo" / "checkpoints" / "step-1"
    single = runs.root / "single" / "t5-ppo"
    names = {p.relative_to(step1).as_posix() for p in step1.rglob("*") if p.is_file()}
    assert {"adapter/adapter_model.safetensors", "adapter/value_head.safetensors",
            "optimizer.safetensors"} <= names
    optimizer = load_file(step1 / "optimizer.safetensors")
    weights = _weights(single)
    # Whole AdamW moments, one per trainable tensor, shaped as the weights.
    assert len([k for k in optimizer if k.endswith(".exp_avg")]) == len(weights)
    assert sorted(v.shape for k, v in optimizer.items() if k.endswith(".exp_avg")) == sorted(
        v.shape for v in weights.values())
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        ours = load_file(step1 / "adapter" / name)
        final = load_file(single / name)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in final.items()}
