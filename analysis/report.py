"""Writing everything ``python -m analysis`` produces: tables to ``tables/``, figures to ``figures/``.

This is the top of the analysis's import graph: it draws on :mod:`analysis.tables` and
:mod:`analysis.figures`, which draw on :mod:`analysis.pipeline`; nothing imports this module back.
"""

from __future__ import annotations

from pathlib import Path

from analysis import figures, tables
from analysis.alpha import AlphaAnalysis
from analysis.pipeline import SweepAnalysis


def write_report(
    result: SweepAnalysis | None,
    sweep_dir: str | Path,
    weight: float | None = None,
    alpha: AlphaAnalysis | None = None,
) -> list[Path]:
    """Write the tables to ``sweep_dir/tables/`` and the figures to ``sweep_dir/figures/``; return the paths.

    ``result``: the per-divergence analysis (None when the sweep has only alpha rows); ``weight``
    picks its single-weight figures' weight (the nearest swept one; default 0.75). ``alpha``: the
    alpha family's analysis, whose tables and figures are written beside (``alpha_*``) and whose
    section ends ``summary.md``.
    """
    sweep_dir = Path(sweep_dir)
    written: list[Path] = []
    if result is not None:
        written += tables.write_tables(result, sweep_dir / "tables")
        written += figures.write_figures(result, sweep_dir / "figures", weight=result.default_weight(weight))
    if alpha is not None:
        written += tables.write_alpha_tables(alpha, sweep_dir / "tables")
        written += figures.write_alpha_figures(alpha, sweep_dir / "figures")
        summary = sweep_dir / "tables" / "summary.md"
        section = tables.alpha_summary_markdown(alpha)
        if result is None:
            summary.write_text(section)
            written.append(summary)
        else:
            tables.write_pieces(["\n", section], summary, mode="a")  # (the line's summary can be long)
    return written
