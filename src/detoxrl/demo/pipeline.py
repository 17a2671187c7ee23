"""The demo's stages, built from a :class:`DemoConfig`, each run once the stages it reads
are built (side by side where they do not read each other: :mod:`detoxrl.demo.parallel`).

Every stage's config is loaded and checked before the first stage runs, so a bad option
fails at once and writes nothing. Paths inside a stage's recorded inputs are written
relative to the demo and data folders (``<demo>/1-reward``, ``<data>/rtp/toxic.jsonl``),
so a moved demo folder, or another copy of the same data, is still up to date.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import load_config, to_dict
from ..runs.io import file_sha256
from . import prompts
from .cache import Stage, claim_output_dir
from .parallel import default_jobs, run_stages
from .settings import BEST_OF, JUDGE, DemoConfig, preset
from .summary import DemoRun, figures, read_summary, write_demo_summary, write_report

FOLDERS = {"data": "0-data", "reward": "1-reward", "policy": "2-policy", "rl": "3-rl",
           "eval-nontoxic": "4-eval-nontoxic", "eval-toxic": "4-eval-toxic",
           "eval-bestof": "4-eval-bestof", "report": "5-report"}
PROTOCOL_TOKENS = 20  # the RealToxicityPrompts protocol's continuation length
# What an evaluation reads of a run's config (evaluation.setup): the best-of baseline's key.
BASELINE_CONFIG = ("model", "lora", "data", "reward", "generation", "seed")


@dataclass
class _Paths:
    root: Path
    data: Path

    def folder(self, stage: str) -> Path:
        return self.root / FOLDERS[stage]

    def portable(self, obj: Any) -> Any:
        """``obj`` with the demo and data folders written as ``<demo>`` and ``<data>``."""
        if isinstance(obj, dict):
            return {k: self.portable(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.portable(v) for v in obj]
        if isinstance(obj, str):
            for base, name in ((self.root, "<demo>"), (self.data, "<data>")):
                if obj == str(base) or obj.startswith(str(base) + "/"):
                    return name + obj[len(str(base)):]
        return obj

    def named_files(self, config: dict) -> dict[str, str]:
        """SHA-256 of every data file a config names (absolute, or relative to the data
        folder), keyed by its portable path."""
        found: dict[str, str] = {}
        for value in _strings(config):
            for path in (Path(value), self.data / value):
                if path.is_absolute() and path.is_file():
                    found[self.portable(str(path))] = file_sha256(path)
                    break
        return dict(sorted(found.items()))


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) and obj else []


def _supervised_config(name: str, cls: type, overrides: list[str], paths: _Paths,
                       stage: str, seed: int):
    # The demo's seed goes first so that a stage's own --STAGE.seed wins; the paths go last
    # because the demo wires its stages together through them.
    return load_config(preset(name), ["--seed", str(seed), *overrides, "--data_dir",
                                      str(paths.data), "--output_dir",
                                      str(paths.folder(stage))], cls=cls)


def _supervised_inputs(cfg: Any, paths: _Paths) -> dict[str, Any]:
    raw = to_dict(cfg)
    config = {k: v for k, v in raw.items() if k not in ("output_dir", "data_dir")}
    return {"config": paths.portable(config), "files": paths.named_files(raw)}


def data_stage(cfg: DemoConfig, paths: _Paths) -> Stage:
    sources = prompts.source_paths(paths.data)
    limits = cfg.data_limits
    inputs = {"files": {paths.portable(str(p)): file_sha256(p) for p in sources.values()},
              **limits}
    return Stage("data", paths.folder("data"), inputs,
                 lambda folder: prompts.build(folder, paths.data, **limits))


def reward_stage(cfg: DemoConfig, paths: _Paths, quick: list[str], quiet: bool) -> Stage:
    from ..supervised.reward_training import RewardTrainingConfig, train_reward

    rcfg = _supervised_config("reward-offensive", RewardTrainingConfig,
                              [*quick, *cfg.reward_overrides], paths, "reward", cfg.seed)
    return Stage("reward", paths.folder("reward"), _supervised_inputs(rcfg, paths),
                 lambda folder: train_reward(rcfg, overwrite=True, quiet=quiet))


def policy_stage(cfg: DemoConfig, paths: _Paths, quick: list[str], quiet: bool) -> Stage:
    from ..supervised.sft import SFTConfig, sft

    scfg = _supervised_config(f"lm-{cfg.arch}", SFTConfig, [*quick, *cfg.policy_overrides],
                              paths, "policy", cfg.seed)
    return Stage("policy", paths.folder("policy"), _supervised_inputs(scfg, paths),
                 lambda folder: sft(scfg, overwrite=True, quiet=quiet))


def rl_stage(cfg: DemoConfig, paths: _Paths, quick: list[str], upstream: dict[str, str],
             quiet: bool) -> Stage:
    """PPO with a fresh LoRA on the stage-2 LM, rewarded by the stage-1 classifier's
    ``notoffensive``, on the stage-0 prompts."""
    tcfg = _rl_config(cfg, paths, quick)
    copy.deepcopy(tcfg).finalize()  # batch arithmetic checked now, before any stage runs
    config = {k: v for k, v in to_dict(tcfg).items() if k != "output_dir"}
    inputs = {"config": paths.portable(config), "upstream": upstream}
    return Stage("rl", paths.folder("rl"), inputs, lambda folder: _train_rl(tcfg, quiet))


def _rl_config(cfg: DemoConfig, paths: _Paths, quick: Sequence[str],
               extra: Sequence[str] = ()):
    """The RL stage's config: its preset, with the demo's stage folders and options."""
    return load_config(preset(f"detox-{cfg.arch}"), [
        *quick, "--seed", str(cfg.seed), *cfg.rl_overrides,
        "--model.name_or_path", str(paths.folder("policy")),
        "--reward.model", str(paths.folder("reward")),
        "--data.path", str(paths.folder("data") / prompts.TRAIN_FILE),
        "--output_dir", str(paths.folder("rl")), *extra])


def _train_rl(tcfg, quiet: bool) -> dict[str, Any]:
    from ..rl.detox_trainer import train

    result = train(tcfg, overwrite=True, quiet=quiet)
    last = result.metrics[-1] if result.metrics else {}
    keys = ("env/reward_mean", "objective/kl", "objective/kl_coef")
    return {"steps": len(result.metrics), **{k: last.get(k) for k in keys}}


def eval_stage(cfg: DemoConfig, paths: _Paths, part: str, upstream: dict[str, str],
               quiet: bool, quick: Sequence[str] = ()) -> Stage:
    """The RealToxicityPrompts protocol on one held-out set, as ``detoxrl evaluate`` runs
    it; part ``bestof``: the non-toxic set answered by the starting policy reranked (best of
    :data:`BEST_OF` by the reward), the baseline RL is shown beside. That one reads no RL
    output, only the RL stage's settings (``quick``: its quick options) for the model,
    reward, prompt recipe and seed, so it runs beside RL and a changed RL option that
    leaves those alone does not rebuild it."""
    name = f"eval-{part}"
    prompt_file = paths.folder("data") / prompts.HELD_OUT_FILES[
        "nontoxic" if part == "bestof" else part]
    n = str(cfg.toxic_prompts) if part == "toxic" else "all"
    best_of = BEST_OF if part == "bestof" else None
    # The judge's floor: the RealToxicityPrompts continuations Perspective scored clean.
    floor = [str(p) for p in prompts.source_paths(paths.data).values()]
    inputs = {"protocol": "rtp", "min_length": PROTOCOL_TOKENS, "n": n,
              "samples_per_prompt": cfg.samples_per_prompt,
              "judges": [JUDGE], "prompts": paths.portable(str(prompt_file)),
              "judge_floor": paths.portable(floor), "best_of": best_of,
              "upstream": upstream}
    # The protocol's 20 tokens, all of them: EOS is blocked in evaluation as in the RL
    # rollouts (configs/mini/detox-*.yaml), so a shorter answer cannot pass for a cleaner one.
    # The run's config.yaml names the policy and reward by the paths they had when RL ran;
    # this demo's own stages are named instead, so a moved or copied demo still evaluates.
    overrides = ["--generation.min_length", str(PROTOCOL_TOKENS),
                 "--model.name_or_path", str(paths.folder("policy")),
                 "--reward.model", str(paths.folder("reward"))]
    opts = dict(n=None if n == "all" else int(n), samples_per_prompt=cfg.samples_per_prompt,
                protocol="rtp", explicit_generation=frozenset({"min_length"}),
                judges=[JUDGE], prompts=str(prompt_file), judge_floor=floor,
                best_of=best_of, progress=not quiet)
    baseline = _rl_config(cfg, paths, quick, overrides) if best_of else None
    if baseline is not None:
        read = to_dict(baseline)
        inputs["config"] = paths.portable({k: read[k] for k in BASELINE_CONFIG})

    def build(folder: Path) -> dict[str, Any]:
        from ..evaluation.setup import Target, resolve_target

        target = (Target(baseline, None, folder) if baseline is not None else
                  resolve_target(str(paths.folder("rl")), None, None, overrides, str(folder)))
        _evaluate(target, folder, opts)
        return {"figures": figures(read_summary(folder))}

    # The best-of stage samples BEST_OF times as much: of the stages ready at once, it
    # starts first.
    return Stage(name, paths.folder(name), inputs, build, weight=BEST_OF if best_of else 1)


def _evaluate(target, out: Path, opts: dict[str, Any]) -> None:
    """What ``detoxrl evaluate RUN_DIR --output OUT ...`` does, printed the same way."""
    from ..evaluation.printing import format_summary
    from ..evaluation.runner import evaluate, rebuild_report
    from ..evaluation.setup import EvalOptions

    summary = evaluate(target, EvalOptions(**opts))
    print(format_summary(summary))
    print(f"\nresults: {out}/summary.json, toxicity.json, generations.jsonl")
    report = rebuild_report(out)
    if report is not None:
        print(f"report: {report}")


def report_stage(cfg: DemoConfig, paths: _Paths, upstream: dict[str, str]) -> Stage:
    return Stage("report", paths.folder("report"), {"upstream": upstream},
                 lambda folder: write_report(folder, paths.root, FOLDERS))


def plan(cfg: DemoConfig, quiet: bool = False) -> tuple[Path, list[Stage]]:
    """Every stage of the demo, configs loaded and checked; nothing is written yet."""
    from .settings import QUICK

    paths = _Paths(Path(cfg.output_dir).resolve(), Path(cfg.data_dir).expanduser().resolve())
    quick = QUICK if cfg.quick else {"reward": [], "policy": [], "rl": []}
    data = data_stage(cfg, paths)
    reward = reward_stage(cfg, paths, quick["reward"], quiet)
    policy = policy_stage(cfg, paths, quick["policy"], quiet)
    before_rl = {s.name: s.key for s in (data, reward, policy)}
    rl = rl_stage(cfg, paths, quick["rl"], before_rl, quiet)
    trained = {"data": data.key, "rl": rl.key}
    evals = [eval_stage(cfg, paths, "nontoxic", trained, quiet),
             eval_stage(cfg, paths, "toxic", trained, quiet),
             eval_stage(cfg, paths, "bestof", before_rl, quiet, quick["rl"])]
    report = report_stage(cfg, paths, {s.name: s.key for s in evals})
    return paths.root, [data, reward, policy, rl, *evals, report]


def run_demo(cfg: DemoConfig, fresh: bool = False, quiet: bool = False) -> DemoRun:
    """Run (or skip, when up to date) every stage; write demo_summary.json."""
    from ..runs.preflight import default_cpu_threads

    cfg.finalize()
    default_cpu_threads()
    start = time.perf_counter()
    root, stages = plan(cfg, quiet)
    claim_output_dir(root)
    number = {stage.name: i + 1 for i, stage in enumerate(stages)}
    results = run_stages(stages, fresh, cfg.jobs or default_jobs(), root,
                         label=lambda s: f"[{number[s.name]}/{len(stages)}] {s.name}")
    run = DemoRun(cfg, root, results, time.perf_counter() - start)
    write_demo_summary(run)
    return run
