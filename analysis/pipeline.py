"""From a sweep's table to everything the figures and tables show.

:func:`analyse` is the one place the classification steps are chained. The steps go one batch of
whole cells at a time (:func:`analyse_batch`: distinct optima, their stability, cell outcomes, and
the runs the per-run figures draw, :mod:`analysis.drawn`); :func:`combine` joins the batches'
small outputs and computes what needs every cell (boundaries, the exact structure). A table in
memory is one batch; :func:`analysis.stream.analyse_sweep` feeds a sweep directory's rows batch by
batch, in bounded memory. :mod:`analysis.report` writes what they return (``figures`` and
``tables`` import this module, never the other way round).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import classify
from analysis.alpha import split_family
from analysis.data import CELL_KEYS, in_context, nearest_value
from analysis.drawn import DEFAULT_WEIGHT, RUN_COLUMNS, Drawn
from analysis.structure import POINT_COLUMNS, Structure, exact_structure

#: What a non-converged run "reached" in the per-run table.
NOT_CONVERGED = "not converged"


@dataclass
class SweepAnalysis:
    """Everything derived from one sweep table.

    - ``runs``: the runs the per-run figures draw (``drawn``; the columns
      :data:`analysis.drawn.RUN_COLUMNS`), with ``optimum`` (index within the cell, -1 if not
      converged) and ``reached`` (type of the optimum reached, ``saddle``, or
      ``not converged``). Every count over all runs is in ``cells``.
    - ``optima``: one row per distinct optimum (:func:`analysis.classify.distinct_optima`).
    - ``cells``: one row per cell (:func:`analysis.classify.cell_outcomes`).
    - ``boundaries``: :func:`analysis.classify.phase_boundaries`.
    - ``context``: the estimator, center and component_var the figures show.
    - ``drawn``: which runs each per-run figure draws (:class:`analysis.drawn.Drawn`).
    - ``structures``: the exact structure (:func:`analysis.structure.exact_structure`) of each
      divergence in that context, over the sweep's weights and separations; ``notes`` says why a
      divergence has none (or what is missing from it).
    """

    runs: pd.DataFrame
    optima: pd.DataFrame
    cells: pd.DataFrame
    boundaries: pd.DataFrame
    context: dict[str, object]
    tol: float
    drawn: Drawn
    structures: dict[str, Structure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def bifurcation_set(self) -> pd.DataFrame:
        """Every special point of every exact structure, one row each (columns: POINT_COLUMNS)."""
        frames = [s.points for s in self.structures.values() if not s.points.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=POINT_COLUMNS)

    def default_weight(self, target: float | None = None) -> float:
        """The swept weight nearest ``target`` (default 0.75) among all the sweep's cells."""
        return nearest_value(self.cells["weight"], DEFAULT_WEIGHT if target is None else target)


def analyse(
    table: pd.DataFrame,
    tol: float = classify.DEFAULT_TOL,
    check_stability: bool = True,
    exact: bool = True,
    weight: float | None = None,
) -> SweepAnalysis:
    """Distinct optima, their stability, cell outcomes and phase boundaries of a prepared table.

    ``table`` comes from :func:`analysis.data.load_sweep` (or :func:`analysis.data.prepare`); it is
    analysed as one batch (:func:`analyse_batch`, :func:`combine`).
    Rows of the alpha family (``divergence=alpha``) are left out: their objective depends on
    ``alpha``, which the cell keys do not hold; :func:`analysis.alpha.analyse_alpha` analyses them.
    So are stochastic runs (a non-null ``basin``; :mod:`analysis.stochastic`). With
    ``check_stability`` the Hessian of every distinct optimum is checked by the core
    (:mod:`analysis.stability`) and saddle points are not counted as optima. With ``exact`` the
    exact structure of every divergence of the main context is computed by continuation
    (:mod:`analysis.structure`): the boundary table then takes its onset and switch from it (the
    grid values stay as ``onset_grid`` and ``switch_grid``) and every cell gets its exact number
    of minima, ``n_minima_exact``. ``weight``: the single-weight figures' weight, whose runs are
    kept (default: nearest 0.75).
    """
    from analysis.source import Census

    if "basin" in table.columns and table["basin"].notna().any():  # stochastic runs: not starts
        table = table[table["basin"].isna()]
    family, table = split_family(table)
    if table.empty:
        raise ValueError(
            f"all {len(family)} rows are of the alpha family: analyse them with analysis.alpha.analyse_alpha"
        )
    census = Census.of_frame(table)
    drawn = Drawn.plan(census.grid, census.starts, weight)
    return combine([analyse_batch(table, drawn, tol, check_stability)], drawn, tol, exact)


