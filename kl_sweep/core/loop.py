"""The batched fit loop: first-order steps until each row has chosen its basin, then the polish.

One loop for every objective: the 1-D :class:`~kl_sweep.core.objective.Objective` and the d > 1
:class:`~kl_sweep.core.reduction.ReducedObjective` answer the same questions (derivatives in theta
[B, P], where the divergence is finite, the bounds of a healthy theta), so no part of the loop
branches on the dimension.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from kl_sweep.core.general import GeneralObjective
from kl_sweep.core.mixture import gaussian_sigma2
from kl_sweep.core.objective import Objective
from kl_sweep.core.polish import (
    _forget,
    _keep_finite,
    _newton,
    _newton_step,
    _projected_norm,
    _pushed_to_edge,
    _settle,
)
from kl_sweep.core.problem import Problem, Result, Settings, Status, healthy, status_codes
from kl_sweep.core.reduction import REDUCIBLE, ReducedObjective, SharedPair


@torch.no_grad()  # every derivative is in closed form, or taken by autograd explicitly
def _stepwise(
    problems: Iterable[Problem], settings: Settings, capacity: int | None = None
) -> Iterator[Result]:
    """Fit a stream of problems step by step, all rows at work in one batch.

    With ``capacity`` None every problem starts at once. Otherwise the next problem joins the work
    whenever at most ``capacity // 2`` rows are still at work: the few slow rows of one problem (a
    start near a saddle can take hundreds of steps) then ride along with the next problem's rows
    instead of paying a whole step's fixed cost for a handful of rows.

    Problems join only at iterations where the handover check falls (multiples of
    ``check_every``), so every row takes exactly the steps it would take in a fit of its own:
    results do not depend on how a sweep is cut into problems or on what runs beside them.
    """
    pending = iter(problems)
    out = _Outputs()
    first = second = None
    exhausted, iteration, next_row = False, 0, 0
    while True:
        active = (len(first) if first else 0) + (len(second) if second else 0)
        if not active:
            iteration = 0  # nothing at work: the next problem starts a fresh schedule
        while (
            not exhausted
            and iteration % settings.check_every == 0
            and (capacity is None or active <= capacity // 2)
        ):
            problem = next(pending, None)
            if problem is None:
                exhausted = True
                break
            block, rows = _start(problem, settings, out, next_row)
            next_row = block.end
            first = rows if first is None else _Rows.concat(first, rows)
            if second is None:
                second = rows.subset(torch.zeros(len(rows), dtype=torch.bool))
            active += len(rows)
        while out.blocks and out.blocks[0].remaining == 0:
            yield out.blocks.pop(0).result(settings)
        if not active:
            if exhausted:
                return
            continue
        check = settings.polish and iteration % settings.check_every == 0
        first, to_newton = _first_order_step(first, settings, out, check)
        second, to_first = _newton_step(second, settings, out)
        first, second = _Rows.concat(first, to_first), _Rows.concat(second, to_newton)
        iteration += 1


def _start(problem: Problem, settings: Settings, out: _Outputs, first_row: int) -> tuple[_Block, _Rows]:
    """A problem's block of outputs and its rows, numbered from ``first_row``, ready to step."""
    theta0, objective = _initial(problem, settings)
    B = theta0.shape[0]
    block = _Block(problem, theta0, first_row)
    out.blocks.append(block)
    nan = torch.full((B,), float("nan"), dtype=theta0.dtype)
    steps = torch.zeros(B, dtype=torch.long)
    rows = _Rows(
        rows=torch.arange(first_row, first_row + B),
        theta=theta0,
        objective=objective,
        lr=problem.lr,
        max_steps=problem.max_steps,
        tol=problem.tol,
        steps=steps,
        state={
            **settings.optimizer.init_state(theta0),
            "damp": torch.ones(B, dtype=theta0.dtype),
            "restart": torch.full((B,), torch.inf, dtype=theta0.dtype),
            "landed": torch.zeros(B, dtype=torch.bool),
            "handed": torch.full_like(theta0, float("nan")),
        },
        best=torch.full((B,), float("inf"), dtype=theta0.dtype),
        kept={"theta": theta0.clone(), "loss": nan, "grad": nan.clone(), "steps": steps.clone()},
    )
    if settings.divergence.alpha_of is not None:
        # A start where the divergence is infinite has no fit: it is reported as such, loss +inf.
        start = objective.finite(theta0)
        if not start.all():
            rows.kept["loss"] = torch.where(start, rows.kept["loss"], torch.inf)
            out.finish(rows, status_codes((~start, Status.INFINITE)))
            rows = rows.subset(start)
    return block, rows


def _initial(
    problem: Problem, settings: Settings
) -> tuple[Tensor, Objective | ReducedObjective | GeneralObjective]:
    """theta0 [B, P] and the objective: (mu, log sigma) in 1-D, the family's parameters of
    N(init_mu u, init_sigma2 I) in d > 1."""
    if problem.family is None:
        theta0 = torch.stack([problem.init_mu, 0.5 * torch.log(problem.init_sigma2)], -1)
        objective = Objective.build(
            settings.divergence, settings.estimator, problem.mixture, theta0, problem.alpha
        )
        return theta0, objective
    target, family = problem.target, problem.family
    theta0 = start_in_family(problem)
    if isinstance(target, SharedPair) and settings.divergence.name in REDUCIBLE:
        make = ReducedObjective.build
    else:  # a general target, or Jensen-Shannon: integrated in R^d
        make = GeneralObjective.build
        target = target.as_mixture() if isinstance(target, SharedPair) else target
    return theta0, make(settings.divergence, settings.estimator, target, family, problem.alpha)


