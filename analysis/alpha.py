r"""The alpha family across its order: where multistability begins for each alpha.

Amari's alpha-divergence in Minka's convention (:mod:`kl_sweep.core.alpha`),

.. math:: D_a(P\Vert Q) = \frac{1}{a(1-a)} \int \big[a\,p + (1-a)\,q - p^a q^{1-a}\big]\,dx ,

is KL(Q||P) at a -> 0 (mode-seeking), KL(P||Q) at a -> 1 (mass-covering) and 4 H^2 at a = 1/2.
A sweep over ``divergence.alpha`` (``python -m kl_sweep -m experiment=alpha``) has one objective
per (alpha, separation, weight); the cell keys of :mod:`analysis.classify` do not include alpha, so
the main pipeline leaves these rows out (:func:`analysis.pipeline.analyse`) and this module
analyses them:

- :func:`fold_versus_alpha`: the exact folds (a minimum born or dying as the separation grows)
  against alpha, by natural-parameter continuation in alpha from the folds of the exact structure
  at a = 1/2 (:func:`analysis.structure.fold_points`). Each step solves the fold system
  :math:`G = (\partial_\mu L, \partial_{\log\sigma} L, \det H / \lVert H\rVert_F^2) = 0` in
  :math:`(\mu, \log\sigma, d)` at the new alpha by Newton from a secant predictor; G comes from the
  fitting core's closed-form gradient and Hessian (:meth:`kl_sweep.core.landscape.Landscape.theta_jet`),
  its Jacobian from central differences of G. (The core's own fold polish,
  :func:`kl_sweep.core.bifurcation.polish_folds`, needs autograd third derivatives, which are not
  finite for a < 0, nor for separations above about 29 sd at any a.) A step is kept when every row
  solves G to :data:`RESIDUAL_TOL` and moved continuously; otherwise it is halved, from the last
  kept point, down to :data:`MIN_STEP`. A fold's continuation ends (column ``end``) when it passes
  :data:`MAX_SEPARATION`, meets another fold (a cusp in (separation, alpha): two folds annihilate),
  turns back in alpha next to the edge of the region where D_a is finite (a < 0:
  :math:`\sigma^2 < v(1-a)/(-a)`; natural continuation cannot go round a turn), or Newton stops
  converging for another reason (said so).
- :func:`onset_table`: per (weight, alpha) the smallest swept separation with two or more distinct
  converged minima, next to the exact onset (the smallest birth fold) where there is one.
- :func:`analyse_alpha` chains both into an :class:`AlphaAnalysis` for the figures and tables.

Separations are in component standard deviations when component_var = 1 (as everywhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from analysis import classify
from analysis.data import CELL_KEYS, in_context, primary_context
from analysis.numerics import float64, tensor

#: The divergence name of the family's rows (``divergence=alpha``).
ALPHA = "alpha"
#: The order the exact structure is computed at before continuing in alpha (the Hellinger point).
START_ALPHA = 0.5
#: The exact structure at START_ALPHA is searched over this separation range (component sd).
START_RANGE = (0.0, 10.0)
#: A fold's continuation stops once its separation passes this (component sd).
MAX_SEPARATION = 40.0
#: A continuation step is kept when every row solves the fold system to this (max |G|).
RESIDUAL_TOL = 1e-10
#: First and largest steps in alpha, and the step below which a failing row is given up.
FIRST_STEP, MAX_STEP, MIN_STEP = 0.05, 0.1, 1e-4
#: Largest change of separation per step (relative, plus an absolute floor): keeps the curve sampled.
MAX_SEPARATION_CHANGE = (0.1, 0.5)
#: Largest change of (mu in fitted sd, log sigma) between a step's predictor and its solution.
MAX_CORRECTION = 0.25
#: Two folds of one weight closer than this (max over mu, log sigma, d) have met: a cusp.
SAME_FOLD = 1e-3
#: Alphas reported by default: -1 to 0.95 every 0.05, then every 0.005 up to 0.995.
DEFAULT_ALPHAS = tuple(
    np.round(np.concatenate([np.arange(-1.0, 0.951, 0.05), np.arange(0.955, 0.9951, 0.005)]), 10)
)
#: Columns of :func:`fold_versus_alpha`'s table, in order.
FOLD_COLUMNS = [
    "weight",
    "alpha",
    "branch",
    "event",
    "separation",
    "mu",
    "sigma2",
    "residual",
    "requested",
    "end",
]


# ---------------------------------------------------------------------------------------------
# Exact folds against alpha


def _fold_equations(landscape, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """G = (F, det H / |H|_F^2) [B, 3] at x = (mu, log sigma, d) [B, 3] and weights w [B, 1]."""
    jet = landscape.theta_jet(torch.cat([x, w], -1))
    h = jet.hessian
    det = h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] * h[:, 1, 0]
    return torch.cat([jet.gradient, (det / (h * h).sum((-1, -2))).unsqueeze(-1)], -1)


def solve_folds(landscape, u: torch.Tensor, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton on the fold system G = 0 in (mu, log sigma, d) at each row's weight, from u [B, 4].

    The Jacobian is central differences of G (steps 1e-6 relative): G itself is exact to rounding,
    so Newton converges to it (the differences only slow the last digits). Returns (u, residual)
    with residual = max |G| at the returned point (inf where it is not finite).
    """
    x, w = u[:, :3].clone(), u[:, 3:]
    n = len(x)
    eye = torch.eye(3, dtype=x.dtype)
    # Each iteration evaluates G at x and at x +- one coordinate's step: 7 points a row, one batch.
    w7 = torch.cat([w, w.repeat_interleave(3, 0), w.repeat_interleave(3, 0)])
    for _ in range(iterations):  # Newton iterations
        step = 1e-6 * (1.0 + x.abs())  # [B, 3]
        shifts = (step.unsqueeze(1) * eye).reshape(-1, 3)  # [B * 3, 3]: row b, coordinate k
        base = x.repeat_interleave(3, 0)
        g = _fold_equations(landscape, torch.cat([x, base + shifts, base - shifts]), w7)
        g0, up, down = g[:n], g[n : 4 * n].reshape(n, 3, 3), g[4 * n :].reshape(n, 3, 3)
        jacobian = ((up - down) / (2 * step.unsqueeze(-1))).transpose(1, 2)  # [B, equation, coordinate]
        delta, info = torch.linalg.solve_ex(jacobian, -g0.unsqueeze(-1))
        delta = delta.squeeze(-1)
        good = torch.isfinite(delta).all(-1) & (info == 0)
        delta = torch.where(good.unsqueeze(-1), delta, 0.0)
        x = x + delta
        if not (delta.abs() > 1e-14 * (1.0 + x.abs())).any():
            break
    residual = _fold_equations(landscape, x, w).abs().amax(-1)
    residual = torch.where(torch.isfinite(residual), residual, torch.inf)
    return torch.cat([x, w], -1), residual


