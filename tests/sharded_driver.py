"""Test-only driver of tests/test_sharded.py and tests/test_distributed.py: several short runs
in one launch of N processes, and several launches in one helper process.

``python tests/sharded_driver.py SPEC.json`` (under ``accelerate launch``) trains every case
of the spec one after the other in the same processes, so that the process group starts
once. ``python tests/sharded_driver.py --serve PLAN.json`` runs several such launches in
turn, each as ``accelerate launch`` runs it but with its ranks forked from this process
(see :func:`launch`), so that torch, transformers and detoxrl are imported once in all.
Each case is a real ``DetoxTrainer`` run; each rank writes what it saw to
``<dump>/<case>.rank<r>.json``:

* per step and per sample (keyed by prompt and sample index): the response tokens, the
  score, the advantages, the per-token rewards, the per-token log-ratio to the reference
  (the k1 KL) and the values;
* the step metrics;
* what its run folder held before it started (for a resumed run, what the interrupted one
  left).

A case may also *replay* the responses another run recorded (a one-process run then learns
from exactly the samples a two-process run drew), or have one rank kill itself with
SIGKILL in the middle of a step's PPO update.

``python tests/sharded_driver.py --cli ARGS`` (under ``accelerate launch``) is one rank of
``detoxrl ARGS``; see :func:`cli`.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"


def _rows(batch, k: int) -> dict[str, dict]:
    """One record per sample, keyed ``<prompt>#<sample index>``; padding dropped."""
    mask = batch.response_mask.bool()
    kl = batch.logprobs - batch.ref_logprobs
    out = {}
    for i, query in enumerate(batch.queries):
        m = mask[i]
        row = {"tokens": batch.response_ids[i][m].tolist(), "score": float(batch.scores[i]),
               "advantages": batch.advantages[i][m].tolist(), "kl": kl[i][m].tolist()}
        for name in ("rewards", "values"):
            value = getattr(batch, name)
            if value is not None:
                row[name] = value[i][m].tolist()
        out[f"{query}#{i % k}"] = row
    return out


def _recording(trainer, records: list, kill: dict | None):
    learner, k = trainer.learner, trainer.args.ppo.num_generations
    step, optimizer_step = learner.step, learner.optimizer_step

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        records.append({"samples": _rows(result.rollout, k), "metrics": result.metrics})
        return result

    def killing_optimizer_step(mini):
        out = optimizer_step(mini)
        if (kill and trainer.accelerator.process_index == kill["rank"]
                and trainer.state.global_step == kill["step"]):
            os.kill(os.getpid(), signal.SIGKILL)   # mid-update: one optimizer step done
        return out

    learner.step, learner.optimizer_step = recording_step, killing_optimizer_step


def _replaying(trainer, recorded: list[dict]):
    """The rollout generates as usual, then its responses are replaced by the recorded ones."""
    learner, tok, k = trainer.learner, trainer.processing_class, trainer.args.ppo.num_generations
    rollout, calls = learner.rollout, []

    def replaying_rollout(query_ids, query_mask, queries, step_seed):
        batch = rollout(query_ids, query_mask, queries, step_seed)
        samples = recorded[len(calls)]["samples"]
        calls.append(1)
        rows = [samples[f"{q}#{i % k}"]["tokens"] for i, q in enumerate(batch.queries)]
        ids = torch.tensor(rows, dtype=batch.response_ids.dtype, device=batch.response_ids.device)
        if ids.shape != batch.response_ids.shape or not batch.response_mask.bool().all():
            raise AssertionError("replay needs fixed-length responses (EOS blocked throughout)")
        return replace(batch, response_ids=ids, logprobs=None, values=None, encoder_hidden=None,
                       responses=tok.batch_decode(ids, skip_special_tokens=True))

    learner.rollout = replaying_rollout


def run_case(case: dict, dump: Path) -> None:
    """One case; what stopped it goes to ``<dump>/<case>.rank<r>.error`` before it propagates."""
    try:
        _run_case(case, dump)
    except Exception:
        dump.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        (dump / f"{case['name']}.rank{rank}.error").write_text(traceback.format_exc())
        raise


def _run_case(case: dict, dump: Path) -> None:
    from detoxrl.config import load_config
    from detoxrl.rl.detox_trainer import DetoxTrainer
    from detoxrl.rl.distributed import zero_stage

    found = _found(Path(case["out"]))   # before any rank of this case writes there
    cfg = load_config(CONFIG, [*case["overrides"], "--output_dir", case["out"]])
    trainer = DetoxTrainer(args=cfg, quiet=True)
    records: list = []
    _recording(trainer, records, case.get("kill"))
    if case.get("replay"):
        _replaying(trainer, merged_records(Path(case["replay"])))
    trainer.train(resume_from_checkpoint=case.get("resume", False))
    acc = trainer.accelerator
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"{case['name']}.rank{acc.process_index}.json").write_text(json.dumps({
        "world_size": acc.num_processes, "distributed_type": acc.distributed_type.value,
        "zero_stage": zero_stage(acc), "found": found, "steps": records}))


