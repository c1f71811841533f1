"""Writing everything ``python -m analysis`` produces: tables to ``tables/``, figures to ``figures/``.

This is the top of the analysis's import graph: it draws on :mod:`analysis.tables` and
:mod:`analysis.figures`, which draw on :mod:`analysis.pipeline`; nothing imports this module back.
"""

from __future__ import annotations

from pathlib import Path

from analysis import figures, tables
from analysis.pipeline import SweepAnalysis


def write_report(result: SweepAnalysis, sweep_dir: str | Path, weight: float | None = None) -> list[Path]:
    """Write the tables to ``sweep_dir/tables/`` and the figures to ``sweep_dir/figures/``; return the paths.

    ``weight`` picks the single-weight figures' weight (the nearest swept one; default 0.75).
    """
    sweep_dir = Path(sweep_dir)
    written = tables.write_tables(result, sweep_dir / "tables")
    written += figures.write_figures(result, sweep_dir / "figures", weight=result.default_weight(weight))
    return written
