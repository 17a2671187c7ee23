"""The demo's before/after figures: the printed table, report.html and demo_summary.json.

A figure row is one metric of one evaluated set: its value before (the starting policy)
and after (PPO, or for the baseline set the best-of-N reranking of the starting policy),
the change, its relative size and, for the metrics scored per prompt, the paired bootstrap
95% CI of the change and its verdict, also in words (``plain``); the judge's toxicity rows
add its floor on clean human text and the share of the excess over it removed. Rows are
read from each evaluation's ``summary.json``: its ``protocol`` block (the papers' measures
and the others, documented in :mod:`detoxrl.evaluation.runner`) and the ``quality`` block's
mean length, which has no CI.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..evaluation.stats import HIGHER, IMPROVED, LOWER, WORSE
from ..evaluation.tables import CSS
from ..runs.io import atomic_write_json, atomic_write_text
from ..runs.run_folder import provenance
from .cache import StageResult
from .settings import BEST_OF, JUDGE, DemoConfig


@dataclass
class DemoRun:
    """A finished demo: its settings, folder, stage results and wall time."""

    cfg: DemoConfig
    root: Path
    stages: list[StageResult]
    wall_s: float


SETS = (("nontoxic", "held-out non-toxic prompts"), ("toxic", "held-out toxic prompts"),
        ("bestof", f"baseline without training, the starting policy's best of {BEST_OF} by "
                   "the reward (held-out non-toxic prompts)"))
TOXICITY = ("expected_max_toxicity", "toxicity_probability", "average_toxicity")
SAMPLES_SHOWN = 10


def read_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"The evaluation wrote no readable {str(path)!r}; run the demo "
                        "again (this stage is rebuilt).") from None


def figures(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measure of the papers' table (``summary["protocol"]``): the three
    toxicity measures of each scorer (the reward classifier, then each judge; with the
    excess over the scorer's floor where it was measured), then perplexity under the
    starting policy, distinct-2 within prompts and of the whole set, and topicality, each
    with its paired bootstrap CI; then the mean length (from the ``quality`` block, which
    has no CI)."""
    protocol = summary["protocol"]
    rows = []
    for scorer, block in protocol["toxicity"].items():
        for name in TOXICITY:
            rows.append(_measure_row(f"{scorer} {name}", block["measures"][name]))
    rows.append(_measure_row("perplexity", protocol["fluency"]["perplexity"]))
    for name in ("distinct_2", "set_distinct_2"):
        rows.append(_measure_row(name, protocol["diversity"][name]))
    if "topicality" in protocol:
        rows.append(_measure_row("topicality", protocol["topicality"]["pmi"]))
    quality = summary.get("quality", {})
    before, after = quality.get("before", {}), quality.get("after", {})
    if "mean_length" in before and "mean_length" in after:
        rows.append(_row("mean_length", before["mean_length"], after["mean_length"]))
    return rows


# What a verdict means for each kind of measure, in words.
_PLAIN = {"toxicity": {IMPROVED: "less toxic", WORSE: "more toxic"},
          "perplexity": {HIGHER: "higher: the text moved away from the start's",
                         LOWER: "lower: the text narrowed to the start's likeliest"},
          "distinct": {IMPROVED: "more varied", WORSE: "less varied"},
          "topicality": {IMPROVED: "more on topic", WORSE: "less on topic"}}


def plain_verdict(metric: str, verdict: Any) -> str:
    """The verdict of a row in words ("" for a row without an interval)."""
    if verdict is None:
        return ""
    kind = next((k for k in ("perplexity", "distinct", "topicality") if k in metric),
                "toxicity")
    return _PLAIN[kind].get(verdict, "no clear change")


def _measure_row(name: str, m: dict[str, Any]) -> dict[str, Any]:
    row = _row(name, m["before"], m["after"], m.get("ci_low"), m.get("ci_high"),
               m.get("verdict"))
    for key in ("floor", "excess_removed"):
        if key in m:
            row[key] = m[key] if _finite(m[key]) else None
    return row


