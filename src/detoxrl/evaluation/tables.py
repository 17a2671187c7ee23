"""The tutorial's before/after comparison table, as CSV, Markdown and HTML.

One row per prompt: the response and reward of the reference model (``before``) and of the
tuned model (``after``), sorted by ``reward_diff = reward_after - reward_before``, largest
gain first. Every file is written atomically.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..runs.io import atomic_write_text
from .stats import as_array

COLUMNS = ("query", "response_before", "response_after", "reward_before", "reward_after",
           "reward_diff")
_NUMERIC = frozenset(COLUMNS[3:])

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.35rem 0.5rem; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.text { white-space: pre-wrap; max-width: 32rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
""".strip()


def comparison_rows(queries: Sequence[str], before: Sequence[str], after: Sequence[str],
                    reward_before: Any, reward_after: Any) -> list[dict[str, Any]]:
    """One dict per prompt with :data:`COLUMNS`, sorted by ``reward_diff`` descending.

    Rewards may be lists, numpy arrays or tensors. Ties keep their input order.
    """
    r_before, r_after = as_array(reward_before), as_array(reward_after)
    sizes = {len(queries), len(before), len(after), r_before.size, r_after.size}
    if len(sizes) != 1:
        raise ValueError("queries, responses and rewards must have equal lengths; got "
                         f"{len(queries)}, {len(before)}, {len(after)}, {r_before.size}, "
                         f"{r_after.size}.")
    rows = [{"query": q, "response_before": b, "response_after": a,
             "reward_before": float(rb), "reward_after": float(ra),
             "reward_diff": float(ra - rb)}
            for q, b, a, rb, ra in zip(queries, before, after, r_before, r_after, strict=True)]
    return sorted(rows, key=lambda row: row["reward_diff"], reverse=True)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as CSV with a header (full float precision)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read rows back from a ``.csv`` written by :func:`write_csv` or a ``.json`` list."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    return [{k: float(v) if k in _NUMERIC and v not in (None, "") else v
             for k, v in row.items()} for row in rows]


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column, "")
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown_escape(text: str) -> str:
    # A pipe would end the cell and a newline the row; <br> keeps line breaks visible.
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in _NUMERIC else "---" for c in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_escape(_cell(row, c)) for c in COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as a Markdown table."""
    return atomic_write_text(path, markdown_table(rows))


def html_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an HTML ``<table>`` fragment, every cell escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{"num" if c in _NUMERIC else "text"}">{html.escape(_cell(row, c))}</td>'
            for c in COLUMNS)
        body.append(f"<tr>{cells}</tr>")
    return (f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body)
            + "\n</tbody>\n</table>")


def write_html(rows: Sequence[dict[str, Any]], path: str | Path,
               title: str = "Before / after comparison") -> Path:
    """Write rows as a self-contained HTML page (inline CSS, no external resources)."""
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n"
            f"<body>\n<h1>{html.escape(title)}</h1>\n{html_table(rows)}\n</body>\n</html>\n")
    return atomic_write_text(path, page)