def _start_folds(weights: Sequence[float], center: float, component_var: float) -> pd.DataFrame:
    from analysis.structure import fold_points

    points = fold_points(
        ALPHA, weights, START_RANGE, center=center, component_var=component_var, alpha=START_ALPHA
    )
    folds = points[points["kind"] == "fold"].reset_index(drop=True)
    return folds[["weight", "branch", "event", "separation", "mu", "sigma2", "residual"]]


def _edge_sigma2(alpha: float, component_var: float) -> float:
    """The largest sigma^2 where D_a is finite (a < 0); inf otherwise."""
    return component_var * (1.0 - alpha) / -alpha if alpha < 0 else np.inf


def _continue(
    landscape_at,
    start: torch.Tensor,
    start_alpha: float,
    targets: np.ndarray,
    component_var: float,
    max_separation: float,
) -> tuple[list[dict], dict[int, str]]:
    """Continue the folds ``start`` [B, 4] from ``start_alpha`` through ``targets`` (one direction).

    All unfinished rows advance together (one batch per step). Returns one record per kept point
    and row (``row``, ``alpha``, ``u``, ``residual``, ``requested``) and, per row, why it ended.
    """
    records: list[dict] = []
    ended: dict[int, str] = {}
    active = np.ones(len(start), dtype=bool)
    u = start.clone()
    previous: tuple[float, torch.Tensor] | None = None
    a, h = start_alpha, FIRST_STEP
    sign = 1.0 if targets[0] > start_alpha else -1.0
    for target in targets:  # the requested alphas in order; steps in between as needed
        while active.any() and sign * (target - a) > 1e-12:
            nxt = float(target) if h >= abs(target - a) - 1e-12 else a + sign * h
            rows = np.flatnonzero(active)
            guess = u[rows].clone()
            if previous is not None:  # secant predictor in (mu, log sigma, d)
                a0, u0 = previous
                guess[:, :3] += (u[rows, :3] - u0[rows, :3]) * (nxt - a) / (a - a0)
            solved, residual = solve_folds(landscape_at(nxt), guess)
            ok = _acceptable(solved, residual, guess, u[rows], nxt, component_var)
            if ok.all():
                previous, a = (a, u.clone()), nxt
                u[rows] = solved
                h = min(1.5 * h, MAX_STEP)
                records += [
                    {"row": row, "alpha": nxt, "u": solved[k].numpy(), "residual": float(residual[k])}
                    | {"requested": nxt == target}
                    for k, row in enumerate(rows)  # folds (a handful), not configurations
                ]
                _end_merged(u, rows, active, ended)
                for row in rows[(solved[:, 2] > max_separation).numpy()]:
                    if active[row]:
                        active[row], ended[row] = False, f"passes {max_separation:g} sd"
                continue
            h /= 2
            if h >= MIN_STEP:
                continue
            # Give up the failing rows at this alpha; the others go on with a fresh step.
            for row in rows[~ok]:
                ended[row] = _why_stopped(u, row, rows, a, component_var)
                active[row] = False
            h = FIRST_STEP / 5
    for row in np.flatnonzero(active):
        ended[row] = "reaches the end of the alpha range"
    return records, ended


