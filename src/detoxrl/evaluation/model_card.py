"""The run folder's README.md: a model card built from what the run folder holds.

peft writes an empty template next to every adapter; this replaces it with the base model,
the data, the rewards, the algorithm and its settings, the final training metrics and, once
``detoxrl evaluate`` has run, the before/after evaluation table. Everything is read from the
folder itself (``config.yaml``, ``run_info.json``, ``metrics.jsonl``, ``eval/summary.json``),
so :func:`write_model_card` can be called again at any time to refresh it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from ..runs.io import atomic_write_text

FINAL_METRICS = ("env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef",
                 "env/response_length", "ppo/loss/policy", "ppo/loss/value")


def write_model_card(run_dir: str | Path) -> Path:
    """(Re)write ``run_dir/README.md`` from the run folder's files; returns its path."""
    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / "README.md", model_card(run_dir))


def model_card(run_dir: Path) -> str:
    cfg = _read_yaml(run_dir / "config.yaml")
    info = _read_json(run_dir / "run_info.json") or {}
    model, data, ppo = cfg.get("model", {}), cfg.get("data", {}), cfg.get("ppo", {})
    base = model.get("name_or_path", "unknown")
    parts = [_front_matter(base, data.get("path")),
             f"# {run_dir.resolve().name}\n\nA LoRA adapter trained with reinforcement learning "
             "from a reward (PPO with a per-token KL penalty to the starting policy) by "
             "detoxrl, to make the base model's outputs less toxic.\n",
             "## Model\n\n" + _bullets({
                 "Base model": f"`{base}`", "Starting adapter": _code(model.get("adapter")),
                 "LoRA": _lora(cfg.get("lora", {})), "Seed": info.get("seed", cfg.get("seed")),
                 "Trained with": _versions(info)}),
             "## Data\n\n" + _bullets({
                 "Prompts": f"`{data.get('path')}` (recipe `{data.get('kind')}`, held-out "
                            f"test fraction {data.get('test_fraction')})",
                 "Prompt tokens": f"at most {data.get('max_prompt_tokens')}"}),
             "## Reward\n\n" + _rewards(info, cfg.get("reward", {})),
             "## Algorithm\n\n" + _algorithm(cfg, ppo),
             "## Final training metrics\n\n" + _final_metrics(run_dir),
             "## Evaluation\n\n" + _evaluation(run_dir),
             "## Use\n\n" + _usage(run_dir),
             "## Full config\n\n```yaml\n" + yaml.safe_dump(cfg, sort_keys=False) + "```\n"]
    return "\n".join(parts)


def _front_matter(base: str, data: str | None) -> str:
    meta = {"base_model": base, "library_name": "peft",
            "tags": ["detoxrl", "lora", "rlhf", "detoxification"]}
    if data and not data.startswith("tiny:") and data.count("/") == 1 and "." not in data:
        meta["datasets"] = [data]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _bullets(items: dict) -> str:
    return "".join(f"- **{k}**: {v}\n" for k, v in items.items() if v not in (None, ""))


def _code(value) -> str | None:
    return f"`{value}`" if value else None


def _lora(lora: dict) -> str:
    targets = lora.get("target_modules") or "per architecture"
    return (f"r={lora.get('r') or 'default'}, alpha={lora.get('alpha') or 'r'}, "
            f"dropout={lora.get('dropout')}, target modules {targets}")


def _versions(info: dict) -> str | None:
    versions = info.get("versions") or {}
    text = ", ".join(f"{k} {v}" for k, v in versions.items())
    return f"detoxrl {info.get('detoxrl', '?')}; {text}" if versions else None


def _rewards(info: dict, reward: dict) -> str:
    rewards = info.get("rewards")
    if not rewards:
        rewards = [{"name": reward.get("model"), "weight": 1.0, "kind": "classifier",
                    "model": reward.get("model"), "label": reward.get("label"),
                    "output": reward.get("output")}]
    rows = ["| reward | weight | what |", "| --- | ---: | --- |"]
    for r in rewards:
        what = (f"classifier `{r.get('model')}`, {r.get('output')} of label "
                f"`{r.get('label')}`" if r.get("kind") == "classifier"
                else "Python function")
        rows.append(f"| `env/reward/{r.get('name')}` | {r.get('weight')} | {what} |")
    return ("The training reward is the weighted sum of:\n\n" + "\n".join(rows)
            + f"\n\nScored on: {reward.get('score_on', 'response')}.\n")


