"""The report's validation-curve section: reward and judges against sqrt(KL) and step.

Drawn from ``eval_curve.jsonl`` (:mod:`detoxrl.evaluation.curve`). The reward is on the
left axis and each judge's mean toxicity on the right one; a star marks the point where a
judge was lowest, which is where further optimisation stopped paying in the judge's terms.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .curve import CURVE_FILE, JUDGE_PREFIX, judge_names, read_curve
from .figures import fmt, is_number, note, png, section

TITLE = "Validation curve: reward and judges against KL"
MAX_TABLE_ROWS = 40
_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def toxicity_key(judge: str) -> str:
    return f"{JUDGE_PREFIX}{judge}/mean_toxicity"


def best_point(rows: list[dict[str, Any]], judge: str) -> dict[str, Any] | None:
    """The point where ``judge``'s mean toxicity was lowest (the earliest of equals)."""
    key = toxicity_key(judge)
    scored = [r for r in rows if is_number(r.get(key))]
    return min(scored, key=lambda r: r[key]) if scored else None


def curve_section(run_dir: Path) -> str:
    rows = read_curve(run_dir)
    if not rows:
        return section(TITLE, note(f"No validation curve ({CURVE_FILE}): train with "
                                   "eval_every: N to score the policy on validation prompts "
                                   "every N steps."))
    judges = list(dict.fromkeys(j for r in rows for j in judge_names(r)))
    best = {j: best_point(rows, j) for j in judges}
    return section(TITLE, png(_figure(rows, judges, best)) + _best_text(rows, best)
                   + _table(rows, judges, best))


def _figure(rows: list[dict[str, Any]], judges: list[str], best: dict[str, Any]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    for i, (x_key, x_label) in enumerate((("eval/sqrt_kl", "√KL to the reference (√nats)"),
                                          ("step", "step"))):
        ax = fig.add_subplot(1, 2, i + 1)
        handles = ax.plot(*_xy(rows, x_key, "eval/reward/mean"), marker="o", markersize=3,
                          color="tab:blue", label="reward (mean)")
        ax.set(xlabel=x_label, ylabel="reward (mean)")
        ax.grid(alpha=0.3)
        if judges:
            right = ax.twinx()
            right.set_ylabel("judge toxicity (mean)")
            for judge, color in zip(judges, _COLORS * len(judges), strict=False):
                handles += right.plot(*_xy(rows, x_key, toxicity_key(judge)), marker="o",
                                      markersize=3, color=color, label=judge)
                point = best[judge]
                if point is not None and is_number(point.get(x_key)):
                    handles += right.plot([point[x_key]], [point[toxicity_key(judge)]],
                                          marker="*", markersize=15, color=color,
                                          linestyle="none",
                                          label=f"{judge} lowest (step {point['step']})")
                    if x_key == "step":
                        ax.axvline(point["step"], color=color, linestyle="--", alpha=0.5)
        if i == 0:
            ax.legend(handles=handles, fontsize="small", loc="best")
    return fig


def _xy(rows: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list, list]:
    pairs = [(r[x_key], r[y_key]) for r in rows if is_number(r.get(x_key))
             and is_number(r.get(y_key))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _best_text(rows: list[dict[str, Any]], best: dict[str, Any]) -> str:
    last = rows[-1]
    lines = []
    for judge, point in best.items():
        if point is None:
            continue
        key = toxicity_key(judge)
        lines.append(
            f"<li>{html.escape(judge)}: lowest at step {point['step']} of {last['step']}: "
            f"mean toxicity {fmt(point[key])} (at the last point {fmt(last.get(key))}), "
            f"reward {fmt(point.get('eval/reward/mean'))} "
            f"({fmt(last.get('eval/reward/mean'))}), √KL {fmt(point.get('eval/sqrt_kl'))} "
            f"({fmt(last.get('eval/sqrt_kl'))}).</li>")
    if not lines:
        return note("No judge scored the validation samples: the curve shows the reward "
                    "alone.")
    return "<ul>" + "".join(lines) + "</ul>"


def _table(rows: list[dict[str, Any]], judges: list[str], best: dict[str, Any]) -> str:
    best_steps = {p["step"] for p in best.values() if p is not None}
    shown = rows
    if len(rows) > MAX_TABLE_ROWS:  # evenly spaced points, plus the best and the last
        stride = -(-len(rows) // MAX_TABLE_ROWS)
        shown = [r for i, r in enumerate(rows) if i % stride == 0 or r["step"] in best_steps
                 or i == len(rows) - 1]
    columns = [("step", "step"), ("eval/sqrt_kl", "√KL"), ("eval/reward/mean", "reward")]
    for judge in judges:
        columns += [(toxicity_key(judge), f"{judge} mean toxicity"),
                    (f"{JUDGE_PREFIX}{judge}/toxicity_probability",
                     f"{judge} toxicity probability")]
    columns.append(("eval/distinct_2", "distinct-2"))
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr" + (' style="font-weight:600"' if r["step"] in best_steps else "") + ">"
        + "".join(f"<td>{fmt(r.get(key))}</td>" for key, _ in columns) + "</tr>"
        for r in shown)
    caption = (note(f"{len(shown)} of {len(rows)} points; all are in {CURVE_FILE}.")
               if len(shown) < len(rows) else "")
    return f"{caption}<table><tr>{head}</tr>{body}</table>"
