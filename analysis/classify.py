r"""Distinct optima, outcome classes and phase boundaries of a sweep: pure functions on tables.

Vocabulary (the exact rules are also in ``analysis/README.md``):

- A **cell** is one objective: the rows sharing :data:`analysis.data.CELL_KEYS` (divergence,
  estimator, center, component_var, separation, weight). Its rows are the **initialisations**
  (init_mu, init_sigma2, optimizer, lr).
- Only **converged** rows define optima. Two converged endpoints of a cell are the **same optimum**
  when they are joined by a chain of neighbours that differ by at most ``tol`` relatively: sort the
  cell's endpoints by mu and cut wherever consecutive means differ by more than
  ``tol * max(sigma_a, sigma_b)``; within each piece sort by sigma2 and cut wherever consecutive
  variances differ by more than ``tol * max(sigma2_a, sigma2_b)``. Each final piece is one optimum.
- The **moment-matched fit** of a cell is :math:`\mu^* = c + s(1/2 - w)`,
  :math:`V^* = v + w(1 - w)s^2` (mean and variance of P), the forward-KL optimum.
- The **order parameter** of an optimum is :math:`r = \sigma^2 / V^*`; of a cell, its mean over the
  converged initialisations that reached a minimum.
- The **type** of an optimum: ``covering`` if :math:`r \ge 1/2`; otherwise mode-seeking, on the
  left component if :math:`\mu < c` (else the right), and that component is the ``heavier mode``
  if it carries weight at least 1/2 (``weight`` is the left component's weight, so at weight 1/2
  the left mode is called the heavier one), else the ``lighter mode``.
- The **outcome** of a cell: ``multistable`` if it has two or more distinct minima, else the type
  of its one minimum, or ``no converged minimum``. Endpoints at saddle points (see
  :mod:`analysis.stability`) are not minima and do not count.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.data import CELL_KEYS

#: Relative tolerance under which two converged endpoints are the same optimum.
DEFAULT_TOL = 1e-3
#: sigma2 / moment-matched variance at or above which an optimum is called covering.
COVERING_RATIO = 0.5

COVERING = "covering"
HEAVIER = "heavier mode"
LIGHTER = "lighter mode"
MULTISTABLE = "multistable"
NO_MINIMUM = "no converged minimum"
#: Every outcome a cell can have, in the order legends show them.
OUTCOMES = (COVERING, HEAVIER, LIGHTER, MULTISTABLE, NO_MINIMUM)
#: Every type an optimum can have.
OPTIMUM_TYPES = (COVERING, HEAVIER, LIGHTER)

#: What a stationary point is, from :mod:`analysis.stability`; "unchecked" counts as a minimum.
MINIMUM, SADDLE, UNCHECKED = "minimum", "saddle", "unchecked"

#: Keys of one row of the phase-boundary table: a cell without its separation.
BOUNDARY_KEYS = [k for k in CELL_KEYS if k != "separation"]


def moment_matched(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    r"""The mean :math:`\mu^*` and variance :math:`V^*` of P for every row of ``table``."""
    s, w = table["separation"].to_numpy(float), table["weight"].to_numpy(float)
    mean = table["center"].to_numpy(float) + s * (0.5 - w)
    var = table["component_var"].to_numpy(float) + w * (1.0 - w) * s**2
    return mean, var


def optimum_types(table: pd.DataFrame) -> np.ndarray:
    """The type (covering / heavier mode / lighter mode) of each row's (mu, sigma2); see module doc."""
    _, var = moment_matched(table)
    ratio = table["sigma2"].to_numpy(float) / var
    left = table["mu"].to_numpy(float) < table["center"].to_numpy(float)
    left_heavier = table["weight"].to_numpy(float) >= 0.5
    mode = np.where(left == left_heavier, HEAVIER, LIGHTER)
    return np.where(ratio >= COVERING_RATIO, COVERING, mode)


