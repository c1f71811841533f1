"""The batched fit: first-order steps until each row has chosen its basin, then a Newton polish.

A row leaves the first-order phase when its gradient norm is at most ``tol`` (converged), when its
loss or gradient stops being finite (diverged: it keeps its last finite values), when its
``max_steps`` run out, or, with the polish on, when its Hessian is positive definite and its
Newton decrement is below ``handover`` (the quadratic model says it is in a minimum's basin).
Finished rows are dropped from the working set, so they stop costing work. The polish then takes
full Newton steps on the 2x2 Hessians until the gradient norm is at most ``tol``: a fixed-rate
first-order method only hovers around the optimum, Newton converges quadratically to it.

:func:`fit_stream` runs a sequence of problems (a sweep's chunks) through the same loop, taking
on the next one while the last few rows of the one before are still at work.

This module's loop (:func:`_stepwise`) is the reference and runs every other fit. Fits with Adam
on the Quadrature rule (:func:`fused`: every 1-D divergence of the registry, and in d > 1 the
reverse KL against a shared-covariance pair, :func:`reduced_natively`) run the same rules whole,
row by row, in the native kernel (:mod:`kl_sweep.core.native`), whose one fit loop takes any number
of parameters.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import fields, replace

import torch

from kl_sweep.core import native
from kl_sweep.core.divergences import NATIVE_TERMS, native_member, native_rule
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.loop import _stepwise, along_u, start_in_family
from kl_sweep.core.mixture import gaussian_sigma2
from kl_sweep.core.objective import TRUSTED_MASS, Objective, in_moment_form
from kl_sweep.core.optim import Adam
from kl_sweep.core.problem import MAX_ABS_LOG_SIGMA, MAX_ABS_MU, Problem, Result, Settings, Status
from kl_sweep.core.reduction import SharedPair, entries

__all__ = [
    "MAX_ABS_LOG_SIGMA",
    "MAX_ABS_MU",
    "TRUSTED_MASS",
    "Objective",
    "Problem",
    "Result",
    "Settings",
    "Status",
    "fit",
    "fit_stream",
    "fused",
    "in_moment_form",
    "reduced_natively",
]


def fit(problem: Problem, settings: Settings) -> Result:
    """Fit Q to P for every row of ``problem`` at once; see the module docstring for the rules."""
    return next(fit_stream([problem], settings))


def fit_stream(
    problems: Iterable[Problem], settings: Settings, capacity: int | None = None
) -> Iterator[Result]:
    """Fit a stream of problems, yielding each one's :class:`Result` in order as it completes.

    Where :func:`fused` holds, each problem is fitted whole in the native kernel; otherwise by
    :func:`_stepwise`, which ``capacity`` is for.
    """
    if getattr(settings.estimator, "resample", False):  # stochastic VI: fresh draws every step
        from kl_sweep.core.stochastic import Practice, fit_stochastic

        for problem in problems:
            yield fit_stochastic(problem, settings, settings.practice or Practice())
        return
    if not fused(settings):
        yield from _bounded(problems, settings, capacity)
        return
    for problem in problems:
        kernel = _kernel_for(problem, settings)
        if kernel is None:
            yield from _bounded([problem], settings, capacity)
        else:
            yield kernel(problem, settings)


def _kernel_for(problem: Problem, settings: Settings):
    """The native kernel's whole fit of ``problem`` (:func:`fused` holds), or None where the torch
    loop fits it: d > 1 other than the reverse KL against a shared-covariance pair, or a
    pointwise 1-D fit against more than two components."""
    if problem.family is not None:
        ok = reduced_natively(settings) and isinstance(problem.target, SharedPair)
        return _fused_reduced_fit if ok else None
    if settings.divergence.native != "forward_moments" and problem.mixture.means.shape[-1] != 2:
        return None
    return _fused_fit


#: Hessian entries of a block of d > 1 rows (240 MB of float64). With the next block joining when
#: half the rows are done, at most 1.5 blocks are at work, and the Hessians' temporaries (about
#: five copies at a check) stay near 2 GB: a full Q in d = 20 (P = 230) runs 567 rows a block.
HESSIAN_BUDGET = 30_000_000


def _bounded(problems: Iterable[Problem], settings: Settings, capacity: int | None) -> Iterator[Result]:
    """:func:`_stepwise` on a stream, d > 1 problems cut into blocks of at most
    :data:`HESSIAN_BUDGET` Hessian entries, at most 1.5 blocks at work; one result per problem."""
    problems = iter(problems)
    first = next(problems, None)
    if first is None:
        return
    if first.family is not None:  # a stream's problems share their family (one sweep group)
        P = first.family.n_params
        size = max(1, HESSIAN_BUDGET // (P * P))
        capacity = size if capacity is None else min(capacity, size)
    counts: deque[int] = deque()
    results = _stepwise(_pieces(itertools.chain([first], problems), counts), settings, capacity)
    while True:
        head = next(results, None)
        if head is None:
            return
        parts = [head] + [next(results) for _ in range(counts.popleft() - 1)]
        yield parts[0] if len(parts) == 1 else _joined(parts)


def _pieces(problems: Iterable[Problem], counts: deque[int]) -> Iterator[Problem]:
    """Each problem, cut into row blocks where its Hessians would exceed :data:`HESSIAN_BUDGET`;
    ``counts`` gets the number of blocks of each problem, in order."""
    for problem in problems:
        B = problem.init_mu.shape[0]
        P = 2 if problem.family is None else problem.family.n_params
        size = max(1, HESSIAN_BUDGET // (P * P))
        blocks = [torch.arange(i, min(i + size, B)) for i in range(0, B, size)] if B > size else []
        counts.append(max(1, len(blocks)))
        if not blocks:
            yield problem
        for index in blocks:  # over blocks of rows, each fitted as a batch
            yield _rows_of(problem, index)


def _rows_of(problem: Problem, index: torch.Tensor) -> Problem:
    def take(x):
        return None if x is None else x[index]

    return replace(
        problem,
        mixture=problem.mixture[index],
        init_mu=problem.init_mu[index],
        init_sigma2=problem.init_sigma2[index],
        lr=problem.lr[index],
        max_steps=problem.max_steps[index],
        tol=problem.tol[index],
        alpha=take(problem.alpha),
        target=take(problem.target),
    )


def _joined(parts: list[Result]) -> Result:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return Result(*(cat(f.name) for f in fields(Result)))


def fused(settings: Settings) -> bool:
    """True when whole fits run in the native kernel, with Adam: every divergence of the registry on
    the Quadrature rule for two-component mixtures in one dimension (the reverse KL by
    :func:`kl_sweep.core.native.reverse_fit`, the alpha family and Jensen-Shannon by
    :func:`~kl_sweep.core.native.pointwise_fit`), and a divergence in moment form (the forward KL,
    any estimator whose nodes do not move with Q, by :func:`~kl_sweep.core.native.moment_fit`).

    The kernel takes the same steps as :func:`_stepwise` by the same rules, on the same
    derivatives (the same functions in ``kl.c`` serve both; the moment form's are the same
    formulas), with the same finite region and edges for the alpha family. Its Adam and Newton
    updates are written in C, so a row's bits can differ from the stepwise path's by rounding
    (another ``expm1``, fused multiply-adds): a few steps more or fewer near the tolerance, the same
    minimum.
    """
    div, est = settings.divergence, settings.estimator
    on_rule = type(est) is Quadrature and (div.native == "reverse_kl" or div.native in NATIVE_TERMS)
    return (
        settings.fused
        and type(settings.optimizer) is Adam
        and (on_rule or in_moment_form(div, est))
        and native.available()
    )


def _options(problem: Problem, settings: Settings) -> native.FitOptions:
    opt = settings.optimizer
    return native.FitOptions(
        problem.lr,
        problem.max_steps,
        problem.tol,
        (opt.beta1, opt.beta2, opt.eps),
        settings.polish,
        settings.handover,
        settings.check_every,
    )


def reduced_natively(settings: Settings) -> bool:
    """True when d > 1 fits against two components with a shared covariance run whole in the
    native kernel (:func:`_fused_reduced_fit`): the reverse KL on the Quadrature rule, with Adam.
    Every other d > 1 fit takes the torch loop."""
    return (
        fused(settings)
        and settings.divergence.native == "reverse_kl"
        and type(settings.estimator) is Quadrature
    )


@torch.no_grad()
def _fused_fit(problem: Problem, settings: Settings) -> Result:
    theta0 = torch.stack([problem.init_mu, 0.5 * torch.log(problem.init_sigma2)], -1)
    options = _options(problem, settings)
    div, on_boundary = settings.divergence, None
    if div.native == "reverse_kl":
        out = native.reverse_fit(theta0, problem.mixture, native_rule(settings.estimator), options)
    elif div.native in NATIVE_TERMS:
        member = native_member(div, problem.mixture, problem.alpha, theta0.shape[0])
        out = native.pointwise_fit(theta0, problem.mixture, native_rule(settings.estimator), member, options)
        if member.region is not None:  # held on the closed edge of the finite region (a < 0)
            _, hi, left, right = member.region
            mu, log_sigma = out.theta[:, 0], out.theta[:, 1]
            on_boundary = (log_sigma == hi) & (left < mu) & (mu < right)
    else:
        objective = Objective.build(div, settings.estimator, problem.mixture, theta0)
        out = native.moment_fit(theta0, objective.moments, replace(options, trusted=objective.trusted))
    mu, log_sigma = out.theta[:, 0], out.theta[:, 1]
    sigma2 = gaussian_sigma2(log_sigma)
    return Result(mu, sigma2, out.loss, out.grad_norm, out.steps, out.status, on_boundary)


@torch.no_grad()
def _fused_reduced_fit(problem: Problem, settings: Settings) -> Result:
    """d > 1, the reverse KL against two components with a shared covariance: whole fits in the
    native kernel (:func:`~kl_sweep.core.native.reduced_fit`), the derivatives those of
    :meth:`~kl_sweep.core.reduction.ReducedObjective._reverse_derivatives`, by the same fit rules."""
    target, family = problem.target, problem.family
    theta0 = start_in_family(problem)
    alpha, beta = target.precision_parts()
    reduction = native.Reduction(
        family.name,
        family.dim,
        entries(family),
        family.log_scale_mask(),
        target.projection(),
        target.center,
        alpha,
        beta,
        target.log_det_cov(),
    )
    out = native.reduced_fit(
        theta0, target.line(), native_rule(settings.estimator), reduction, _options(problem, settings)
    )
    mu, sigma2 = along_u(problem, out.theta)
    return Result(mu, sigma2, out.loss, out.grad_norm, out.steps, out.status, None, out.theta)