def _acceptable(
    solved: torch.Tensor,
    residual: torch.Tensor,
    guess: torch.Tensor,
    last: torch.Tensor,
    alpha: float,
    component_var: float,
) -> np.ndarray:
    """Which rows of a step are kept: solved, near their predictor, continuous, inside the finite region."""
    converged = (residual <= RESIDUAL_TOL) & torch.isfinite(solved).all(-1)
    sd = torch.exp(guess[:, 1])
    correction = torch.maximum((solved[:, 0] - guess[:, 0]).abs() / sd, (solved[:, 1] - guess[:, 1]).abs())
    rel, floor = MAX_SEPARATION_CHANGE
    jump = (solved[:, 2] - last[:, 2]).abs() > torch.maximum(rel * last[:, 2].abs(), torch.tensor(floor))
    inside = torch.exp(2 * solved[:, 1]) < _edge_sigma2(alpha, component_var)
    return (converged & (correction <= MAX_CORRECTION) & ~jump & inside).numpy()


def _end_merged(u: torch.Tensor, rows: np.ndarray, active: np.ndarray, ended: dict[int, str]) -> None:
    """End both of any two active folds of one weight that have met (a cusp)."""
    for i in rows:  # pairs of folds (a handful)
        for j in rows:
            if j <= i or not (active[i] and active[j]) or u[i, 3] != u[j, 3]:
                continue
            if (u[i, :3] - u[j, :3]).abs().max() <= SAME_FOLD:
                active[i] = active[j] = False
                ended[i] = ended[j] = "meets another fold (cusp)"


def _why_stopped(u: torch.Tensor, row: int, rows: np.ndarray, alpha: float, component_var: float) -> str:
    """Why Newton stopped converging for ``row`` past ``alpha``: near another fold, the edge, or unknown.

    Natural-parameter continuation cannot go round a point where the fold curve turns back in
    alpha; next to the edge of the finite region (a < 0) that is what happens (checked by
    continuing in separation instead, solving for alpha: the curve turns, and its other sheet
    leaves the finite region).
    """
    others = [j for j in rows if j != row and u[j, 3] == u[row, 3]]
    for j in others:  # folds of the same weight
        close = (u[row, :3] - u[j, :3]).abs()
        if close[2] <= 0.02 * (1 + u[row, 2].abs()) and close[:2].max() <= 0.1:
            return "meets another fold (cusp)"
    share = float(torch.exp(2 * u[row, 1])) / _edge_sigma2(alpha, component_var)
    if share >= 0.9:
        return f"turns back in alpha next to the edge of the finite region, sigma^2 at {share:.0%} of it"
    return "stops converging (Newton; the curve may turn back in alpha)"