def _row(metric: str, before: Any, after: Any, ci_low: Any = None, ci_high: Any = None,
         verdict: Any = None) -> dict[str, Any]:
    change = after - before if _finite(before) and _finite(after) else None
    # A relative change reads only against a positive start (the PMI can be <= 0).
    relative = change / before if change is not None and before > 0 else None
    return {"metric": metric, "before": before, "after": after, "change": change,
            "relative": relative, "ci_low": ci_low, "ci_high": ci_high, "verdict": verdict,
            "plain": plain_verdict(metric, verdict)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def _num(value: Any, signed: bool = False) -> str:
    if not _finite(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_row(row: dict[str, Any]) -> str:
    """``metric  before → after  relative  CI [low, high]  verdict  (excess removed)``."""
    text = f"{row['metric']:<42}{_num(row['before']):>9} → {_num(row['after']):<9}"
    text += f"{row['relative'] * 100:+7.1f}%" if row["relative"] is not None else " " * 8
    if row["ci_low"] is not None:
        text += f"   CI [{_num(row['ci_low'], True)}, {_num(row['ci_high'], True)}]"
    if row.get("plain"):
        text += f"   {row['plain']}"
    if row.get("excess_removed") is not None:
        text += (f" ({row['excess_removed'] * 100:.0f}% of the excess over the floor "
                 f"{_num(row['floor'])} removed)")
    return text


def format_summary(by_set: dict[str, list[dict]], stages: list[dict], wall_s: float) -> str:
    lines = []
    for part, title in SETS:
        if part in by_set:
            lines += [f"{title} (before → after, relative change, 95% CI of the change, "
                      "verdict):", *("  " + format_row(r) for r in by_set[part]), ""]
    lines.append("stage wall time:")
    for s in stages:
        state = "cached" if s["cached"] else "built"
        lines.append(f"  {s['name']:<15}{s['wall_s']:8.1f} s  ({state})")
    lines.append(f"  {'total (now)':<15}{wall_s:8.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- files

def write_demo_summary(run: DemoRun) -> Path:
    """Print the key figures and stage times; write ``demo_summary.json`` at the demo root."""
    by_set = {s.name.removeprefix("eval-"): s.result["figures"] for s in run.stages
              if s.name.startswith("eval-")}
    stages = [{"name": s.name, "key": s.key, "cached": s.cached, "wall_s": s.wall_s}
              for s in run.stages]
    print("\n" + format_summary(by_set, stages, run.wall_s), flush=True)
    report = next((s.result.get("report") for s in run.stages if s.name == "report"), None)
    if report:
        print(f"\nreport: {report}")
    return atomic_write_json(run.root / "demo_summary.json", {
        **provenance(run.cfg), "figures": by_set, "stages": stages,
        "wall_s": run.wall_s, "report": report})


def write_report(folder: Path, root: Path, folders: dict[str, str]) -> dict[str, Any]:
    """``report.html``: the before/after tables of both sets and sample responses; beside
    it ``training.html``, the RL run's own report (curves, config)."""
    from ..evaluation.report import build_report

    training = build_report(root / folders["rl"], folder / "training.html")
    sections = ['<p>Training curves and the RL config: <a href="training.html">'
                "training.html</a>.</p>"]
    for part, title in SETS:
        eval_dir = root / folders.get(f"eval-{part}", "")
        if part == "bestof" and not (eval_dir / "summary.json").is_file():
            continue  # a demo without the baseline's stage
        rows = figures(read_summary(eval_dir))
        sections.append(f"<h2>{html.escape(title[0].upper() + title[1:])}</h2>\n"
                        + _figure_table(rows) + _samples_html(eval_dir / "generations.jsonl"))
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>detoxrl demo</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            "<h1>detoxrl demo: before and after detoxification</h1>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")
    path = atomic_write_text(folder / "report.html", page)
    return {"report": str(path), "training": str(training)}


def _figure_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("metric", "before", "after", "change",
                                             "relative", "95% CI of change", "verdict",
                                             "excess over the floor removed"))
    body = []
    for r in rows:
        rel = f"{r['relative'] * 100:+.1f}%" if r["relative"] is not None else ""
        ci = (f"[{_num(r['ci_low'], True)}, {_num(r['ci_high'], True)}]"
              if r["ci_low"] is not None else "")
        removed = (f"{r['excess_removed'] * 100:.0f}% (floor {_num(r['floor'])})"
                   if r.get("excess_removed") is not None else "")
        cells = [html.escape(str(r["metric"])), _num(r["before"]), _num(r["after"]),
                 _num(r["change"], True), rel, ci, html.escape(r.get("plain") or ""), removed]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _samples_html(path: Path) -> str:
    """The first sample of the first prompts, before and after, with the judge's score:
    to read whether the policy games the reward (empty, repetitive or off-topic text)."""
    if not path.is_file():
        return ""
    judge = f"judge:{JUDGE}"
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("sample", 0) != 0:   # one response per prompt, K prompts apart
                continue
            cells = [row.get("query", ""), row.get("before", ""),
                     _num(row.get(f"{judge}_before")), row.get("after", ""),
                     _num(row.get(f"{judge}_after"))]
            rows.append("<tr>" + "".join(f'<td class="text">{html.escape(str(c))}</td>'
                                         for c in cells) + "</tr>")
            if len(rows) == SAMPLES_SHOWN:
                break
    head = "".join(f"<th>{c}</th>" for c in ("prompt", "before", JUDGE, "after", JUDGE))
    return (f"<h3>Sample responses</h3>\n<table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