def _first_order_step(
    group: _Rows, settings: Settings, out: _Outputs, check: bool
) -> tuple[_Rows, _Rows | None]:
    """Evaluate, retire finished rows, hand basin-bound rows to Newton, step the rest."""
    if not len(group):
        return group, None
    loss, grad, hess = group.objective.derivatives(group.theta, hessian=check)
    on_edge = _pushed_to_edge(group, grad)
    _settle(group, on_edge)
    gnorm = _projected_norm(grad, on_edge)
    finite = healthy(loss, grad, group.theta, group.objective.parameter_bounds(grad.dtype))
    group.keep_if(finite, loss, gnorm)
    if group.objective.trusted is not None:
        # An estimator that cannot see P breaks down like a blow-up: the row is marked diverged
        # at its starting point (which has finite values), and the sweep goes on.
        finite = finite & group.objective.trusted
    converged = finite & (gnorm <= group.tol)
    budget = finite & ~converged & (group.steps >= group.max_steps)
    leaving = converged | ~finite | budget
    to_newton = None
    if hess is not None:
        _, decrement, pd = _newton(grad, hess, on_edge)
        handover = finite & ~leaving & pd & (decrement <= settings.handover)
        # Not twice from the same point: a row the polish sent back to where it was handed over
        # would be handed over again, take the same steps and come back, for ever; it takes a
        # first-order step from there instead.
        handed = group.state["handed"]
        handover = handover & ~(group.theta == handed).all(-1)
        if handover.any():
            group.state["handed"] = torch.where(handover.unsqueeze(-1), group.theta, handed)
            to_newton = group.subset(handover)
            to_newton.best = torch.full_like(to_newton.best, float("inf"))
            leaving = leaving | handover
    if leaving.any():
        codes = status_codes(
            (converged, Status.CONVERGED), (~finite, Status.DIVERGED), (budget, Status.MAX_STEPS)
        )
        out.finish(group, codes)
        group, grad, loss = group.subset(~leaving), grad[~leaving], loss[~leaving]
        on_edge = None if on_edge is None else on_edge[~leaving]
    grad = _damped(group, grad, loss, on_edge)
    group.theta = _keep_finite(
        group, settings.optimizer.step(group.theta, grad, group.lr, group.state), first_order=True
    )
    group.steps = group.steps + 1
    return group, to_newton


#: A row with a outside [0, 1] restarts its first-order state each time 1 + D has fallen this
#: many times (a < 0: unless it is held on the edge).
RESTART_DROP = 10.0


def _damped(group: _Rows, grad: Tensor, loss: Tensor, on_edge: Tensor | None = None) -> Tensor:
    r"""The gradient the first-order update is fed: that of :math:`\log(1 + D)` for a outside [0, 1].

    There D grows like an exponential towards the edge of its finite region (3e7 nats at a = 2,
    sigma^2 = 1, two modes 2.8 apart), and Adam's second-moment estimate would remember such
    gradients for thousands of steps, stalling the fit. :math:`\log(1 + D)` has the same
    stationary points and minima; convergence is still judged on D's own gradient.

    For a > 1 even that gradient falls a hundredfold from a start on the wall to the basin (D from
    1e7 to 1 at a = 2), and Adam's memory of it made the fits three to six times longer: such a row
    restarts Adam (its moments and step count) each time 1 + D has fallen :data:`RESTART_DROP`-fold
    since its last start. So does a row with a < 0 (alpha -3's fits: 120 steps on average without,
    45 with), except while it is held on the edge (``on_edge``), where it solves a problem in mu
    alone and its moments already started afresh (:func:`~kl_sweep.core.polish._settle`). The
    steps change, not the stationary points: on the test grids every row ends in the same minimum
    as without the restarts (``benchmarks/registry_throughput.py``).
    """
    objective = group.objective
    if objective.divergence.alpha_of is None or not len(group):
        return grad
    a = objective.divergence.orders(objective.alpha, len(group), grad.dtype)
    fed = 1.0 + loss.clamp_min(0.0)
    steep = (a < 0.0) | (a > 1.0)
    restart = group.state.get("restart")
    if restart is not None:
        drop = (steep if on_edge is None else steep & ~on_edge) & (fed * RESTART_DROP <= restart)
        if drop.any():
            _forget(group, drop & (restart < torch.inf))
            group.state["restart"] = torch.where(drop, fed, restart)
    return torch.where(steep.unsqueeze(-1), grad / fed.unsqueeze(-1), grad)


