r"""Batched pseudo-arclength continuation of curves :math:`G(u) = 0` (n equations, n + 1 unknowns).

The design follows BifurcationKit's: a *problem* gives the map and its Jacobian (and the test
functions to watch), :func:`continuation` with its :class:`Options` traces a curve from each start,
and returns a :class:`Curve` (a table of points, tangents and test-function values);
:func:`locate` then finds where a test function changes sign between two points, to rounding.
Every row of a batch is its own curve: rows advance together as tensors, each with its own step
length, and nothing loops over rows.

One step from a point u with unit tangent t and step length h:

- **predictor** :math:`u_0 = u + h\,t`;
- **corrector**: Newton on the bordered system :math:`G(v) = 0,\; t\cdot(v - u_0) = 0`, whose
  Jacobian :math:`\begin{pmatrix} J \\ t^T\end{pmatrix}` stays regular at folds, where
  natural-parameter stepping stops;
- **new tangent**: the solution of :math:`J\tau = 0,\; t\cdot\tau = 1`, normalised, which keeps
  the orientation of travel;
- **step control**: a step is accepted when the corrector converged and the tangent turned by
  less than :attr:`Options.max_turn`; then h grows by :attr:`Options.grow` (up to ``ds_max``) if
  the corrector needed few iterations; otherwise h halves and the step is tried again, and a row
  whose h falls below ``ds_min`` stops (``Curve.failed``).

A row stops when it leaves the box :attr:`Options.lower`, :attr:`Options.upper` (its last point,
just outside, is kept so that curves reach the edges) or after ``max_steps`` accepted points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class CurveProblem(Protocol):
    """What :func:`continuation` needs: a batch of n equations in n + 1 unknowns, one row per curve."""

    def residual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """G(u) [B, n] and its Jacobian [B, n, n + 1] at u [B, n + 1]."""
        ...

    def monitors(self, u: Tensor, jacobian: Tensor, tangent: Tensor) -> dict[str, Tensor]:
        """Test functions and other values recorded at each point, each [B]."""
        ...

    def take(self, index: Tensor) -> CurveProblem:
        """The same problem for the rows ``index`` (per-row constants follow)."""
        ...


@dataclass(frozen=True)
class Options:
    """Step control of :func:`continuation` (lengths in the units of u)."""

    ds: float = 0.05  #: first step length
    ds_min: float = 1e-6  #: a row whose step falls below this stops (failed)
    ds_max: float = 0.25  #: longest step
    grow: float = 1.5  #: step growth after an easy corrector (at most ``easy_newton`` iterations)
    easy_newton: int = 3
    max_steps: int = 400  #: accepted points per row at most
    max_newton: int = 8  #: corrector iterations per step
    tol: float = 1e-11  #: corrector: max |G| and max |Newton update| at convergence
    max_turn: float = 0.3  #: largest angle (radians) between consecutive tangents
    lower: tuple[float, ...] = ()  #: box of u outside which a row stops (empty: no bound)
    upper: tuple[float, ...] = ()


@dataclass
class Curve:
    """Traced curves: ``points`` [B, S, n + 1] (NaN past each row's ``length``), tangents alike.

    ``monitors`` holds each recorded value as [B, S]; ``failed`` marks rows stopped because the
    step length fell below ``ds_min``.
    """

    points: Tensor
    tangents: Tensor
    monitors: dict[str, Tensor]
    length: Tensor
    failed: Tensor

    @property
    def valid(self) -> Tensor:
        """[B, S]: which entries are points of the curve."""
        steps = torch.arange(self.points.shape[1])
        return steps.unsqueeze(0) < self.length.unsqueeze(1)


def bordered_solve(jacobian: Tensor, border: Tensor, rhs_top: Tensor, rhs_last: Tensor) -> Tensor:
    """Solve [J; b^T] x = [r; r_last] for every row: J [B, n, n+1], b [B, n+1], r [B, n], r_last [B]."""
    matrix = torch.cat([jacobian, border.unsqueeze(1)], 1)
    rhs = torch.cat([rhs_top, rhs_last.unsqueeze(-1)], -1)
    x, info = torch.linalg.solve_ex(matrix, rhs.unsqueeze(-1))  # a singular row gets NaN: it stops
    return torch.where((info == 0).unsqueeze(-1), x.squeeze(-1), torch.nan)


def tangent(jacobian: Tensor, previous: Tensor) -> Tensor:
    """Unit null vector of J, oriented along ``previous`` (J tau = 0, previous . tau = 1, normalised)."""
    zeros = torch.zeros_like(jacobian[:, :, 0])
    tau = bordered_solve(jacobian, previous, zeros, torch.ones_like(previous[:, 0]))
    return tau / tau.norm(dim=-1, keepdim=True)


def correct(
    problem: CurveProblem, guess: Tensor, normal: Tensor, anchor: Tensor, options: Options
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Newton on G(v) = 0, normal . (v - anchor) = 0, from ``guess``; rows are independent.

    Returns (v, J at v, converged [B], iterations [B]). A converged row stops moving.
    """
    v = guess.clone()
    done = torch.zeros(v.shape[0], dtype=torch.bool)
    iterations = torch.zeros(v.shape[0], dtype=torch.long)
    g, jac = problem.residual(v)
    for _ in range(options.max_newton):
        plane = (normal * (v - anchor)).sum(-1)
        delta = bordered_solve(jac, normal, -g, -plane)
        delta = torch.where(torch.isfinite(delta), delta, 0.0)
        step = torch.where(done.unsqueeze(-1), 0.0, delta)
        v = v + step
        iterations = iterations + (~done).long()
        g, jac = problem.residual(v)
        small = (g.abs().amax(-1) <= options.tol) & (step.abs().amax(-1) <= options.tol * 1e3)
        done = done | (small & torch.isfinite(g).all(-1))
        if bool(done.all()):
            break
    return v, jac, done, iterations


def _inside(u: Tensor, options: Options) -> Tensor:
    inside = torch.isfinite(u).all(-1)
    if options.lower:
        inside &= (u >= torch.as_tensor(options.lower, dtype=u.dtype)).all(-1)
    if options.upper:
        inside &= (u <= torch.as_tensor(options.upper, dtype=u.dtype)).all(-1)
    return inside


def continuation(problem: CurveProblem, start: Tensor, direction: Tensor, options: Options) -> Curve:
    """Trace the curve G = 0 through each row of ``start`` [B, n+1] (on it), heading along ``direction``.

    ``direction`` [B, n+1] picks the orientation of the first tangent (for example +e_d to go up in
    separation). See the module docstring for the algorithm.
    """
    B = start.shape[0]
    _, jac = problem.residual(start)
    t = tangent(jac, direction)
    u = start.clone()
    h = torch.full((B,), options.ds, dtype=start.dtype)
    active = _inside(u, options)
    failed = torch.zeros(B, dtype=torch.bool)
    points, tangents, monitors = [u.clone()], [t.clone()], [problem.monitors(u, jac, t)]
    accepted = [torch.ones(B, dtype=torch.bool)]
    count = torch.ones(B, dtype=torch.long)
    while bool(active.any()):
        rows = active.nonzero().squeeze(-1)
        sub = problem.take(rows)
        ur, tr, hr = u[rows], t[rows], h[rows]
        guess = ur + hr.unsqueeze(-1) * tr
        v, jv, ok, iterations = correct(sub, guess, tr, guess, options)
        tv = tangent(jv, tr)
        turn = torch.arccos((tv * tr).sum(-1).clamp(-1.0, 1.0))
        ok = ok & (turn <= options.max_turn) & torch.isfinite(tv).all(-1)
        # Accepted rows move on; the others retry with half the step.
        grow = torch.where(iterations <= options.easy_newton, options.grow, 1.0)
        h[rows] = torch.where(ok, (hr * grow).clamp_max(options.ds_max), 0.5 * hr)
        u[rows] = torch.where(ok.unsqueeze(-1), v, ur)
        t[rows] = torch.where(ok.unsqueeze(-1), tv, tr)
        took = torch.zeros(B, dtype=torch.bool)
        took[rows] = ok
        mon = sub.monitors(v, jv, tv)
        full = {k: torch.full((B,), float("nan"), dtype=start.dtype) for k in mon}
        for k, value in mon.items():
            full[k][rows] = value.to(start.dtype)
        points.append(u.clone())
        tangents.append(t.clone())
        monitors.append(full)
        accepted.append(took)
        count = count + took.long()
        failed = failed | (active & (h < options.ds_min))
        active = active & ~failed & _inside(u, options) & (count < options.max_steps)
    return _assemble(points, tangents, monitors, accepted, failed)


def _assemble(points, tangents, monitors, accepted, failed) -> Curve:
    """Pack the accepted points of every row to the front of [B, S, .] tensors, NaN after."""
    acc = torch.stack(accepted, 1)  # [B, T]
    order = torch.argsort((~acc).to(torch.int8), dim=1, stable=True)  # accepted first, in order
    length = acc.sum(1)
    S = int(length.max())
    keep = order[:, :S]

    def pack(x: Tensor) -> Tensor:
        idx = keep if x.dim() == 2 else keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        out = torch.gather(x, 1, idx)
        mask = torch.arange(S).unsqueeze(0) < length.unsqueeze(1)
        return torch.where(mask if x.dim() == 2 else mask.unsqueeze(-1), out, float("nan"))

    names = monitors[0].keys()
    return Curve(
        pack(torch.stack(points, 1)),
        pack(torch.stack(tangents, 1)),
        {k: pack(torch.stack([m[k] for m in monitors], 1)) for k in names},
        length,
        failed,
    )


@dataclass
class Located:
    """Points where a test function is zero: u [M, n+1], the tangent there, the monitors, and whether
    the search converged (the bracket shrank below ``tol`` or the test function hit zero)."""

    u: Tensor
    tangent: Tensor
    monitors: dict[str, Tensor]
    converged: Tensor
    rows: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def locate(
    problem: CurveProblem,
    curve: Curve,
    rows: Tensor,
    steps: Tensor,
    monitor: str,
    options: Options,
    iterations: int = 60,
    tol: float = 1e-14,
) -> Located:
    """Where ``monitor`` changes sign between points ``steps`` and ``steps + 1`` of curve ``rows``.

    Along the straight line from point a through its tangent, each trial length sigma is
    corrected back onto the curve (the same bordered Newton as a continuation step), and sigma is
    found by the Illinois variant of regula falsi, which keeps a bracket: linear convergence is
    impossible to lose, superlinear is the rule. All brackets are searched at once.
    """
    sub = problem.take(rows)
    ua, ta = curve.points[rows, steps], curve.tangents[rows, steps]
    ub = curve.points[rows, steps + 1]
    fa, fb = curve.monitors[monitor][rows, steps], curve.monitors[monitor][rows, steps + 1]
    sa = torch.zeros_like(fa)
    sb = (ta * (ub - ua)).sum(-1)
    side = torch.zeros_like(fa)
    found = torch.zeros_like(fa, dtype=torch.bool)
    s_found = torch.zeros_like(fa)
    for _ in range(iterations):
        s = torch.where(fb != fa, (sa * fb - sb * fa) / (fb - fa), 0.5 * (sa + sb))
        inside = torch.isfinite(s) & (s > torch.minimum(sa, sb)) & (s < torch.maximum(sa, sb))
        s = torch.where(inside, s, 0.5 * (sa + sb))
        s = torch.where(found, s_found, s)  # a row that has converged keeps its point
        anchor = ua + s.unsqueeze(-1) * ta
        u, jac, _, _ = correct(sub, anchor, ta, anchor, options)
        t = tangent(jac, ta)
        mon = sub.monitors(u, jac, t)
        f = mon[monitor]
        same_as_a = torch.sign(f) == torch.sign(fa)
        # Illinois: halve the kept end's value when the same end is replaced twice running.
        fb = torch.where(same_as_a & (side == 1), 0.5 * fb, fb)
        fa = torch.where(~same_as_a & (side == -1), 0.5 * fa, fa)
        sa, fa = torch.where(same_as_a, s, sa), torch.where(same_as_a, f, fa)
        sb, fb = torch.where(same_as_a, sb, s), torch.where(same_as_a, fb, f)
        side = torch.where(same_as_a, 1.0, -1.0)
        newly = ~found & (((sb - sa).abs() <= tol) | (f == 0))
        s_found = torch.where(newly, s, s_found)
        found = found | newly
        if bool(found.all()):
            break
    return Located(u, t, mon, found, rows)
