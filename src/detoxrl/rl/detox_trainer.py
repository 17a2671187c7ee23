"""``DetoxTrainer``: the public trainer, shaped like transformers' and TRL's trainers.

It takes names or loaded objects (a model, a tokenizer as ``processing_class``, a
``datasets.Dataset``, a ``peft.LoraConfig``, reward functions), runs PPO steps, writes the
run folder and calls ``transformers.TrainerCallback`` hooks: ``on_step_end`` and ``on_log``
(with the step's metrics), ``on_evaluate``, ``on_save``, ``on_train_begin``/``on_train_end``.
A callback stops training by setting ``control.should_training_stop``, asks for an
evaluation with ``control.should_evaluate`` and for a checkpoint with ``control.should_save``.
``detoxrl train`` builds the same object from the YAML config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, to_dict
from ..errors import ConfigError, DataError
from ..runs import run_folder
from ..runs.preflight import check_hub_resources, check_trackers, default_cpu_threads
from . import distributed as dist
from .assembly import batch_indices, build_learner, step_seed
from .inputs import (
    build_tiny_first,
    named_resources,
    policy_tokenizer,
    prompt_dataset,
    record_names,
    reward_columns,
)
from .learner import Learner
from .sharding import root_gathered, shard_optimizer_state, sliced_loads, whole_optimizer_state


class DetoxTrainer:
    """Detoxify a text generator with PPO against one or more rewards.

    Args:
        model: Hub id or folder (sets ``args.model.name_or_path``), or a loaded
            ``AutoModelForSeq2SeqLM`` / ``AutoModelForCausalLM``. Default: ``args.model``.
        reward_funcs: A callable ``f(prompts=..., completions=..., **columns)``, a classifier
            id or path (str), or a list of these. Default: the classifier in ``args.reward``.
        args: The :class:`~detoxrl.TrainConfig`. Default: ``TrainConfig()``.
        train_dataset: A ``datasets.Dataset`` with a ``prompt`` (or ``query``) text column;
            every other column reaches the rewards as a keyword argument. Default: the
            prompts ``args.data`` describes (train split).
        eval_dataset: Prompts for :meth:`evaluate`; default: the held-out test split.
        processing_class: The policy's tokenizer, loaded or by name. Default: the model's.
        callbacks: ``transformers.TrainerCallback`` instances (or classes).
        peft_config: A ``peft.LoraConfig`` used as it is instead of ``args.lora``.
        reward_weights: One weight per reward function; default 1 each.
        quiet: No progress bar and no parameter report.
    """

    def __init__(self, model: Any = None, reward_funcs: Any = None,
                 args: TrainConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None,
                 callbacks: list | None = None, peft_config: Any = None,
                 reward_weights: list[float] | None = None, quiet: bool = False):
        from transformers import TrainerControl

        from ..evaluation.curve import Validator

        self.args = args = args if args is not None else TrainConfig()
        self.quiet = quiet
        record_names(args, model, peft_config)
        check_trackers(args.log_with)
        default_cpu_threads()
        self.accelerator = dist.make_accelerator(args)
        check_hub_resources(named_resources(args, model, reward_funcs, train_dataset,
                                             processing_class))
        build_tiny_first(self.accelerator, args, reward_funcs, processing_class)
        tokenizer = policy_tokenizer(args, model, processing_class)
        # Data errors surface before the models load; the prompts need only the tokenizer.
        self.train_dataset, self.eval_dataset = self._prompt_datasets(
            train_dataset, eval_dataset, tokenizer)
        with dist.whole_weights(self.accelerator):  # a judge classifier is never sharded
            self.validator = Validator.build(  # before the policy loads
                args, self.train_dataset, tokenizer, self.accelerator.device,
                synced_gpus=dist.zero_stage(self.accelerator) == 3)
        self.learner = build_learner(
            args, self.accelerator, reward_funcs, quiet, model=model if not isinstance(
                model, str) else None, tokenizer=None if processing_class is None else tokenizer,
            peft_config=peft_config, reward_weights=reward_weights)
        self.policy = self.learner.policy
        self.model, self.processing_class = self.policy.model, self.policy.tokenizer
        self.reward_funcs = self.learner.reward_fn
        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in callbacks or []]
        self.state, self.control = _new_state(args, self.accelerator), TrainerControl()
        self._callback("on_init_end")

    # ------------------------------------------------------------------ datasets
    def _prompt_datasets(self, train_dataset, eval_dataset, tokenizer):
        from ..data.prompts import build_prompts

        size = self.args.data.max_prompt_tokens
        if train_dataset is None:
            built = build_prompts(self.args.data, tokenizer, seed=self.args.seed)
            train, test = built.train, built.test
        else:
            train, test = prompt_dataset(train_dataset, tokenizer, size), None
        if eval_dataset is not None:
            test = prompt_dataset(eval_dataset, tokenizer, size)
        return train, test

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: bool | str | None = None,
              overwrite_output_dir: bool = False) -> list[dict]:
        """Run ``args.steps`` PPO steps (or until a callback stops); returns the metrics.

        ``resume_from_checkpoint``: True for the newest checkpoint of ``args.output_dir``,
        or the path of a ``checkpoints/step-N`` folder. ``overwrite_output_dir`` removes a
        previous run's files from ``args.output_dir`` first. The process group of a
        multi-process launch stays up, so that the program can train or evaluate again; end
        it with ``trainer.accelerator.end_training()`` when the program is done.
        """
        from ..runs.checkpoint import load_checkpoint, load_latest

        out, acc = Path(self.args.output_dir), self.accelerator
        resume = bool(resume_from_checkpoint)
        if resume:
            dist.setup_deepspeed(self.args, acc, resume=True)  # refuses resume under DeepSpeed
        start = run_folder.check_output_dir(out, resume, overwrite_output_dir, acc, self.args)
        first_step = 0
        if start is not None:
            with sliced_loads(acc, self.policy):  # FSDP: each rank keeps its slice
                state = (load_checkpoint(Path(resume_from_checkpoint), self.policy,
                                         self.learner.optimizer)
                         if isinstance(resume_from_checkpoint, (str, Path)) else
                         load_latest(out, self.policy, self.learner.optimizer,
                                     acc.is_main_process))
            shard_optimizer_state(self.learner.optimizer)
            self.learner.load_state_dict(state)
            first_step = state["step"]
        if acc.is_main_process:
            run_folder.write_run_files(out, self.args, acc, first_step,
                                       self.reward_funcs.describe())
        if self.args.log_with:
            flat = run_folder.flatten(to_dict(self.args))
            acc.init_trackers("detoxrl", config={k: v if isinstance(v, (int, float, str, bool))
                                                 else str(v) for k, v in flat.items()})
        self.state.global_step = first_step
        self.control.should_training_stop = False
        self._callback("on_train_begin")
        if first_step == 0 and self.should_evaluate(0):
            self._log({"step": 0, **self.curve_point(0)})
        history = self._loop(first_step)
        self.save_model()
        self._callback("on_train_end")
        # Not acc.end_training(): it also destroys the process group, which a program that
        # trains or evaluates again on the same processes needs (``detoxrl train`` ends it).
        for tracker in acc.trackers:
            tracker.finish()
        acc.trackers.clear()  # a later train() starts its own
        return history

    def _loop(self, first_step: int) -> list[dict]:
        from tqdm.auto import tqdm

        cfg, acc = self.args, self.accelerator
        bar = tqdm(total=cfg.steps, initial=first_step, desc="PPO",
                   disable=self.quiet or not acc.is_main_process)
        history, skipped = [], 0
        for step in range(first_step, cfg.steps):
            self._callback("on_step_begin")
            result = self._step(step)
            metrics = {"step": step + 1, **result.metrics, **self._reward_metrics()}
            if self.should_evaluate(step + 1):
                metrics.update(self.curve_point(step + 1))
            history.append(metrics)
            self._log(metrics, result, bar)
            bad = not result.applied or metrics.get("ppo/skipped_updates", 0) > 0
            skipped = skipped + 1 if bad else 0
            _stop_if_diverged(skipped, cfg, step + 1)
            self.state.global_step = step + 1
            self._callback("on_step_end", metrics=metrics)
            self._callback("on_log", logs=metrics)
            if self.control.should_evaluate:
                self.evaluate()
            periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
            if (periodic or self.control.should_save) and step + 1 < cfg.steps:
                self._checkpoint(step + 1)
            if self.control.should_training_stop:
                break
        bar.close()
        return history

    def _step(self, step: int):
        from ..models.generation import collate_queries

        cfg, rank = self.args, self.accelerator.process_index
        rows = self.train_dataset[batch_indices(step, len(self.train_dataset), cfg, rank)]
        pad_id, side = self.policy.tokenizer.pad_token_id, self.policy.padding_side
        query_ids, query_mask = collate_queries(rows["input_ids"], pad_id, side)
        return self.learner.step(query_ids, query_mask, rows["query"],
                                 step_seed(cfg.seed, step, rank), reward_columns(rows))

    def _reward_metrics(self) -> dict[str, float]:
        """``env/reward/<name>``: each reward's mean over every process (NaN = None skipped)."""
        out = {}
        for name, scores in self.reward_funcs.last.items():
            applies = ~scores.isnan()
            mean, _, count = dist.global_masked_moments(self.accelerator,
                                                        scores.nan_to_num(0.0), applies)
            out[f"env/reward/{name}"] = float(mean) if float(count) else float("nan")
        return out

    def _log(self, metrics: dict, result=None, bar=None) -> None:
        """One metrics line; ``result`` and ``bar`` for a training step (not step 0)."""
        cfg, acc = self.args, self.accelerator
        if acc.is_main_process:
            out = Path(cfg.output_dir)
            run_folder.append_jsonl(out / "metrics.jsonl", [metrics])
            if result is not None:
                run_folder.append_jsonl(out / "samples.jsonl", run_folder.samples(
                    metrics["step"], result.rollout, cfg.num_samples_logged))
        if cfg.log_with:
            acc.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        self.state.log_history.append(metrics)
        if bar is not None:
            bar.set_postfix(reward=f"{metrics.get('env/reward_mean', float('nan')):.3f}",
                            kl=f"{metrics.get('objective/kl', float('nan')):.3f}")
            bar.update(1)

    # ------------------------------------------------------------------ validation curve
    def should_evaluate(self, step: int) -> bool:
        """Whether the validation curve gets a point after ``step`` steps (0: before the
        first): every ``args.eval_every`` steps and after the last. Override to choose."""
        every = self.args.eval_every
        return every > 0 and (step % every == 0 or step == self.args.steps)

    def curve_point(self, step: int) -> dict[str, float]:
        """Score the current policy on the validation set (``eval/*`` metrics, see
        :mod:`detoxrl.evaluation.curve`); the point is appended to ``eval_curve.jsonl``."""
        from ..evaluation.curve import CURVE_FILE

        if self.validator is None:
            raise ConfigError("The validation curve is off: set eval_every to N > 0.")
        metrics = self.validator(self.learner, reward_columns)
        if self.accelerator.is_main_process:
            run_folder.append_jsonl(Path(self.args.output_dir) / CURVE_FILE,
                                    [{"step": step, **metrics}])
        self._callback("on_evaluate", metrics=metrics)
        return metrics

    def _checkpoint(self, step: int) -> None:
        from ..runs.checkpoint import save_checkpoint

        acc = self.accelerator
        acc.wait_for_everyone()
        with dist.gathered_trainable(acc, self.policy):  # FSDP: every rank gathers, 0 writes
            optimizer_state = whole_optimizer_state(self.learner.optimizer)
            if acc.is_main_process:
                save_checkpoint(Path(self.args.output_dir), step, self.policy, optimizer_state,
                                self.learner.state_dict())
        acc.wait_for_everyone()
        self._callback("on_save")

    # ------------------------------------------------------------------ evaluation, saving
    def evaluate(self, eval_dataset: Any = None, max_prompts: int = 64) -> dict[str, float]:
        """Mean rewards of the current policy on up to ``max_prompts`` evaluation prompts.

        Sampled as in training, with the run's seed, so two calls on the same weights agree.
        Metrics: ``eval/reward_mean``, ``eval/reward/<name>``, ``eval/response_length``;
        passed to the callbacks' ``on_evaluate``. For the full before/after evaluation with
        confidence intervals use ``detoxrl evaluate``.
        """
        import torch

        from ..models.generation import collate_queries

        prompts = (self.eval_dataset if eval_dataset is None else
                   prompt_dataset(eval_dataset, self.processing_class,
                                  self.args.data.max_prompt_tokens))
        if prompts is None or len(prompts) == 0:
            raise DataError("No evaluation prompts: pass eval_dataset, or keep "
                            "data.test_fraction above 0.")
        prompts = prompts.select(range(min(max_prompts, len(prompts))))
        totals, lengths, parts = [], [], {}
        size = self.args.ppo.local_batch_size
        for start in range(0, len(prompts), size):
            rows = prompts[start:start + size]
            ids, mask = collate_queries(rows["input_ids"], self.processing_class.pad_token_id,
                                        self.policy.padding_side)
            torch.manual_seed(self.args.seed + start)
            with root_gathered(self.accelerator, self.policy):
                batch = self.policy.generate(
                    ids.to(self.accelerator.device), mask.to(self.accelerator.device),
                    self.args.generation, queries=rows["query"],
                    synced_gpus=dist.shards_parameters(self.accelerator))
            totals.append(self.reward_funcs(batch.queries, batch.responses,
                                            **reward_columns(rows)))
            lengths.append(batch.response_mask.sum(1).float().cpu())
            for name, scores in self.reward_funcs.last.items():
                parts.setdefault(name, []).append(scores)
        metrics = {"eval/reward_mean": float(torch.cat(totals).mean()),
                   "eval/response_length": float(torch.cat(lengths).mean()),
                   **{f"eval/reward/{n}": float(torch.cat(v).nanmean()) for n, v in
                      parts.items()}}
        self.state.log_history.append({"step": self.state.global_step, **metrics})
        self._callback("on_evaluate", metrics=metrics)
        return metrics

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """The adapter (peft format), value head, tokenizer and model card, in ``output_dir``
        (default ``args.output_dir``). Every process must call it (ZeRO-3 gathers)."""
        from ..evaluation.model_card import write_model_card

        out = Path(output_dir or self.args.output_dir)
        acc = self.accelerator
        with dist.gathered_trainable(acc, self.policy):  # ZeRO-3: every rank must enter
            if acc.is_main_process:
                out.mkdir(parents=True, exist_ok=True)
                run_folder.save_final(out, self.policy)
                write_model_card(out)
        acc.wait_for_everyone()
        return out

    def _callback(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            handler = getattr(cb, event, None)
            if handler is None:
                continue
            result = handler(self.args, self.state, self.control, model=self.model,
                             processing_class=self.processing_class,
                             optimizer=self.learner.optimizer, lr_scheduler=self.learner.scheduler,
                             **kwargs)
            if result is not None:
                self.control = result
        if event == "on_step_begin":  # requests are per step, as in transformers
            self.control.should_evaluate = self.control.should_save = False


def _stop_if_diverged(skipped: int, cfg: TrainConfig, step: int) -> None:
    if cfg.max_skipped_steps and skipped >= cfg.max_skipped_steps:
        from ..errors import TrainingDiverged

        raise TrainingDiverged(
            f"Stopped at step {step}: {skipped} consecutive steps had non-finite rewards, "
            "log-probs or gradients and changed nothing. Check the reward function for NaN "
            "or inf, lower ppo.learning_rate or set ppo.max_grad_norm; the last good "
            f"checkpoint in {cfg.output_dir}/checkpoints is kept (continue with --resume), "
            "and max_skipped_steps sets the limit.")


def _new_state(args: TrainConfig, accelerator):
    from transformers import TrainerState

    return TrainerState(max_steps=args.steps, train_batch_size=args.ppo.batch_size,
                        save_steps=args.save_every,
                        is_local_process_zero=accelerator.is_local_main_process,
                        is_world_process_zero=accelerator.is_main_process)


@dataclass
class RunResult:
    output_dir: Path
    metrics: list[dict]
    trainer: DetoxTrainer

    @property
    def learner(self) -> Learner:
        return self.trainer.learner


def train(cfg: TrainConfig, reward_fn: Any = None, resume: bool = False,
          overwrite: bool = False, quiet: bool = False) -> RunResult:
    """Train as ``cfg`` says; ``reward_fn`` (callable, classifier name or a list of them)
    overrides ``cfg.reward``. The shortest form of :class:`DetoxTrainer`; ``detoxrl train``
    and the demo train through it."""
    # Before any model loads: a wrong run folder costs nothing.
    run_folder.precheck_output_dir(Path(cfg.output_dir), resume, overwrite, cfg)
    trainer = DetoxTrainer(args=cfg, reward_funcs=reward_fn, quiet=quiet)
    metrics = trainer.train(resume_from_checkpoint=resume, overwrite_output_dir=overwrite)
    return RunResult(Path(cfg.output_dir), metrics, trainer)
