r"""The exact phase structure of one divergence: branches, folds, cusps, coexistence and crossover points.

:func:`exact_structure` drives :mod:`kl_sweep.core.bifurcation` (numerical continuation on the
batched core) over a range of weights and separations and returns tables:

- ``points``: the bifurcation set, one row per special point (``kind`` = ``fold``, ``pitchfork``,
  ``cusp``, ``maxwell``, ``crossover``), with its location, the branch it is on, whether the
  minimum is born or dies as separation grows (``event``) and its residual;
- ``branches``: the continued branches as polylines (minima and saddles), for the bifurcation
  diagram;
- ``fold_lines``: the fold curves continued in (separation, weight), for the phase diagram;
- ``minima``: every stationary point of every branch at the query separations (the sweep's, or a
  0.05 grid), solved by Newton: the exact number of minima of every cell.

How the branches are found: from fits at the ends of the separation range (Q on either mode at the
largest separation, the moment-matched start at the smallest), batched through the core's
:func:`~kl_sweep.core.fit.fit`, plus, when a sweep is given, every distinct minimum it found that
does not lie on a branch already traced (in rounds, until every one does). Coexistence points are
looked for between consecutive query separations: where the lowest minimum at one is not the
continuation of the lowest at the other, and both minima exist at both, the equal-loss system is
solved; where the lowest minimum stays on its branch but its sigma^2 / V* passes 1/2, the
crossover is solved. See ``analysis/README.md`` for the rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from analysis import classify
from analysis.numerics import float64, tensor

#: Columns of the bifurcation-set table, in order.
POINT_COLUMNS = [
    "divergence",
    "weight",
    "component_var",
    "center",
    "kind",
    "separation",
    "mu",
    "sigma2",
    "branch",
    "event",
    "residual",
    "mu_other",
    "sigma2_other",
    "branch_other",
]
KINDS = ("fold", "pitchfork", "cusp", "maxwell", "crossover")
#: Two stationary points at one (separation, weight) are the same if mu and log sigma agree to this.
SAME_POINT = 1e-7
#: Default query separations when no sweep gives them: this step over the range.
QUERY_STEP = 0.05
#: Rounds of seeding from sweep minima that no traced branch passes through.
SEED_ROUNDS = 3


@dataclass
class Structure:
    """The exact structure of one divergence and context over ``weights`` (see the module docstring)."""

    divergence: str
    center: float
    component_var: float
    weights: np.ndarray
    separation_range: tuple[float, float]
    points: pd.DataFrame
    branches: pd.DataFrame
    fold_lines: pd.DataFrame
    minima: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def counts(self) -> pd.DataFrame:
        """Exact number of distinct minima per (weight, separation) of the query grid."""
        m = self.minima
        return (
            m[m["minimum"]]
            .groupby(["weight", "separation"])
            .size()
            .rename("n_minima")
            .reindex(pd.MultiIndex.from_frame(m[["weight", "separation"]].drop_duplicates()), fill_value=0)
            .reset_index()
            .sort_values(["weight", "separation"], ignore_index=True)
        )


def _landscape(divergence: str, center: float, component_var: float, alpha: float | None):
    from kl_sweep.core.divergences import get_divergence
    from kl_sweep.core.landscape import Landscape

    return Landscape(get_divergence(divergence), center=center, component_var=component_var, alpha=alpha)


def _frame(u: torch.Tensor) -> pd.DataFrame:
    a = u.numpy()
    return pd.DataFrame({"mu": a[:, 0], "log_sigma": a[:, 1], "separation": a[:, 2], "weight": a[:, 3]})


def _types(frame: pd.DataFrame, center: float, component_var: float) -> np.ndarray:
    table = frame.assign(center=center, component_var=component_var, sigma2=np.exp(2 * frame["log_sigma"]))
    return classify.optimum_types(table)


def standard_seeds(landscape, weights: np.ndarray, lo: float, hi: float) -> torch.Tensor:
    """Fits from the starts every structure has: each mode at ``hi``, moment matching at ``lo`` and ``hi``.

    One batch through the core's fit (Adam, then the Newton polish); converged rows, as u [n, 4].
    """
    from kl_sweep.core.estimators import Quadrature
    from kl_sweep.core.fit import Problem, Settings, Status, fit
    from kl_sweep.core.optim import Adam

    w = np.repeat(weights, 4)
    d = np.tile([hi, hi, hi, lo], len(weights))
    c, v = landscape.center, landscape.component_var
    mean, var = c + d * (0.5 - w), v + w * (1 - w) * d * d
    init_mu = np.where(
        np.arange(len(w)) % 4 == 0, c - d / 2, np.where(np.arange(len(w)) % 4 == 1, c + d / 2, mean)
    )
    init_var = np.where(np.arange(len(w)) % 4 < 2, v, var)
    mixture = landscape.mixture(torch.stack([tensor(init_mu), tensor(init_var), tensor(d), tensor(w)], -1))
    n = len(w)
    problem = Problem(
        mixture,
        tensor(init_mu),
        tensor(init_var),
        torch.full((n,), 0.05),
        torch.full((n,), 20_000, dtype=torch.long),
        torch.full((n,), 1e-10),
        None if landscape.alpha is None else torch.full((n,), landscape.alpha),
    )
    result = fit(problem, Settings(landscape.divergence, Quadrature(), Adam()))
    ok = result.status == Status.CONVERGED
    u = torch.stack([result.mu, 0.5 * torch.log(result.sigma2), tensor(d), tensor(w)], -1)
    return u[ok]


def _polylines(branches) -> list[dict[str, np.ndarray]]:
    """Each seed's branch as one polyline: its downward half reversed, then its upward half."""
    curve = branches.curve
    n = curve.points.shape[0] // 2
    out = []
    for i in range(n):  # branches (tens), not configurations: bookkeeping only
        parts = []
        for row, flip in ((n + i, True), (i, False)):
            length = int(curve.length[row])
            p = curve.points[row, :length].numpy()
            m = {k: v[row, :length].numpy() for k, v in curve.monitors.items()}
            if flip:
                p, m = p[::-1], {k: v[::-1] for k, v in m.items()}
            parts.append((p, m))
        (pd_, md), (pu, mu_) = parts
        p = np.concatenate([pd_, pu[1:]])
        m = {k: np.concatenate([md[k], mu_[k][1:]]) for k in md}
        out.append({"u": p, "weight": float(branches.weight[i]), "seed": len(pd_) - 1, **m})
    return out


