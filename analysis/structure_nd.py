r"""The exact phase structure of the reverse KL in d dimensions: folds and pitchforks.

For a family of Q (``full``, ``diag``, ``iso``), a dimension, a direction of the separation and a
weight, the fits are the stationary points of :class:`kl_sweep.core.landscape.ReducedLandscape`;
their branches are continued in the separation with the same core as on the line
(:mod:`kl_sweep.core.bifurcation`), one batch for every correlation at once (the correlation is
the landscape's second parameter). Where a minimum is born or dies on a branch:

- a **fold** (the branch turns in the separation): polished by Newton on (F, det H) = 0;
- a **pitchfork** (it does not turn: another branch crosses it). At weight 1/2 the mirror
  :math:`x \mapsto 2c - x` swaps P's components, and the centred fit loses stability by splitting
  in two mirror-image fits; it is polished on the mirror's fixed subspace
  (:func:`kl_sweep.core.bifurcation.polish_pitchforks`).

``full`` needs no continuation: with a shared covariance the reverse KL of a full Gaussian is the
1-D reverse KL of the Mahalanobis separation :math:`\Delta = s\sqrt{u^T\Sigma^{-1}u}` plus a term
that vanishes at its optimum, so its special points are the line's at
:math:`s = \Delta/\sqrt{u^T\Sigma^{-1}u}` (tests/test_structure_nd.py checks this by continuing
the full family in d = 2 and 5 for both directions).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import torch

from analysis.data import ND_GRID_KEYS
from kl_sweep.core.continuation import Options
from kl_sweep.core.gaussians import Family
from kl_sweep.core.reduction import SharedPair, direction_vector

#: The columns of a d-dimensional special point (``mu`` and ``sigma2``: Q's mean and variance along
#: the separation's direction u, u^T m and u^T S u).
ND_COLUMNS = [
    "divergence",
    "dim",
    "q_family",
    "direction",
    "correlation",
    "weight",
    "kind",
    "event",
    "separation",
    "mahalanobis",
    "mu",
    "sigma2",
    "residual",
]
#: Two special points of one kind and event at one (correlation, weight) are the same within this
#: (a fold is reached from the branches on both of its sides).
SAME_SEPARATION = 1e-7
#: Continuation's step control for d > 1 branches.
BRANCH_OPTIONS = Options(ds=0.05, ds_max=0.2, max_steps=400)


def mahalanobis_unit(dim: int, direction: str, correlation: float, component_var: float = 1.0) -> float:
    r""":math:`\sqrt{u^T\Sigma^{-1}u}`: the Mahalanobis separation per unit of separation."""
    one = torch.ones(1, dtype=torch.float64)
    target = SharedPair(one, 0.5 * one, 0 * one, component_var * one, correlation * one, dim, direction)
    return float(target.mahalanobis_unit())


def seeds(landscape, correlations: np.ndarray, lo: float, hi: float) -> torch.Tensor:
    """Stationary points u [S, n + 2] to continue from, for every correlation: the fits (by the
    core) from each mode and from P's centre with a broad Q at separation ``hi``, and from the
    centre near ``lo``. At weight 1/2 the right mode's fit is the mirror image of the left one's,
    whose branch has the same special points: it is left out."""
    from kl_sweep.core.divergences import DIVERGENCES
    from kl_sweep.core.estimators import Quadrature
    from kl_sweep.core.fit import Problem, Settings, Status, fit
    from kl_sweep.core.optim import Adam

    family, c = landscape.family, landscape.center
    starts = [
        (hi, -0.5 * hi, 1.0),
        (hi, 0.5 * hi, 1.0),
        (hi, 0.0, 1.0 + 0.25 * hi * hi),
        (lo + 0.25, 0.0, 1.5),
    ]
    if landscape.weight == 0.5:
        del starts[1]
    k = len(starts)
    rho = torch.tensor(np.repeat(correlations, k), dtype=torch.float64)
    sep, start, var = (
        torch.tensor([s[i] for s in starts] * len(correlations), dtype=torch.float64) for i in range(3)
    )
    var = var * landscape.component_var
    one = torch.ones_like(sep)
    target = SharedPair(
        sep,
        landscape.weight * one,
        c * one,
        landscape.component_var * one,
        rho,
        family.dim,
        landscape.direction,
    )
    problem = Problem(
        target.line(), start, var, 0.05 * one, torch.full_like(sep, 20_000, dtype=torch.long),
        1e-10 * one, target=target, family=family,
    )  # fmt: skip
    result = fit(problem, Settings(DIVERGENCES["reverse"], Quadrature(), Adam()))
    ok = result.status == Status.CONVERGED
    theta = result.theta
    if landscape.embedding is not None:  # (a fit started symmetric stays symmetric: its z)
        theta = torch.linalg.lstsq(landscape.embedding, theta.T).solution.T
    u = torch.cat([theta, sep[:, None], rho[:, None]], -1)
    return u[ok]


def continued_points(
    family: Family, direction: str, weight: float, correlations, separation_range: tuple[float, float],
    component_var: float = 1.0, center: float = 0.0, symmetric: bool | None = None,
) -> pd.DataFrame:  # fmt: skip
    """The folds and pitchforks of ``family`` at one weight, for every correlation (:data:`ND_COLUMNS`).
    ``symmetric`` (the default for ``diag`` and ``iso``): continued on the target's
    permutation-symmetric subspace (:func:`kl_sweep.core.landscape.symmetric_embedding`), in 2 to 4
    coordinates at any d; ``False``: in all the family's parameters."""
    return _special(
        family, direction, weight, correlations, separation_range, component_var, center, symmetric
    )[0]