def fold_versus_alpha(
    weights: Sequence[float] = (0.5, 0.75),
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    center: float = 0.0,
    component_var: float = 1.0,
    max_separation: float = MAX_SEPARATION,
) -> pd.DataFrame:
    """The exact folds of the alpha-divergence against alpha, at ``weights`` (module docstring).

    The folds of the exact structure at alpha = 1/2 over separations 0 to 10 are continued up and
    down through ``alphas`` (steps in between as needed; alphas of 1 and above are dropped: the
    forward KL has no fold). One row per kept point (columns :data:`FOLD_COLUMNS`): the fold's
    weight, alpha, ``branch`` (the type, at alpha = 1/2, of the minimum born or dying: heavier
    mode, lighter mode or covering), ``event`` (``birth``: the minimum exists above the fold's
    separation, ``death``: below), separation, mu, sigma2, the residual max |G|, whether alpha is
    one of ``alphas`` (``requested``) and, on each fold's last point in each direction, why its
    continuation ends (``end``; empty elsewhere).
    """
    from kl_sweep.core.divergences import get_divergence
    from kl_sweep.core.landscape import Landscape

    alphas = np.unique(np.asarray(alphas, dtype=float))
    alphas = alphas[(alphas < 1.0) & np.r_[True, np.diff(alphas) > 1e-9]]  # range() leaves 5.6e-17 for 0
    with float64(), torch.no_grad():
        folds = _start_folds(weights, center, component_var)
        if folds.empty:
            return pd.DataFrame(columns=FOLD_COLUMNS)
        start = tensor(
            np.column_stack(
                [folds["mu"], 0.5 * np.log(folds["sigma2"]), folds["separation"], folds["weight"]]
            )
        )
        divergence = get_divergence(ALPHA)

        def landscape_at(a: float):
            return Landscape(divergence, center=center, component_var=component_var, alpha=a)

        at_start = bool(np.isclose(alphas, START_ALPHA, rtol=0, atol=1e-12).any())
        records = [
            {"row": i, "alpha": START_ALPHA, "u": start[i].numpy(), "residual": r, "requested": at_start}
            for i, r in enumerate(folds["residual"])
        ]
        ends = []
        for targets in (alphas[alphas > START_ALPHA], alphas[alphas < START_ALPHA][::-1]):
            if len(targets):
                points, ended = _continue(
                    landscape_at, start, START_ALPHA, targets, component_var, max_separation
                )
                records += points
                ends.append((np.sign(targets[0] - START_ALPHA), ended))
    return _fold_frame(records, ends, folds)


def _fold_frame(
    records: list[dict], ends: list[tuple[float, dict[int, str]]], folds: pd.DataFrame
) -> pd.DataFrame:
    """The kept points as a table, each direction's reason for ending on that direction's last point."""
    u = np.array([r["u"] for r in records])
    out = pd.DataFrame(
        {
            "row": [r["row"] for r in records],
            "alpha": [r["alpha"] for r in records],
            "separation": u[:, 2],
            "mu": u[:, 0],
            "sigma2": np.exp(2 * u[:, 1]),
            "residual": [r["residual"] for r in records],
            "requested": [r["requested"] for r in records],
        }
    ).join(folds[["weight", "branch", "event"]], on="row")
    out["end"] = ""
    for sign, ended in ends:  # two directions
        for row, why in ended.items():  # one reason per fold
            mine = out.loc[out["row"] == row, "alpha"]
            last = (mine * sign).idxmax()
            out.loc[last, "end"] = "; ".join(filter(None, [out.loc[last, "end"], why]))
    out = out.sort_values(["weight", "row", "alpha"], ignore_index=True)
    return out[FOLD_COLUMNS]


# ---------------------------------------------------------------------------------------------
# The sweep's view: distinct minima per (weight, alpha, separation) and the onset of multistability