#: A seed lies on a traced polyline if the line's interpolated point at its separation is this close.
ON_LINE_TOL = 1e-2


def distinct_lines(new: list[dict], old: list[dict]) -> list[dict]:
    """The polylines of ``new`` whose seed lies on no earlier polyline (of ``old`` or ``new``) of its weight.

    Several seeds often reach one branch (a mode start and the moment-matched start both end on the
    heavier mode); each branch is kept once. Distinct branches at one (separation, weight) are far
    further apart than :data:`ON_LINE_TOL` in (mu, log sigma), except where they meet, at folds.
    """
    kept = list(old)
    for line in new:  # branches, not configurations
        seed = line["u"][line["seed"]]
        guesses = _crossings([k for k in kept if k["weight"] == line["weight"]], {line["weight"]: seed[2:3]})
        if len(guesses) and (np.abs(guesses[:, :2].numpy() - seed[:2]).max(1) <= ON_LINE_TOL).any():
            continue
        kept.append(line)
    return kept[len(old) :]


def _crossings(lines: list[dict], queries: dict[float, np.ndarray]) -> torch.Tensor:
    """Guesses u [n, 4] where each polyline crosses each query separation of its weight."""
    guesses = []
    for line in lines:  # branches, not configurations
        q = queries.get(line["weight"])
        if q is None or len(line["u"]) < 2:
            continue
        d = line["u"][:, 2]
        a, b = d[:-1, None], d[1:, None]
        k, j = np.nonzero((np.minimum(a, b) <= q) & (q <= np.maximum(a, b)) & (a != b))
        frac = (q[j] - d[k]) / (d[k + 1] - d[k])
        theta = line["u"][k, :2] + frac[:, None] * (line["u"][k + 1, :2] - line["u"][k, :2])
        guesses.append(np.column_stack([theta, q[j], np.full(len(j), line["weight"])]))
    if not guesses:
        return torch.empty(0, 4)
    return tensor(np.concatenate(guesses))