def _special(
    family, direction, weight, correlations, separation_range, component_var=1.0, center=0.0, symmetric=None
):  # fmt: skip
    """(:func:`continued_points`' table, the points u [M, n + 2] of its rows, the landscape, and
    for a coexistence row the other minimum's point, NaN elsewhere). Remembered: ``python -m
    analysis`` asks for the same cell's points for its table and for the phase_plane figure's
    lines (callers copy what they change)."""
    key = tuple(sorted(set(float(r) for r in correlations)))
    symmetric = family.name != "full" if symmetric is None else symmetric
    range_ = (float(separation_range[0]), float(separation_range[1]))
    frame, u, landscape, partner = _special_of(
        family,
        str(direction),
        float(weight),
        key,
        range_,
        float(component_var),
        float(center),
        bool(symmetric),
    )
    return frame.copy(), u.clone(), landscape, partner.clone()


@functools.lru_cache(maxsize=32)
def _special_of(family, direction, weight, correlations, separation_range, component_var, center, symmetric):
    from kl_sweep.core.bifurcation import branch_special_points, continue_branches, mirror_pitchforks
    from kl_sweep.core.landscape import ReducedLandscape

    landscape = ReducedLandscape(
        family, direction, center, component_var, second="correlation", weight=weight, symmetric=symmetric
    )
    lo, hi = separation_range
    correlations = np.asarray(correlations, dtype=float)
    start = seeds(landscape, correlations, lo, hi)
    branches = continue_branches(landscape, start, (lo, hi), BRANCH_OPTIONS)
    special = branch_special_points(landscape, branches)
    n = landscape.n_state
    keep = special.converged
    first, second, residual = _maxwell(landscape, branches)
    mirror = torch.empty(0, n + 2, dtype=torch.float64)
    mirror_birth, mirror_residual = torch.empty(0, dtype=torch.bool), torch.empty(0, dtype=torch.float64)
    if weight == 0.5:  # (the centred fit's pitchforks, which a branch can step past)
        rho = torch.tensor(correlations, dtype=torch.float64)
        mirror, mirror_birth, mirror_residual = mirror_pitchforks(landscape, rho, (lo, hi))
    u = torch.cat([special.u[keep], mirror, first])
    kind = np.concatenate(
        [
            np.where(special.fold[keep].numpy(), "fold", "pitchfork"),
            np.full(len(mirror), "pitchfork"),
            np.full(len(first), "maxwell"),
        ]
    )
    birth = torch.cat([special.birth[keep], mirror_birth]).numpy()
    event = np.concatenate([np.where(birth, "birth", "death"), np.full(len(first), "")])
    rho = u[:, n + 1]
    theta = landscape.theta(u)
    _, S = family.covariance(theta)
    along = direction_vector(direction, family.dim)
    frame = pd.DataFrame(
        {
            "divergence": "reverse",
            "dim": family.dim,
            "q_family": family.name,
            "direction": direction,
            "correlation": rho.numpy(),
            "weight": weight,
            "kind": kind,
            "event": event,
            "separation": u[:, n].numpy(),
            "mahalanobis": [
                float(s) * mahalanobis_unit(family.dim, direction, float(r), component_var)
                for s, r in zip(u[:, n].tolist(), rho.tolist())
            ],
            "mu": (theta[:, : family.dim] @ along).numpy(),
            "sigma2": torch.einsum("i,bij,j->b", along, S, along).numpy(),
            "residual": torch.cat([special.residual[keep], mirror_residual, residual]).numpy(),
        },
        columns=ND_COLUMNS,
    )
    partner = torch.cat([torch.full_like(u[: len(u) - len(second)], float("nan")), second])
    frame = dedupe(frame.assign(row=np.arange(len(frame))))
    keep_rows = frame["row"].to_numpy().copy()
    u, partner = u[keep_rows], partner[keep_rows]
    frame = frame.drop(columns="row")
    # On the symmetric subspace: continued minima that are saddles of the whole space (the block of
    # the Hessian that breaks the symmetry not positive definite). None were found (docs/dimensions.md).
    curve = branches.curve
    off = curve.valid & (curve.monitors["least"] > 0) & (curve.monitors["breaking"] < 0)
    frame.attrs["off_subspace"] = int(off.sum())
    return frame, u, landscape, partner


