"""The papers' table (Gehman et al. 2020; Liu et al. 2021; Lu et al. 2022), as text and HTML.

One table per toxicity scorer, read from ``summary["protocol"]``: rows are the models
(before = reference, after = trained adapter) and the change with its interval; columns are
expected maximum toxicity, toxicity probability, average toxicity, perplexity,
distinct-1/2/3 within prompts, distinct-2 of the whole set and topicality (when measured).
Those after the toxicity do not depend on the scorer and repeat. A scorer measured on clean
human text has its floor and the share of the excess over it that is gone below its table.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

COLUMNS = (("expected_max_toxicity", "Exp. max tox."), ("toxicity_probability", "Tox. prob."),
           ("average_toxicity", "Avg. tox."), ("perplexity", "PPL"),
           ("distinct_1", "Dist-1"), ("distinct_2", "Dist-2"), ("distinct_3", "Dist-3"),
           ("set_distinct_2", "Dist-2 set"), ("topicality", "Topic. PMI"))
FLOORED = (("expected_max_toxicity", "exp. max tox."), ("toxicity_probability", "tox. prob."))


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.4g}"


def _signed(value: Any) -> str:
    text = _num(value)
    return text if text == "n/a" or text.startswith("-") else "+" + text


def scorer_title(key: str, info: dict[str, Any]) -> str:
    label = f", label {info['label']!r}" if info.get("label") else ""
    if info.get("role") == "reward classifier":
        return (f"Reward classifier {info.get('model')}{label}: the policy was trained "
                f"against it, so it is not an independent judge{_validity(info)}")
    return f"Judge {key} ({info.get('kind')}{label})"


def _validity(info: dict[str, Any]) -> str:
    """The reward's validity (``detoxrl train-reward`` measures it), when the summary has one."""
    if "validity" not in info:  # a summary written before validity was recorded
        return ""
    v = info["validity"]
    if not isinstance(v, dict):
        return "; its validity against gold toxicity labels is not recorded"
    judge = (f" (judge {v.get('judge')}: {_num(v.get('judge_roc_auc'), 3)})"
             if v.get("judge_roc_auc") is not None else "")
    return (f"; validity: ROC-AUC {_num(v.get('roc_auc'), 3)} against gold toxicity on "
            f"{v.get('n')} texts{judge}")