def solve_points(landscape, guesses: torch.Tensor) -> pd.DataFrame:
    """Newton-corrected stationary points from ``guesses`` u [n, 4], deduplicated per (weight, separation)."""
    from kl_sweep.core.bifurcation import stationary_points

    if len(guesses) == 0:
        return pd.DataFrame(
            columns=["mu", "log_sigma", "separation", "weight", "loss", "minimum", "residual"]
        )
    u, jet = stationary_points(landscape, guesses)
    frame = _frame(u).assign(
        loss=jet.loss.numpy(), minimum=jet.minimum.numpy(), residual=jet.gradient.abs().amax(-1).numpy()
    )
    moved = (u[:, :2] - guesses[:, :2]).abs().amax(-1).numpy()
    frame = frame[(frame["residual"] <= 1e-9) & (moved <= 0.25)]
    return dedupe(frame, ["weight", "separation"])


def dedupe(
    frame: pd.DataFrame, keys: list[str], columns: Sequence[str] = ("mu", "log_sigma")
) -> pd.DataFrame:
    """Drop rows equal to an earlier one with the same ``keys`` and ``columns`` within :data:`SAME_POINT`."""
    if frame.empty:
        return frame
    frame = frame.sort_values(keys + list(columns), ignore_index=True)
    same = np.ones(len(frame), dtype=bool)
    for key in keys:
        same &= frame[key].to_numpy() == frame[key].shift(1).to_numpy()
    for column in columns:  # compares each row with the previous in sorted order
        same &= np.abs(frame[column].diff().to_numpy()) <= SAME_POINT * (1 + np.abs(frame[column].to_numpy()))
    return frame[~same].reset_index(drop=True)


def exact_structure(
    divergence: str,
    weights: Sequence[float],
    separation_range: tuple[float, float] = (0.0, 8.0),
    *,
    center: float = 0.0,
    component_var: float = 1.0,
    alpha: float | None = None,
    sweep_minima: pd.DataFrame | None = None,
    separations: Sequence[float] | None = None,
) -> Structure:
    """The exact structure of ``divergence`` at ``weights`` over ``separation_range`` (module docstring).

    ``sweep_minima`` (columns separation, weight, mu, sigma2) seeds branches the standard starts
    miss; ``separations`` are the query separations (default: a 0.05 grid over the range).
    """
    from kl_sweep.core import bifurcation as bf

    weights = np.unique(np.asarray(weights, dtype=float))
    lo, hi = map(float, separation_range)
    if separations is None:
        separations = np.round(np.arange(lo, hi + QUERY_STEP / 2, QUERY_STEP), 10)
    separations = np.unique(np.asarray(separations, dtype=float))
    notes: list[str] = []
    with float64(), torch.no_grad():
        landscape = _landscape(divergence, center, component_var, alpha)
        pending = standard_seeds(landscape, weights, lo, hi)
        traced, lines = [], []
        for _ in range(SEED_ROUNDS):  # rounds of seeding, each one batch
            branches = bf.continue_branches(landscape, pending, (lo, hi))
            traced.append(branches)
            lines += distinct_lines(_polylines(branches), lines)
            pending = unreached_seeds(landscape, lines, sweep_minima, center, component_var)
            if len(pending) == 0:
                break
        if len(pending):
            notes.append(f"{len(pending)} sweep minima lie on no traced branch after {SEED_ROUNDS} rounds")
        specials = pd.concat([_special_frame(landscape, b) for b in traced], ignore_index=True)
        specials = dedupe(specials, ["weight", "kind"], ("separation", "mu"))
        queries = {float(w): separations for w in weights}
        minima = solve_points(
            landscape, torch.cat([_crossings(lines, queries), _around_folds(landscape, specials, queries)])
        )
        minima["sigma2"] = np.exp(2 * minima["log_sigma"])
        minima["type"] = _types(minima, center, component_var)
        fold_lines, cusps = _fold_lines(
            landscape, specials, (lo, hi), (float(weights.min()), float(weights.max()))
        )
        beside = _beside_folds(specials)
        near = solve_points(
            landscape, torch.cat([_crossings(lines, beside), _around_folds(landscape, specials, beside)])
        )
        near["type"] = _types(near.assign(sigma2=np.exp(2 * near["log_sigma"])), center, component_var)
        switches = _switches(landscape, pd.concat([minima, near], ignore_index=True))
    context = {"divergence": divergence, "center": center, "component_var": component_var}
    points = pd.concat([specials, cusps, switches], ignore_index=True)
    for column, value in context.items():
        points[column] = value
    # Newton and continuation carry w along and may round it in the last bit: every point but a
    # cusp (which has a weight of its own) is at one of the given weights exactly.
    if len(points):
        snap = (points["kind"] != "cusp").to_numpy()
        points.loc[snap, "weight"] = _snap(points.loc[snap, "weight"].to_numpy(float), weights)
    minima["weight"] = _snap(minima["weight"].to_numpy(float), weights)
    points = _finish_points(points, center, component_var)
    return Structure(
        divergence,
        center,
        component_var,
        weights,
        (lo, hi),
        points,
        _branch_table(lines),
        fold_lines,
        minima,
        notes,
    )