def split_family(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the alpha family, the other rows): the main pipeline gets the second."""
    family = (table["divergence"] == ALPHA).to_numpy()
    return table[family], table[~family]


def _group_label(alpha: float) -> str:
    return f"{ALPHA}={float(alpha):.17g}"


def classify_alpha(
    table: pd.DataFrame, tol: float = classify.DEFAULT_TOL, check_stability: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Distinct optima and cell outcomes of the alpha rows, each alpha its own objective.

    :mod:`analysis.classify` groups by :data:`analysis.data.CELL_KEYS`, which hold no alpha: the
    rows are grouped with each alpha under its own divergence label, classified by the same rules
    (same-optimum tolerance ``tol``, types, outcomes), then given back ``divergence = alpha`` and an
    ``alpha`` column. An optimum is ``on_boundary`` if any of its runs ended on the edge of the
    finite region (a < 0); the core checked that it is stationary along the edge and pushed
    outward, and its curvature along the edge, d^2 D/d mu^2, decides: a minimum, or a saddle (a
    maximum along the edge, where a symmetric start stays by symmetry). The others are minima or
    saddles by the Hessian rule of :mod:`analysis.stability`, with the Hessian of D_a at their
    own alpha (``unchecked``, counted as minima, without ``check_stability``). Cells get
    ``n_boundary``, the number of their minima on the edge.
    """
    from analysis.numerics import hessians
    from analysis.stability import HESSIAN_RTOL

    runs = table[table["divergence"] == ALPHA].reset_index(drop=True)
    if "on_boundary" not in runs:
        runs = runs.assign(on_boundary=False)
    labels_of = {_group_label(a): a for a in np.unique(runs["alpha"].to_numpy(float))}
    work = runs.assign(divergence=runs["alpha"].map(_group_label))
    labels = classify.label_runs(work, tol)
    optima = classify.distinct_optima(work, labels)
    edge = (
        work.assign(optimum=labels)[labels >= 0]
        .groupby(CELL_KEYS + ["optimum"], dropna=False)["on_boundary"]
        .any()
        .rename("on_boundary")
    )
    optima = optima.merge(edge.reset_index(), on=CELL_KEYS + ["optimum"], how="left")
    optima["on_boundary"] = optima["on_boundary"].fillna(False).astype(bool)
    optima["alpha"] = optima["divergence"].map(labels_of)
    inner = ~optima["on_boundary"].to_numpy()
    optima["kind"] = classify.MINIMUM if check_stability else classify.UNCHECKED
    if check_stability and len(optima):
        hess = hessians(optima, ALPHA, alpha=optima["alpha"].to_numpy(float))
        eig = np.linalg.eigvalsh(np.where(np.isfinite(hess), hess, 0.0))
        saddle = eig[:, 0] < -HESSIAN_RTOL * np.maximum(1.0, np.abs(eig[:, 1]))
        along = hess[:, 0, 0]  # on the edge: the curvature along it
        edge_saddle = along < -HESSIAN_RTOL * np.maximum(1.0, np.abs(hess[:, 1, 1]))
        saddle = np.where(inner, saddle, edge_saddle)
        kind = np.where(
            np.isfinite(hess).all((1, 2)),
            np.where(saddle, classify.SADDLE, classify.MINIMUM),
            classify.UNCHECKED,
        )
        optima["kind"] = kind
    cells = classify.cell_outcomes(work, optima)
    minima = optima[classify.is_minimum(optima)]
    boundary = minima.groupby(CELL_KEYS, dropna=False)["on_boundary"].sum().rename("n_boundary")
    cells = cells.merge(boundary.reset_index(), on=CELL_KEYS, how="left")
    cells["n_boundary"] = cells["n_boundary"].fillna(0).astype(np.int64)
    cells["alpha"] = cells["divergence"].map(labels_of)
    optima["divergence"] = cells["divergence"] = ALPHA
    return optima, cells


#: Columns of :func:`onset_table`, in order (context columns are left out).
ONSET_COLUMNS = [
    "weight",
    "alpha",
    "onset_grid",
    "onset_lower",
    "n_optima_max",
    "boundary_cells",
    "fold_separation",
    "fold_branch",
    "edge_split",
    "exact_onset",
    "exact_multistable",
    "note",
    "n_runs",
    "n_not_converged",
]


def onset_table(
    table: pd.DataFrame,
    folds: pd.DataFrame | None = None,
    tol: float = classify.DEFAULT_TOL,
    check_stability: bool = True,
) -> pd.DataFrame:
    """Per (weight, alpha): where the sweep first finds two or more distinct minima, beside the exact fold.

    ``table``: a sweep table (rows other than ``divergence == alpha`` are ignored), in its main
    context (the estimator, center and component_var with the most alpha rows).

    - ``onset_grid``: the smallest swept separation whose cell has two or more distinct converged
      minima (edge optima included); ``onset_lower``: the swept separation below it (NaN if the
      sweep is multistable from its smallest separation); NaN if never (:func:`classify_alpha`,
      :func:`analysis.classify.phase_boundaries`).
    - ``n_optima_max``: the most distinct minima in any cell; ``boundary_cells``: cells with a
      minimum on the edge of the finite region.
    - From ``folds`` (:func:`fold_versus_alpha`, at this very alpha), if given:
      ``fold_separation``, the smallest separation where a minimum is born (a fold with event
      birth), and ``fold_branch``, which (``both modes`` where the two are born together, at
      weight 1/2); ``exact_multistable``, the separations where the folds give two minima or more
      (one minimum below every fold, plus one per birth, minus one per death passed); NaN and
      empty where no fold was continued to this alpha.
    - ``note``: what the two columns say together: no fold for a >= 1; the continuation's end
      before this alpha; the sweep multistable below the interior fold through a minimum on the
      edge (a constrained birth, which has no exact value here); or fold and grid disagreeing
      because the sweep's starts missed the new minima.
    - ``n_runs``, ``n_not_converged``: over the row's cells.

    ``check_stability``: check interior optima by their Hessian (:func:`classify_alpha`); without
    it every converged optimum counts as a minimum (for hand-made tables).
    """
    runs = table[table["divergence"] == ALPHA]
    context = primary_context(runs)
    optima, cells = classify_alpha(in_context(runs, context), tol, check_stability)
    return onsets_of(optima, cells, folds, context)