#: Separations on which two minimum branches' losses are compared for a coexistence point.
MAXWELL_GRID = 200
#: A coexistence point lies where both minima were continued, within this much separation.
MAXWELL_REACH = 0.1


def _maxwell(landscape, branches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coexistence (Maxwell) points on continued branches: (u_1, u_2, residual) of every pair of
    distinct minima whose losses cross at one (separation, second parameter), solved by Newton on
    F(theta_1) = F(theta_2) = 0, L_1 = L_2 (:func:`kl_sweep.core.bifurcation.solve_maxwell`) from
    where the two branches' interpolated losses cross; kept where both ends are distinct minima and
    the residual is at most 1e-10. Mirror images (weight 1/2) have equal losses everywhere: no jump.
    ``mu`` and ``sigma2`` of its row are the first minimum's."""
    from itertools import combinations

    from kl_sweep.core.bifurcation import solve_maxwell

    n, curve = landscape.n_state, branches.curve
    pieces = []  # each branch's runs of minima, as graphs over the separation
    for r in range(curve.points.shape[0]):  # over the few continued branches
        valid = curve.valid[r]
        points, loss = curve.points[r][valid].numpy(), curve.monitors["loss"][r][valid].numpy()
        minimum = np.flatnonzero(curve.monitors["least"][r][valid].numpy() > 0)
        for run in np.split(minimum, np.flatnonzero(np.diff(minimum) > 1) + 1):
            if len(run) >= 3:
                order = run[np.argsort(points[run, n])]
                pieces.append((float(branches.weight[r]), points[order], loss[order]))
    firsts, seconds, brackets = [], [], []
    for (pa, a, la), (pb, b, lb) in combinations(pieces, 2):  # pairs of branches, not configurations
        lo, hi = max(a[0, n], b[0, n]), min(a[-1, n], b[-1, n])
        if pa != pb or hi <= lo:
            continue
        grid = np.linspace(lo, hi, MAXWELL_GRID)
        diff = np.interp(grid, a[:, n], la) - np.interp(grid, b[:, n], lb)
        theta_a = np.stack([np.interp(grid, a[:, n], a[:, i]) for i in range(n)], -1)
        theta_b = np.stack([np.interp(grid, b[:, n], b[:, i]) for i in range(n)], -1)
        if np.abs(theta_a - theta_b).max() < 1e-6 or np.abs(diff).max() < 1e-10:
            continue  # one branch traced twice, or mirror images
        for k in np.flatnonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0):
            f = diff[k] / (diff[k] - diff[k + 1])
            s = grid[k] + f * (grid[k + 1] - grid[k])
            firsts.append([*(theta_a[k] + f * (theta_a[k + 1] - theta_a[k])), s, pa])
            seconds.append([*(theta_b[k] + f * (theta_b[k + 1] - theta_b[k])), s, pa])
            brackets.append((lo, hi))
    empty = torch.empty(0, n + 2, dtype=torch.float64)
    if not firsts:
        return empty, empty, empty[:, 0]
    first, second, residual = solve_maxwell(
        landscape, torch.tensor(firsts, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    )
    apart = (first[:, :n] - second[:, :n]).abs().amax(-1) > 1e-4  # (not one point, as at a pitchfork)
    both = landscape.theta_jet(first).minimum & landscape.theta_jet(second).minimum
    lo, hi = (torch.tensor(b, dtype=torch.float64) for b in zip(*brackets))
    inside = (first[:, n] >= lo - MAXWELL_REACH) & (first[:, n] <= hi + MAXWELL_REACH)  # (else it ran off)
    ok = apart & both & inside & (residual <= 1e-10)
    return first[ok], second[ok], residual[ok]


def dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per special point: the same kind, event, correlation and weight within
    :data:`SAME_SEPARATION` in the separation (and the mirror image at weight 1/2, which has the
    same separation) count once; the smallest residual is kept."""
    if frame.empty:
        return frame.reset_index(drop=True)
    frame = frame.sort_values(["correlation", "weight", "kind", "event", "separation"]).reset_index(drop=True)
    keys = frame[["correlation", "weight"]].round(7).astype(str).agg("|".join, axis=1)
    keys = keys + "|" + frame["kind"] + "|" + frame["event"]
    new = (keys != keys.shift()) | (frame["separation"].diff().abs() > SAME_SEPARATION)
    group = new.cumsum()
    best = frame.groupby(group)["residual"].idxmin()
    return frame.loc[best.to_numpy()].reset_index(drop=True)


def full_points(line_points: pd.DataFrame, dim: int, direction: str, correlations) -> pd.DataFrame:
    """The ``full`` family's folds and pitchforks: the line's special points (a 1-D structure's
    ``points``, one weight or more) at the Mahalanobis separation (see the module docstring).
    ``mu`` and ``sigma2`` are left NaN: the 1-D point is in whitened units."""
    rows = []
    line = line_points[line_points["kind"].isin(["fold", "pitchfork", "maxwell"])]
    for rho in sorted(set(float(r) for r in correlations)):
        scale = mahalanobis_unit(dim, direction, rho)
        for _, p in line.iterrows():
            rows.append(
                {
                    "divergence": "reverse", "dim": dim, "q_family": "full", "direction": direction,
                    "correlation": rho, "weight": float(p["weight"]), "kind": p["kind"],
                    "event": p["event"], "separation": float(p["separation"]) / scale,
                    "mahalanobis": float(p["separation"]), "mu": math.nan, "sigma2": math.nan,
                    "residual": float(p["residual"]),
                }
            )  # fmt: skip
    return dedupe(pd.DataFrame(rows, columns=ND_COLUMNS))


#: The columns of a sweep's rows the d > 1 exact structure reads.
NEEDED = ND_GRID_KEYS
#: The columns a d = 1 special point gets in the one table of a sweep's special points.
LINE_DEFAULTS = {"dim": 1, "q_family": "full", "direction": "axis", "correlation": 0.0}


def exact_points(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The folds and pitchforks of every (dim, family, direction, weight) among a sweep's
    reverse-KL rows with dim > 1, at their correlations, over their separations: (points, notes on
    what was left out). ``full`` comes from the line's exact structure at the Mahalanobis separation."""
    from analysis.structure import exact_structure

    missing = [k for k in NEEDED if k not in rows.columns]
    if missing:
        return pd.DataFrame(columns=ND_COLUMNS), [
            f"the d > 1 exact structure needs the column(s) {', '.join(missing)}"
        ]
    rows = rows[rows["divergence"] == "reverse"]
    if "target_file" in rows.columns:
        rows = rows[rows["target_file"].isna()]
    frames, notes = [], []
    keys = ["dim", "q_family", "direction", "weight", "center", "component_var"]
    for (dim, name, direction, weight, center, var), cell in rows.groupby(keys, dropna=False):
        if center != 0.0 or var != 1.0:
            notes.append("the d > 1 exact structure is drawn for center 0 and component_var 1 only")
            continue
        lo, hi = 0.0, float(cell["separation"].max())
        correlations = sorted(cell["correlation"].unique())
        family = Family(str(name), int(dim))
        if name == "full":
            reach = hi * max(mahalanobis_unit(int(dim), direction, r) for r in correlations)
            line = exact_structure("reverse", [float(weight)], (0.0, max(reach, 1.0))).points
            frames.append(full_points(line, int(dim), direction, correlations))
        elif hi > 0:
            points = continued_points(family, str(direction), float(weight), correlations, (lo, hi))
            if points.attrs.get("off_subspace"):
                notes.append(
                    f"{name} Q in d = {dim} along the {direction}: a continued minimum of the symmetric "
                    "subspace is a saddle off it; the table holds the subspace's special points"
                )
            frames.append(points)
    points = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ND_COLUMNS)
    return points, sorted(set(notes))