def fold_points(
    divergence: str,
    weights: Sequence[float],
    separation_range: tuple[float, float] = (0.0, 8.0),
    *,
    center: float = 0.0,
    component_var: float = 1.0,
    alpha: float | None = None,
) -> pd.DataFrame:
    """The folds and pitchforks of :func:`exact_structure` alone (its ``points`` of those kinds).

    The same standard seeds, branches and located points, without the sweep's seeds, fold lines,
    cusps, counts and switches: several times cheaper, for callers that need only the folds (the
    continuation in alpha of :mod:`analysis.alpha`). Columns: :data:`POINT_COLUMNS`.
    """
    from kl_sweep.core import bifurcation as bf

    weights = np.unique(np.asarray(weights, dtype=float))
    lo, hi = map(float, separation_range)
    with float64(), torch.no_grad():
        landscape = _landscape(divergence, center, component_var, alpha)
        branches = bf.continue_branches(landscape, standard_seeds(landscape, weights, lo, hi), (lo, hi))
        points = dedupe(_special_frame(landscape, branches), ["weight", "kind"], ("separation", "mu"))
    points = points.assign(divergence=divergence, center=center, component_var=component_var)
    if len(points):
        points["weight"] = _snap(points["weight"].to_numpy(float), weights)
    return _finish_points(points, center, component_var)