def onsets_of(
    optima: pd.DataFrame, cells: pd.DataFrame, folds: pd.DataFrame | None, context: dict[str, object]
) -> pd.DataFrame:
    """:func:`onset_table` from the optima and cells of :func:`classify_alpha` (of one context)."""
    work = cells.assign(divergence=cells["alpha"].map(_group_label))
    bounds = classify.phase_boundaries(work, optima.assign(divergence=optima["alpha"].map(_group_label)))
    alpha_of = dict(zip(work["divergence"], work["alpha"], strict=False))
    bounds["alpha"] = bounds["divergence"].map(alpha_of)
    bounds = bounds.rename(columns={"onset_separation": "onset_grid"})
    edge_cells = cells.groupby(["weight", "alpha"])["n_boundary"].apply(lambda n: int((n > 0).sum()))
    out = bounds.merge(edge_cells.rename("boundary_cells").reset_index(), on=["weight", "alpha"], how="left")
    out["fold_separation"], out["fold_branch"], out["exact_multistable"], out["note"] = np.nan, "", "", ""
    out["edge_split"] = np.nan
    if folds is not None:
        out = _with_exact_onset(out, folds, cells)
        out = _with_edge_split(out, context)
    out["exact_onset"] = out[["fold_separation", "edge_split"]].min(axis=1)
    return out[ONSET_COLUMNS].sort_values(["weight", "alpha"], ignore_index=True)


def _with_edge_split(out: pd.DataFrame, context: dict[str, object]) -> pd.DataFrame:
    """``edge_split`` at weight 1/2 and a < 0: where the covering fit, held on the edge of the finite
    region, splits into two edge minima (:func:`kl_sweep.core.bifurcation.edge_pitchfork`; at
    a = -1 it is at separation pi). Where it comes before the interior fold, it is the onset."""
    from kl_sweep.core.bifurcation import edge_pitchfork
    from kl_sweep.core.divergences import get_divergence
    from kl_sweep.core.landscape import Landscape

    out = out.copy()
    center, var = float(context["center"]), float(context["component_var"])
    with float64(), torch.no_grad():
        for i, row in out.iterrows():  # (weight, alpha) rows: tens
            if not (np.isclose(row["weight"], 0.5) and row["alpha"] < 0):
                continue
            landscape = Landscape(
                get_divergence(ALPHA), center=center, component_var=var, alpha=float(row["alpha"])
            )
            found = edge_pitchfork(landscape, (1e-3 * np.sqrt(var), MAX_SEPARATION * np.sqrt(var)))
            if found.numel():
                split = float(found.min())
                out.loc[i, "edge_split"] = split
                if np.isnan(row["fold_separation"]) or split < row["fold_separation"]:
                    out.loc[i, "note"] = (
                        f"multistable from the edge split at {split:.4f}: the covering fit, held on the edge "
                        "of the finite region, splits into two edge minima"
                    )
    return out


def multistable_intervals(births: np.ndarray, deaths: np.ndarray) -> list[tuple[float, float]]:
    """Separation intervals with two minima or more, from the folds at one (weight, alpha).

    One minimum below every fold; each birth adds one, each death removes one. The last interval
    is open (upper end inf) when the count stays at two or more.
    """
    events = sorted([(d, 1) for d in births] + [(d, -1) for d in deaths])
    count, start, out = 1, None, []
    for d, step in events:  # a few folds
        count += step
        if count >= 2 and start is None:
            start = d
        elif count < 2 and start is not None:
            out.append((start, d))
            start = None
    if start is not None:
        out.append((start, np.inf))
    return out


def _intervals_text(intervals: list[tuple[float, float]]) -> str:
    return "; ".join(f"from {a:.4f}" if np.isinf(b) else f"{a:.4f} to {b:.4f}" for a, b in intervals)


