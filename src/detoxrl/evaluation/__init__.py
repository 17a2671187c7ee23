"""Evaluation: toxicity statistics, text quality, comparison tables and the HTML report.

``stats`` and ``quality`` are pure functions (numpy, rouge_score); ``tables`` writes the
before/after comparison; ``report`` renders a run folder as one self-contained HTML page;
``runner`` generates, scores and writes an evaluation (``detoxrl evaluate`` and the demo call
it); ``model_card`` writes a run's README; ``validity`` scores a reward classifier against
gold toxicity labels (ROC-AUC) and reads what a reward folder records. Imports
``detoxrl.errors``, ``config``, ``runs``, ``models`` and ``data``.
"""

from __future__ import annotations

from .quality import distinct_n, mean_length, quality_metrics, rouge
from .stats import (
    compare,
    evaluation_summary,
    paired_bootstrap,
    percent_improvement,
    summarize,
    verdict,
)
from .tables import comparison_rows, write_csv, write_html, write_markdown

__all__ = [
    "compare",
    "comparison_rows",
    "distinct_n",
    "evaluation_summary",
    "mean_length",
    "paired_bootstrap",
    "percent_improvement",
    "quality_metrics",
    "rouge",
    "summarize",
    "verdict",
    "write_csv",
    "write_html",
    "write_markdown",
]