_ALGORITHMS = {
    "ppo": ("PPO (RLHF variant: per-token KL penalty to the reference, GAE with a value head)",
            ("kl_controller", "init_kl_coef", "kl_target", "kl_estimator", "cliprange",
             "vf_coef", "gamma", "lam")),
    "rloo": ("RLOO (leave-one-out baseline over each prompt's samples, KL in the reward)",
             ("num_generations", "beta", "kl_estimator", "cliprange")),
    "grpo": ("GRPO (group-normalised rewards, k3 KL loss term)",
             ("num_generations", "beta", "loss_type", "scale_rewards", "cliprange")),
}


def _algorithm(cfg: dict, ppo: dict) -> str:
    name, own = _ALGORITHMS.get(ppo.get("algorithm", "ppo"), _ALGORITHMS["ppo"])
    keys = ("learning_rate", "batch_size", "mini_batch_size", "ppo_epochs", *own)
    shown = ", ".join(f"{k}={ppo[k]}" for k in keys if k in ppo)
    gen = cfg.get("generation", {})
    return (f"{name}, {cfg.get('steps')} steps: {shown}. Rollouts sample "
            f"{gen.get('min_new_tokens_draw')}-{gen.get('max_new_tokens_draw')} new tokens at "
            f"temperature {gen.get('temperature')}.\n")


def _final_metrics(run_dir: Path) -> str:
    last = None
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                last = json.loads(line)
            except json.JSONDecodeError:  # a torn last line after a crash
                continue
    if not last:
        return "No training steps recorded.\n"
    keys = [k for k in FINAL_METRICS if k in last] + sorted(
        k for k in last if k.startswith("env/reward/"))
    rows = ["| metric | value |", "| --- | ---: |"]
    rows += [f"| `{k}` | {_num(last[k])} |" for k in keys]
    return f"At step {last.get('step')}:\n\n" + "\n".join(rows) + "\n"


def _evaluation(run_dir: Path) -> str:
    summary = _read_json(run_dir / "eval" / "summary.json")
    if isinstance(summary, dict) and isinstance(summary.get("protocol"), dict):
        from .protocol_table import markdown_tables

        return ("Held-out prompts, reference (before) vs this adapter (after), the "
                "detoxification papers' measures:\n\n" + markdown_tables(summary["protocol"]))
    metrics = (summary or {}).get("metrics") if isinstance(summary, dict) else None
    if not isinstance(metrics, dict):
        return (f"Not evaluated yet: run `detoxrl evaluate {run_dir}` (held-out prompts, "
                "paired bootstrap intervals); this card is then refreshed.\n")
    rows = ["| metric | before | after | change | 95% CI of change | verdict |",
            "| --- | ---: | ---: | ---: | --- | --- |"]
    for name, m in metrics.items():
        try:
            before, after = m["before"]["mean"], m["after"]["mean"]
            boot = m["bootstrap"]["mean"]
            rows.append(f"| {name} (mean) | {_num(before)} | {_num(after)} | "
                        f"{_num(after - before, sign=True)} | [{_num(boot['ci_low'], True)}, "
                        f"{_num(boot['ci_high'], True)}] | {boot.get('verdict', '')} |")
        except (KeyError, TypeError):
            continue
    return (f"On {summary.get('n')} held-out prompts, reference (before) vs this adapter "
            "(after):\n\n" + "\n".join(rows) + "\n")


def _usage(run_dir: Path) -> str:
    adapter = _read_json(run_dir / "adapter_config.json") or {}
    kind = "Seq2SeqLM" if adapter.get("task_type") == "SEQ_2_SEQ_LM" else "CausalLM"
    return (f"```python\nfrom peft import AutoPeftModelFor{kind}\n"
            "from transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelFor{kind}.from_pretrained(RUN_DIR).merge_and_unload()\n"
            "tokenizer = AutoTokenizer.from_pretrained(RUN_DIR)\n```\n\n"
            "or `detoxrl generate RUN_DIR \"prompt\" --with both` (trained and reference).\n")


def _num(value, sign: bool = False) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
