"""The Newton polish: full Newton steps on rows that have chosen their basin, and the constrained
steps along the edge of the alpha family's finite region (KKT points)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kl_sweep.core.optim import newton
from kl_sweep.core.problem import Settings, Status, healthy, status_codes

if TYPE_CHECKING:
    from kl_sweep.core.loop import _Outputs, _Rows
    from kl_sweep.core.reduction import ReducedObjective


def _newton_step(group: _Rows, settings: Settings, out: _Outputs) -> tuple[_Rows, _Rows | None]:
    """One Newton iteration on the polish group.

    A row stops once its gradient norm is at most ``tol`` and one more Newton step no longer
    lowers it: quadratic convergence makes that last step take the error from ``tol`` down to
    rounding level, which is what lets converged fits match closed forms to 1e-8 relative. A row
    whose Hessian stops being positive definite (it was near a fold of the landscape), or (for a
    pointwise member) whose gradient a step made worse, goes back to the first-order group from its
    best point.
    """
    if not len(group):
        return group, None
    loss, grad, hess = group.objective.derivatives(group.theta, hessian=True)
    on_edge = _pushed_to_edge(group, grad)
    _settle(group, on_edge)
    gnorm = _projected_norm(grad, on_edge)
    step, _, pd = _newton(grad, hess, on_edge)
    finite = healthy(loss, grad, group.theta, group.objective.parameter_bounds(grad.dtype))
    better = finite & (gnorm < group.best)
    group.keep_if(better, loss, gnorm)
    group.best = torch.where(better, gnorm, group.best)
    converged = group.best <= group.tol
    done = converged & ~better
    budget = ~done & (group.steps >= group.max_steps)
    ending = done | budget
    if ending.any():
        finished = done | (budget & converged)
        out.finish(group, status_codes((finished, Status.CONVERGED), (budget & ~converged, Status.MAX_STEPS)))
    # For a pointwise member, a step that made the gradient worse than the best point's means the
    # quadratic model does not hold here (Jensen-Shannon's flat tails can make full steps cycle for
    # ever): the row goes back to the first-order phase from its best point. Along an edge, where
    # the loss can be far from quadratic, the step is taken back and the next one halved instead.
    worse = finite & ~converged & (gnorm > group.best)
    off_edge = worse if on_edge is None else worse & ~on_edge
    off_edge = off_edge & group.objective.divergence.pointwise
    retreat = ~done & ~budget & (~finite | ~pd | off_edge)
    worse = worse & on_edge if on_edge is not None else torch.zeros_like(worse)
    damp = group.state.get("damp")
    if damp is not None:
        group.state["damp"] = torch.where(better, 1.0, torch.where(worse, 0.5 * damp, damp))
    to_first = None
    if retreat.any():
        to_first = group.subset(retreat)
        to_first.theta = to_first.kept["theta"].clone()
    keep = ~(ending | retreat)
    if not keep.all():
        group, step, worse = group.subset(keep), step[keep], worse[keep]
    # Cap the step at one e-fold of sigma, or that many sigmas of mu.
    step = step / step.abs().max(-1, keepdim=True).values.clamp_min(1.0)
    if "damp" in group.state:
        step = step * group.state["damp"].unsqueeze(-1)
    proposed = torch.where(worse.unsqueeze(-1), group.kept["theta"], group.theta + step)
    group.theta = _keep_finite(group, proposed)
    group.steps = group.steps + 1
    return group, to_first


# --- the edge of the finite region (alpha outside [0, 1]) ---------------------------------------


def _pushed_to_edge(group: _Rows, grad: Tensor) -> Tensor | None:
    """Rows on a finite edge (log sigma = its upper bound) whose gradient pushes outward.

    There the optimum is constrained: the KKT conditions are a zero gradient along the edge (in
    mu) and an outward-pointing descent direction, d loss / d log sigma < 0.
    """
    if not group.objective.has_edges or not len(group):
        return None
    _, hi, closed = group.objective.bounds(group.theta[:, 0])
    return (group.theta[:, 1] == hi) & closed & (grad[:, 1] < 0)


#: Entries of a row's state that belong to the loop, not to the first-order optimizer: a restart
#: of the optimizer (:func:`_forget`) leaves them be.
LOOP_STATE = ("damp", "restart", "landed", "handed")


def _forget(group: _Rows, rows: Tensor) -> None:
    """Restart the first-order optimizer (its moments and step count) on ``rows`` [b] (boolean)."""
    for key, value in group.state.items():
        if key not in LOOP_STATE:
            value[rows] = 0


def _settle(group: _Rows, on_edge: Tensor | None) -> None:
    """Restart the first-order state of rows held on the edge they have just arrived at.

    A row whose first-order step takes it onto the edge (``_keep_finite`` marks it as landed) and
    is held there solves a problem in mu alone from then on: its moments, which remember the steep
    way in, are dropped.
    That is decided where the gradient at the edge is known, not on landing: a row whose gradient
    there points back inside is not held, and its moments are what carry it along the edge and
    keep it from leaving; dropped, its next step would be a full ``lr`` in each coordinate (Adam's
    first), off the edge and back onto the same point, a cycle without end. A landed row that is
    no longer on the edge forgets that it landed.
    """
    landed = group.state.get("landed")
    if on_edge is None or landed is None or not landed.any():
        return
    held = landed & on_edge
    if held.any():
        _forget(group, held)
    _, hi, _ = group.objective.bounds(group.theta[:, 0])
    group.state["landed"] = landed & ~on_edge & (group.theta[:, 1] == hi)


def _projected_norm(grad: Tensor, on_edge: Tensor | None) -> Tensor:
    """|grad|, or |d/d mu| alone on rows held by the edge."""
    norm = torch.linalg.vector_norm(grad, dim=-1)  # what grad.norm(dim=-1) calls, without its wrapper
    return norm if on_edge is None else torch.where(on_edge, grad[:, 0].abs(), norm)


def _newton(grad: Tensor, hess: Tensor, on_edge: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The Newton step; on rows held by the edge, along the edge only (in mu, log sigma fixed)."""
    step, decrement, pd = newton(grad, hess)
    if on_edge is None or not on_edge.any():
        return step, decrement, pd
    h = hess[:, 0, 0]
    ok = h > 0
    edge_step = -grad[:, 0] / torch.where(ok, h, 1.0)
    edge = torch.stack([edge_step, torch.zeros_like(edge_step)], -1)
    step = torch.where(on_edge.unsqueeze(-1), edge, step)
    decrement = torch.where(on_edge, -edge_step * grad[:, 0], decrement)
    return step, decrement, torch.where(on_edge, ok, pd)