def _found(out: Path) -> dict:
    """What a run folder held: files (checkpoints apart), checkpoints, metric lines."""
    checkpoints, metrics = out / "checkpoints", out / "metrics.jsonl"
    return {"files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                            if p.is_file() and "checkpoints" not in p.relative_to(out).parts),
            "checkpoints": sorted(p.name for p in checkpoints.glob("*")),
            "metrics": metrics.read_text().splitlines() if metrics.exists() else []}


def merged_records(prefix: Path) -> list[dict]:
    """Every rank's records of one case (``<dump>/<case>``), merged per step."""
    ranks = sorted(prefix.parent.glob(prefix.name + ".rank*.json"))
    loaded = [json.loads(p.read_text())["steps"] for p in ranks]
    if not loaded:
        raise FileNotFoundError(f"no records under {prefix}")
    return [{"samples": {key: row for rank in step for key, row in rank["samples"].items()},
             "metrics": step[0]["metrics"]} for step in zip(*loaded, strict=True)]


def main(spec_path: str) -> None:
    """One rank: every case of the spec, in order, then the end of the program."""
    _fresh_signals()
    spec = json.loads(Path(spec_path).read_text())
    for case in spec["cases"]:
        run_case(case, Path(spec["dump"]))
    from accelerate.state import PartialState

    PartialState().destroy_process_group()


def _fresh_signals() -> None:
    # A rank forked by ``launch`` inherits the launcher's handlers; a fresh interpreter's
    # defaults end it even inside a collective when the launcher stops it.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def launch(argv: list[str], env: dict[str, str]) -> int:
    """``accelerate launch ARGV`` in this process, with ``env`` set, its ranks forked.

    accelerate's own launcher reads the config file and sets the ranks' environment, and
    torchrun's agent starts and watches them, as ``accelerate launch`` does; the ranks are
    forked from this process (torchrun's ``--run-path --start-method fork``), which has
    imported torch, transformers, peft and detoxrl once, instead of each importing them
    anew. Returns the exit status ``accelerate launch`` would have.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    args.run_path, args.start_method = True, "fork"
    saved = {k: os.environ.pop(k) for k in env if env[k] is None and k in os.environ}
    try:
        with patch_environment(**{k: v for k, v in env.items() if v is not None}):
            launch_command(args)
    except ChildFailedError as failure:
        print(failure, file=sys.stderr)
        return 1
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        os.environ.update(saved)
    return 0


def cli(argv: list[str]) -> int:
    """One rank of ``detoxrl train ARGV``, as the command runs it. Under ``DETOXRL_TEST_DUMP``
    the rank also writes what it saw there: per step the prompts and raw scores of its own
    rollouts, and at the end its adapter and value head (``rank<r>.safetensors``), KL
    coefficient and score moments (``rank<r>.json``)."""
    _fresh_signals()
    if os.environ.get("DETOXRL_TEST_DUMP"):
        _dumping(Path(os.environ["DETOXRL_TEST_DUMP"]))
    from detoxrl.cli import main as detoxrl_main

    return detoxrl_main(argv)


def _dumping(out: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from detoxrl.rl import detox_trainer, learner

    steps, score, train = [], learner.Learner.score, detox_trainer.DetoxTrainer.train

    def recording_score(self, batch, *args, **kwargs):
        batch, raw = score(self, batch, *args, **kwargs)
        steps.append({"queries": list(batch.queries), "scores": raw.tolist()})
        return batch, raw

    def dumping_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        t = self.learner
        rank = t.accelerator.process_index
        tensors = {"adapter." + k: v for k, v in get_peft_model_state_dict(
            t.policy.model, adapter_name="default").items()}
        tensors.update({"value_head." + k: v
                        for k, v in t.policy.value_head.state_dict().items()})
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": t.accelerator.num_processes,
            "kl_coef": t.kl_ctl.value, "score_moments": t.score_moments.state_dict(),
            "steps": steps}))
        return result

    learner.Learner.score = recording_score
    detox_trainer.DetoxTrainer.train = dumping_train


def serve(plan_path: str) -> None:
    """Every launch of the plan in turn; their exit statuses and seconds to ``<plan>.out``."""
    # What every rank imports, imported once before any rank forks.
    for module in ("accelerate.commands.launch", "peft", "detoxrl.rl.detox_trainer",
                   "detoxrl.data.prompts", "transformers.models.t5.modeling_t5",
                   "transformers.models.gpt2.modeling_gpt2",
                   "transformers.models.roberta.modeling_roberta"):
        importlib.import_module(module)

    plan, results = json.loads(Path(plan_path).read_text()), {}
    for name, argv, env in plan:
        start = time.perf_counter()
        results[name] = {"returncode": launch(argv, env)}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        Path(plan_path + ".out").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "--cli":
        sys.exit(cli(sys.argv[2:]))
    else:
        main(sys.argv[1])
