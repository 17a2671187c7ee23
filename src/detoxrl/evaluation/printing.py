"""An evaluation's summary as the printed table: before, after, change and its interval.

``detoxrl evaluate`` and the demo print it; the same numbers are in summary.json.
"""

from __future__ import annotations

import math
from typing import Any

_ROWS = (("mean", "mean"), ("std", "std"), ("median", "median"),
         ("share > 0.5", "share_above_0_5"), ("max", "max"))


def _num(value: Any, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _pct(before: Any, after: Any) -> str:
    """The tutorial's (before - after) / before, in percent (positive: less toxic)."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)):
        return "n/a"
    return "n/a" if before == 0 else f"{(before - after) / before * 100:+.2f}%"


def metric_lines(name: str, metric: dict[str, Any], confidence: float) -> list[str]:
    """One metric as a before → after table with changes and bootstrap intervals."""
    b, a, boot = metric["before"], metric["after"], metric.get("bootstrap", {})
    ci_head = f"{confidence * 100:g}% CI of change"
    lines = [f"{name:<13}{'before':>9}{'after':>10}{'change':>10}{'% improv.':>11}   {ci_head}"]
    for label, key in _ROWS:
        if key == "share_above_0_5" and not metric["lower_is_better"]:
            continue  # a share of rewards above 0.5 means nothing for logits
        ci = boot.get(key)
        interval = (f"[{_num(ci['ci_low'], True)}, {_num(ci['ci_high'], True)}]"
                    if ci else "")
        pct = _pct(b[key], a[key]) if metric["lower_is_better"] else ""
        change = a[key] - b[key] if all(
            isinstance(v, (int, float)) for v in (a[key], b[key])) else None
        lines.append(f"  {label:<11}{_num(b[key]):>9}{_num(a[key]):>10}"
                     f"{_num(change, True):>10}{pct:>11}   {interval}")
    verdict = boot.get("mean", {}).get("verdict", "n/a")
    lines.append(f"  verdict: {verdict} (mean {name}, paired bootstrap over "
                 f"{b.get('n', '?')} prompts)")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """The printed evaluation: toxicity, reward, judge, quality and KL."""
    s = summary.get("settings", {})
    conf = summary.get("confidence", 0.95)
    source = s.get("prompts", {})
    where = f"prompts of {source['path']}" if source.get("path") else "test prompts"
    head = (f"Evaluated {summary['n']} {where}, {s.get('samples_per_prompt', 1)} samples "
            f"each: reference (before) vs trained adapter (after); {s.get('decoding', '?')}, "
            f"max {s.get('max_new_tokens', '?')} new tokens, seed {s.get('seed', '?')}.")
    reward = s.get("reward", {})
    lines = [head, f"toxicity = P({summary.get('toxic_label')}) by {reward.get('model')} on "
             f"the {s.get('score_on', 'response')}; reward = {reward.get('output')} of "
             f"{reward.get('label')!r} on the {reward.get('score_on')}.", ""]
    for key, metric in summary.get("metrics", {}).items():
        lines += [*metric_lines(key.replace(":", " "), metric, conf), ""]
    lines += quality_lines(summary)
    if summary.get("protocol"):
        from .protocol_table import text_tables

        lines += ["", text_tables(summary["protocol"])]
    return "\n".join(lines).rstrip()


def quality_lines(summary: dict[str, Any]) -> list[str]:
    quality = summary.get("quality") or {}
    before, after = quality.get("before", {}), quality.get("after", {})
    lines = [f"{'quality':<13}{'before':>9}{'after':>10}"] if before or after else []
    for key in ("rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "mean_length"):
        if key in before or key in after:
            lines.append(f"  {key:<11}{_num(before.get(key)):>9}{_num(after.get(key)):>10}")
    kl = summary.get("kl")
    if kl:
        lines.append(f"KL(trained ‖ reference) per response: mean {_num(kl.get('mean'))}, "
                     f"std {_num(kl.get('std'))} nats")
    return lines