#: Halvings of a step that would leave the finite region before the row stays where it is.
MAX_HALVINGS = 60


def _keep_finite(group: _Rows, theta: Tensor, first_order: bool = False) -> Tensor:
    """The proposed ``theta``, kept where the divergence is finite: never a step outside.

    Past a closed edge (a < 0, mu between the widest modes) log sigma is set on the edge, and the
    row's first-order state restarts (``first_order``: once it is held there, see
    :func:`_settle`); towards an open one (a > 1) it goes halfway to it; a step that still lands
    where the divergence is infinite is halved until it does not.
    """
    objective = group.objective
    if objective.divergence.alpha_of is None or not len(group):
        return theta
    old = group.theta
    if not objective.has_edges:
        return _halved_into(objective, old, theta)
    lo, hi, _ = objective.bounds(theta[:, 0])
    log_sigma = torch.where(theta[:, 1] <= lo, 0.5 * (old[:, 1] + lo), theta[:, 1])
    landing = (log_sigma >= hi) & (old[:, 1] < hi)
    if landing.any():
        # A row that reaches the edge may now solve a problem in mu alone, and its first-order
        # state (Adam's moments, remembering the steep way in) starts afresh: in the polish at once,
        # in the first-order phase once it is held there (_settle).
        if first_order and "landed" in group.state:
            group.state["landed"] = group.state["landed"] | landing
        else:
            _forget(group, landing)
            if "landed" in group.state:
                group.state["landed"] = group.state["landed"] & ~landing
    theta = torch.stack([theta[:, 0], torch.minimum(log_sigma, hi)], -1)
    for _ in range(MAX_HALVINGS):  # over halvings, not over rows
        bad = ~objective.divergence.finite(objective.mixture, theta[:, 0], theta[:, 1], objective.alpha)
        bad = bad & torch.isfinite(theta).all(-1)
        if not bad.any():
            return theta
        theta = torch.where(bad.unsqueeze(-1), old + 0.5 * (theta - old), theta)
    return torch.where(bad.unsqueeze(-1), old, theta)


def _halved_into(objective: ReducedObjective, old: Tensor, theta: Tensor) -> Tensor:
    """``theta``, each row's step halved until the divergence is finite there (d > 1: no edges)."""
    for _ in range(MAX_HALVINGS):  # over halvings, not over rows
        bad = ~objective.finite(theta) & torch.isfinite(theta).all(-1)
        if not bad.any():
            return theta
        theta = torch.where(bad.unsqueeze(-1), old + 0.5 * (theta - old), theta)
    return torch.where(bad.unsqueeze(-1), old, theta)
