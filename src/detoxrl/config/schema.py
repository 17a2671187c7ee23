"""Typed run configuration: dataclasses with one help text per field.

A run is described by :class:`TrainConfig`, loaded from YAML (``detoxrl.config.load_config``) and
overridden on the command line with dotted keys (``--ppo.learning_rate 3e-5``). The batch
arithmetic is computed and checked once, by :meth:`TrainConfig.finalize`, right after parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .choices import check_choices
from .validation import check_ranges

CPU_MICRO_BATCH = 2  # largest micro-batch that gradient_accumulation_steps: auto picks on a CPU
GPU_FORWARD_BATCH = 64  # most samples forward_batch_size: auto puts in one pass on a GPU
DEFAULT_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


def derived(default: int, help: str) -> Any:
    """A field computed by ``TrainConfig.finalize``; never read from YAML or the CLI."""
    return field(default=default, metadata={"help": "Derived: " + help, "derived": True})


def option(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a default and a help text (list/dict defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = option("google/flan-t5-base", "Hub id or local folder of the policy "
                           "(any AutoModelForSeq2SeqLM or AutoModelForCausalLM); 'tiny:t5' and "
                           "'tiny:gpt2' build tiny offline models.")
    adapter: str | None = option(None, "Existing LoRA adapter (Hub id or folder) to continue "
                             "training; the reference model is then base + this adapter.")
    dtype: str = option("auto", "auto (fp32 on CPU, bf16 on GPU), float32 or bfloat16. float16 is "
                    "refused for T5, which overflows in fp16.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the policy.")
    trust_remote_code: bool = option(False, "Run model code from the Hub. Off unless you trust it.")
    gradient_checkpointing: bool = option(False, "Recompute each layer's activations in the "
                                          "backward pass instead of storing them: much less "
                                          "memory in the PPO updates, for about one more "
                                          "forward pass of compute.")


@dataclass
class LoraSettings:
    r: int | None = option(None, "LoRA rank; default 32 for T5 (the tutorial), 16 otherwise.")
    alpha: int | None = option(None, "LoRA alpha; default equal to r.")
    dropout: float = option(0.05, "LoRA dropout. Only active in train mode, which RL never uses.")
    target_modules: list[str] | None = option(None, "Modules to adapt; default per architecture "
                                          "(T5: q,v; GPT-2: c_attn; Llama: q_proj,v_proj).")


@dataclass
class DataConfig:
    path: str = option("knkarthick/dialogsum", "Hub dataset id or local .jsonl/.json/.csv/.parquet "
                   "file; 'tiny:dialogsum' writes a small synthetic set.")
    split: str = option("train", "Split to read from a Hub dataset.")
    kind: str = option("dialogsum", "Prompt recipe: 'dialogsum' (filter + instruction template) or "
                   "'rtp' (RealToxicityPrompts records, prompt.text, no template).")
    text_column: str = option("dialogue", "Column whose length is filtered and that fills the "
                          "template's {dialogue}.")
    summary_columns: list[str] | None = option(None, "Reference summary columns; default 'summary' "
                                           "or 'summary1'..'summary3', whichever exist.")
    id_column: str | None = option(None, "Row id column; default 'id' or 'fname', if present.")
    template: str = option(DEFAULT_TEMPLATE, "Instruction template; {name} placeholders are filled "
                       "from the row's columns.")
    min_chars: int = option(200, "Keep rows with min_chars < len(text) (exclusive).")
    max_chars: int = option(1000, "Keep rows with len(text) <= max_chars.")
    max_prompt_tokens: int = option(512, "Truncate tokenized prompts to this many tokens.")
    test_fraction: float = option(0.2, "Share of kept rows held out as the test split.")
    shuffle: bool = option(False, "Shuffle before splitting (the tutorial did not).")
    toxicity_threshold: float | None = option(None, "rtp only: keep prompts with "
                                              "prompt.toxicity >= "
                                          "this value.")
    max_rows: int | None = option(None, "Read at most this many rows (quick experiments).")


@dataclass
class RewardConfig:
    model: str = option("facebook/roberta-hate-speech-dynabench-r4-target",
                        "Hub id or folder of an "
                    "AutoModelForSequenceClassification; 'tiny:roberta-hate' for offline runs.")
    label: str = option("nothate", "Label whose score is the reward, looked up by name.")
    output: str = option("logit", "'logit' (the raw logit, as the tutorial) or 'prob'.")
    score_on: str = option("response", "'response' scores the response alone; 'query+response' "
                       "scores prompt and response together, as the tutorial did.")
    batch_size: int = option(32, "Texts per classifier forward pass.")
    max_length: int | None = option(None, "Truncate inputs to this many tokens; default: the "
                                "classifier's maximum.")


@dataclass
class SamplingConfig:
    min_new_tokens_draw: int = option(100, "Per-prompt max_new_tokens is drawn uniformly from "
                                  "[min_new_tokens_draw, max_new_tokens_draw] (the tutorial's "
                                  "LengthSampler(100, 400)).")
    max_new_tokens_draw: int = option(400, "Upper end of that draw (inclusive).")
    min_length: int = option(5, "Minimum response length in tokens (EOS is blocked before it).")
    top_k: int = option(0, "Top-k sampling; 0 disables it.")
    top_p: float = option(1.0, "Nucleus sampling threshold; 1.0 disables it.")
    temperature: float = option(1.0, "Sampling temperature; log-probs are computed at the "
                                "same one.")
    do_sample: bool = option(True, "Sample (True) or decode greedily (False).")
    num_beams: int = option(1, "Beams, for evaluation only; PPO needs sampling.")
    cuda_graphs: bool = option(True, "On a CUDA device, decode over a static KV cache and "
                               "replay each step as a recorded CUDA graph (one launch per "
                               "token instead of hundreds). No effect on the CPU or under "
                               "ZeRO-3/FSDP, whose steps gather parameters.")


@dataclass
class PPOConfig:
    algorithm: str = option("ppo", "'ppo' (value head, GAE, KL in the per-token reward), 'rloo' "
                            "(leave-one-out baseline, KL in the sequence reward) or 'grpo' "
                            "(group-normalised reward, KL as a k3 loss term); rloo and grpo "
                            "have no value head and need num_generations >= 2.")
    num_generations: int = option(1, "Samples per prompt (K). batch_size counts prompts, so "
                                  "a step generates batch_size x num_generations samples.")
    beta: float = option(0.05, "rloo: KL coefficient in the sequence reward; grpo: coefficient "
                         "of the k3 KL loss term. Fixed (the KL controller is PPO's).")
    loss_type: str = option("grpo", "grpo: how token losses are reduced: 'grpo' (each "
                            "sequence's mean), 'bnpo' (mean over tokens) or 'dr_grpo' (sum "
                            "over tokens / generation.max_new_tokens_draw: Dr. GRPO).")
    scale_rewards: str = option("group", "grpo: divide advantages by the std of the 'group', of "
                                "the 'batch' (all processes), or 'none' (Dr. GRPO).")
    learning_rate: float = option(1.41e-5, "AdamW learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    lr_scheduler: str = option("constant", "transformers scheduler name: constant, linear, "
                               "cosine, ...")
    warmup_steps: int = option(0, "Scheduler warm-up, in optimizer steps.")
    batch_size: int = option(16, "Prompts rolled out per step, over all processes.")
    mini_batch_size: int = option(4, "Samples per optimizer step, over all processes.")
    gradient_accumulation_steps: int | str = option(
        "auto", "Micro-batches per mini-batch: the same update from smaller forward passes, "
        "so less activation memory. 'auto': 1 on a GPU; on a CPU, micro-batches of at most "
        f"{CPU_MICRO_BATCH} samples (at GPT-2 and FLAN-T5-base sizes a CPU is compute-bound "
        "there already, so they cost no time and halve the PPO update's memory at the "
        "tutorial's mini-batch of 4; a model of a few million parameters updates faster "
        "with 1).")
    forward_batch_size: int | str = option(
        "auto", "Samples per no-grad forward pass (the reference log-probs, and the old ones "
        "when not read while sampling). 'auto': on a GPU, whole local mini-batches up to "
        f"{GPU_FORWARD_BATCH} samples (one pass of that size costs about what one of 4 does "
        "there); on a CPU, one local mini-batch.")
    ppo_epochs: int = option(1, "Passes over each batch of samples (every algorithm).")
    logprobs_from_rollout: bool = option(True, "Read the old log-probs (and PPO's values) "
                                         "while sampling instead of by a second forward "
                                         "pass; they differ by float rounding (~1e-6 in "
                                         "fp32, more in bf16), so the first update's ratio "
                                         "is 1 only up to that.")
    gamma: float = option(1.0, "ppo: discount factor.")
    lam: float = option(0.95, "ppo: GAE lambda.")
    cliprange: float = option(0.2, "Clip range of the policy ratio (every algorithm).")
    cliprange_value: float = option(0.2, "ppo: clip range of the value prediction.")
    vf_coef: float = option(0.1, "ppo: value loss coefficient.")
    max_grad_norm: float | None = option(1.0, "Gradient clipping norm; null disables it.")
    kl_estimator: str = option("k1", "Per-token KL estimator in the reward and the logged KL: "
                               "k1, k2, k3 or abs (OpenRLHF's names).")
    kl_controller: str = option("adaptive", "ppo: 'adaptive' (Ziegler et al. 2019) or 'fixed'.")
    init_kl_coef: float = option(0.2, "ppo: initial KL penalty coefficient.")
    kl_target: float = option(6.0, "ppo, adaptive controller: target KL per sequence.")
    kl_horizon: int = option(10000, "ppo, adaptive controller: horizon, in samples.")
    whiten_rewards: bool = option(False, "ppo: whiten the KL-shaped rewards before GAE.")
    whiten_advantages: bool = option(True, "ppo: whiten advantages before the policy loss.")
    normalize_scores: bool = option(False, "Normalize scores by a running mean and std.")
    score_clip: float | None = option(None, "Clip (normalized) scores to "
                                      "[-score_clip, score_clip].")
    missing_eos_penalty: float | None = option(None, "Subtracted from the score of responses that "
                                           "end without EOS.")
    prefix_shaping: bool = option(False, "ppo: reward each token by how much it changed the "
                                  "score of the response so far (the reward scores every "
                                  "prefix; potential-based shaping, Ng et al. 1999): the same "
                                  "total reward, credited to the tokens that earned it. Costs "
                                  "one reward call per response token.")
    best_of_n_target: int | None = option(None, "ppo, rloo: aim at the reference's best-of-N. "
                                          "Each score becomes (N - 1) * log F, F the share of "
                                          "the reference's samples for the same prompt that "
                                          "score at most as high; with a fixed KL coefficient "
                                          "of 1 the KL-regularised optimum is best-of-N (BOND, "
                                          "Sessa et al. 2024). Costs reference_samples extra "
                                          "samples and reward calls per response.")
    reference_samples: int = option(4, "With best_of_n_target: samples of the reference per "
                                    "response from which F is estimated.")

    @property
    def has_value_head(self) -> bool:
        """Only PPO learns a value; rloo and grpo are critic-free."""
        return self.algorithm == "ppo"

    # Derived by finalize(); not set by users.
    world_size: int = derived(1, "number of processes.")
    local_batch_size: int = derived(0, "prompts per process.")
    local_mini_batch_size: int = derived(0, "per process.")
    micro_batch_size: int = derived(0, "per forward pass.")
    forward_chunk: int = derived(0, "samples per no-grad forward pass, per process.")
    num_mini_batches: int = derived(0, "per epoch.")


@dataclass
class ValidationSettings:
    path: str | None = option(None, "Prompt file of the validation set, read with the run's "
                              "data recipe (data.kind, template, filter); default: prompts "
                              "drawn from the RL prompt pool. Keep held-out test prompts out.")
    num_prompts: int = option(32, "Validation prompts: a fixed subset of the source, drawn "
                              "with the run's seed.")
    samples_per_prompt: int = option(2, "Samples per validation prompt.")
    max_new_tokens: int | None = option(None, "Length limit of the validation samples; "
                                        "default generation.max_new_tokens_draw.")
    judges: list[str] | None = option(None, "Judges of the validation samples, as for "
                                      "`detoxrl evaluate --judge`: profanity-check, "
                                      "module:function or a classifier (MODEL@LABEL); "
                                      "default profanity-check when alt-profanity-check is "
                                      "installed, else none ([] for none).")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy model."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA adapter."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompt dataset."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Reward."})
    generation: SamplingConfig = field(default_factory=SamplingConfig,
                                       metadata={"help": "Rollout sampling."})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "PPO settings."})
    steps: int = option(10, "PPO steps (batches of rollouts) to run.")
    seed: int = option(0, "Seed of everything: data order, sampling, initialisation.")
    output_dir: str = option("runs/detoxrl", "Where the adapter, metrics and checkpoints go.")
    save_every: int = option(0, "Checkpoint every N steps (0: only at the end).")
    log_with: list[str] = option([], "Accelerate trackers, e.g. [tensorboard] or [wandb].")
    num_samples_logged: int = option(8, "Rollouts per step written to samples.jsonl.")
    max_skipped_steps: int = option(3, "Stop the run (exit status 2) after this many consecutive "
                                    "steps skipped for non-finite values; 0 never stops.")
    eval_every: int = option(0, "Score the policy on the validation set every N steps, before "
                             "the first and after the last (eval_curve.jsonl: reward and "
                             "judges against sqrt(KL)); 0: off.")
    validation: ValidationSettings = field(default_factory=ValidationSettings, metadata={
        "help": "Validation set of the eval_every curve."})

    def finalize(self, world_size: int = 1, device_type: str = "cpu") -> TrainConfig:
        """Derive per-process batch sizes and check every option; raise ConfigError if not.

        ``device_type`` ("cpu", "cuda", ...) resolves ``gradient_accumulation_steps`` and
        ``forward_batch_size`` set to ``auto``.
        """
        check_choices(self)
        check_ranges(self)
        p = self._check_batches(world_size)
        p.world_size = world_size
        p.local_batch_size = p.batch_size // world_size
        p.local_mini_batch_size = p.mini_batch_size // world_size
        p.micro_batch_size = _micro_batch_size(p, device_type)
        p.forward_chunk = _forward_chunk(p, device_type)
        p.num_mini_batches = p.batch_size * p.num_generations // p.mini_batch_size
        g = self.generation
        if not 1 <= g.min_new_tokens_draw <= g.max_new_tokens_draw:
            raise ConfigError("generation.min_new_tokens_draw must be >= 1 and <= "
                              f"generation.max_new_tokens_draw; got {g.min_new_tokens_draw} "
                              f"and {g.max_new_tokens_draw}.")
        if not g.do_sample or g.num_beams != 1:
            raise ConfigError("PPO needs sampled rollouts: set generation.do_sample: true and "
                              "generation.num_beams: 1 (beams are for evaluation).")
        if g.temperature <= 0:
            raise ConfigError(f"generation.temperature must be > 0, got {g.temperature}.")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}.")
        return self

    def _check_batches(self, world_size: int) -> PPOConfig:
        p = self.ppo
        accum = p.gradient_accumulation_steps
        for name in ("gradient_accumulation_steps", "forward_batch_size"):
            value = getattr(p, name)
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"ppo.{name} must be a whole number >= 1 or 'auto', got "
                                  f"{value!r}.")
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps",
                     "forward_batch_size", "ppo_epochs", "num_generations"):
            if getattr(p, name) != "auto" and getattr(p, name) < 1:
                raise ConfigError(f"ppo.{name} must be at least 1, got {getattr(p, name)}.")
        if p.algorithm != "ppo" and p.num_generations < 2:
            raise ConfigError(f"ppo.algorithm {p.algorithm!r} compares the samples of each "
                              "prompt: set ppo.num_generations to 2 or more (e.g. 4).")
        if p.beta < 0:
            raise ConfigError(f"ppo.beta must be >= 0, got {p.beta}.")
        _check_score_options(p)
        if p.batch_size % world_size:
            # A prompt's K samples are compared with each other, so they stay on one process.
            raise ConfigError(f"ppo.batch_size ({p.batch_size} prompts) must be a multiple of "
                              f"the number of processes ({world_size}).")
        samples = p.batch_size * p.num_generations
        if samples % p.mini_batch_size:
            raise ConfigError(f"ppo.batch_size ({p.batch_size}) x ppo.num_generations "
                              f"({p.num_generations}) = {samples} samples must be a multiple "
                              f"of ppo.mini_batch_size ({p.mini_batch_size}).")
        if p.mini_batch_size % (world_size * (1 if accum == "auto" else accum)):
            raise ConfigError(
                f"ppo.mini_batch_size ({p.mini_batch_size}) must be a multiple of processes "
                f"({world_size}) x ppo.gradient_accumulation_steps "
                f"({p.gradient_accumulation_steps}); change one of them.")
        return p


def _micro_batch_size(p: PPOConfig, device_type: str) -> int:
    local = p.local_mini_batch_size
    if p.gradient_accumulation_steps != "auto":
        return local // p.gradient_accumulation_steps
    if device_type != "cpu":
        return local
    return max(d for d in range(1, CPU_MICRO_BATCH + 1) if local % d == 0)


def _forward_chunk(p: PPOConfig, device_type: str) -> int:
    if p.forward_batch_size != "auto":
        return p.forward_batch_size
    local = p.local_mini_batch_size
    if device_type == "cpu":
        return local
    samples = p.local_batch_size * p.num_generations
    return max(local, min(samples, GPU_FORWARD_BATCH) // local * local)


def _check_score_options(p: PPOConfig) -> None:
    """The options that change what the score means, against the algorithm and each other."""
    if p.prefix_shaping and p.algorithm != "ppo":
        raise ConfigError(f"ppo.prefix_shaping needs per-token advantages; ppo.algorithm "
                          f"{p.algorithm!r} gives one advantage per sample. Use "
                          "ppo.algorithm ppo, or turn prefix_shaping off.")
    if p.best_of_n_target is None:
        return
    # best_of_n_target fixes the score's scale and meaning, so nothing may rescale it.
    if p.algorithm == "grpo":
        raise ConfigError("ppo.best_of_n_target needs the score's scale, and grpo normalises "
                          "scores within each prompt's group. Use ppo.algorithm ppo or rloo.")
    clashes = [name for name, on in (("normalize_scores", p.normalize_scores),
                                     ("score_clip", p.score_clip is not None),
                                     ("prefix_shaping", p.prefix_shaping)) if on]
    if clashes:
        raise ConfigError(f"ppo.best_of_n_target sets the score itself; turn off "
                          f"{', '.join('ppo.' + c for c in clashes)}.")