def one_table(line_points: pd.DataFrame, nd_points: pd.DataFrame | None) -> pd.DataFrame:
    """Every special point of a sweep in one table: the line's (:data:`LINE_DEFAULTS` filled in)
    and the d > 1 points, with ``dim``, ``correlation``, ``direction`` and ``q_family``."""
    line = line_points.assign(**{k: v for k, v in LINE_DEFAULTS.items() if k not in line_points})
    line = line.assign(mahalanobis=line["separation"]) if len(line) else line.assign(mahalanobis=np.nan)
    frames = [f for f in (line, nd_points) if f is not None and len(f)]
    if not frames:
        return pd.DataFrame(columns=[*line_points.columns, *LINE_DEFAULTS, "mahalanobis"])
    table = pd.concat(frames, ignore_index=True)
    first = ND_COLUMNS[: ND_COLUMNS.index("separation") + 1]
    return table[[*first, *[c for c in table.columns if c not in first]]]


#: The correlations the exact lines are drawn over (R is positive definite for rho in (-1/(d-1), 1)).
LINE_RHO = (-0.3, 0.95)
#: A traced line needs this many points (fewer: the continuation could not leave its seed).
MIN_LINE_POINTS = 5


def exact_lines(
    family: Family,
    direction: str,
    weight: float,
    correlations,
    separation_range: tuple[float, float],
    pitchfork_steps: int = 30,
) -> pd.DataFrame:
    """The fold, pitchfork and coexistence lines of ``family`` in the (separation, correlation) plane at one
    weight: columns ``line``, ``kind``, ``separation``, ``correlation``.

    Folds: the fold system (F, det H) = 0 continued in (theta, separation, correlation) from the
    folds found at the swept correlations (:func:`analysis.structure.trace_fold_lines`, as on the
    line across weights). Mirror pitchforks (weight 1/2): the pitchfork system solved by Newton
    (:func:`kl_sweep.core.bifurcation.polish_pitchforks`) on a grid of correlations, each from
    the previous one (they do not turn in the correlation), ``pitchfork_steps`` each way.
    Coexistence lines (kind ``maxwell``) the same way from each coexistence point
    (:func:`_maxwell_lines`). Every point is exact, to the residuals of its system.
    """
    from analysis.structure import on_lines, trace_fold_lines
    from kl_sweep.core.bifurcation import polish_pitchforks

    frame, u, landscape, partner = _special(family, direction, weight, correlations, separation_range)
    n = landscape.n_state
    rho_range = _rho_range(family.dim)
    folds = torch.as_tensor(frame["kind"].to_numpy() == "fold")
    lines: list[tuple[str, np.ndarray]] = []
    if bool(folds.any()):
        options = Options(ds=0.02, ds_max=0.1, max_steps=300)
        found, _ = trace_fold_lines(landscape, u[folds], (0.0, 2.0 * separation_range[1]), rho_range, options)
        lines += [("fold", p) for p in found]
    pitchforks: list[np.ndarray] = []
    for k in np.flatnonzero(frame["kind"].to_numpy() == "pitchfork"):  # one on a traced line is skipped
        if on_lines(pitchforks, u[k : k + 1, n].numpy(), u[k : k + 1, n + 1].numpy(), n)[0]:
            continue
        halves = []
        for end in rho_range:  # each way from the found point
            point, half = u[k : k + 1].clone(), []
            for rho in np.linspace(float(u[k, n + 1]), end, pitchfork_steps)[1:]:  # continuation steps
                point[:, n + 1] = rho
                point, residual = polish_pitchforks(landscape, point)
                if not (bool(residual[0] <= 1e-9) and _loses_a_minimum(landscape, point)):
                    break
                half.append(point[0].numpy().copy())  # (point is written in place next)
            halves.append(half)
        pitchforks.append(np.array([*halves[0][::-1], u[k].numpy(), *halves[1]]))
    lines += [("pitchfork", p) for p in pitchforks]
    coexist = torch.as_tensor(frame["kind"].to_numpy() == "maxwell")
    if bool(coexist.any()):
        coexistence: list[np.ndarray] = []
        for p in _maxwell_lines(landscape, u[coexist], partner[coexist], rho_range, pitchfork_steps):
            mid = p[len(p) // 2 : len(p) // 2 + 1]  # (an inner point: the ends may differ by rounding)
            if len(p) and not any(on_lines(coexistence, mid[:, n], mid[:, n + 1], n)):
                coexistence.append(p)  # (a line through two swept correlations is traced twice)
        lines += [("maxwell", p) for p in coexistence]
    frames = [
        pd.DataFrame({"line": i, "kind": kind, "separation": p[:, n], "correlation": p[:, n + 1]})
        for i, (kind, p) in enumerate(lines)
        if len(p) >= MIN_LINE_POINTS
    ]
    columns = ["line", "kind", "separation", "correlation"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _maxwell_lines(
    landscape, first: torch.Tensor, second: torch.Tensor, rho_range, steps: int
) -> list[np.ndarray]:
    """Coexistence lines in (separation, correlation): from each coexistence point (its two minima
    ``first`` and ``second`` [M, n + 2]), :func:`kl_sweep.core.bifurcation.solve_maxwell` on
    ``steps`` correlations each way to the ends of ``rho_range``, each from the previous one, all
    points at once. A line ends where the system has no solution within 1e-10 whose ends are two
    distinct minima (the two minima merge at a cusp, or one of them dies at a fold)."""
    from kl_sweep.core.bifurcation import solve_maxwell

    n = landscape.n_state
    halves = []
    for end in rho_range:  # each way from the found points
        a, b, start = first.clone(), second.clone(), first[:, n + 1].clone()
        alive = torch.ones(len(a), dtype=torch.bool)
        half: list[list[np.ndarray]] = [[] for _ in range(len(a))]
        for t in np.linspace(0.0, 1.0, steps)[1:]:  # continuation steps
            rows = alive.nonzero()[:, 0]
            if rows.numel() == 0:
                break
            rho = start[rows] + float(t) * (end - start[rows])
            ga, gb = a[rows].clone(), b[rows].clone()
            ga[:, n + 1], gb[:, n + 1] = rho, rho
            na, nb, residual = solve_maxwell(landscape, ga, gb)
            apart = (na[:, :n] - nb[:, :n]).abs().amax(-1) > 1e-4
            ok = (
                (residual <= 1e-10)
                & apart
                & landscape.theta_jet(na).minimum
                & landscape.theta_jet(nb).minimum
            )
            a[rows[ok]], b[rows[ok]] = na[ok], nb[ok]
            alive[rows[~ok]] = False
            for i in rows[ok].tolist():
                half[i].append(a[i].numpy().copy())
        halves.append(half)
    return [np.array([*lo[::-1], p.numpy(), *hi]) for lo, hi, p in zip(*halves, first)]


def _loses_a_minimum(landscape, u: torch.Tensor) -> bool:
    """Whether the pitchfork point u [1, n + 2] is where a minimum loses stability: every eigenvalue
    of H but the one at zero is positive. (det H_mm = 0 also holds where a second eigenvalue of an
    already unstable centred fit crosses zero; Newton from the previous correlation can slide onto
    that root.)"""
    h = landscape.theta_jet(u).hessian
    second = torch.linalg.eigvalsh(h)[0, 1]
    return bool(second > 1e-8 * h.abs().max())


def _rho_range(dim: int) -> tuple[float, float]:
    """:data:`LINE_RHO`, kept inside (-1/(d - 1), 1) where R is positive definite."""
    return max(LINE_RHO[0], -1.0 / max(dim - 1, 1) + 0.02), LINE_RHO[1]


def full_lines(line_points: pd.DataFrame, dim: int, direction: str) -> pd.DataFrame:
    """``full``'s fold lines in closed form: s = Delta_fold / sqrt(u^T Sigma^-1 u(rho))."""
    rho = np.linspace(*_rho_range(dim), 120)
    unit = np.array([mahalanobis_unit(dim, direction, float(r)) for r in rho])
    line = line_points[line_points["kind"].isin(["fold", "pitchfork", "maxwell"])].reset_index(drop=True)
    frames = [
        pd.DataFrame(
            {
                "line": i,
                "kind": p["kind"],
                "event": p["event"],
                "separation": float(p["separation"]) / unit,
                "correlation": rho,
            }
        )  # fmt: skip
        for i, p in line.iterrows()
    ]
    columns = ["line", "kind", "event", "separation", "correlation"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


#: The weights at which folds are sought to seed the fold lines of the (separation, weight) plane.
SEED_WEIGHTS = (0.6, 0.75, 0.9)
#: The weights the (separation, weight) plane spans (the mirror w -> 1 - w gives the rest).
WEIGHT_RANGE = (0.5, 0.99)


def weight_plane(
    family: Family,
    direction: str,
    correlation: float,
    separation_range: tuple[float, float],
    seed_weights: tuple[float, ...] = SEED_WEIGHTS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fold lines of ``family`` in the (separation, weight) plane at one correlation, and their
    cusps: (lines with columns ``line``, ``separation``, ``weight``; cusps in :data:`ND_COLUMNS`).

    The fold system (F, det H) = 0 is continued in (theta, separation, weight) from the folds found
    at ``seed_weights`` (:func:`analysis.structure.trace_fold_lines`, as on the line); a cusp
    is where a fold curve's tangent has no (separation, weight) component, located to rounding.
    """
    from analysis.structure import trace_fold_lines
    from kl_sweep.core.landscape import ReducedLandscape

    landscape = ReducedLandscape(
        family, direction, second="weight", correlation=correlation, symmetric=family.name != "full"
    )
    n = landscape.n_state
    folds = []
    for weight in seed_weights:  # a few seeding weights, each one batch
        frame, u, _, _ = _special(family, direction, weight, [correlation], separation_range)
        u = u[torch.as_tensor(frame["kind"].to_numpy() == "fold")].clone()
        u[:, n + 1] = weight  # the second coordinate is now the weight
        folds.append(u)
    folds = torch.cat(folds)
    lines = pd.DataFrame(columns=["line", "separation", "weight"])
    cusps = torch.empty(0, n + 2, dtype=torch.float64)
    if len(folds):
        options = Options(ds=0.02, ds_max=0.1, max_steps=300)
        box = ((0.0, 1.5 * separation_range[1]), WEIGHT_RANGE)
        found, cusps = trace_fold_lines(landscape, folds, *box, options)
        parts = [
            pd.DataFrame({"line": i, "separation": p[:, n], "weight": p[:, n + 1]})
            for i, p in enumerate(found)
        ]
        lines = pd.concat(parts, ignore_index=True)
    along = direction_vector(direction, family.dim)
    theta = landscape.theta(cusps)
    _, S = family.covariance(theta)
    table = pd.DataFrame(
        {
            "divergence": "reverse",
            "dim": family.dim,
            "q_family": family.name,
            "direction": direction,
            "correlation": correlation,
            "weight": cusps[:, n + 1].numpy(),
            "kind": "cusp",
            "event": "",
            "separation": cusps[:, n].numpy(),
            "mahalanobis": cusps[:, n].numpy() * mahalanobis_unit(family.dim, direction, correlation),
            "mu": (theta[:, : family.dim] @ along).numpy(),
            "sigma2": torch.einsum("i,bij,j->b", along, S, along).numpy(),
            "residual": _fold_residuals(landscape, cusps),
        },
        columns=ND_COLUMNS,
    )
    return lines, dedupe(table)


def _fold_residuals(landscape, u: torch.Tensor) -> np.ndarray:
    from kl_sweep.core.bifurcation import fold_residual

    return fold_residual(landscape, u).numpy() if len(u) else np.empty(0)