def _snap(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each value replaced by the nearest of ``weights`` if it is within 1e-9 of it."""
    nearest = weights[np.abs(values[:, None] - weights[None, :]).argmin(-1)] if len(values) else values
    return np.where(np.abs(nearest - values) <= 1e-9, nearest, values)


def unreached_seeds(
    landscape, lines: list[dict], sweep_minima: pd.DataFrame | None, center: float, component_var: float
) -> torch.Tensor:
    """Sweep minima that no traced branch passes through (one per weight and type), as seeds u [n, 4]."""
    if sweep_minima is None or sweep_minima.empty:
        return torch.empty(0, 4)
    check = match_minima(landscape, lines, sweep_minima)
    missed = check[~check["on_branch"]]
    if missed.empty:
        return torch.empty(0, 4)
    missed = missed.assign(
        type=classify.optimum_types(missed.assign(center=center, component_var=component_var))
    )
    missed = missed.sort_values("separation").groupby(["weight", "type"]).tail(1)
    return tensor(
        np.column_stack(
            [missed["mu"], 0.5 * np.log(missed["sigma2"]), missed["separation"], missed["weight"]]
        )
    )


#: A sweep minimum lies on a branch if a branch's exact point at its (separation, weight) is this close.
ON_BRANCH_TOL = 1e-5


def match_minima(landscape, lines: list[dict], sweep_minima: pd.DataFrame) -> pd.DataFrame:
    """``sweep_minima`` with ``distance`` to the nearest exact branch point at its cell and ``on_branch``."""
    table = sweep_minima[["separation", "weight", "mu", "sigma2"]].reset_index(drop=True)
    queries = {float(w): np.unique(g["separation"].to_numpy()) for w, g in table.groupby("weight")}
    exact = solve_points(landscape, _crossings(lines, queries))
    merged = table.reset_index().merge(
        exact, on=["weight", "separation"], how="left", suffixes=("", "_exact")
    )
    merged["distance"] = np.maximum(
        np.abs(merged["mu"] - merged["mu_exact"]) / np.sqrt(merged["sigma2"]),
        np.abs(0.5 * np.log(merged["sigma2"]) - merged["log_sigma"]),
    )
    best = merged.groupby("index")["distance"].min().reindex(table.index)
    return table.assign(distance=best.to_numpy(), on_branch=(best <= ON_BRANCH_TOL).to_numpy())


def _special_frame(landscape, branches) -> pd.DataFrame:
    """Folds and pitchforks on traced branches as a table (one row per located point)."""
    from kl_sweep.core.bifurcation import branch_special_points

    sp = branch_special_points(landscape, branches)
    frame = _frame(sp.u)
    return frame.assign(
        kind=np.where(sp.fold.numpy(), "fold", "pitchfork"),
        event=np.where(sp.birth.numpy(), "birth", "death"),
        residual=sp.residual.numpy(),
    )[sp.converged.numpy()]


def _fold_lines(landscape, specials: pd.DataFrame, d_range, w_range) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold curves through the folds in ``specials`` (:func:`trace_fold_lines`), as tables; cusps."""
    from kl_sweep.core import bifurcation as bf

    folds = specials[specials["kind"] == "fold"]
    empty_lines = pd.DataFrame(columns=["line", "separation", "weight", "mu", "sigma2"])
    if folds.empty or w_range[1] <= w_range[0]:
        return empty_lines, pd.DataFrame()
    lines, cusp_u = trace_fold_lines(
        landscape, tensor(folds[["mu", "log_sigma", "separation", "weight"]].to_numpy()), d_range, w_range
    )
    line_table = pd.concat(
        [
            pd.DataFrame(
                {
                    "line": i,
                    "separation": p[:, 2],
                    "weight": p[:, 3],
                    "mu": p[:, 0],
                    "sigma2": np.exp(2 * p[:, 1]),
                }
            )
            for i, p in enumerate(lines)
        ],
        ignore_index=True,
    )
    cusps = _frame(cusp_u).assign(kind="cusp", event="", residual=bf.fold_residual(landscape, cusp_u).numpy())
    return line_table, dedupe(cusps, ["kind"], ("separation", "weight"))


def trace_fold_lines(
    landscape, folds: torch.Tensor, d_range, w_range, options=None
) -> tuple[list[np.ndarray], torch.Tensor]:
    """Fold curves through the fold points ``folds`` u [M, n + 2] in (separation, w), w the
    landscape's second parameter, traced in rounds until every fold is on one: (one polyline
    [k, n + 2] a curve, the cusps found on them u [C, n + 2])."""
    from kl_sweep.core import bifurcation as bf

    n = landscape.n_state
    d, w = folds[:, n].numpy(), folds[:, n + 1].numpy()
    covered = np.zeros(len(folds), dtype=bool)
    lines, located = [], []
    for _ in range(4):  # rounds of seeding, each one batch
        todo = np.nonzero(~covered)[0]
        if len(todo) == 0:
            break
        values, counts = np.unique(w[todo], return_counts=True)
        seed_weight = values[np.argmax(counts)]
        seeds = todo[w[todo] == seed_weight]
        traced = bf.continue_fold_lines(landscape, folds[seeds], d_range, w_range, options)
        new = _polylines_fold(traced)
        lines += new
        covered |= on_lines(new, d, w, n)
        covered[seeds] = True  # a seed whose curve could not leave it is not tried again
        located.append(bf.cusp_points(traced))
    return lines, torch.cat([c.u[c.converged] for c in located])


def _polylines_fold(fold_lines) -> list[np.ndarray]:
    """Each seed's fold curve as one polyline (its two halves joined at the seed)."""
    curve = fold_lines.curve
    n = curve.points.shape[0] // 2
    out = []
    for i in range(n):  # fold curves (a handful), not configurations
        down = curve.points[n + i, : int(curve.length[n + i])].numpy()[::-1]
        up = curve.points[i, : int(curve.length[i])].numpy()
        out.append(np.concatenate([down, up[1:]]))
    return out


def on_lines(lines: list[np.ndarray], d: np.ndarray, w: np.ndarray, n: int = 2) -> np.ndarray:
    """Which folds (separations ``d``, second parameters ``w``) lie on one of ``lines`` (points
    u [k, n + 2]): a line crosses their w near their separation."""
    on = np.zeros(len(d), dtype=bool)
    for p in lines:  # fold curves, not configurations
        a, b = p[:-1, n + 1, None], p[1:, n + 1, None]
        k, j = np.nonzero((np.minimum(a, b) <= w) & (w <= np.maximum(a, b)) & (a != b))
        frac = (w[j] - p[k, n + 1]) / (p[k + 1, n + 1] - p[k, n + 1])
        dd = p[k, n] + frac * (p[k + 1, n] - p[k, n])
        hit = np.abs(dd - d[j]) <= ON_LINE_TOL * (1 + np.abs(d[j]))
        on[j[hit]] = True
    return on


#: Separations just beside a fold, where the minimum it creates or destroys exists: this far (relative).
BESIDE_FOLD = 1e-6
#: Guesses beside a fold point for the stationary points near it: offsets along H's null vector.
AROUND_FOLD = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: Query separations this close to a fold also get the guesses around it.
NEAR_FOLD = 0.1


def _beside_folds(specials: pd.DataFrame) -> dict[float, np.ndarray]:
    """Per weight, separations on the existing side of every fold and midway between consecutive folds.

    Between two query separations the global minimum may jump inside a bistable interval narrower
    than the query step (near a cusp). With these separations added, every interval between folds
    holds points where both minima exist, so the equal-loss system is bracketed there too.
    """
    folds = specials[specials["kind"] == "fold"]
    out: dict[float, np.ndarray] = {}
    for weight, group in folds.groupby("weight"):  # weights: a bookkeeping loop over tens of values
        d = group["separation"].to_numpy()
        side = np.where(group["event"].to_numpy() == "birth", 1.0, -1.0)
        beside = d + side * BESIDE_FOLD * (1 + np.abs(d))
        ordered = np.sort(d)
        out[float(weight)] = np.unique(np.concatenate([beside, 0.5 * (ordered[1:] + ordered[:-1])]))
    return out


def _around_folds(landscape, specials: pd.DataFrame, queries: dict[float, np.ndarray]) -> torch.Tensor:
    """Guesses u [n, 4] at each query separation near a fold: the fold point moved along H's null vector.

    A branch's polyline is too coarse to tell the minimum from the saddle just beside a fold (they
    are O(sqrt(distance)) apart, on either side of the fold point along the null vector of the
    Hessian); Newton from points on that line, both ways, finds both.
    """
    folds = specials[specials["kind"] == "fold"].reset_index(drop=True)
    if folds.empty:
        return torch.empty(0, 4)
    u = tensor(folds[["mu", "log_sigma", "separation", "weight"]].to_numpy())
    _, vectors = torch.linalg.eigh(landscape.jet(u, order=2).hessian)
    null = vectors[:, :, 0].numpy()  # eigenvector of the eigenvalue nearest 0 (the smaller one)
    steps = np.concatenate([-np.asarray(AROUND_FOLD), AROUND_FOLD])
    guesses = []
    for weight, group in folds.groupby("weight"):  # weights, not configurations
        q = queries.get(float(weight), np.empty(0))
        near = np.abs(q[:, None] - group["separation"].to_numpy()[None, :]) <= NEAR_FOLD  # [q, folds]
        i, j = np.nonzero(near)
        j = group.index.to_numpy()[j]
        theta = u[j, :2].numpy()[:, None, :] + steps[None, :, None] * null[j][:, None, :]
        d = np.repeat(q[i], len(steps))
        guesses.append(np.column_stack([theta.reshape(-1, 2), d, np.full(len(d), weight)]))
    return tensor(np.concatenate(guesses)) if guesses else torch.empty(0, 4)


def _switches(landscape, minima: pd.DataFrame) -> pd.DataFrame:
    """Coexistence (Maxwell) points and crossovers of the global minimum between query separations."""
    from kl_sweep.core.bifurcation import solve_crossover, solve_maxwell, stationary_points

    m = minima[minima["minimum"]].copy()
    if m.empty:
        return pd.DataFrame()
    # The global minimum per cell; mirror-image minima (weight 1/2) tie exactly: take the left one.
    m["rank_loss"] = m["loss"].round(11)
    glob = (
        m.sort_values(["weight", "separation", "rank_loss", "mu"]).groupby(["weight", "separation"]).head(1)
    )
    glob = glob.sort_values(["weight", "separation"], ignore_index=True)
    nxt = glob.groupby("weight").shift(-1).assign(weight=glob["weight"])
    pair = nxt["separation"].notna()
    a, b = glob[pair].reset_index(drop=True), nxt[pair].reset_index(drop=True)
    if a.empty:
        return pd.DataFrame()

    def u_of(frame, d):
        return tensor(np.column_stack([frame["mu"], frame["log_sigma"], d, a["weight"]]))

    # The global minimum can jump only where a cell at either end has two minima or more; with one
    # at both ends it is one branch's (a minimum cannot die without another to take its place).
    count = m.groupby(["weight", "separation"]).size()
    many = (count.reindex(pd.MultiIndex.from_frame(a[["weight", "separation"]])).to_numpy() > 1) | (
        count.reindex(pd.MultiIndex.from_frame(b[["weight", "separation"]])).to_numpy() > 1
    )
    # Continue each such global minimum to the other end of its interval (Newton from where it was).
    n = len(a)
    fwd, back = u_of(b, b["separation"]).clone(), u_of(a, a["separation"]).clone()
    fwd_min, back_min = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    fwd_loss, back_loss = b["loss"].to_numpy().copy(), a["loss"].to_numpy().copy()
    if many.any():
        fwd_u, jf = stationary_points(landscape, u_of(a, b["separation"])[many])
        back_u, jb = stationary_points(landscape, u_of(b, a["separation"])[many])
        fwd[many], back[many] = fwd_u, back_u
        fwd_min[many], back_min[many] = jf.minimum.numpy(), jb.minimum.numpy()
        fwd_loss[many], back_loss[many] = jf.loss.numpy(), jb.loss.numpy()
    same = (np.abs(fwd[:, :2].numpy() - b[["mu", "log_sigma"]].to_numpy()).max(1) <= 1e-6) & fwd_min
    ties = np.abs(a["loss"].to_numpy() - back_loss) <= 1e-11
    jump = ~same & fwd_min & back_min & ~ties
    crossing = same & (a["type"].to_numpy() != b["type"].to_numpy())
    rows = []
    if jump.any():
        d0, d1 = a["separation"].to_numpy()[jump], b["separation"].to_numpy()[jump]
        gap0 = back_loss[jump] - a["loss"].to_numpy()[jump]  # > 0: the new one is higher at d0
        gap1 = b["loss"].to_numpy()[jump] - fwd_loss[jump]  # < 0: lower at d1
        f = np.clip(gap0 / (gap0 - gap1), 0, 1)[:, None]
        first = (1 - f) * u_of(a, a["separation"])[jump].numpy() + f * fwd[jump].numpy()
        second = (1 - f) * back[jump].numpy() + f * u_of(b, b["separation"])[jump].numpy()
        first[:, 2] = second[:, 2] = d0 + f[:, 0] * (d1 - d0)
        u1, u2, residual = solve_maxwell(landscape, tensor(first), tensor(second))
        inside = (u1[:, 2].numpy() >= d0) & (u1[:, 2].numpy() <= d1)
        other = _frame(u2)
        rows.append(
            _frame(u1).assign(
                kind="maxwell",
                event="",
                residual=residual.numpy(),
                mu_other=other["mu"],
                log_sigma_other=other["log_sigma"],
            )[inside & (residual.numpy() <= 1e-8)]
        )
    if crossing.any():
        ra, rb = _ratio(a, landscape)[crossing], _ratio(b, landscape)[crossing]
        f = np.clip((0.5 - ra) / (rb - ra), 0, 1)[:, None]
        guess = (1 - f) * u_of(a, a["separation"])[crossing].numpy() + f * u_of(b, b["separation"])[
            crossing
        ].numpy()
        u, residual = solve_crossover(landscape, tensor(guess))
        # On the crossover sigma^2 / V* is 1/2 exactly: name the types on either side instead.
        rows.append(
            _frame(u).assign(
                kind="crossover",
                event="",
                residual=residual.numpy(),
                branch=b["type"].to_numpy()[crossing],
                branch_other=a["type"].to_numpy()[crossing],
            )
        )
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _ratio(frame: pd.DataFrame, landscape) -> np.ndarray:
    d, w = frame["separation"].to_numpy(), frame["weight"].to_numpy()
    return np.exp(2 * frame["log_sigma"].to_numpy()) / (landscape.component_var + w * (1 - w) * d * d)


def _finish_points(points: pd.DataFrame, center: float, component_var: float) -> pd.DataFrame:
    """Types, sigma^2 and column order of the bifurcation-set table."""
    if points.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    for column in ("mu_other", "log_sigma_other"):
        if column not in points:
            points[column] = np.nan
    points["sigma2"] = np.exp(2 * points["log_sigma"])
    points["sigma2_other"] = np.exp(2 * points["log_sigma_other"])
    named = points["branch"].notna() if "branch" in points else pd.Series(False, index=points.index)
    given = points["branch"].copy() if "branch" in points else None
    given_other = points["branch_other"].copy() if "branch_other" in points else None
    points["branch"] = _types(points, center, component_var)
    other = points["mu_other"].notna()
    points["branch_other"] = ""
    if named.any():
        points.loc[named, "branch"] = given[named]
        points.loc[named, "branch_other"] = given_other[named]
    if other.any():
        alt = points[other].assign(mu=points["mu_other"], log_sigma=points["log_sigma_other"])
        points.loc[other, "branch_other"] = _types(alt, center, component_var)
    points.loc[points["kind"] == "cusp", "branch"] = ""
    order = {k: i for i, k in enumerate(KINDS)}
    points = points.sort_values(["weight", "separation"], key=lambda c: c, ignore_index=True)
    points = points.assign(_k=points["kind"].map(order)).sort_values(
        ["weight", "separation", "_k"], ignore_index=True
    )
    return points[POINT_COLUMNS]


def _branch_table(lines: list[dict]) -> pd.DataFrame:
    """The traced branches as one long table: branch, weight, separation, mu, sigma2, loss, minimum."""
    frames = []
    for i, line in enumerate(lines):  # branches, not configurations
        u = line["u"]
        frames.append(
            pd.DataFrame(
                {
                    "branch": i,
                    "weight": line["weight"],
                    "separation": u[:, 2],
                    "mu": u[:, 0],
                    "sigma2": np.exp(2 * u[:, 1]),
                    "loss": line["loss"],
                    "minimum": (line["det"] > 0) & (line["h00"] > 0),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
