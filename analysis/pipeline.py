"""From a sweep's table to everything the figures and tables show.

:func:`analyse` is the one place the classification steps are chained; :mod:`analysis.report`
writes what it returns (``figures`` and ``tables`` import this module, never the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import classify
from analysis.data import CELL_KEYS, nearest_value, primary_context

#: Weight shown by the single-weight figures unless asked otherwise (the nearest swept one).
DEFAULT_WEIGHT = 0.75
#: What a non-converged run "reached" in the per-run table.
NOT_CONVERGED = "not converged"


@dataclass
class SweepAnalysis:
    """Everything derived from one sweep table.

    - ``runs``: the table with ``optimum`` (index within the cell, -1 if not converged) and
      ``reached`` (type of the optimum reached, ``saddle``, or ``not converged``).
    - ``optima``: one row per distinct optimum (:func:`analysis.classify.distinct_optima`).
    - ``cells``: one row per cell (:func:`analysis.classify.cell_outcomes`).
    - ``boundaries``: :func:`analysis.classify.phase_boundaries`.
    - ``context``: the estimator, center and component_var the figures show.
    """

    runs: pd.DataFrame
    optima: pd.DataFrame
    cells: pd.DataFrame
    boundaries: pd.DataFrame
    context: dict[str, object]
    tol: float

    def default_weight(self, target: float | None = None) -> float:
        """The swept weight nearest ``target`` (default 0.75) in the figures' context."""
        return nearest_value(self.runs["weight"], DEFAULT_WEIGHT if target is None else target)


def analyse(
    table: pd.DataFrame, tol: float = classify.DEFAULT_TOL, check_stability: bool = True
) -> SweepAnalysis:
    """Distinct optima, their stability, cell outcomes and phase boundaries of a prepared table.

    ``table`` comes from :func:`analysis.data.load_sweep` (or :func:`analysis.data.prepare`).
    With ``check_stability`` the Hessian of every distinct optimum is checked by the core
    (:mod:`analysis.stability`) and saddle points are not counted as optima.
    """
    labels = classify.label_runs(table, tol)
    optima = classify.distinct_optima(table, labels)
    if check_stability and not optima.empty:
        from analysis.stability import stationary_kind

        optima["kind"] = stationary_kind(optima)
    cells = classify.cell_outcomes(table, optima)
    boundaries = classify.phase_boundaries(cells, optima)
    reached = optima.assign(
        reached=np.where(optima["kind"] == classify.SADDLE, classify.SADDLE, optima["type"])
    )
    runs = table.assign(optimum=labels).merge(
        reached[CELL_KEYS + ["optimum", "reached"]], on=CELL_KEYS + ["optimum"], how="left"
    )
    runs["reached"] = runs["reached"].fillna(NOT_CONVERGED)
    return SweepAnalysis(runs, optima, cells, boundaries, primary_context(table), tol)
