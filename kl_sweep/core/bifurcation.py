r"""Branches of stationary points, their folds, fold lines, cusps, coexistence and crossover points.

For one :class:`~kl_sweep.core.landscape.Landscape` (a divergence, P's center and component
variance), the fits are the stationary points :math:`F(\theta; d, w) = \nabla_\theta L = 0` in
:math:`\theta = (\mu, \log\sigma)`. In d dimensions (:class:`~kl_sweep.core.landscape.ReducedLandscape`)
theta is the family's n parameters and w may be the correlation instead: every function here
takes its sizes from the landscape (``n_state``), so the one implementation serves both.
Everything here is batched: rows are branches, weights or special points, and no Python loop runs
over them.

- **Branches** (:func:`continue_branches`): at fixed weight w, the curve F = 0 in
  :math:`(\mu, \log\sigma, d)`, traced by pseudo-arclength (:mod:`kl_sweep.core.continuation`) so
  that it goes round folds. A point is a minimum where the Hessian H is positive definite.
- **Folds and pitchforks** (:func:`branch_special_points`): the least eigenvalue of H changes
  sign between two points of a branch (on the line, as det H does; in d dimensions symmetry can
  make two eigenvalues cross zero together, and det H then keeps its sign). If the branch also
  turns in d there (the d-component of its tangent changes sign) it is a **fold**: a minimum
  and a saddle merge, and the minimum is born or dies as d grows. The zero is bracketed along
  the curve (:func:`kl_sweep.core.continuation.locate`) and then polished by Newton on the
  extended system :math:`(F, \det H) = 0` in :math:`(\theta, d)` (:func:`polish_folds`), which
  is regular at a fold. If the branch does not turn, two other
  branches cross it there: a **pitchfork**, the symmetric case (weight 1/2, where the covering
  minimum dies between two mirror-image saddles, or splits into two mirror-image minima); its
  location is the bracketed zero, polished on the mirror's fixed subspace where Q is centred
  (:func:`polish_pitchforks`).
- **Fold lines and cusps** (:func:`continue_fold_lines`, :func:`cusp_points`): the fold system
  :math:`(F, \det H) = 0` is 3 equations in :math:`(\mu, \log\sigma, d, w)`, a curve, traced the
  same way across weights. Its projection on (d, w) is a fold line; a **cusp** is where that
  projection has zero speed, i.e. where the curve's tangent has no (d, w) component: two fold
  lines meet there and the curve turns back in d or in w. The test functions are the d- and
  w-components of the tangent; each zero is bracketed and kept as a cusp if the other component
  vanishes there too (:data:`CUSP_TANGENT_TOL`). At weight 1/2 this is the pitchfork above (the
  unfolding of a symmetric pitchfork is a cusp).
- **Coexistence (Maxwell) points** (:func:`solve_maxwell`): two minima with equal loss at the
  same (d, w), so the global minimum jumps between them: Newton on
  :math:`F(\theta_1) = 0, F(\theta_2) = 0, L(\theta_1) - L(\theta_2) = 0` in
  :math:`(\theta_1, \theta_2, d)`.
- **Crossovers** (:func:`solve_crossover`): a minimum whose :math:`\sigma^2 / V^*` passes a given
  ratio (1/2: covering versus mode-seeking), with :math:`V^* = v + w(1 - w)d^2` P's variance:
  Newton on :math:`F = 0, \sigma^2/V^* = r` in :math:`(\mu, \log\sigma, d)`.

Every located point carries its residual: the largest of :math:`\lVert F\rVert_\infty` and the
other equations of its system (det H relative to :math:`\lVert H\rVert^2` for folds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from kl_sweep.core.continuation import Curve, Located, Options, continuation, locate
from kl_sweep.core.landscape import (
    LOG_SIGMA,
    MU,
    SEPARATION,
    WEIGHT,
    Jet,
    Landscape,
    autograd_jet,
    determinant,
    least_eigenvalue,
)
from kl_sweep.core.mixture import Mixture

#: A zero of one tangent component is a cusp if the other (d or w) component is below this there.
CUSP_TANGENT_TOL = 1e-4
#: sigma^2 / V* at which a minimum counts as covering (the analysis's rule).
COVERING_RATIO = 0.5
#: A pitchfork whose Q's means lie this close to P's centre is polished on the mirror subspace.
MIRROR_TOL = 1e-3


def _hessian_scale(h: Tensor) -> Tensor:
    """|H|_F^n for H [B, n, n]: det H relative to it is scale-free."""
    return (h * h).sum((-1, -2)).clamp_min(1e-300) ** (h.shape[-1] / 2)


def _frobenius(h: Tensor) -> Tensor:
    return (h * h).sum((-1, -2)).clamp_min(1e-300).sqrt()


@dataclass(frozen=True)
class BranchProblem:
    """F(theta; d, w) = 0 in (theta, d), with w (the landscape's second parameter) fixed per row
    ([B]); theta is (mu, log sigma) on the line, the family's n parameters in d dimensions."""

    landscape: Landscape
    weight: Tensor
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def full(self, u: Tensor) -> Tensor:
        return torch.cat([u, self.weight.unsqueeze(-1)], -1)

    def residual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        jet = self.landscape.jet(self.full(u), order=2)
        self._cache["last"] = (u, jet)
        return jet.gradient, jet.second[:, :, : jet.n + 1]

    def _jet(self, u: Tensor) -> Jet:
        last = self._cache.get("last")
        if last is not None and last[0].shape == u.shape and torch.equal(last[0], u):
            return last[1]
        return self.landscape.jet(self.full(u), order=2)

    def monitors(self, u: Tensor, jacobian: Tensor, tangent: Tensor) -> dict[str, Tensor]:
        jet = self._jet(u)
        h = jet.hessian
        return {
            "loss": jet.loss,
            "det": determinant(h) / _hessian_scale(h),
            "h00": h[:, 0, 0],
            # the least eigenvalue, relative to |H|: > 0 exactly at minima
            "least": least_eigenvalue(h) / _frobenius(h),
            "t_d": tangent[:, jet.n],
            "ratio": self.landscape.covering_ratio(self.full(u)) - COVERING_RATIO,
            # on a symmetric subspace: the least eigenvalue on the directions that break the
            # symmetry (> 0: a minimum of the subspace is one of the whole space); else +1
            "breaking": self._breaking(u, h),
        }

    def _breaking(self, u: Tensor, h: Tensor) -> Tensor:
        block = self.landscape.breaking_block(self.full(u))
        if block is None:
            return torch.ones_like(h[:, 0, 0])
        return least_eigenvalue(block) / _frobenius(h)

    def take(self, index: Tensor) -> BranchProblem:
        return BranchProblem(self.landscape, self.weight[index])


@dataclass(frozen=True)
class FoldProblem:
    """(F, det H) = 0 in u = (theta, d, w): the fold curve (n + 1 equations, n + 2 unknowns)."""

    landscape: Landscape

    def residual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        jet = self.landscape.jet(u, order=3)
        g = torch.cat([jet.gradient, jet.det.unsqueeze(-1)], -1)
        return g, torch.cat([jet.second, jet.det_grad.unsqueeze(1)], 1)

    def monitors(self, u: Tensor, jacobian: Tensor, tangent: Tensor) -> dict[str, Tensor]:
        n = self.landscape.n_state
        return {"t_d": tangent[:, n], "t_w": tangent[:, n + 1]}

    def take(self, index: Tensor) -> FoldProblem:
        return self


def newton(
    system, x: Tensor, iterations: int = 30, tol: float = 1e-12, final: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Newton on a batch of square systems ``system(x, rows) -> (G [m, k], J [m, k, k])``.

    ``system`` gets the points x [m, k] of the rows ``rows`` of the batch (so that it can pick its
    per-row constants).

    A row is done once its update is below ``tol`` (relative to 1 + |x|) and is no longer
    evaluated: only the unfinished rows take part in each iteration; a row whose iterate is no
    longer finite stops too. Returns (x, G at x), or (x, None) when ``final`` is False (the caller
    evaluates x itself).
    """
    x = x.clone()
    active = torch.arange(x.shape[0])
    g, jac = system(x, active)
    for _ in range(iterations):
        delta, info = torch.linalg.solve_ex(jac, -g.unsqueeze(-1))  # singular rows: info != 0
        delta = delta.squeeze(-1)
        delta = torch.where(torch.isfinite(delta) & (info == 0).unsqueeze(-1), delta, 0.0)
        x[active] = x[active] + delta
        moving = ~(delta.abs() <= tol * (1.0 + x[active].abs())).all(-1) & torch.isfinite(x[active]).all(-1)
        active = active[moving]
        if active.numel() == 0:
            break
        g, jac = system(x[active], active)
    return x, system(x, torch.arange(x.shape[0]))[0] if final else None


def stationary_points(landscape: Landscape, u: Tensor, iterations: int = 30) -> tuple[Tensor, Jet]:
    """Newton on F = 0 in theta at each row's fixed (d, w), from u [B, n + 2]; returns (u, its jet).

    F and H come from the fitting core's closed forms (:meth:`Landscape.theta_jet`): the returned
    jet has the loss, F and H only.

    Starting points must lie in the basin of Newton's method (a fit, or a point interpolated on a
    branch); the caller checks the returned gradient.
    """
    n = landscape.n_state
    params = u[:, n:]

    def system(theta: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        jet = landscape.theta_jet(torch.cat([theta, params[rows]], -1))
        return jet.gradient, jet.hessian

    theta, _ = newton(system, u[:, :n], iterations, final=False)
    point = torch.cat([theta, params], -1)
    return point, landscape.theta_jet(point)


@dataclass
class Branches:
    """Continued branches: ``curve`` in (theta, d), one row per branch and direction, and each
    row's ``weight`` [R] (the landscape's second parameter: the correlation where that is swept)."""

    curve: Curve
    weight: Tensor
    problem: BranchProblem

    def points(self) -> Tensor:
        """All points as u = (theta, d, w), [R, S, n + 2] (NaN past each row's end)."""
        w = self.weight[:, None, None].expand(-1, self.curve.points.shape[1], 1)
        return torch.cat([self.curve.points, w], -1)


def continue_branches(
    landscape: Landscape,
    seeds: Tensor,
    separation_range: tuple[float, float],
    options: Options | None = None,
) -> Branches:
    """Trace the branch through every seed u [B, n + 2] (a stationary point) up and down in
    separation.

    Rows 0..B-1 of the result head towards larger d, rows B..2B-1 towards smaller d. The box is
    ``separation_range`` in d (and |log scale| <= 12, :meth:`Landscape.state_bounds`).
    """
    lo, hi = separation_range
    n = landscape.n_state
    lower, upper = landscape.state_bounds()
    options = options or Options()
    options = replace(options, lower=(*lower, lo), upper=(*upper, hi))
    seeds, _ = stationary_points(landscape, seeds)
    both = torch.cat([seeds, seeds])
    sign = torch.cat([torch.ones(len(seeds)), -torch.ones(len(seeds))]).to(seeds.dtype)
    direction = torch.zeros(len(both), n + 1, dtype=seeds.dtype)
    direction[:, n] = sign
    problem = BranchProblem(landscape, both[:, n + 1])
    curve = continuation(problem, both[:, : n + 1], direction, options)
    return Branches(curve, both[:, n + 1], problem)


@dataclass
class SpecialPoints:
    """Folds and pitchforks on branches: u [M, n + 2], ``fold`` (else pitchfork), ``birth`` (else death:
    the minimum exists above, else below, the point in d), the branch row and step, the residual."""

    u: Tensor
    fold: Tensor
    birth: Tensor
    branch: Tensor
    step: Tensor
    residual: Tensor
    converged: Tensor


def _sign_changes(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(row, step) of every step where ``values`` changes sign to the next valid point."""
    a, b = values[:, :-1], values[:, 1:]
    change = valid[:, :-1] & valid[:, 1:] & (torch.sign(a) * torch.sign(b) < 0)
    rows, steps = change.nonzero(as_tuple=True)
    return rows, steps


def branch_special_points(
    landscape: Landscape, branches: Branches, options: Options | None = None
) -> SpecialPoints:
    """Folds and pitchforks where a minimum is born or dies along each branch (see module docstring)."""
    options = options or Options()
    curve = branches.curve
    valid = curve.valid
    n = landscape.n_state
    # Where the least eigenvalue of H changes sign a minimum is born or dies (on the line det H
    # and H's corner say the same; in d dimensions two eigenvalues may cross zero together).
    least = curve.monitors["least"]
    rows, steps = _sign_changes(least, valid)
    minimum = least > 0
    empty = torch.empty(0, dtype=torch.long)
    if rows.numel() == 0:
        z = torch.empty(0, n + 2, dtype=least.dtype)
        return SpecialPoints(z, empty.bool(), empty.bool(), empty, empty, z[:, 0], empty.bool())
    td = curve.monitors["t_d"]
    fold = torch.sign(td[rows, steps]) * torch.sign(td[rows, steps + 1]) < 0
    found = locate(branches.problem, curve, rows, steps, "least", options)
    u = torch.cat([found.u, branches.weight[rows].unsqueeze(-1)], -1)
    polished, residual = polish_folds(landscape, u[fold])
    u[fold] = polished
    residual_all = _stationary_residual(landscape, u)
    residual_all[fold] = residual
    symmetric = ~fold & _on_mirror_subspace(landscape, u)
    if bool(symmetric.any()):
        polished, residual = polish_pitchforks(landscape, u[symmetric])
        u[symmetric] = polished
        residual_all[symmetric] = residual
    # Which side of the point in d holds the minimum: the bracket end that is a minimum.
    min_end = torch.where(minimum[rows, steps], steps, steps + 1)
    birth = curve.points[rows, min_end, n] > u[:, n]
    converged = found.converged & (residual_all <= 1e-10)
    return SpecialPoints(u, fold, birth, rows, steps, residual_all, converged)


def _stationary_residual(landscape: Landscape, u: Tensor) -> Tensor:
    jet = landscape.jet(u, order=2)
    h = jet.hessian
    rel_det = (determinant(h) / _hessian_scale(h)).abs()
    return torch.maximum(jet.gradient.abs().amax(-1), rel_det)


def polish_folds(landscape: Landscape, u: Tensor) -> tuple[Tensor, Tensor]:
    """Newton on (F, det H) = 0 in (theta, d) at each row's weight, from u [M, n + 2].

    Returns (u, residual) with residual = max(|F|_inf, |det H| / |H|_F^2).
    """
    if u.shape[0] == 0:
        return u, u[:, 0]
    n = landscape.n_state
    w = u[:, n + 1 :]

    def system(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        jet = landscape.jet(torch.cat([x, w[rows]], -1), order=3)
        g = torch.cat([jet.gradient, jet.det.unsqueeze(-1)], -1)
        return g, torch.cat([jet.second[:, :, : n + 1], jet.det_grad[:, None, : n + 1]], 1)

    x, _ = newton(system, u[:, : n + 1])
    point = torch.cat([x, w], -1)
    return point, _stationary_residual(landscape, point)


def _on_mirror_subspace(landscape: Landscape, u: Tensor) -> Tensor:
    """Rows [M] at weight 1/2 whose Q is centred: fixed by the mirror x -> 2c - x that swaps P's
    components (Q's means at c; its scale is unchanged by the mirror). Within 1e-3: a branch point
    bracketed along the curve drifts off the subspace (the bordered corrector is singular there)."""
    n, k = landscape.n_state, landscape.n_mean
    weight = (
        u[:, n + 1] if landscape.parameters[1] == "weight" else torch.full_like(u[:, 0], landscape.weight)
    )
    centred = (u[:, :k] - landscape.center).abs().amax(-1) <= MIRROR_TOL
    return (weight == 0.5) & centred


def polish_pitchforks(landscape: Landscape, u: Tensor) -> tuple[Tensor, Tensor]:
    """Newton on the mirror-symmetric pitchfork system from u [M, n + 2] (weight 1/2, Q centred).

    The mirror x -> 2c - x swaps P's components at weight 1/2 and maps Q's means m to 2c - m: on
    its fixed subspace (m = c) the Hessian splits into the means' block H_mm and the scale's, and
    the centred fit loses stability where det H_mm = 0 while the scale stays stationary. So
    (F_scale, det H_mm) = 0 in (scale, d), with the means held at c: regular at the branch point,
    where the bordered system of the continuation is not (two branches cross there).
    Returns (u, residual) with residual = max(|F|_inf, |det H| / |H|_F^n).
    """
    if u.shape[0] == 0:
        return u, u[:, 0]
    n, k = landscape.n_state, landscape.n_mean
    rest = u[:, n + 1 :]

    def point(x: Tensor, rows: Tensor) -> Tensor:
        means = torch.full((x.shape[0], k), landscape.center, dtype=x.dtype)
        return torch.cat([means, x, rest[rows]], -1)

    def system(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        jet = autograd_jet(landscape.loss, point(x, rows), n, 3, block=k)  # det_grad: of det H_mm
        det = determinant(jet.hessian[:, :k, :k])
        g = torch.cat([jet.gradient[:, k:], det.unsqueeze(-1)], -1)
        jac = torch.cat([jet.second[:, k:, k : n + 1], jet.det_grad[:, None, k : n + 1]], 1)
        return g, jac

    x, _ = newton(system, u[:, k : n + 1])
    polished = point(x, torch.arange(x.shape[0]))
    return polished, _stationary_residual(landscape, polished)


def mirror_pitchforks(
    landscape: Landscape, second: Tensor, separation_range: tuple[float, float], samples: int = 100
) -> tuple[Tensor, Tensor, Tensor]:
    """The centred fit's pitchforks at weight 1/2, found on the mirror's fixed subspace itself.

    A branch continued through a pitchfork can step onto the branch that crosses it there, and
    then the centred fit's loss of stability is not seen (which branch it takes is decided by
    rounding). On the fixed subspace (Q's means at c) no branch crosses: the centred fit is solved
    by Newton in its scale coordinates from each of ``samples`` separations of
    ``separation_range`` to the next, for every value [P] of the landscape's second parameter at
    once (weight 1/2 throughout). Where the least eigenvalue of its whole Hessian changes sign, the
    bracket is polished by :func:`polish_pitchforks`. Two pitchforks within one step of the grid
    are not seen. Returns (u [M, n + 2], birth [M]: the centred fit is a minimum above the point,
    residual [M]).
    """
    n, k = landscape.n_state, landscape.n_mean
    lower, _ = landscape.state_bounds()
    log_scale = torch.tensor([b > -float("inf") for b in lower[k:]])
    lo, hi = separation_range
    m = len(second)
    means = torch.full((m, k), landscape.center, dtype=torch.float64)
    x = torch.zeros(m, n - k, dtype=torch.float64)
    x[:, log_scale] = 0.5 * math.log(landscape.component_var + 0.25 * lo * lo)
    points, least, good = [], [], []
    for sep in torch.linspace(lo, hi, samples, dtype=torch.float64).tolist():  # continuation steps
        params = torch.stack([torch.full((m,), sep, dtype=torch.float64), second.to(torch.float64)], -1)

        def system(y: Tensor, rows: Tensor, params: Tensor = params) -> tuple[Tensor, Tensor]:
            jet = landscape.theta_jet(torch.cat([means[rows], y, params[rows]], -1))
            return jet.gradient[:, k:], jet.hessian[:, k:, k:]

        x, _ = newton(system, x, tol=1e-8, final=False)  # (a bracket; polish_pitchforks does the rest)
        u = torch.cat([means, x, params], -1)
        jet = landscape.theta_jet(u)
        points.append(u)
        least.append(least_eigenvalue(jet.hessian))
        good.append(jet.gradient.isfinite().all(-1) & (jet.gradient.abs().amax(-1) <= 1e-9))
    points, least, good = torch.stack(points, 1), torch.stack(least, 1), torch.stack(good, 1)
    rows, steps = _sign_changes(least, good)
    a, b = least[rows, steps], least[rows, steps + 1]
    f = (a / (a - b)).unsqueeze(-1)
    start = points[rows, steps] + f * (points[rows, steps + 1] - points[rows, steps])
    u, residual = polish_pitchforks(landscape, start)
    step = (hi - lo) / max(samples - 1, 1)
    inside = (u[:, n] - start[:, n]).abs() <= step
    ok = inside & (residual <= 1e-10)
    return u[ok], (b > 0)[ok], residual[ok]


@dataclass
class FoldLines:
    """Fold curves in u = (mu, log sigma, d, w): ``curve`` rows, traced from fold seeds both ways."""

    curve: Curve
    problem: FoldProblem


def continue_fold_lines(
    landscape: Landscape,
    folds: Tensor,
    separation_range: tuple[float, float],
    weight_range: tuple[float, float],
    options: Options | None = None,
) -> FoldLines:
    """Trace the fold curve through every fold point u [M, n + 2], towards larger and smaller
    weight (the landscape's second parameter).

    Rows 0..M-1 head towards larger w, rows M..2M-1 towards smaller w (or, where the curve runs
    along w = const, the orientation the bordered tangent picks).
    """
    n = landscape.n_state
    lower, upper = landscape.state_bounds()
    options = options or Options(ds=0.02, ds_max=0.1, max_steps=600)
    options = replace(
        options,
        lower=(*lower, separation_range[0], weight_range[0]),
        upper=(*upper, separation_range[1], weight_range[1]),
    )
    both = torch.cat([folds, folds])
    direction = torch.zeros_like(both)
    direction[:, n + 1] = torch.cat([torch.ones(len(folds)), -torch.ones(len(folds))]).to(both.dtype)
    # The fold lines of the weight-1/2 pitchfork run along w; a small d-component breaks the tie.
    direction[:, n] = 1e-3 * direction[:, n + 1]
    problem = FoldProblem(landscape)
    return FoldLines(continuation(problem, both, direction, options), problem)


def cusp_points(fold_lines: FoldLines, options: Options | None = None) -> Located:
    """Cusps on the fold curves: zeros of the tangent's d- or w-component where the other vanishes too.

    Returns the located points (u [C, 4], possibly the same cusp from several curves) with the
    ``monitors`` t_d and t_w at each.
    """
    options = options or Options()
    curve = fold_lines.curve
    valid = curve.valid
    found = []
    for name in ("t_d", "t_w"):  # the two test functions, not configurations
        rows, steps = _sign_changes(curve.monitors[name], valid)
        if rows.numel():
            found.append(locate(fold_lines.problem, curve, rows, steps, name, options))
    if not found:
        z = torch.empty(0, curve.points.shape[-1], dtype=curve.points.dtype)
        return Located(z, z, {"t_d": z[:, 0], "t_w": z[:, 0]}, z[:, 0].bool())
    u = torch.cat([f.u for f in found])
    t = torch.cat([f.tangent for f in found])
    mon = {k: torch.cat([f.monitors[k] for f in found]) for k in ("t_d", "t_w")}
    converged = torch.cat([f.converged for f in found])
    speed = torch.sqrt(mon["t_d"] ** 2 + mon["t_w"] ** 2)
    cusp = speed <= CUSP_TANGENT_TOL
    return Located(u[cusp], t[cusp], {k: v[cusp] for k, v in mon.items()}, converged[cusp])


def fold_residual(landscape: Landscape, u: Tensor) -> Tensor:
    """max(|F|_inf, |det H| / |H|_F^2) at u [M, 4]: how well a point solves the fold system."""
    return _stationary_residual(landscape, u)


def solve_maxwell(landscape: Landscape, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-loss points of two minima at one weight: Newton in (theta_1, theta_2, d).

    ``first`` and ``second`` are u [M, n + 2] guesses (same d and w per row). Returns (u_1, u_2,
    residual) with residual = max(|F_1|, |F_2|, |L_1 - L_2|).
    """
    n = landscape.n_state
    w = first[:, n + 1 :]

    def unpack(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        d = x[:, 2 * n : 2 * n + 1]
        return torch.cat([x[:, :n], d, w[rows]], -1), torch.cat([x[:, n : 2 * n], d, w[rows]], -1)

    def system(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        a, b = unpack(x, rows)
        ja, jb = landscape.jet(a, 2), landscape.jet(b, 2)
        g = torch.cat([ja.gradient, jb.gradient, (ja.loss - jb.loss).unsqueeze(-1)], -1)
        m = x.shape[0]
        jac = torch.zeros(m, 2 * n + 1, 2 * n + 1, dtype=x.dtype)
        jac[:, :n, :n] = ja.hessian
        jac[:, :n, 2 * n] = ja.second[:, :, n]
        jac[:, n : 2 * n, n : 2 * n] = jb.hessian
        jac[:, n : 2 * n, 2 * n] = jb.second[:, :, n]
        jac[:, 2 * n, :n] = ja.gradient
        jac[:, 2 * n, n : 2 * n] = -jb.gradient
        jac[:, 2 * n, 2 * n] = ja.grad[:, n] - jb.grad[:, n]
        return g, jac

    x0 = torch.cat([first[:, :n], second[:, :n], first[:, n : n + 1]], -1)
    x, g = newton(system, x0)
    a, b = unpack(x, torch.arange(x.shape[0]))
    return a, b, g.abs().amax(-1)


def solve_crossover(landscape: Landscape, u: Tensor, ratio: float = COVERING_RATIO) -> tuple[Tensor, Tensor]:
    """Where a minimum's sigma^2 / V* equals ``ratio``: Newton in (mu, log sigma, d) from u [M, 4].

    Returns (u, residual) with residual = max(|F|_inf, |sigma^2 / V* - ratio|).
    """
    w = u[:, WEIGHT:]
    v = landscape.component_var

    def system(x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        jet = landscape.jet(torch.cat([x, w[rows]], -1), order=2)
        d, ww = x[:, SEPARATION], w[rows, 0]
        var = v + ww * (1 - ww) * d * d
        r = torch.exp(2 * x[:, LOG_SIGMA]) / var
        g = torch.cat([jet.gradient, (r - ratio).unsqueeze(-1)], -1)
        row = torch.stack([torch.zeros_like(r), 2 * r, -r * 2 * ww * (1 - ww) * d / var], -1)
        return g, torch.cat([jet.second[:, :, :3], row.unsqueeze(1)], 1)

    x, g = newton(system, u[:, :3])
    return torch.cat([x, w], -1), g.abs().amax(-1)


__all__ = [
    "MU",
    "LOG_SIGMA",
    "SEPARATION",
    "WEIGHT",
    "BranchProblem",
    "Branches",
    "FoldLines",
    "FoldProblem",
    "SpecialPoints",
    "branch_special_points",
    "continue_branches",
    "continue_fold_lines",
    "edge_pitchfork",
    "cusp_points",
    "fold_residual",
    "mirror_pitchforks",
    "newton",
    "polish_folds",
    "solve_crossover",
    "solve_maxwell",
    "stationary_points",
]


def edge_pitchfork(landscape: Landscape, separation_range: tuple[float, float], samples: int = 200) -> Tensor:
    r"""Separations where the symmetric fit on the edge of the finite region splits in two (w = 1/2).

    For a < 0 the divergence is finite only for :math:`\sigma^2 \le v(1-a)/(-a)` and the covering
    fit sits on that edge at mu = centre. Multistability begins where it stops being a minimum
    along the edge, :math:`\partial^2 L/\partial\mu^2 = 0` there (a pitchfork of the constrained
    problem: two edge minima move out to either side), while the outward push
    :math:`\partial L/\partial\log\sigma < 0` keeps it on the edge. The interior folds of
    :func:`continue_fold_lines` cannot see this birth. Sign changes on ``samples`` separations,
    then bisection to 1e-12; returns the separations [n] (empty if there is none).
    """
    lo, hi = separation_range
    d = torch.linspace(lo, hi, samples)
    centre = torch.full_like(d, landscape.center)

    def curvature(sep: Tensor) -> tuple[Tensor, Tensor]:
        half = torch.full_like(sep, 0.5)
        mixture = Mixture.two_component(
            sep, half, centre[: len(sep)], torch.full_like(sep, landscape.component_var)
        )
        _, edge, closed = landscape.divergence.bounds(mixture, centre[: len(sep)], landscape.alpha)
        u = torch.stack([centre[: len(sep)], edge, sep, half], -1)
        jet = landscape.theta_jet(u)
        pushed = closed & (jet.gradient[:, LOG_SIGMA] < 0)
        return jet.hessian[:, MU, MU], pushed

    h, pushed = curvature(d)
    change = (h[:-1] > 0) & (h[1:] <= 0) & pushed[:-1] & pushed[1:]
    left, right = d[:-1][change], d[1:][change]
    for _ in range(60 if len(left) else 0):  # bisection steps, all brackets at once
        mid = 0.5 * (left + right)
        positive = curvature(mid)[0] > 0
        left, right = torch.where(positive, mid, left), torch.where(positive, right, mid)
        if (right - left).max() <= 1e-12:
            break
    return 0.5 * (left + right)
