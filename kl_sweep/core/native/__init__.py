"""Fused C kernels for the fit's hot path, compiled on first use and called through ctypes.

The torch path evaluates a divergence's derivatives in some twenty passes over [rows, nodes]
float64 tensors per step: memory traffic, not arithmetic. The kernels in ``kl.c`` make one pass
per row, with the same rules and formulas, and agree with the torch path to about 1e-14 (tests
check both against scipy). One node loop serves every integrand and one fit loop every
derivatives function (see ``kl.c``):

- :func:`reverse_kl` and :func:`pointwise`: the fit derivatives of the reverse KL and of a
  pointwise member (the alpha family, Jensen-Shannon), used by
  :class:`kl_sweep.core.objective.Objective` for the Quadrature estimator;
- :func:`reverse_fit`, :func:`pointwise_fit` and :func:`moment_fit`: whole fits of them and of a
  divergence in moment form (the forward KL), with Adam and the Newton polish, each row from start
  to finish in the kernel, used by :func:`kl_sweep.core.fit.fit_stream`: the same steps as its
  torch state machine, without its hundred small torch operations an iteration;
- :func:`reduced_fit`: the same fit loop in d > 1, in Q's family's parameters, on the reverse KL's
  reduction to 1-D (:mod:`kl_sweep.core.reduction`) against two components with a shared covariance;
- :func:`kl_pair` and :func:`pointwise_value`: the values a result row reports, both KLs and the
  alpha family's (:func:`kl_sweep.core.divergences.kl_pair_exact`, ``divergence_exact``);
- :func:`stochastic_fit`: whole stochastic fits (fresh Monte Carlo draws every step, issue 25) of
  every divergence, for :func:`kl_sweep.core.stochastic.fit_stochastic`, any number of components.

All need :func:`available`, and all but :func:`moment_fit` and :func:`stochastic_fit` a
two-component P; otherwise the torch path runs.

A row's bits depend on its own inputs only, whichever batch it is in and however many threads
run: the rows are shared among torch's own OpenMP threads (``torch.get_num_threads()``), each
computing whole rows.

Set ``KL_SWEEP_NATIVE=0`` to use the torch path everywhere (results then differ in the last
bits, about 1e-14, from a run with the kernel).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
from torch import Tensor

from kl_sweep.core.mixture import Mixture
from kl_sweep.core.native.toolchain import load

log = logging.getLogger(__name__)

#: Rows below which one thread does a call alone (waking the team costs more than it saves).
MIN_PARALLEL_ROWS = 256
#: The same for whole fits (a row takes from one to thousands of steps of about 0.5 us).
MIN_PARALLEL_FITS = 8
#: ... and for whole fits in moment form (steps of some 20 ns).
MIN_PARALLEL_MOMENT_FITS = 256


def enabled() -> bool:
    """False when ``KL_SWEEP_NATIVE`` is 0, false or no."""
    return os.environ.get("KL_SWEEP_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


@cache
def _library() -> ctypes.CDLL | None:
    lib, reason = load("kl")
    if lib is None:
        log.warning("native kernel unavailable (%s): fits take the torch path, about 10x slower", reason)
        return None
    p, i, n, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_ssize_t, ctypes.c_double
    lib.reverse_kl.argtypes = [n, n, i, p, p, p, p, p, p, i, p, i, p, d, i, p, p, i, p, p, p]
    lib.reverse_kl.restype = None
    lib.kl_pair.argtypes = [n, n, i, p, p, p, p, p, p, i, p, i, p, d, i, p, p, p, p]
    lib.kl_pair.restype = None
    fit_tail = [p, p, p, p, d, d, d, i, d, i, p, p, p, p, p]
    lib.reverse_fit.argtypes = [n, n, i, p, p, p, p, p, p, i, p, i, p, d, i, p, p, *fit_tail]
    lib.reverse_fit.restype = None
    reduced = [i, i, i, p, p, p, p, p, p, p, i, p]
    lib.reduced_fit.argtypes = [n, n, i, p, p, p, p, p, p, i, p, i, p, d, i, p, p, *reduced, *fit_tail]
    lib.reduced_fit.restype = None
    lib.moment_fit.argtypes = [n, n, p, p, p, p, p, p, *fit_tail]
    lib.moment_fit.restype = None
    lib.forward_moments.argtypes = [n, n, i, p, p, p, p, p, i, p, i, p, d, i, p, p, p, p, p, p, p]
    lib.forward_moments.restype = None
    member = [i, p, p, d, i, p, d, p, p, p, p, p]
    lib.pointwise.argtypes = [n, n, i, p, p, p, p, p, p, i, p, i, p, d, i, p, p, *member, i, p, p, p]
    lib.pointwise.restype = None
    lib.pointwise_fit.argtypes = [n, n, i, p, p, p, p, p, p, i, p, i, p, d, i, p, p, *member, *fit_tail]
    lib.pointwise_fit.restype = None
    lib.pointwise_value.argtypes = [n, n, i, p, p, p, p, p, p, i, p, i, p, d, i, p, p, *member, p]
    lib.pointwise_value.restype = None
    u = [p, p, p, p]  # lo, hi, left, right
    lib.stochastic_fit.argtypes = [
        n, n, i, p, p, p, p, p, p, i, p, d, *u, i, i, p, p, p, d, d, d, i, d, d, i, p, p, p, p, p, p,
    ]  # fmt: skip
    lib.stochastic_fit.restype = None
    return lib


def available() -> bool:
    """True when the kernels are enabled and compiled (compiling them on the first call)."""
    return enabled() and _library() is not None


@dataclass(frozen=True)
class Rule:
    """The Quadrature rule's constants as the kernel takes them (see ``kl.c``)."""

    scale_offsets: Tensor
    switch_offsets: Tensor
    support: float
    nodes: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        args = (
            self.scale_offsets.numel(), self.scale_offsets.data_ptr(),
            self.switch_offsets.numel(), self.switch_offsets.data_ptr(), self.support,
            self.nodes.numel(), self.nodes.data_ptr(), self.weights.data_ptr(),
        )  # fmt: skip
        object.__setattr__(self, "args", args)  # the rule's arguments of kl.c's functions, once