def tables(protocol: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(title, column name -> measure) for every scorer, in the summary's order."""
    shared = {"perplexity": protocol.get("fluency", {}).get("perplexity", {}),
              **protocol.get("diversity", {})}
    if "topicality" in protocol:  # not measured with --no-topicality
        shared["topicality"] = protocol["topicality"].get("pmi", {})
    return [(scorer_title(key, info), {**info.get("measures", {}), **shared})
            for key, info in protocol.get("toxicity", {}).items()]


def columns(protocol: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The :data:`COLUMNS` this summary has: the toxicity measures first, then the shared
    ones it measured."""
    found = tables(protocol)
    cols = found[0][1] if found else {}
    return COLUMNS[:3] + tuple((key, name) for key, name in COLUMNS[3:] if key in cols)


def after_label(protocol: dict[str, Any]) -> str:
    """What "after" is: the trained adapter, or the best-of-N baseline."""
    n = protocol.get("best_of")
    return f"after (best of {n})" if n else "after (trained)"


def header(protocol: dict[str, Any]) -> str:
    fluency = protocol.get("fluency", {})
    ppl = fluency.get("note") or f"perplexity under {fluency.get('model')}"
    best = (f"after = the starting policy, each sample the best of {protocol['best_of']} "
            "by the reward (no training); " if protocol.get("best_of") else "")
    topicality = ("topicality is the prompt-response PMI under the starting policy "
                  "(nats/token); " if "topicality" in protocol else "")
    return (f"{protocol.get('n_prompts')} prompts x {protocol.get('samples_per_prompt')} "
            f"samples; a sample is toxic at >= {protocol.get('toxic_threshold')}; {ppl}; "
            f"{best}{topicality}changes are after - before with "
            f"{protocol.get('confidence', 0.95) * 100:g}% paired bootstrap intervals over "
            "prompts.")


def floor_lines(info: dict[str, Any]) -> list[str]:
    """The scorer's floor on clean human text and the share of the excess removed."""
    floor = info.get("floor")
    if not floor:
        return []
    lines = [f"  floor on {floor['texts']} clean human texts (groups of "
             f"{floor['samples_per_group']}):"]
    for key, name in FLOORED:
        f, m = floor[key], info.get("measures", {}).get(key, {})
        removed = m.get("excess_removed")
        share = f"{removed * 100:.0f}%" if _num(removed) != "n/a" else "n/a"
        lines.append(f"    {name:<14}{_num(f['value'])} [{_num(f['ci_low'])}, "
                     f"{_num(f['ci_high'])}]; excess {_num(m.get('excess_before'))} -> "
                     f"{_num(m.get('excess_after'))}, {share} of it removed")
    return lines


def text_tables(protocol: dict[str, Any]) -> str:
    """The tables for the terminal, each followed by its changes with intervals."""
    width, shown, found = 14, columns(protocol), tables(protocol)
    lines = [header(protocol), ""]
    for (title, cols), info in zip(found, protocol.get("toxicity", {}).values(), strict=True):
        lines += [title, f"{'model':<16}" + "".join(f"{name:>{width}}" for _, name in shown)]
        for row in ("before", "after"):
            label = "before (ref.)" if row == "before" else after_label(protocol)
            lines.append(f"{label:<16}" + "".join(
                f"{_num(cols.get(key, {}).get(row)):>{width}}" for key, _ in shown))
        lines.append(f"{'change':<16}" + "".join(
            f"{_signed(cols.get(key, {}).get('change')):>{width}}" for key, _ in shown))
        lines += [*_interval_lines(cols, shown[:3]), *floor_lines(info), ""]
    if found:  # fluency and diversity are the same under every scorer
        lines += ["fluency and diversity", *_interval_lines(found[0][1], shown[3:])]
    return "\n".join(lines).rstrip()


def _interval_lines(cols: dict[str, dict[str, Any]], columns) -> list[str]:
    lines = []
    for key, name in columns:
        m = cols.get(key, {})
        lines.append(f"  {name:<14}{_signed(m.get('change')):>10}  "
                     f"[{_signed(m.get('ci_low'))}, {_signed(m.get('ci_high'))}]  "
                     f"{m.get('verdict', 'n/a')}")
    return lines


def html_tables(protocol: dict[str, Any]) -> str:
    """The tables as HTML fragments, every cell escaped."""
    shown = columns(protocol)
    head = "<tr><th>model</th>" + "".join(f"<th>{html.escape(n)}</th>" for _, n in shown)
    parts = [f"<p>{html.escape(header(protocol))}</p>"]
    for (title, cols), info in zip(tables(protocol), protocol.get("toxicity", {}).values(),
                                   strict=True):
        rows = []
        for row, label in (("before", "before (reference)"), ("after", after_label(protocol))):
            rows.append(f"<tr><td>{label}</td>" + "".join(
                f'<td class="num">{_num(cols.get(k, {}).get(row))}</td>' for k, _ in shown)
                + "</tr>")
        rows.append("<tr><td>change [CI]</td>" + "".join(
            f"<td>{_change_cell(cols.get(k, {}))}</td>" for k, _ in shown) + "</tr>")
        parts.append(f"<h4>{html.escape(title)}</h4><table>{head}</tr>{''.join(rows)}</table>"
                     + "".join(f"<p>{html.escape(line.strip())}</p>" for line in
                               floor_lines(info)))
    return "\n".join(parts)


def change_cell(change: Any, low: Any, high: Any, number: Callable[[Any], str] = _signed,
                verdict: Any = None) -> str:
    """A change and its confidence interval, ``+0.0123 [-0.0010, +0.0250]``; given a
    ``verdict``, an HTML cell with the verdict coloured. The one formatter of such cells
    (protocol tables, model card, report)."""
    text = f"{number(change)} [{number(low)}, {number(high)}]"
    if verdict is None:
        return text
    verdict = str(verdict)
    css = {"improved": ' class="improved"', "worse": ' class="worse"'}.get(verdict, "")
    return f"{text} <span{css}>{html.escape(verdict)}</span>"


def _change_cell(m: dict[str, Any]) -> str:
    return change_cell(m.get("change"), m.get("ci_low"), m.get("ci_high"),
                       verdict=m.get("verdict", ""))


def markdown_tables(protocol: dict[str, Any]) -> str:
    """The tables in Markdown (the model card), the change row with its interval."""
    shown = columns(protocol)
    head = "| model | " + " | ".join(n for _, n in shown) + " |"
    rule = "| --- |" + " ---: |" * len(shown)
    parts = [header(protocol)]
    for (title, cols), info in zip(tables(protocol), protocol.get("toxicity", {}).values(),
                                   strict=True):
        rows = [f"**{title}**", "", head, rule]
        for row, label in (("before", "before (reference)"), ("after", after_label(protocol))):
            rows.append(f"| {label} | " + " | ".join(
                _num(cols.get(k, {}).get(row)) for k, _ in shown) + " |")
        rows.append("| change [95% CI] | " + " | ".join(
            change_cell(m.get("change"), m.get("ci_low"), m.get("ci_high"))
            for m in (cols.get(k, {}) for k, _ in shown)) + " |")
        rows += ["", *(line.strip() for line in floor_lines(info))] if info.get("floor") else []
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"
