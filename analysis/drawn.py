"""Which runs the per-run figures draw, decided from a sweep's census before its runs are read.

Three figures draw single runs: the bifurcation diagram, the basin map and the loss landscape
(:mod:`analysis.figures`). A sweep's runs are read a batch at a time (:mod:`analysis.source`) and
only the runs these figures draw are kept: :meth:`Drawn.plan` chooses them from the census (the
rows per swept value) and :meth:`Drawn.keep` picks them out of each batch. The figures choose
among the kept runs by the same masks, so both agree by construction.

- **Bifurcation**: the main context's converged runs at up to :data:`BIFURCATION_WEIGHTS`
  weights and, per weight, :data:`BIFURCATION_INITS` starting means (both evenly chosen among the
  swept ones).
- **Basin map**: the main context's runs at the figures' weight with the most common
  (optimizer, lr, init_sigma2), every separation and starting mean.
- **Loss landscape**: the runs of one cell: the reverse KL (else the first divergence) at the
  figures' weight and the largest separation swept there.

Where a figure's runs would number more than :data:`MAX_DRAWN_RUNS` (10^4 separations x 10^4
starts at one weight...), it draws a regular sub-grid instead: every k-th swept separation (and,
for the basin map, every k-th starting mean), with the smallest k that fits; ``notes`` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.data import CELL_KEYS, RUN_KEYS, divergence_order, in_context, nearest_value, primary_context

#: Weight shown by the single-weight figures unless asked otherwise (the nearest swept one).
DEFAULT_WEIGHT = 0.75
#: Most runs a per-run figure keeps; beyond it the figure draws a regular sub-grid (module docstring).
MAX_DRAWN_RUNS = 500_000
#: Weights and starting means per weight of the bifurcation diagram, at most (evenly chosen).
BIFURCATION_WEIGHTS, BIFURCATION_INITS = 6, 40
#: What makes the basin map's runs one per grid cell: it shows the most common combination.
BASIN_KEYS = ["optimizer", "lr", "init_sigma2"]
#: The columns of a drawn run the figures read (with ``optimum`` and ``reached``); no others are kept.
RUN_COLUMNS = [*CELL_KEYS, *RUN_KEYS, "mu", "sigma2", "loss", "converged", "status"]


def pick_evenly(values: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` of the sorted unique ``values``, evenly spaced by index, ends included."""
    v = np.unique(values)
    if v.size <= most:
        return v
    return v[np.unique(np.round(np.linspace(0, v.size - 1, most)).astype(int))]


def most_common(table: pd.DataFrame, keys: list[str], count: str | None = None) -> dict[str, object]:
    """The most frequent combination of ``keys`` in ``table`` (rows counted by ``count`` if given)."""
    grouped = table.groupby(keys, dropna=False)
    best = (grouped.size() if count is None else grouped[count].sum()).idxmax()
    return dict(zip(keys, best if isinstance(best, tuple) else (best,), strict=True))


def _equal(column: pd.Series, value: object) -> np.ndarray:
    """``column == value``, NaN matching NaN."""
    return (column == value).to_numpy() | (column.isna().to_numpy() & pd.isna(value))


def _isin(column: pd.Series, values: np.ndarray | None) -> np.ndarray:
    """Whether each value of ``column`` is one of ``values`` (None: all are)."""
    return np.ones(len(column), dtype=bool) if values is None else column.isin(values).to_numpy()