def label_runs(table: pd.DataFrame, tol: float = DEFAULT_TOL) -> np.ndarray:
    """The optimum each row reached, numbered 0, 1, ... within its cell in order of mu; -1 if not converged.

    Implements the same-optimum rule of the module docstring with two sorts of the whole table,
    so it costs O(n log n) for n rows and has no loop over cells.
    """
    labels = np.full(len(table), -1, dtype=np.int64)
    rows = np.flatnonzero(table["converged"].to_numpy(bool))
    if rows.size == 0:
        return labels
    conv = table.iloc[rows]
    cell = conv.groupby(CELL_KEYS, sort=False, dropna=False).ngroup().to_numpy()
    mu, var = conv["mu"].to_numpy(float), conv["sigma2"].to_numpy(float)
    sd = np.sqrt(var)

    by_mu = np.lexsort((mu, cell))
    c, m, d = cell[by_mu], mu[by_mu], sd[by_mu]
    cut = np.ones(len(c), dtype=bool)
    cut[1:] = (c[1:] != c[:-1]) | (np.diff(m) > tol * np.maximum(d[1:], d[:-1]))
    piece = np.cumsum(cut)

    v_sorted = var[by_mu]
    by_var = np.lexsort((v_sorted, piece))
    p, v = piece[by_var], v_sorted[by_var]
    cut2 = np.ones(len(p), dtype=bool)
    cut2[1:] = (p[1:] != p[:-1]) | (np.diff(v) > tol * np.maximum(v[1:], v[:-1]))
    optimum = np.cumsum(cut2) - 1

    # Optima are numbered cell by cell in order of (mu piece, sigma2): subtract each cell's first.
    cell_sorted = c[by_var]
    first = pd.Series(optimum).groupby(cell_sorted).transform("min").to_numpy()
    labels[rows[by_mu[by_var]]] = optimum - first
    return labels