@cache
def quadrature_rule(
    scale_offsets: tuple[float, ...], switch_offsets: tuple[float, ...], support: float, order: int
) -> Rule:
    """Panel edges at ``scale_offsets`` sds of Q and ``switch_offsets`` widths around each switch
    point, within ``support`` sds, with ``order`` Gauss-Legendre nodes a panel."""
    t, w = np.polynomial.legendre.leggauss(order)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Rule(f64(scale_offsets), f64(switch_offsets), float(support), f64(t), f64(w))


def _float64(tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """The tensors as contiguous float64 (themselves when they already are: the common case)."""
    return [
        x if x.dtype == torch.float64 and x.is_contiguous() else x.detach().to(torch.float64).contiguous()
        for x in tensors
    ]


def _run(kernel: str, min_rows: int, theta: Tensor, mixture: Mixture, rule: Rule, *tail) -> None:
    """Call ``kernel`` of ``kl.c`` on the rows of ``theta`` [B, 2] and of the two-component
    ``mixture`` (with its switch points, :meth:`Mixture.crossings`), with ``rule``."""
    switch_points, widths = mixture.crossings()
    arrays = _float64((theta, mixture.means, mixture.variances, mixture.log_weights, switch_points, widths))
    getattr(_library(), kernel)(
        theta.shape[0], min_rows, switch_points.shape[-1], *(x.data_ptr() for x in arrays), *rule.args, *tail
    )  # the arrays stay alive until the call returns


def reverse_kl(
    theta: Tensor, mixture: Mixture, rule: Rule, hessian: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reverse KL [B], gradient [B, 2] and Hessian [B, 2, 2] (or None) in theta = (mu, log sigma) [B, 2],
    for a two-component P; ``rule`` is the Quadrature estimator's for Q's cover (:func:`quadrature_rule`)."""
    B = theta.shape[0]
    loss = torch.empty(B, dtype=torch.float64)
    grad = torch.empty(B, 2, dtype=torch.float64)
    hess = torch.empty(B, 2, 2, dtype=torch.float64) if hessian else None
    outputs = (loss.data_ptr(), grad.data_ptr(), 0 if hess is None else hess.data_ptr())
    _run("reverse_kl", MIN_PARALLEL_ROWS, theta, mixture, rule, int(hessian), *outputs)
    return loss, grad, hess


@dataclass(frozen=True)
class Fits:
    """What each row of a whole fit reports: its kept point and how it ended."""

    theta: Tensor
    loss: Tensor
    grad_norm: Tensor
    steps: Tensor
    #: A :class:`kl_sweep.core.fit.Status` number per row.
    status: Tensor


@dataclass(frozen=True)
class FitOptions:
    """A whole fit's optimiser, per row and shared (kl_sweep.core.fit.Problem and Settings)."""

    lr: Tensor
    max_steps: Tensor
    tol: Tensor
    #: Adam's (beta1, beta2, eps).
    adam: tuple[float, float, float]
    polish: bool
    handover: float
    check_every: int
    #: Rows whose nodes see all of P (None: all); the others end as diverged at once.
    trusted: Tensor | None = None


def _fit_args(B: int, options: FitOptions, n_params: int = 2) -> tuple[tuple, Fits, list[Tensor]]:
    """(the fit's arguments of ``kl.c``, its outputs, the tensors those arguments point into)."""
    f64 = lambda *n: torch.empty(n, dtype=torch.float64)  # noqa: E731
    i64 = lambda n: torch.empty(n, dtype=torch.long)  # noqa: E731
    out = Fits(f64(B, n_params), f64(B), f64(B), i64(B), i64(B))
    lr, tol = _float64((options.lr.expand(B), options.tol.expand(B)))
    max_steps = options.max_steps.expand(B).to(torch.long).contiguous()
    trusted = None if options.trusted is None else options.trusted.to(torch.uint8).contiguous()
    args = (
        lr.data_ptr(), max_steps.data_ptr(), tol.data_ptr(), 0 if trusted is None else trusted.data_ptr(),
        *map(float, options.adam), int(options.polish), float(options.handover), int(options.check_every),
        *(x.data_ptr() for x in (out.theta, out.loss, out.grad_norm, out.steps, out.status)),
    )  # fmt: skip
    return args, out, [lr, tol, max_steps, *([] if trusted is None else [trusted])]


def reverse_fit(theta0: Tensor, mixture: Mixture, rule: Rule, options: FitOptions) -> Fits:
    """Fit Q to the two-component P of each row of ``theta0`` [B, 2] = (mu, log sigma) at the start,
    by the reverse KL on ``rule``, by the rules of :func:`kl_sweep.core.fit.fit_stream` (``kl.c``)."""
    args, out, _alive = _fit_args(theta0.shape[0], options)
    _run("reverse_fit", MIN_PARALLEL_FITS, theta0, mixture, rule, *args)
    return out


@dataclass(frozen=True)
class Reduction:
    """A d > 1 reverse-KL fit as :func:`reduced_fit` takes it (``kl.c``: reduced_derivatives):
    Q's family (its name, d, L's entries set by its scale parameters as (rows, cols) [E], and which
    of its P parameters are logs of a scale), and per row the target's projection b [B, d], centre,
    precision parts (alpha, beta) and log det Sigma [B] (:class:`kl_sweep.core.reduction.SharedPair`)."""

    family: str
    dim: int
    entries: tuple[Tensor, Tensor]
    log_scale: Tensor
    b: Tensor
    centre: Tensor
    alpha: Tensor
    beta: Tensor
    log_det_cov: Tensor

    FAMILIES = {"full": 0, "diag": 1, "iso": 2}


def reduced_fit(theta0: Tensor, line: Mixture, rule: Rule, reduction: Reduction, options: FitOptions) -> Fits:
    """Whole reverse-KL fits in d > 1 from theta0 [B, P] in the family's parameters, each row's 1-D
    part on its ``line`` mixture p_1 with ``rule``, by the rules of
    :func:`kl_sweep.core.fit.fit_stream` (``kl.c``: fit_row with P parameters)."""
    B, P = theta0.shape
    args, out, _alive = _fit_args(B, options, P)
    rows, cols = (x.to(torch.long).contiguous() for x in reduction.entries)
    log_scale = reduction.log_scale.to(torch.uint8).contiguous()
    arrays = _float64((reduction.b, reduction.centre, reduction.alpha, reduction.beta, reduction.log_det_cov))
    _run(
        "reduced_fit", MIN_PARALLEL_FITS, theta0, line, rule,
        reduction.dim, Reduction.FAMILIES[reduction.family], rows.numel(), rows.data_ptr(), cols.data_ptr(),
        *(x.data_ptr() for x in arrays), P, log_scale.data_ptr(), *args,
    )  # fmt: skip
    return out


def moment_fit(theta0: Tensor, moments: tuple[Tensor, ...], options: FitOptions) -> Fits:
    """The same for a divergence in moment form: ``moments`` = (c, m0, m1, m2, ref) [B] of
    :class:`kl_sweep.core.fit.Objective` (the forward KL)."""
    args, out, _alive = _fit_args(theta0.shape[0], options)
    arrays = _float64((theta0, *moments))
    _library().moment_fit(theta0.shape[0], MIN_PARALLEL_MOMENT_FITS, *(x.data_ptr() for x in arrays), *args)
    return out


def forward_moments(mixture: Mixture, rule: Rule) -> tuple[Tensor, ...]:
    """(c, m0, m1, m2, ref) [B]: the forward KL's moment form under the two-component P of each row
    (:meth:`kl_sweep.core.fit.Objective.build`), on ``rule`` (twice the fit's order: P's nodes are
    laid out once a fit), about P's mean ``ref``; see ``kl.c``."""
    B = mixture.means.shape[0]
    ref = mixture.mean().to(torch.float64).contiguous()
    sums = [torch.empty(B, dtype=torch.float64) for _ in range(4)]
    switch_points, widths = mixture.crossings()
    arrays = _float64((mixture.means, mixture.variances, mixture.log_weights, switch_points, widths))
    _library().forward_moments(
        B, MIN_PARALLEL_ROWS // 4, switch_points.shape[-1], *(x.data_ptr() for x in arrays), *rule.args,
        ref.data_ptr(), *(x.data_ptr() for x in sums),
    )  # fmt: skip
    return (*sums, ref)


@dataclass(frozen=True)
class Member:
    """A pointwise divergence as :func:`pointwise` and :func:`pointwise_fit` take it (see ``kl.c``):
    its terms (:data:`ALPHA_TERMS` or :data:`JENSEN_SHANNON_TERMS`), per row its order ``a`` [B]
    (None for Jensen-Shannon) and, for Renyi, its ``alpha`` [B]; its scale; the tails' offsets and
    reach (:data:`kl_sweep.core.alpha.TAIL_OFFSETS`, :data:`~kl_sweep.core.alpha.REACH`); and the
    finite region per row, (lo, hi, left, right) of :func:`kl_sweep.core.alpha.finite_region`
    (None: finite everywhere), with ``steep`` [B]: 1 for a < 0 and 2 for a > 1 (the damped first
    order steps of :func:`kl_sweep.core.loop._damped`), else 0."""

    terms: int
    a: Tensor | None
    alpha: Tensor | None
    scale: float
    tail: Tensor
    reach: float
    region: tuple[Tensor, Tensor, Tensor, Tensor] | None
    steep: Tensor | None

    def take(self, index: Tensor) -> Member:
        """The same member for the rows ``index``."""

        def take(x):
            return None if x is None else x[index]

        region = None if self.region is None else tuple(x[index] for x in self.region)
        return replace(self, a=take(self.a), alpha=take(self.alpha), region=region, steep=take(self.steep))

    def args(self) -> tuple[tuple, list[Tensor]]:
        """(its arguments of ``kl.c``'s functions, the tensors they point into)."""
        a, alpha = (None if x is None else _float64((x,))[0] for x in (self.a, self.alpha))
        region = [] if self.region is None else _float64(self.region)
        steep = None if self.steep is None else self.steep.to(torch.uint8).contiguous()
        tail = _float64((self.tail,))[0]
        ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
        bounds = [ptr(x) for x in region] if region else [0, 0, 0, 0]
        args = (
            self.terms, ptr(a), ptr(alpha), float(self.scale),
            tail.numel(), tail.data_ptr(), float(self.reach), *bounds, ptr(steep),
        )  # fmt: skip
        alive = [x for x in (a, alpha, tail, steep, *region) if x is not None]
        return args, alive


#: Member.terms: the alpha family's (t0, t1, t2), or Jensen-Shannon's.
ALPHA_TERMS, JENSEN_SHANNON_TERMS = 0, 1


def pointwise(
    theta: Tensor, mixture: Mixture, rule: Rule, member: Member, hessian: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The pointwise ``member``'s value [B], gradient [B, 2] and Hessian [B, 2, 2] (or None) at theta
    = (mu, log sigma) [B, 2], for a two-component P, on the Quadrature ``rule`` of its cover, with
    its tilted and tail panels (see ``kl.c``); +inf outside its finite region."""
    B = theta.shape[0]
    loss = torch.empty(B, dtype=torch.float64)
    grad = torch.empty(B, 2, dtype=torch.float64)
    hess = torch.empty(B, 2, 2, dtype=torch.float64) if hessian else None
    args, _alive = member.args()
    outputs = (loss.data_ptr(), grad.data_ptr(), 0 if hess is None else hess.data_ptr())
    _run("pointwise", MIN_PARALLEL_ROWS // 4, theta, mixture, rule, *args, int(hessian), *outputs)
    return loss, grad, hess


def pointwise_value(theta: Tensor, mixture: Mixture, rule: Rule, member: Member) -> Tensor:
    """The pointwise ``member``'s value [B] at theta [B, 2] to near rounding level, as
    :func:`kl_sweep.core.divergences.divergence_value` gives it on ``rule`` (its non-negative
    density integrated, see ``kl.c``); +inf outside its finite region."""
    value = torch.empty(theta.shape[0], dtype=torch.float64)
    args, _alive = member.args()
    _run("pointwise_value", MIN_PARALLEL_ROWS // 4, theta, mixture, rule, *args, value.data_ptr())
    return value


def pointwise_fit(theta0: Tensor, mixture: Mixture, rule: Rule, member: Member, options: FitOptions) -> Fits:
    """Whole fits of the pointwise ``member`` (:func:`pointwise`) from ``theta0`` [B, 2], by the rules
    of :func:`kl_sweep.core.fit.fit_stream`, steps kept within the member's finite region."""
    args, out, _alive = _fit_args(theta0.shape[0], options)
    member_args, _member_alive = member.args()
    _run("pointwise_fit", MIN_PARALLEL_FITS, theta0, mixture, rule, *member_args, *args)
    return out


def kl_pair(theta: Tensor, mixture: Mixture, rule: Rule) -> tuple[Tensor, Tensor]:
    """(KL(P||Q), KL(Q||P)) [B] at theta = (mu, log sigma) [B, 2], on one set of nodes a row: the
    Quadrature rule over both P's and Q's mass, as offsets from Q's mean (see ``kl.c``)."""
    B = theta.shape[0]
    forward, reverse = torch.empty(B, dtype=torch.float64), torch.empty(B, dtype=torch.float64)
    _run("kl_pair", MIN_PARALLEL_ROWS // 4, theta, mixture, rule, forward.data_ptr(), reverse.data_ptr())
    return forward, reverse


#: Stochastic fits: rows below which one thread runs them (a row is thousands of steps).
MIN_PARALLEL_STOCHASTIC = 8
#: stochastic_fit's form of each divergence's Monte Carlo estimate (``kl.c``: mc_weight).
MC_FORMS = {"reverse_kl": 0, "forward_moments": 1, "alpha_terms": 2, "renyi": 3, "jensen_shannon_terms": 4}


@dataclass(frozen=True)
class StochasticRuns:
    """What :func:`stochastic_fit` returns per row: the last iterate, the sum of the averaged
    iterates, the updates made, whether every iterate stayed finite and in bounds, and the changes
    of the nearest exact minimum."""

    theta: Tensor
    total: Tensor
    steps: Tensor
    alive: Tensor
    crossings: Tensor


@dataclass(frozen=True)
class StochasticSetup:
    """A stochastic fit's estimate and optimiser as ``stochastic_fit`` takes them: the form
    (:data:`MC_FORMS`), per row its order a [B] (the alpha family's, Renyi's 1 - alpha; else None),
    the member's scale, its finite region (lo, hi, left, right) [B] or None, sticking the landing,
    the draws a step, Adam's (beta1, beta2, eps) and the schedule (decaying, decay, decay_steps)."""

    form: int
    order: Tensor | None
    scale: float
    region: tuple[Tensor, Tensor, Tensor, Tensor] | None
    stick: bool
    num_samples: int
    adam: tuple[float, float, float]
    schedule: tuple[bool, float, float]


def stochastic_fit(
    theta0: Tensor,
    mixture: Mixture,
    key: Tensor,
    seed: Tensor,
    setup: StochasticSetup,
    lr: Tensor,
    budget: Tensor,
    start: Tensor,
    minima: Tensor,
    alive: Tensor,
) -> StochasticRuns:
    """Every row's stochastic fit from theta0 [B, 2] (``kl.c``: the rules of
    :func:`kl_sweep.core.stochastic.fit_stochastic`), keyed by ``key`` and ``seed`` [B] (int64),
    with ``budget`` updates from rate ``lr``, summing the iterates from update ``start`` on,
    placed against ``minima`` [B, M, 2]; rows with ``alive`` False are left at their start."""
    B, K = mixture.means.shape
    theta = _float64((theta0,))[0].clone()
    total = torch.zeros(B, 2, dtype=torch.float64)
    steps = torch.zeros(B, dtype=torch.long)
    crossings = torch.zeros(B, dtype=torch.long)
    ok = alive.to(torch.uint8).contiguous().clone()
    weights = torch.cumsum(mixture.weights, -1)
    arrays = _float64((mixture.means, mixture.variances, mixture.log_weights, weights, lr, minima))
    keys, seeds = (x.to(torch.int64).contiguous() for x in (key, seed))
    longs = [x.to(torch.long).contiguous() for x in (budget, start)]
    order = None if setup.order is None else _float64((setup.order,))[0]
    region = [] if setup.region is None else _float64(setup.region)
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    bounds = [ptr(x) for x in region] if region else [0, 0, 0, 0]
    means, variances, log_weights, cum, rates, found = arrays
    _library().stochastic_fit(
        B, MIN_PARALLEL_STOCHASTIC, K, means.data_ptr(), variances.data_ptr(), log_weights.data_ptr(),
        cum.data_ptr(), keys.data_ptr(), seeds.data_ptr(), setup.form, ptr(order), float(setup.scale),
        *bounds,
        int(setup.stick), int(setup.num_samples), rates.data_ptr(), longs[0].data_ptr(), longs[1].data_ptr(),
        *map(float, setup.adam), int(setup.schedule[0]), float(setup.schedule[1]), float(setup.schedule[2]),
        found.shape[1], found.data_ptr(), theta.data_ptr(), total.data_ptr(), steps.data_ptr(), ok.data_ptr(),
        crossings.data_ptr(),
    )  # fmt: skip
    return StochasticRuns(theta, total, steps, ok.bool(), crossings)