def _with_exact_onset(out: pd.DataFrame, folds: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Fill the exact columns and the note of the onset table from a :func:`fold_versus_alpha` table."""
    out = out.copy()
    top = cells.groupby("weight")["separation"].max()
    for i, row in out.iterrows():  # (weight, alpha) rows: tens, bookkeeping only
        weight, alpha = row["weight"], row["alpha"]
        mine = folds[np.isclose(folds["weight"].astype(float), weight)]
        here = mine[np.isclose(mine["alpha"].astype(float), alpha, rtol=0, atol=1e-9)]
        births = here[here["event"] == "birth"]
        if alpha >= 1.0:
            far = mine[mine["end"].str.startswith("passes") & (mine["event"] == "birth")]
            out.loc[i, "note"] = (
                f"a >= 1: no fold; the births pass {MAX_SEPARATION:g} sd by a = {far['alpha'].max():.3f}"
                if len(far)
                else "a >= 1: no fold"
            )
            continue
        if births.empty:
            ends = mine[(mine["end"] != "") & (mine["event"] == "birth")]
            side = ends[(ends["alpha"] - START_ALPHA) * (alpha - START_ALPHA) > 0]
            if len(side):
                last = side.loc[(side["alpha"] - alpha).abs().idxmin()]
                out.loc[i, "note"] = (
                    f"no interior fold: at a = {last['alpha']:.4f} the fold curve {last['end']}"
                )
            else:
                out.loc[i, "note"] = "no fold continued to this alpha"
            continue
        first = births["separation"].min()
        born = births[np.isclose(births["separation"], first, rtol=1e-9, atol=0)]["branch"]
        out.loc[i, "fold_separation"] = first
        out.loc[i, "fold_branch"] = "both modes" if len(born) > 1 else str(born.iloc[0])
        intervals = multistable_intervals(
            births["separation"].to_numpy(), here.loc[here["event"] == "death", "separation"].to_numpy()
        )
        out.loc[i, "exact_multistable"] = _intervals_text(intervals)
        out.loc[i, "note"] = _compare(row, intervals, cells, float(top.get(weight, np.nan)))
    return out


def _compare(row: pd.Series, intervals: list[tuple[float, float]], cells: pd.DataFrame, top: float) -> str:
    """What the grid onset says next to the exact multistable intervals (empty when they agree)."""
    grid = row["onset_grid"]
    seps = np.unique(cells["separation"])
    expected = [s for s in seps if any(a < s < b or s == a for a, b in intervals)]
    if np.isnan(grid):
        if expected:
            return (
                f"the sweep's starts reach none of the minima born at {intervals[0][0]:.4g} "
                f"(swept up to {top:g})"
            )
        return ""
    if not intervals or grid < intervals[0][0]:
        mine = cells[(cells["weight"] == row["weight"]) & np.isclose(cells["alpha"], row["alpha"])]
        at = mine[mine["separation"] == grid]
        if (at["n_boundary"] > 0).any():
            return "multistable below the interior fold: a minimum born on the edge of the finite region"
        return "multistable below the interior fold"
    if expected and grid > expected[0]:
        return f"two minima first found at {grid:g}, not {expected[0]:g}: the starts miss the new basin"
    return ""


# ---------------------------------------------------------------------------------------------
# Everything the alpha section of a report shows


@dataclass
class AlphaAnalysis:
    """The alpha rows of a sweep, analysed (see the module docstring).

    - ``statuses``: how many of the alpha rows (main context) ended with each ``status``
      (columns ``status``, ``runs``); ``optima``, ``cells``: :func:`classify_alpha`.
    - ``folds``: :func:`fold_versus_alpha` at the swept weights (empty without ``exact``).
    - ``onsets``: :func:`onset_table` with the exact columns from ``folds``.
    - ``notes``: what could not be computed, and why.
    """

    statuses: pd.DataFrame
    optima: pd.DataFrame
    cells: pd.DataFrame
    folds: pd.DataFrame
    onsets: pd.DataFrame
    context: dict[str, object]
    tol: float
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> np.ndarray:
        return np.unique(self.cells["weight"].to_numpy(float))

    @property
    def alphas(self) -> np.ndarray:
        return np.unique(self.cells["alpha"].to_numpy(float))

    @property
    def separations(self) -> np.ndarray:
        return np.unique(self.cells["separation"].to_numpy(float))

    @property
    def n_runs(self) -> int:
        return int(self.statuses["runs"].sum())


@dataclass
class AlphaBatch:
    """What one batch of whole cells leaves: its optima and cells, and its runs counted by status."""

    optima: pd.DataFrame
    cells: pd.DataFrame
    statuses: pd.DataFrame


def alpha_batch(
    table: pd.DataFrame,
    context: dict[str, object],
    tol: float = classify.DEFAULT_TOL,
    check_stability: bool = True,
) -> AlphaBatch:
    """:func:`classify_alpha` of a batch's alpha rows in ``context`` (the batch holds whole cells)."""
    runs = in_context(table[table["divergence"] == ALPHA], context).reset_index(drop=True)
    optima, cells = classify_alpha(runs, tol, check_stability)
    statuses = runs.groupby("status").size().rename("runs").reset_index()
    return AlphaBatch(optima, cells, statuses)


def _by_label(frames: Iterable[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """The batches' frames as one, in the order :func:`classify_alpha` gives one batch's: by the
    alpha's group label, then ``keys``."""
    frames = list(frames)
    frames = [f for f in frames if len(f)] or frames[:1]
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    out = pd.concat(frames, ignore_index=True)
    out["_label"] = out["alpha"].map(_group_label)
    return out.sort_values(["_label", *keys], ignore_index=True).drop(columns="_label")


def analyse_alpha(
    table: pd.DataFrame,
    tol: float = classify.DEFAULT_TOL,
    exact: bool = True,
    alphas: Sequence[float] | None = None,
) -> AlphaAnalysis:
    """The alpha section of a sweep: optima, cells, exact folds against alpha and the onset table.

    ``table`` is analysed as one batch (:func:`alpha_batch`, :func:`combine_alpha`). ``alphas``:
    where the folds are reported (default :data:`DEFAULT_ALPHAS`); the swept alphas are always
    added, so every row of the onset table can have its exact fold.
    """
    runs = table[table["divergence"] == ALPHA]
    context = primary_context(runs)
    several = len(in_context(runs, context)) < len(runs)
    return combine_alpha([alpha_batch(runs, context, tol)], context, tol, several, exact, alphas)


def combine_alpha(
    batches: list[AlphaBatch],
    context: dict[str, object],
    tol: float,
    several_contexts: bool = False,
    exact: bool = True,
    alphas: Sequence[float] | None = None,
) -> AlphaAnalysis:
    """The alpha section from the batches' optima and cells (of ``context``; the list is emptied
    once they are joined): the exact folds at
    the swept weights and alphas, then the onset table. ``several_contexts``: the sweep's alpha
    rows hold other contexts too (a note says which is shown)."""
    rest = [k for k in CELL_KEYS if k != "divergence"]
    optima = _by_label((b.optima for b in batches), rest + ["optimum"])
    cells = _by_label((b.cells for b in batches), rest)
    statuses = pd.concat([b.statuses for b in batches], ignore_index=True)
    statuses = statuses.groupby("status", as_index=False)["runs"].sum()
    batches.clear()  # (joined: each is held once)
    notes = []
    if several_contexts:
        notes.append(
            "alpha: several contexts swept; shown: " + ", ".join(f"{k}={v}" for k, v in context.items())
        )
    folds = pd.DataFrame(columns=FOLD_COLUMNS)
    if exact:
        # The swept alphas, and the reporting grid within the swept range (up to a = 1 when the
        # sweep reaches it: the folds are followed until they pass MAX_SEPARATION).
        swept = np.unique(cells["alpha"].to_numpy(float))
        targets = np.concatenate([np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, float), swept])
        high = 1.0 if swept.max() >= 1.0 else swept.max() + 1e-12
        targets = targets[(targets >= swept.min() - 1e-12) & (targets <= high) & (targets < 1.0)]
        if len(targets):
            folds = fold_versus_alpha(
                np.unique(cells["weight"].to_numpy(float)),
                targets,
                center=float(context["center"]),
                component_var=float(context["component_var"]),
            )
    onsets = onsets_of(optima, cells, folds if exact else None, context)
    return AlphaAnalysis(statuses, optima, cells, folds, onsets, context, tol, notes)


def alpha_notes(analysis: AlphaAnalysis) -> list[str]:
    """Lines for the command line: per weight, where the sweep finds multistability, where folds end."""
    lines = list(analysis.notes)
    top = float(analysis.separations.max())
    for weight, part in analysis.onsets.groupby("weight"):  # the swept weights
        seen = part.dropna(subset=["onset_grid"])
        text = f"alpha, weight {weight:g}: "
        if seen.empty:
            text += f"the sweep never finds two minima up to {top:g} sd"
        else:
            low, high = seen.loc[seen["alpha"].idxmin()], seen.loc[seen["alpha"].idxmax()]
            text += "the sweep finds two minima or more "
            text += (
                f"at alpha {low['alpha']:.3g} (from {low['onset_grid']:g} sd)"
                if len(seen) == 1
                else f"for alpha {low['alpha']:.3g} to {high['alpha']:.3g} (from {low['onset_grid']:g} sd at "
                f"alpha {low['alpha']:.3g}, {high['onset_grid']:g} sd at {high['alpha']:.3g})"
            )
        never = part[part["onset_grid"].isna() & (part["alpha"] > seen["alpha"].max() if len(seen) else True)]
        if len(never) and len(seen):
            text += f", never up to {top:g} sd for alpha >= {never['alpha'].min():.3g}"
        folds = analysis.folds
        mine = folds[np.isclose(folds["weight"].astype(float), weight) & (folds["event"] == "birth")]
        far = mine[mine["end"].str.startswith("passes")]
        if len(far):
            text += f"; the exact birth folds pass {MAX_SEPARATION:g} sd at alpha {far['alpha'].min():.4g}"
        lines.append(text + " (tables/alpha_onsets.md)")
    return lines
