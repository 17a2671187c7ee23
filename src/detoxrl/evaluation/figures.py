"""Parts of the HTML reports: sections, notes, numbers and figures embedded as PNG."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any


def section(title: str, body: str) -> str:
    """An HTML ``<section>`` with its heading."""
    return f"<section>\n<h2>{html.escape(title)}</h2>\n{body}\n</section>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def png(fig) -> str:
    """The figure as an inline ``<img>``; no metadata, so no URL hides in the PNG either."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # render headless on Agg, whatever pyplot's backend is
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else html.escape(str(value))
    return "n/a" if isinstance(value, float) and not math.isfinite(value) else f"{value:.{digits}g}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl``; blank or broken lines (a crash) are skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Steps and finite values of ``key``; a row without a usable ``step`` uses its index."""
    points = [(row["step"] if is_number(row.get("step")) else i, row[key])
              for i, row in enumerate(rows) if is_number(row.get(key))]
    return [float(s) for s, _ in points], [float(v) for _, v in points]


