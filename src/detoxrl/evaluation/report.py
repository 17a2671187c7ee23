"""One self-contained HTML report of a run: config, training curves, toxicity, tables.

The page references nothing outside itself: figures are embedded as base64 PNG and the CSS
is inline, so the file can be mailed, archived or opened offline. Every input is optional;
a missing or unreadable one replaces its section with a short note.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

from ..errors import DetoxError
from ..runs.io import atomic_write_text
from .curve_report import curve_section
from .figures import fmt, is_number, note, png, read_metrics, section, series
from .protocol_table import change_cell, html_tables
from .tables import CSS, html_table, read_rows

CURVES = (("env/reward_mean", "Reward (mean)"), ("objective/kl", "KL to reference"),
          ("objective/kl_coef", "KL coefficient"), ("ppo/returns/mean", "Returns (mean)"),
          ("ppo/loss/policy", "Policy loss"), ("ppo/loss/value", "Value loss"))
QUALITY_KEYS = ("rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "mean_length")
MAX_COMPARISON_ROWS = 100  # the best and worst halves are shown beyond this
_EXTRA_CSS = """
h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.75rem; overflow-x: auto; }
p.note { color: #666; font-style: italic; }
img { max-width: 100%; }
.improved { color: #16794a; font-weight: 600; } .worse { color: #b3261e; font-weight: 600; }
""".strip()


def build_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the HTML report of ``run_dir`` (default ``run_dir/report.html``); return its path.

    Reads, each if present: ``config.yaml``; ``metrics.jsonl`` (one JSON object per line
    with ``step`` and the keys in :data:`CURVES`); ``eval_curve.jsonl`` (the validation
    curve, :mod:`detoxrl.evaluation.curve`); ``eval/toxicity.json``
    (``{"before": [p, ...], "after": [p, ...]}``, toxic-label probabilities per prompt);
    ``eval/summary.json``; ``eval/compare.csv`` or ``eval/compare.json`` (rows of
    :func:`detoxrl.evaluation.tables.comparison_rows`).

    ``eval/summary.json`` schema (as built by
    :func:`detoxrl.evaluation.stats.evaluation_summary`; every top-level key optional)::

        {"n": 100, "toxic_label": "hate", "confidence": 0.95, "n_resamples": 10000,
         "seed": 0,
         "metrics": {                     # stats.compare() per metric
           "toxicity": {"lower_is_better": true,
                        "before": summarize(), "after": summarize(),  # mean, std, median,
                                                     # share_above_0_5, max, n
                        "percent_improvement": {"mean": %, "std": %},
                        "bootstrap": {"mean": {paired_bootstrap() keys + "verdict"},
                                      "std": {...}}},
           "reward": {... same, "lower_is_better": false}},
         "quality": {"before": {"rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2",
                                "mean_length"}, "after": {...}},
         "kl": {"mean": nats, "std": nats},   # per-response KL(tuned || reference)
         "protocol": {...}}   # the papers' table; layout in detoxrl.evaluation.runner
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DetoxError(f"Run folder {str(run_dir)!r} does not exist. Pass the output_dir "
                         "of a training run, e.g. detoxrl report runs/detoxrl.")
    sections = [_config_section(run_dir), _curves_section(run_dir), curve_section(run_dir),
                _toxicity_section(run_dir), _summary_section(run_dir),
                _comparison_section(run_dir)]
    out = Path(out_path) if out_path is not None else run_dir / "report.html"
    return atomic_write_text(out, _page(f"detoxrl report: {run_dir.resolve().name}", sections))


# --------------------------------------------------------------------------- page parts

def _page(title: str, sections: list[str]) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n{_EXTRA_CSS}\n</style>\n"
            f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<p class="note">Generated {stamp}.</p>\n' + "\n".join(sections)
            + "\n</body>\n</html>\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- sections

def _config_section(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return section("Configuration", note("No config.yaml in the run folder."))
    text = path.read_text(encoding="utf-8", errors="replace")
    return section("Configuration", f"<pre>{html.escape(text)}</pre>")


def _curves_section(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    curves = [(key, title, *series(rows, key)) for key, title in CURVES]
    missing = [c[0] for c in curves if not c[2]]
    curves = [c for c in curves if c[2]]
    if not curves:
        return section("Training curves", note(
            "No training metrics found (metrics.jsonl missing, empty or without "
            + ", ".join(k for k, _ in CURVES) + ")."))
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(curves))
    n_rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * n_rows), layout="constrained")
    for i, (_, title, steps, values) in enumerate(curves):
        ax = fig.add_subplot(n_rows, cols, i + 1)
        ax.plot(steps, values, marker="." if len(values) < 50 else None)
        ax.set(title=title, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    missing_note = note("Not logged: " + ", ".join(missing) + ".") if missing else ""
    return section("Training curves", png(fig) + missing_note)


def _toxicity_section(run_dir: Path) -> str:
    data = _read_json(run_dir / "eval" / "toxicity.json")
    if not isinstance(data, dict) or not any(data.get(k) for k in ("before", "after")):
        return section("Toxicity", note("No eval/toxicity.json with before/after scores."))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    bins = [i / 20 for i in range(21)]
    for name, color in (("before", "tab:red"), ("after", "tab:green")):
        values = [v for v in data.get(name) or [] if is_number(v)]
        if values:
            ax.hist(values, bins=bins, alpha=0.5, color=color,
                    label=f"{name} (n={len(values)}, mean={sum(values) / len(values):.3f})")
    ax.set(xlabel="toxicity (probability of the toxic label)", ylabel="responses", xlim=(0, 1))
    ax.legend()
    return section("Toxicity", png(fig))


def _summary_section(run_dir: Path) -> str:
    summary = _read_json(run_dir / "eval" / "summary.json")
    if not isinstance(summary, dict):
        return section("Evaluation", note("No readable eval/summary.json."))
    try:
        body = _summary_html(summary)
    except (AttributeError, KeyError, TypeError):  # a schema this version does not know
        body = (note("summary.json has an unexpected layout; shown as is.")
                + f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>")
    return section("Evaluation", body)


def _summary_html(summary: dict[str, Any]) -> str:
    conf = summary.get("confidence", 0.95)
    header = (f"<p>{fmt(summary.get('n'))} prompts; {fmt(conf * 100, 3)}% paired bootstrap "
              f"intervals ({fmt(summary.get('n_resamples'))} resamples) of after − before. "
              f"Toxic label: {fmt(summary.get('toxic_label'))}.</p>")
    parts = [header, _settings_html(summary.get("settings"))]
    if summary.get("protocol"):
        parts += ["<h3>Detoxification measures (RealToxicityPrompts protocol)</h3>",
                  html_tables(summary["protocol"]), "<h3>Per-prompt statistics</h3>"]
    parts.append(_metrics_table(summary.get("metrics") or {}))
    if summary.get("quality"):
        parts.append(_quality_table(summary["quality"]))
    if summary.get("kl"):
        kl = summary["kl"]
        parts.append(f"<p>KL(tuned ‖ reference) per response: mean {fmt(kl.get('mean'))}, "
                     f"std {fmt(kl.get('std'))} nats.</p>")
    return "\n".join(parts)


def _settings_html(settings: Any) -> str:
    """How the responses were made (``detoxrl evaluate`` records it), in one line."""
    if not isinstance(settings, dict):
        return ""
    reward = settings.get("reward") if isinstance(settings.get("reward"), dict) else {}
    judges = settings.get("judges") or ([settings["judge"]] if settings.get("judge") else [])
    judge = f"; judges {', '.join(fmt(j) for j in judges)}" if judges else ""
    source = settings.get("prompts") if isinstance(settings.get("prompts"), dict) else {}
    where = f"Prompts of {fmt(source['path'])}" if source.get("path") else "Test prompts"
    return (f"<p>{where}, {fmt(settings.get('samples_per_prompt', 1))} samples each, "
            f"{fmt(settings.get('decoding'))} decoding, at most "
            f"{fmt(settings.get('max_new_tokens'))} new tokens, seed {fmt(settings.get('seed'))}"
            f", batch size {fmt(settings.get('batch_size'))}; toxicity by "
            f"{fmt(reward.get('model'))} on the {fmt(settings.get('score_on'))}{judge}.</p>")


def _interval(boot: dict[str, Any]) -> str:
    return change_cell(boot.get("observed"), boot.get("ci_low"), boot.get("ci_high"), fmt,
                       verdict=boot.get("verdict", ""))


def _metrics_table(metrics: dict[str, Any]) -> str:
    head = ("<tr><th>metric</th><th>before mean ± std</th><th>after mean ± std</th>"
            "<th>Δ mean [CI]</th><th>Δ std [CI]</th><th>% improvement (mean / std)</th>"
            "<th>share &gt; 0.5 (before → after)</th></tr>")
    rows = []
    for name, m in metrics.items():
        b, a, boot = m.get("before", {}), m.get("after", {}), m.get("bootstrap", {})
        pct = m.get("percent_improvement", {})
        # Both last columns assume a toxicity-like probability (lower is better); for a
        # reward logit they would mislead, so they are left empty.
        toxic_like = m.get("lower_is_better", True)
        pct_cell = (f"{fmt(pct.get('mean'), 3)}% / {fmt(pct.get('std'), 3)}%" if toxic_like
                    else "–")
        share_cell = (f"{fmt(b.get('share_above_0_5'))} → {fmt(a.get('share_above_0_5'))}"
                      if toxic_like else "–")
        rows.append(
            f"<tr><td>{html.escape(name)}</td>"
            f"<td>{fmt(b.get('mean'))} ± {fmt(b.get('std'))}</td>"
            f"<td>{fmt(a.get('mean'))} ± {fmt(a.get('std'))}</td>"
            f"<td>{_interval(boot.get('mean', {}))}</td><td>{_interval(boot.get('std', {}))}</td>"
            f"<td>{pct_cell}</td><td>{share_cell}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _quality_table(quality: dict[str, Any]) -> str:
    before, after = quality.get("before", {}), quality.get("after", {})
    keys = [k for k in QUALITY_KEYS if k in before or k in after]
    keys += sorted((set(before) | set(after)) - set(keys))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(before.get(k))}</td>"
                   f"<td>{fmt(after.get(k))}</td></tr>" for k in keys)
    return ("<h3>Quality</h3><table><tr><th>measure</th><th>before</th><th>after</th></tr>"
            f"{rows}</table>")


def _comparison_section(run_dir: Path) -> str:
    paths = [run_dir / "eval" / name for name in ("compare.csv", "compare.json")]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return section("Responses before and after", note("No eval/compare.csv."))
    try:
        rows = read_rows(path)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return section("Responses before and after", note(f"Cannot read {path.name}: {exc}"))
    header = note(f"{len(rows)} prompts, sorted by reward_diff (after − before), best first.")
    if len(rows) > MAX_COMPARISON_ROWS:
        half = MAX_COMPARISON_ROWS // 2
        header = note(f"The {half} largest and {half} smallest reward gains of {len(rows)} "
                       f"prompts; all rows are in {path.name}.")
        rows = rows[:half] + rows[-half:]
    return section("Responses before and after", header + html_table(rows))