@dataclass
class Batch:
    """What one batch of whole cells leaves: its optima, its cells and the runs some figure draws."""

    optima: pd.DataFrame
    cells: pd.DataFrame
    runs: pd.DataFrame


def analyse_batch(
    table: pd.DataFrame, drawn: Drawn, tol: float = classify.DEFAULT_TOL, check_stability: bool = True
) -> Batch:
    """The per-cell steps on a prepared batch of whole cells (no alpha rows; see :func:`analyse`)."""
    labels = classify.label_runs(table, tol)
    optima = classify.distinct_optima(table, labels)
    if check_stability and not optima.empty:
        from analysis.stability import stationary_kind

        optima["kind"] = stationary_kind(optima)
    cells = classify.cell_outcomes(table, optima)
    keep = drawn.keep(table)
    reached = optima.assign(
        reached=np.where(optima["kind"] == classify.SADDLE, classify.SADDLE, optima["type"])
    )
    runs = (
        table.loc[keep, [c for c in RUN_COLUMNS if c in table.columns]]
        .assign(optimum=labels[keep])
        .merge(reached[CELL_KEYS + ["optimum", "reached"]], on=CELL_KEYS + ["optimum"], how="left")
    )
    runs["reached"] = runs["reached"].fillna(NOT_CONVERGED)
    return Batch(optima, cells, runs)


def concat(frames: Iterable[pd.DataFrame], by: list[str] | None = None) -> pd.DataFrame:
    """The batches' frames as one (the empty ones only where all are), sorted by ``by`` if given."""
    frames = list(frames)
    full = [f for f in frames if len(f)] or frames[:1]
    out = pd.concat(full, ignore_index=True) if len(full) > 1 else full[0].reset_index(drop=True)
    return out.sort_values(by, ignore_index=True) if by and len(full) > 1 else out


def combine(batches: list[Batch], drawn: Drawn, tol: float, exact: bool = True) -> SweepAnalysis:
    """The analysis of the batches' cells together: their optima, cells and runs joined (the list
    is emptied), then the phase boundaries and (with ``exact``) the exact structures, which need
    every cell."""
    optima = concat((b.optima for b in batches), CELL_KEYS + ["optimum"])
    cells = concat((b.cells for b in batches), CELL_KEYS)
    runs = concat(b.runs for b in batches)
    batches.clear()  # (joined: each is held once)
    boundaries = classify.phase_boundaries(cells, optima)
    result = SweepAnalysis(runs, optima, cells, boundaries, drawn.context, tol, drawn)
    if exact:
        result.structures, result.notes = exact_structures(cells, optima, drawn.context)
        result.boundaries = exact_boundaries(boundaries, result.structures)
        result.cells = exact_counts(cells, result.structures)
    return result


