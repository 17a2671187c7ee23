"""Test-only driver of tests/test_sharded.py: several short runs in one launch of N processes.

``python tests/sharded_driver.py SPEC.json`` (under ``accelerate launch``) trains every case
of the spec one after the other in the same processes, so the interpreter, torch and the
process group start once. Each case is a real ``DetoxTrainer`` run; each rank writes what
it saw to ``<dump>/<case>.rank<r>.json``:

* per step and per sample (keyed by prompt and sample index): the response tokens, the
  score, the advantages, the per-token rewards, the per-token log-ratio to the reference
  (the k1 KL) and the values;
* the step metrics.

A case may also *replay* the responses another run recorded (a one-process run then learns
from exactly the samples a two-process run drew), or have one rank kill itself with
SIGKILL in the middle of a step's PPO update.
"""

from __future__ import annotations

import json
import os
import signal
import sys
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
    from detoxrl.config import load_config
    from detoxrl.rl.detox_trainer import DetoxTrainer

    cfg = load_config(CONFIG, [*case["overrides"], "--output_dir", case["out"]])
    trainer = DetoxTrainer(args=cfg, quiet=True)
    # end_training destroys the process group, which the next case of this launch needs.
    trainer.accelerator.end_training = lambda: None
    records: list = []
    _recording(trainer, records, case.get("kill"))
    if case.get("replay"):
        _replaying(trainer, merged_records(Path(case["replay"])))
    trainer.train(resume_from_checkpoint=case.get("resume", False))
    acc = trainer.accelerator
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"{case['name']}.rank{acc.process_index}.json").write_text(json.dumps({
        "world_size": acc.num_processes, "distributed_type": acc.distributed_type.value,
        "steps": records}))


def merged_records(prefix: Path) -> list[dict]:
    """Every rank's records of one case (``<dump>/<case>``), merged per step."""
    ranks = sorted(prefix.parent.glob(prefix.name + ".rank*.json"))
    loaded = [json.loads(p.read_text())["steps"] for p in ranks]
    if not loaded:
        raise FileNotFoundError(f"no records under {prefix}")
    return [{"samples": {key: row for rank in step for key, row in rank["samples"].items()},
             "metrics": step[0]["metrics"]} for step in zip(*loaded, strict=True)]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for case in spec["cases"]:
        run_case(case, Path(spec["dump"]))
    from accelerate.state import PartialState

    PartialState().destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
