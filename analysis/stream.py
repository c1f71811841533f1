"""A sweep directory analysed out of core: its rows read once, a batch of whole cells at a time.

:func:`analyse_sweep` is what ``python -m analysis`` runs. It takes the sweep's census first
(:attr:`analysis.source.Sweep.census`: rows per swept value, a small GROUP BY), which fixes the
main contexts, the runs the per-run figures draw (:class:`analysis.drawn.Drawn`) and, later, the
ranges of the exact structures. Then it streams the rows (:meth:`analysis.source.Sweep.batches`)
and hands each batch's rows to the three analyses, which keep only small outputs:

- the line's rows other than the alpha family's: :func:`analysis.pipeline.analyse_batch` (optima,
  cells, the drawn runs), joined by :func:`analysis.pipeline.combine`;
- the alpha family's: :func:`analysis.alpha.alpha_batch`, joined by :func:`analysis.alpha.combine_alpha`;
- the rows with ``dim`` > 1: :meth:`analysis.dims.HigherRows.add`.

What is held at any time is one batch plus outputs per cell and optimum and the capped drawn runs,
so memory does not grow with the rows of a cell grid, and the time is one pass over them (plus
DuckDB's sort). The in-memory entry points (:func:`analysis.pipeline.analyse`,
:func:`analysis.alpha.analyse_alpha`, :meth:`analysis.dims.HigherRows.of`) are the same steps on
one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.alpha import AlphaAnalysis, alpha_batch, combine_alpha, split_family
from analysis.classify import DEFAULT_TOL
from analysis.data import in_context, primary_context, split_dimensions
from analysis.dims import HigherRows
from analysis.drawn import Drawn
from analysis.pipeline import SweepAnalysis, analyse_batch, combine
from analysis.source import BATCH_ROWS, Census, Sweep


@dataclass
class SweepReport:
    """Everything :func:`analyse_sweep` found: the line's analysis (None without such rows), the
    alpha family's (None without alpha rows), the d > 1 rows' summary (None without them), the
    number of d > 1 rows and their dimensions, and notes on what was thinned."""

    result: SweepAnalysis | None
    alpha: AlphaAnalysis | None
    higher: HigherRows | None
    higher_rows: int = 0
    higher_dims: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Parts:
    """The sweep's census split as the analyses split the rows (see :func:`analyse_sweep`)."""

    lines: Census
    family: Census
    higher: Census

    @classmethod
    def of(cls, census: Census) -> Parts:
        grid_lines, grid_higher = split_dimensions(census.grid)
        starts_lines, starts_higher = split_dimensions(census.starts)
        grid_family, grid_lines = split_family(grid_lines)
        starts_family, starts_lines = split_family(starts_lines)
        return cls(
            Census(grid_lines, starts_lines),
            Census(grid_family, starts_family),
            Census(grid_higher, starts_higher),
        )


def analyse_sweep(
    sweep: Sweep | str | Path,
    tol: float = DEFAULT_TOL,
    weight: float | None = None,
    batch_rows: int = BATCH_ROWS,
    exact: bool = True,
    check_stability: bool = True,
) -> SweepReport:
    """Analyse a sweep directory (or an opened :class:`~analysis.source.Sweep`) in one streamed pass.

    ``weight``: the single-weight figures' weight, whose runs are kept (default: nearest 0.75);
    ``batch_rows``: rows a batch holds (about: batches end with whole cells); ``exact`` and
    ``check_stability`` as for :func:`analysis.pipeline.analyse`. Raises ``FileNotFoundError`` or
    ``ValueError`` for a sweep that cannot be read (:meth:`~analysis.source.Sweep.open`).
    """
    sweep = sweep if isinstance(sweep, Sweep) else Sweep.open(sweep)
    parts = Parts.of(sweep.census)
    drawn = Drawn.plan(parts.lines.grid, parts.lines.starts, weight) if len(parts.lines.grid) else None
    family = parts.family.grid
    context = primary_context(family, count="n") if len(family) else None
    several = len(family) > 0 and int(in_context(family, context)["n"].sum()) < int(family["n"].sum())
    inits = np.unique(parts.higher.starts["init_mu"].to_numpy(float))
    higher = HigherRows(inits) if len(parts.higher.grid) else None
    higher_rows = int(parts.higher.grid["n"].sum())
    dims = sorted(int(d) for d in pd.unique(parts.higher.grid["dim"]))
    del parts, family  # (the census grows with the grid swept; what was planned from it is kept)
    lines, alphas = [], []
    for batch in sweep.batches(batch_rows, higher=higher is not None):
        batch_lines, batch_higher = split_dimensions(batch)
        batch_family, batch_rest = split_family(batch_lines)
        if len(batch_rest):
            lines.append(analyse_batch(batch_rest, drawn, tol, check_stability))
        if len(batch_family):
            alphas.append(alpha_batch(batch_family, context, tol, check_stability))
        if higher is not None and len(batch_higher):
            higher.add(batch_higher)
    result = combine(lines, drawn, tol, exact) if lines else None
    alpha = combine_alpha(alphas, context, tol, several, exact) if alphas else None
    notes = (drawn.notes if drawn is not None else []) + (higher.notes if higher is not None else [])
    return SweepReport(result, alpha, higher, higher_rows, dims, notes)
