"""Reading a sweep's results table and checking it has what the analysis needs.

A sweep directory holds one table, one row per configuration (see the project README for the
column contract), assembled by :func:`kl_sweep.collect.read_sweep` from whatever layout the sweep
left. :func:`load_sweep` returns it with the analysis's working columns filled in: ``converged`` as
a strict boolean (a row counts as converged only if its flag says so and its ``mu``/``sigma2``/
``loss`` are finite) and the optional context columns given defaults when a hand-made table
leaves them out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kl_sweep.collect import read_sweep

#: What fixes a d > 1 objective (one line of the exact structure's grid): a d > 1 cell's keys.
ND_GRID_KEYS = (
    "divergence",
    "dim",
    "q_family",
    "direction",
    "weight",
    "correlation",
    "separation",
    "center",
    "component_var",
)
#: Columns without which nothing can be analysed.
REQUIRED_COLUMNS = ("divergence", "separation", "weight", "init_mu", "mu", "sigma2", "loss")
#: Columns the contract promises but a hand-made table may omit, with the value assumed then.
OPTIONAL_DEFAULTS: dict[str, object] = {
    "estimator": "unknown",
    "optimizer": "unknown",
    "lr": np.nan,
    "center": 0.0,
    "component_var": 1.0,
    "init_sigma2": 1.0,
    "kl_forward": np.nan,
    "kl_reverse": np.nan,
}
#: What fixes the objective being minimised: optima are properties of one such cell.
CELL_KEYS = ["divergence", "estimator", "center", "component_var", "separation", "weight"]
#: Cell keys other than divergence, separation and weight: one value each in a typical sweep.
CONTEXT_KEYS = ["estimator", "center", "component_var"]
#: How a run started and walked: runs differing only in these are initialisations of one cell.
RUN_KEYS = ["optimizer", "lr", "init_sigma2", "init_mu"]
#: The order divergences are shown in; any others follow alphabetically.
DIVERGENCE_ORDER = ("forward", "hellinger", "reverse")


def load_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """Read a sweep directory (any layout :func:`kl_sweep.collect.read_sweep` understands) for analysis.

    Returns the table ready for :mod:`analysis.classify` (see :func:`prepare`). Raises
    ``FileNotFoundError`` or ``ValueError`` (with the path in the message) when the directory does
    not exist, holds no results, or its table lacks a required column.
    """
    table = read_sweep(sweep_dir)
    if table.empty:
        raise ValueError(f"no results in {sweep_dir}: the results table has no rows")
    try:
        return prepare(table)
    except ValueError as err:
        raise ValueError(f"results in {sweep_dir}: {err}") from None


def prepare(table: pd.DataFrame) -> pd.DataFrame:
    """Check the required columns, fill optional ones and normalise ``converged``; returns a copy."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if "converged" not in table.columns and "status" not in table.columns:
        missing.append("converged (or status)")
    if missing:
        raise ValueError(f"the results table lacks the column(s) {', '.join(missing)}")
    table = with_defaults(table)
    flag = table["converged"] if "converged" in table.columns else table["status"] == "converged"
    finite = np.isfinite(table[["mu", "sigma2", "loss"]].to_numpy(dtype=float)).all(axis=1)
    table["converged"] = (
        flag.fillna(False).astype(bool).to_numpy() & finite & (table["sigma2"] > 0).to_numpy()
    )
    if "status" not in table.columns:
        table["status"] = np.where(table["converged"], "converged", "unknown")
    table["divergence"] = table["divergence"].astype(str)
    return table.reset_index(drop=True)


def with_defaults(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table``, every optional column it lacks set to its default (:data:`OPTIONAL_DEFAULTS`)."""
    table = table.copy()
    for column, default in OPTIONAL_DEFAULTS.items():
        if column not in table.columns:
            table[column] = default
    return table


def divergence_order(names: pd.Series | list[str]) -> list[str]:
    """Forward first, then reverse, then any other divergence alphabetically."""
    present = set(names)
    known = [d for d in DIVERGENCE_ORDER if d in present]
    return known + sorted(present - set(known))


def primary_context(table: pd.DataFrame, count: str | None = None) -> dict[str, object]:
    """The (estimator, center, component_var) with the most rows: the one the figures show.

    ``count``: a column holding how many rows each row of ``table`` stands for (a census,
    :class:`analysis.source.Census`); without it each row is one.
    """
    grouped = table.groupby(CONTEXT_KEYS, dropna=False)
    counts = grouped.size() if count is None else grouped[count].sum()
    return dict(zip(CONTEXT_KEYS, counts.idxmax(), strict=True))


def in_context(table: pd.DataFrame, context: dict[str, object]) -> pd.DataFrame:
    """The rows of ``table`` whose columns equal ``context``'s values (NaN matching NaN)."""
    mask = np.ones(len(table), dtype=bool)
    for key, value in context.items():
        mask &= (table[key] == value).to_numpy() | (table[key].isna().to_numpy() & pd.isna(value))
    return table[mask]


def nearest_value(values: pd.Series | np.ndarray, target: float) -> float:
    """The value in ``values`` closest to ``target`` (the smaller on a tie)."""
    unique = np.unique(np.asarray(values, dtype=float))
    return float(unique[np.argmin(np.abs(unique - target))])


def split_dimensions(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the 1-D rows, the rows with ``dim`` > 1): the phase analysis here is of the line; a table
    from before ``dim`` existed is all 1-D."""
    if "dim" not in table.columns:
        return table, table.iloc[:0]
    higher = table["dim"].fillna(1).astype(int).to_numpy() > 1
    return table[~higher].reset_index(drop=True), table[higher].reset_index(drop=True)