@dataclass
class _Rows:
    """A group of rows being optimised, with their slices of everything a step needs."""

    rows: Tensor
    theta: Tensor
    objective: Objective
    lr: Tensor
    max_steps: Tensor
    tol: Tensor
    steps: Tensor
    state: dict[str, Tensor]
    #: Smallest gradient norm seen since the row entered the Newton group.
    best: Tensor
    #: What a row reports if it stops now: its last finite (first order) or best (Newton) point.
    kept: dict[str, Tensor]

    FIELDS = ("rows", "theta", "lr", "max_steps", "tol", "steps", "best")

    def __len__(self) -> int:
        return self.rows.numel()

    def subset(self, keep: Tensor) -> _Rows:
        if keep.dtype == torch.bool:
            keep = keep.nonzero().squeeze(-1)  # once: a boolean index would be searched per field
        return _Rows(
            objective=self.objective.subset(keep),
            state={k: v[keep] for k, v in self.state.items()},
            kept={k: v[keep] for k, v in self.kept.items()},
            **{f: getattr(self, f)[keep] for f in self.FIELDS},
        )

    def keep_if(self, mask: Tensor, loss: Tensor, gnorm: Tensor) -> None:
        """Make the current point what these rows report, where ``mask`` holds."""
        k = self.kept
        if mask.all():  # the common case, in fewer operations (none of these is changed in place)
            k["theta"], k["loss"], k["grad"], k["steps"] = self.theta, loss, gnorm, self.steps
            return
        k["theta"] = torch.where(mask.unsqueeze(-1), self.theta, k["theta"])
        k["loss"] = torch.where(mask, loss, k["loss"])
        k["grad"] = torch.where(mask, gnorm, k["grad"])
        k["steps"] = torch.where(mask, self.steps, k["steps"])

    @staticmethod
    def concat(a: _Rows, b: _Rows | None) -> _Rows:
        if b is None or not len(b):
            return a
        if not len(a):
            return b
        return _Rows(
            objective=type(a.objective).concat(a.objective, b.objective),
            state={k: torch.cat([a.state[k], b.state[k]]) for k in a.state},
            kept={k: torch.cat([a.kept[k], b.kept[k]]) for k in a.kept},
            **{f: torch.cat([getattr(a, f), getattr(b, f)]) for f in _Rows.FIELDS},
        )


class _Block:
    """Full-size result tensors of one problem of a stream, written once per row, when it finishes."""

    def __init__(self, problem: Problem, theta0: Tensor, start: int):
        B = theta0.shape[0]
        nan = torch.full((B,), float("nan"), dtype=theta0.dtype)
        self.problem, self.start, self.end, self.remaining = problem, start, start + B, B
        self.theta, self.loss, self.grad = theta0.clone(), nan, nan.clone()
        self.steps = torch.zeros(B, dtype=torch.long)
        self.status = torch.full((B,), int(Status.RUNNING), dtype=torch.long)

    def result(self, settings: Settings) -> Result:
        problem, theta = self.problem, self.theta
        if problem.family is not None:
            mu, sigma2 = along_u(problem, theta)
            return Result(mu, sigma2, self.loss, self.grad, self.steps, self.status, None, theta)
        on_boundary = None
        if settings.divergence.alpha_of is not None:
            _, hi, closed = settings.divergence.bounds(problem.mixture, theta[:, 0], problem.alpha)
            on_boundary = (theta[:, 1] == hi) & closed
        sigma2 = gaussian_sigma2(theta[:, 1])
        return Result(theta[:, 0], sigma2, self.loss, self.grad, self.steps, self.status, on_boundary)


def start_in_family(problem: Problem) -> Tensor:
    """d > 1: theta0 [B, P], the family's parameters of Q = N(init_mu u, init_sigma2 I)."""
    return problem.family.initial(problem.init_mu.unsqueeze(-1) * problem.target.u, problem.init_sigma2)


def along_u(problem: Problem, theta: Tensor) -> tuple[Tensor, Tensor]:
    """d > 1: (u^T mean, u^T S u) [B] of Q at the family's theta [B, P], what a row reports as mu
    and sigma2."""
    mean, L = problem.family.scale_tril(theta)
    u = problem.target.u
    mu, root = mean @ u, L.transpose(-1, -2) @ u
    return mu, (root * root).sum(-1)


class _Outputs:
    """The blocks at work, each row's results routed to its own block by its global row number."""

    def __init__(self) -> None:
        self.blocks: list[_Block] = []

    def finish(self, group: _Rows, status: Tensor) -> None:
        """Write out the rows of ``group`` whose ``status`` [b] (a :class:`Status` code) is not RUNNING."""
        mask = status != Status.RUNNING
        if not mask.any():
            return
        rows, k = group.rows[mask], group.kept
        codes = status[mask]
        theta, loss, grad, steps = k["theta"][mask], k["loss"][mask], k["grad"][mask], k["steps"][mask]
        for block in self.blocks:  # over the few blocks at work, not over rows
            here = (rows >= block.start) & (rows < block.end)
            n = int(here.sum())
            if not n:
                continue
            local = rows[here] - block.start
            block.theta[local], block.loss[local], block.grad[local] = theta[here], loss[here], grad[here]
            block.steps[local], block.status[local] = steps[here], codes[here]
            block.remaining -= n