def exact_structures(
    cells: pd.DataFrame, optima: pd.DataFrame, context: dict[str, object]
) -> tuple[dict[str, Structure], list[str]]:
    """The exact structure of each divergence of the context, over its swept weights and separations
    (those of its ``cells``: the cost depends on the values swept, not on the number of runs)."""
    from kl_sweep.core.divergences import DIVERGENCES

    structures, notes = {}, []
    runs = in_context(cells, context)
    minima = in_context(optima, context)
    minima = minima[classify.is_minimum(minima)]
    for divergence, part in runs.groupby("divergence"):  # one batched computation per divergence
        separations = np.unique(part["separation"].to_numpy(float))
        weights = np.unique(part["weight"].to_numpy(float))
        if divergence not in DIVERGENCES:
            notes.append(f"{divergence}: not a divergence of kl_sweep.core, no exact structure")
            continue
        if len(separations) < 2:
            notes.append(f"{divergence}: one separation swept, no branches to continue")
            continue
        structure = exact_structure(
            str(divergence),
            weights,
            (float(separations.min()), float(separations.max())),
            center=float(context["center"]),
            component_var=float(context["component_var"]),
            sweep_minima=minima[minima["divergence"] == divergence],
            separations=separations,
        )
        if len(weights) < 2:
            structure.notes.append("one weight swept: no fold lines or cusps (they need a weight range)")
        if structure.points.empty:
            structure.notes.append("no special point in the swept range: one minimum everywhere")
        notes += [f"{divergence}: {n}" for n in structure.notes]
        structures[str(divergence)] = structure
    return structures, notes


def exact_boundaries(boundaries: pd.DataFrame, structures: dict[str, Structure]) -> pd.DataFrame:
    """The boundary table with its onset and switch columns from the exact structures.

    ``onset_separation``: the smallest separation where a minimum is born (a fold or pitchfork with
    event birth); ``global_switch_separation``: the first coexistence (maxwell) or crossover point
    of the global minimum, and ``switch_kind`` which. The grid values stay as ``onset_grid`` and
    ``switch_grid``; ``n_minima_max`` is the exact largest number of minima. Rows of other contexts
    or divergences keep their grid values and say so in ``boundary_method``.
    """
    out = boundaries.rename(
        columns={"onset_separation": "onset_grid", "global_switch_separation": "switch_grid"}
    )
    out["onset_separation"], out["global_switch_separation"] = out["onset_grid"], out["switch_grid"]
    out["switch_kind"], out["n_minima_max"], out["boundary_method"] = None, np.nan, "grid"
    for divergence, structure in structures.items():  # a handful of divergences
        rows = (
            (out["divergence"] == divergence)
            & np.isclose(out["center"].astype(float), structure.center)
            & np.isclose(out["component_var"].astype(float), structure.component_var)
        )
        points = structure.points
        births = points[points["kind"].isin(["fold", "pitchfork"]) & (points["event"] == "birth")]
        onset = births.groupby("weight")["separation"].min()
        switch = points[points["kind"].isin(["maxwell", "crossover"])].sort_values("separation")
        switch = switch.groupby("weight").head(1).set_index("weight")
        most = structure.counts().groupby("weight")["n_minima"].max()
        w = out.loc[rows, "weight"].astype(float)
        out.loc[rows, "onset_separation"] = w.map(onset).to_numpy()
        out.loc[rows, "global_switch_separation"] = w.map(switch["separation"]).to_numpy()
        out.loc[rows, "switch_kind"] = w.map(switch["kind"]).to_numpy()
        out.loc[rows, "n_minima_max"] = w.map(most).to_numpy()
        out.loc[rows, "boundary_method"] = "exact"
    keys = classify.BOUNDARY_KEYS
    first = ["onset_separation", "onset_grid", "onset_lower", "n_minima_max", "n_optima_max"]
    second = [
        "global_switch_separation",
        "switch_kind",
        "switch_grid",
        "switch_lower",
        "switch_upper",
        "method",
    ]
    rest = [c for c in out.columns if c not in keys + first + second]
    return out[keys + first + second + rest]


def exact_counts(cells: pd.DataFrame, structures: dict[str, Structure]) -> pd.DataFrame:
    """``cells`` with ``n_minima_exact``: the number of minima the exact structure has there (NaN if none)."""
    frames = [
        s.counts().assign(divergence=name, center=s.center, component_var=s.component_var)
        for name, s in structures.items()
    ]
    if not frames:
        return cells.assign(n_minima_exact=np.nan)
    exact = pd.concat(frames, ignore_index=True).rename(columns={"n_minima": "n_minima_exact"})
    keys = ["divergence", "center", "component_var", "weight", "separation"]
    return cells.merge(exact, on=keys, how="left")