@dataclass
class Drawn:
    """The runs each per-run figure draws (module docstring), as values they are picked by.

    ``weight`` is the single-weight figures' weight: the swept weight of the main context nearest
    the one asked for. ``separations`` (per figure) and ``basin_inits`` are None where every swept
    value is drawn, else the regular sub-grid drawn.
    """

    context: dict[str, object]
    weight: float
    bifurcation: dict[float, np.ndarray]
    basin: dict[str, object]
    basin_inits: np.ndarray | None
    landscape: dict[str, object]
    separations: dict[str, np.ndarray | None]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def plan(cls, grid: pd.DataFrame, starts: pd.DataFrame, weight: float | None = None) -> Drawn:
        """The runs to keep, from the census of the rows analysed (:class:`analysis.source.Census`):
        ``grid`` and ``starts`` of the line's rows, other than the alpha family's."""
        context = primary_context(grid, count="n")
        target = nearest_value(grid["weight"], DEFAULT_WEIGHT if weight is None else weight)
        cells = in_context(grid, context)
        starts = in_context(starts, context)
        plan = cls(context, nearest_value(cells["weight"], target), {}, {}, None, {}, {})
        plan._plan_bifurcation(cells, starts)
        plan._plan_basin(cells, starts)
        plan._plan_landscape(grid, cells, target)
        return plan

    def _plan_bifurcation(self, cells: pd.DataFrame, starts: pd.DataFrame) -> None:
        weights = pick_evenly(cells["weight"].to_numpy(float), BIFURCATION_WEIGHTS)
        runs = 0
        for w in weights:  # a few weights
            here = starts[starts["weight"] == w]
            inits = pick_evenly(here["init_mu"].to_numpy(float), BIFURCATION_INITS)
            self.bifurcation[float(w)] = inits
            runs += int(here.loc[here["init_mu"].isin(inits), "n"].sum())
        separations = np.unique(cells.loc[cells["weight"].isin(weights), "separation"].to_numpy(float))
        step = math.ceil(runs / MAX_DRAWN_RUNS)
        self.separations["bifurcation"] = None if step <= 1 else separations[::step]
        if step > 1:
            self.notes.append(
                f"bifurcation: {runs} runs at the weights and starting means drawn, over the cap of "
                f"{MAX_DRAWN_RUNS}: drawn at one swept separation in {step} "
                f"({len(separations[::step])} of {len(separations)})"
            )

    def _plan_basin(self, cells: pd.DataFrame, starts: pd.DataFrame) -> None:
        here = starts[starts["weight"] == self.weight]
        self.basin = most_common(here, BASIN_KEYS, count="n")
        mask = np.ones(len(here), dtype=bool)
        for key, value in self.basin.items():
            mask &= _equal(here[key], value)
        here = here[mask]
        runs = int(here["n"].sum())
        separations = np.unique(cells.loc[cells["weight"] == self.weight, "separation"].to_numpy(float))
        inits = np.unique(here["init_mu"].to_numpy(float))
        step = 1
        while runs * _share(len(separations), step) * _share(len(inits), step) > MAX_DRAWN_RUNS:
            step += 1
        self.separations["basin"] = None if step == 1 else separations[::step]
        self.basin_inits = None if step == 1 else inits[::step]
        if step > 1:
            self.notes.append(
                f"basin map: {runs} runs at weight {self.weight:g}, over the cap of {MAX_DRAWN_RUNS}: drawn "
                f"at one swept separation in {step} ({len(separations[::step])} of {len(separations)}) "
                f"and one starting mean in {step} ({len(inits[::step])} of {len(inits)})"
            )

    def _plan_landscape(self, grid: pd.DataFrame, cells: pd.DataFrame, target: float) -> None:
        names = list(dict.fromkeys(grid["divergence"]))
        divergence = "reverse" if "reverse" in names else divergence_order(names)[0]
        mine = cells[cells["divergence"] == divergence]
        if mine.empty:  # (not in the main context: the figure has no cell to show, and says so)
            self.landscape = {"divergence": divergence, "weight": np.nan, "separation": np.nan}
            return
        weight = nearest_value(mine["weight"], target)
        separation = float(mine.loc[mine["weight"] == weight, "separation"].max())
        self.landscape = {"divergence": divergence, "weight": weight, "separation": separation}

    @property
    def bifurcation_weights(self) -> np.ndarray:
        return np.array(sorted(self.bifurcation), dtype=float)

    def in_context(self, runs: pd.DataFrame) -> np.ndarray:
        """Which of ``runs`` are in the figures' context."""
        mask = np.ones(len(runs), dtype=bool)
        for key, value in self.context.items():
            mask &= _equal(runs[key], value)
        return mask

    def in_bifurcation(self, runs: pd.DataFrame) -> np.ndarray:
        """Which of ``runs`` the bifurcation diagram draws."""
        mask = self.in_context(runs) & runs["converged"].to_numpy(bool)
        mask &= _isin(runs["separation"], self.separations["bifurcation"])
        chosen = np.zeros(len(runs), dtype=bool)
        for weight, inits in self.bifurcation.items():  # a few weights
            chosen |= (runs["weight"] == weight).to_numpy() & runs["init_mu"].isin(inits).to_numpy()
        return mask & chosen

    def in_basin(self, runs: pd.DataFrame) -> np.ndarray:
        """Which of ``runs`` the basin map draws."""
        mask = self.in_context(runs) & (runs["weight"] == self.weight).to_numpy()
        for key, value in self.basin.items():
            mask &= _equal(runs[key], value)
        mask &= _isin(runs["separation"], self.separations["basin"])
        return mask & _isin(runs["init_mu"], self.basin_inits)

    def in_landscape(self, runs: pd.DataFrame) -> np.ndarray:
        """Which of ``runs`` the loss landscape draws (one cell)."""
        mask = self.in_context(runs)
        for key, value in self.landscape.items():
            mask &= (runs[key] == value).to_numpy()
        return mask

    def keep(self, runs: pd.DataFrame) -> np.ndarray:
        """Which of ``runs`` (a batch) some per-run figure draws."""
        if runs.empty:
            return np.zeros(0, dtype=bool)
        return self.in_bifurcation(runs) | self.in_basin(runs) | self.in_landscape(runs)


def _share(n: int, step: int) -> float:
    """The fraction of ``n`` values left by taking every ``step``-th."""
    return math.ceil(n / step) / n if n else 1.0