def group_means(groups: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """The mean of ``values`` in each group (``groups`` numbers them 0 .. n_groups - 1), NaN left out.

    Each group's values are added in their order by Kahan's compensated summation (as pandas'
    groupby mean does for a table not sorted by group), one position of every group at a time.
    A group's mean so depends on its own values and their order only, never on the rest of the
    table: a cell's optima are the same whether its batch holds one cell or a million.
    """
    order = np.argsort(groups, kind="stable")
    groups, values = groups[order], values[order]
    valid = ~np.isnan(values)
    groups, values = groups[valid], values[valid]
    counts = np.bincount(groups, minlength=n_groups)
    position = np.arange(len(groups)) - (np.cumsum(counts) - counts)[groups]
    by_position = np.lexsort((groups, position))
    ends = np.cumsum(np.bincount(position)) if len(position) else np.zeros(0, dtype=np.int64)
    total, compensation = np.zeros(n_groups), np.zeros(n_groups)
    start = 0
    with np.errstate(invalid="ignore", divide="ignore"):  # (infinite values: see below; empty groups)
        for end in ends:  # positions within a group: as many as the largest group's values
            rows = by_position[start:end]
            g, y = groups[rows], values[rows] - compensation[groups[rows]]
            t = total[g] + y
            compensation[g] = t - total[g] - y
            total[g] = t
            start = end
        means = total / counts
    # An infinite value makes the compensation NaN: such a group's mean is its plain one.
    odd = ~np.isfinite(means) & (counts > 0)
    if odd.any():
        plain = np.bincount(groups, weights=values, minlength=n_groups) / np.maximum(counts, 1)
        means[odd] = plain[odd]
    return means


def distinct_optima(table: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """One row per (cell, optimum) with its mean mu, sigma2, loss, KLs, runs reaching it and its type.

    ``share`` is the fraction of the cell's converged runs that reached the optimum; ``ratio`` is
    sigma2 over the moment-matched variance; ``side`` is ``left`` if mu < center else ``right``.
    The ``kind`` column (minimum / saddle / unchecked) starts as ``unchecked``; see
    :func:`analysis.stability.stationary_kind`.
    """
    conv = table.assign(optimum=labels)[labels >= 0]
    grouped = conv.groupby(CELL_KEYS + ["optimum"], sort=True, dropna=False)
    optima = grouped.size().rename("n_runs").reset_index()
    groups = grouped.ngroup().to_numpy()
    for k, column in enumerate(("mu", "sigma2", "loss", "kl_forward", "kl_reverse")):
        values = conv[column].to_numpy(float)
        optima.insert(len(CELL_KEYS) + 1 + k, column, group_means(groups, values, len(optima)))
    cell_runs = optima.groupby(CELL_KEYS, dropna=False)["n_runs"].transform("sum")
    optima["share"] = optima["n_runs"] / cell_runs
    _, var = moment_matched(optima)
    optima["ratio"] = optima["sigma2"] / var
    optima["type"] = optimum_types(optima)
    optima["side"] = np.where(optima["mu"] < optima["center"], "left", "right")
    optima["kind"] = UNCHECKED
    return optima


def is_minimum(optima: pd.DataFrame) -> np.ndarray:
    """Whether each optimum counts as a minimum: everything but a detected saddle."""
    return (optima["kind"] != SADDLE).to_numpy()


def cell_outcomes(table: pd.DataFrame, optima: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: run counts, distinct minima, outcome class and order parameter.

    Columns: the cell keys, ``n_runs``, ``n_converged``, ``n_not_converged``, ``n_saddle_runs``
    (converged runs that stopped on a saddle), ``n_optima`` (distinct minima), ``outcome`` and
    ``order_parameter`` (mean sigma2 / V* over the runs that reached a minimum; NaN if none).
    """
    runs = (
        table.groupby(CELL_KEYS, dropna=False)
        .agg(n_runs=("converged", "size"), n_converged=("converged", "sum"))
        .reset_index()
    )
    runs["n_not_converged"] = runs["n_runs"] - runs["n_converged"]
    minimum = is_minimum(optima)
    per_cell = (
        optima.assign(
            n_optima=minimum.astype(np.int64),
            n_saddle_runs=np.where(minimum, 0, optima["n_runs"]),
            min_runs=np.where(minimum, optima["n_runs"], 0),
            min_ratio=np.where(minimum, optima["n_runs"] * optima["ratio"], 0.0),
        )
        .groupby(CELL_KEYS, dropna=False)[["n_optima", "n_saddle_runs", "min_runs", "min_ratio"]]
        .sum()
    )
    single = optima[minimum].groupby(CELL_KEYS, dropna=False)["type"].first().rename("single_type")
    cells = runs.merge(per_cell.join(single).reset_index(), on=CELL_KEYS, how="left")
    for column in ("n_optima", "n_saddle_runs", "min_runs"):
        cells[column] = cells[column].fillna(0).astype(np.int64)
    cells["order_parameter"] = cells["min_ratio"] / cells["min_runs"].where(cells["min_runs"] > 0)
    cells["outcome"] = np.select(
        [cells["n_optima"] >= 2, cells["n_optima"] == 1],
        [MULTISTABLE, cells["single_type"].fillna(NO_MINIMUM)],
        default=NO_MINIMUM,
    )
    return cells.drop(columns=["min_runs", "min_ratio", "single_type"]).sort_values(
        CELL_KEYS, ignore_index=True
    )


def branch_losses(optima: pd.DataFrame) -> pd.DataFrame:
    """Per cell, the lowest loss among covering minima and among mode-seeking minima (NaN if none)."""
    minima = optima[is_minimum(optima)]
    if minima.empty:
        return minima[CELL_KEYS].assign(covering_loss=np.nan, mode_loss=np.nan)
    branch = np.where(minima["type"] == COVERING, "covering_loss", "mode_loss")
    wide = minima.assign(branch=branch).groupby(CELL_KEYS + ["branch"], dropna=False)["loss"].min()
    wide = wide.unstack("branch").reindex(columns=["covering_loss", "mode_loss"])
    wide.columns.name = None
    return wide.reset_index().dropna(subset=["covering_loss", "mode_loss"], how="all")


def phase_boundaries(cells: pd.DataFrame, optima: pd.DataFrame) -> pd.DataFrame:
    r"""Per divergence, context and weight: where multistability starts and where the global minimum switches.

    Only separations whose cell has at least one minimum take part ("informative" cells).

    - ``onset_separation``: the smallest swept separation with two or more distinct minima; a grid
      value by definition. ``onset_lower`` is the informative separation just below it (NaN if
      there is none: the onset is then not bracketed from below). NaN if never multistable.
    - ``n_optima_max``: the most distinct minima at any separation.
    - ``global_switch_separation``: where the lowest-loss minimum changes from covering to
      mode-seeking, at the first consecutive pair of informative separations
      :math:`s_i < s_{i+1}` with a covering global minimum at :math:`s_i` and a mode-seeking one at
      :math:`s_{i+1}` (``switch_lower``, ``switch_upper``). If both branches exist at both
      separations, the loss difference :math:`\Delta = L_\text{mode} - L_\text{covering}` is
      interpolated linearly to its zero, :math:`s^* = s_i + (s_{i+1} - s_i)\,\Delta_i / (\Delta_i -
      \Delta_{i+1})` (``method`` = "interpolated"); otherwise :math:`s^* = s_{i+1}`, the first
      swept separation where the mode-seeking minimum is global (``method`` = "grid"). NaN (and no
      method) where the sweep does not bracket a switch, as for the forward KL, whose minimum is
      always covering.
    - ``n_runs`` and ``n_not_converged``: summed over all separations of the row.
    """
    keys = BOUNDARY_KEYS
    totals = cells.groupby(keys, dropna=False)[["n_runs", "n_not_converged"]].sum()
    informative = cells[cells["n_optima"] > 0].merge(branch_losses(optima), on=CELL_KEYS, how="left")
    informative = informative.sort_values(keys + ["separation"], ignore_index=True)
    grouped = informative.groupby(keys, dropna=False)
    informative["previous"] = grouped["separation"].shift(1)
    out = totals.join(grouped["n_optima"].max().rename("n_optima_max"))

    multi = informative[informative["n_optima"] >= 2].groupby(keys, dropna=False).head(1).set_index(keys)
    out = out.join(multi["separation"].rename("onset_separation")).join(
        multi["previous"].rename("onset_lower")
    )

    cov, mode = informative["covering_loss"], informative["mode_loss"]
    mode_global = mode.notna() & ~(cov <= mode)
    cov_global = cov.notna() & ~mode_global
    prev_cov_global = cov_global.groupby([informative[k] for k in keys], dropna=False).shift(1)
    delta = mode - cov
    prev_delta = delta.groupby([informative[k] for k in keys], dropna=False).shift(1)
    switch = informative[prev_cov_global.fillna(False).astype(bool) & mode_global].copy()
    d0, d1 = prev_delta[switch.index], delta[switch.index]
    both = d0.notna() & d1.notna()
    s0, s1 = switch["previous"], switch["separation"]
    switch["global_switch_separation"] = np.where(both, s0 + (s1 - s0) * d0 / (d0 - d1), s1)
    switch["method"] = np.where(both, "interpolated", "grid")
    switch = switch.groupby(keys, dropna=False).head(1).set_index(keys)
    out = out.join(switch["global_switch_separation"])
    out = out.join(switch["previous"].rename("switch_lower")).join(
        switch["separation"].rename("switch_upper")
    )
    out = out.join(switch["method"])

    out["n_optima_max"] = out["n_optima_max"].fillna(0).astype(np.int64)
    columns = [
        "onset_separation",
        "onset_lower",
        "n_optima_max",
        "global_switch_separation",
        "switch_lower",
        "switch_upper",
        "method",
        "n_runs",
        "n_not_converged",
    ]
    return out.reset_index()[keys + columns].sort_values(keys, ignore_index=True)
