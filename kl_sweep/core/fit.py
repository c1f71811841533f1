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

This module's loop (:func:`_stepwise`) is the reference and runs every other fit. Reverse- and
forward-KL fits with Adam (:func:`fused`) run the same rules whole, row by row, in the native
kernel (:mod:`kl_sweep.core.native`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from enum import IntEnum

import torch
from torch import Tensor

from kl_sweep.core import alpha as family
from kl_sweep.core import native
from kl_sweep.core.divergences import RENYI_NEAR, Divergence, divergence_value
from kl_sweep.core.estimators import (
    SCALE_OFFSETS,
    SUPPORT_SDS,
    SWITCH_OFFSETS,
    Estimator,
    Quadrature,
)
from kl_sweep.core.mixture import LOG_2PI, Mixture, gaussian_sigma2, normal_log_prob
from kl_sweep.core.optim import Adam, FirstOrder, newton


class Status(IntEnum):
    RUNNING = 0
    CONVERGED = 1
    MAX_STEPS = 2
    DIVERGED = 3
    #: The divergence is infinite at the start (alpha outside [0, 1] with Q too narrow or wide).
    INFINITE = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Problem:
    """What to fit, one row per configuration: P, the start of Q and the optimiser's budget."""

    mixture: Mixture
    init_mu: Tensor
    init_sigma2: Tensor
    lr: Tensor
    max_steps: Tensor
    tol: Tensor
    #: The divergence's parameter per row (``divergence.alpha``), or None.
    alpha: Tensor | None = None


@dataclass(frozen=True)
class Settings:
    divergence: Divergence
    estimator: Estimator
    optimizer: FirstOrder
    polish: bool = True
    #: Newton decrement below which a row is handed to the polish (the quadratic model then puts
    #: it within 0.05 nats of its local minimum, with a positive definite Hessian).
    handover: float = 0.1
    #: How often (in steps) the first-order phase looks for rows ready for the polish.
    check_every: int = 5
    #: Run whole fits in the native kernel where it applies (:func:`fused`); False: step by step
    #: here (the same rules, to rounding).
    fused: bool = True


@dataclass
class Result:
    """Final values per row, all [B]; ``loss`` is the estimator's objective at (mu, sigma2)."""

    mu: Tensor
    sigma2: Tensor
    loss: Tensor
    grad_norm: Tensor
    steps: Tensor
    status: Tensor
    #: True where the fit ended on the edge of the region where the divergence is finite.
    on_boundary: Tensor | None = None


#: How far from 1 the mass a rule's nodes see of P may be before the estimator counts as blind.
TRUSTED_MASS = 1e-6


def in_moment_form(divergence: Divergence, estimator: Estimator) -> bool:
    """True when :meth:`Objective.build` gives the moment form: an integrand affine in log q (the
    forward KL) under nodes that do not move with Q."""
    return divergence.measure == "p" and estimator.static_p and divergence.affine_in_log_q


@dataclass
class Objective:
    r"""The divergence of each active row as a function of theta = (mu, log sigma).

    When the estimator's nodes do not move with Q (expectations under P), they are computed once
    per fit (:meth:`build`). If moreover the integrand is ``g(log p) - log q`` (forward KL), the
    expectation is :math:`\sum_i w_i g_i - \sum_i w_i \log q(x_i)`, and since log q is quadratic
    in x the second sum needs only the moments :math:`\sum_i w_i x_i^j`, j = 0, 1, 2: each step
    then costs O(1) per row, with exactly the estimator's value.
    """

    divergence: Divergence
    estimator: Estimator
    mixture: Mixture
    #: (x, w, log p) at the fixed nodes under P, for integrands that need them.
    cache: tuple[Tensor, ...] | None = None
    #: (c, m0, m1, m2, ref): the moment form of an integrand affine in log q.
    moments: tuple[Tensor, ...] | None = None
    #: Rows whose nodes see all of P (mass within 1e-6 of 1); a grid coarser than P's components
    #: sees nothing, and its objective would be a flat, meaningless zero. None: all rows.
    trusted: Tensor | None = None
    #: The divergence's parameter per row (``divergence.alpha``), or None.
    alpha: Tensor | None = None

    @classmethod
    def build(
        cls,
        divergence: Divergence,
        estimator: Estimator,
        mixture: Mixture,
        theta: Tensor,
        alpha: Tensor | None = None,
    ) -> Objective:
        if not (divergence.measure == "p" and estimator.static_p):
            return cls(divergence, estimator, mixture, alpha=alpha)
        if (
            divergence.native == "forward_moments"
            and type(estimator) is Quadrature
            and mixture.means.shape[-1] == 2
            and native.available()
        ):  # the same, in one pass a row (core.native)
            rule = native.quadrature_rule(
                SCALE_OFFSETS, SWITCH_OFFSETS, SUPPORT_SDS, 2 * estimator.nodes_per_panel
            )
            moments = native.forward_moments(mixture, rule)
            trusted = (moments[1] - 1.0).abs() <= TRUSTED_MASS
            return cls(divergence, estimator, mixture, moments=moments, trusted=trusted)
        with torch.no_grad():
            x, w = estimator.nodes("p", mixture, theta[:, 0], theta[:, 1])
            log_p = mixture.log_prob(x)
            trusted = (w.sum(-1) - 1.0).abs() <= TRUSTED_MASS
            if not divergence.affine_in_log_q:
                return cls(divergence, estimator, mixture, cache=(x, w, log_p), trusted=trusted)
            # Moments about P's mean, so that nothing cancels when P is far from 0.
            ref = mixture.mean().unsqueeze(-1)
            const = (w * divergence.integrand(log_p, torch.zeros_like(log_p))).sum(-1)
            u = x - ref
            moments = (const, w.sum(-1), (w * u).sum(-1), (w * u * u).sum(-1), ref[:, 0])
            return cls(divergence, estimator, mixture, moments=moments, trusted=trusted)

    def subset(self, keep: Tensor) -> Objective:
        if keep.dtype == torch.bool:
            keep = keep.nonzero().squeeze(-1)  # once: a boolean index would be searched per field
        return replace(
            self,
            mixture=self.mixture[keep],
            cache=_take(self.cache, keep),
            moments=_take(self.moments, keep),
            trusted=None if self.trusted is None else self.trusted[keep],
            alpha=None if self.alpha is None else self.alpha[keep],
        )

    @staticmethod
    def concat(a: Objective, b: Objective) -> Objective:
        def cat(x, y):
            return None if x is None else tuple(torch.cat(pair) for pair in zip(x, y))

        return replace(
            a,
            mixture=Mixture.cat([a.mixture, b.mixture]),
            cache=cat(a.cache, b.cache),
            moments=cat(a.moments, b.moments),
            trusted=None if a.trusted is None else torch.cat([a.trusted, b.trusted]),
            alpha=None if a.alpha is None else torch.cat([a.alpha, b.alpha]),
        )

    def bounds(self, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(lo, hi, closed): where in log sigma the divergence is finite (see Divergence.bounds)."""
        return self.divergence.bounds(self.mixture, mu, self.alpha)

    def __call__(self, theta: Tensor) -> Tensor:
        """The loss per row (differentiable in theta unless the moment form is used)."""
        mu, log_sigma = theta[:, 0], theta[:, 1]
        if self.moments is not None:
            return self._moment_derivatives(theta, hessian=False)[0]
        if self.cache is None:
            return divergence_value(self.divergence, self.estimator, self.mixture, mu, log_sigma, self.alpha)
        x, w, log_p = self.cache
        log_q = normal_log_prob(x, mu.unsqueeze(-1), gaussian_sigma2(log_sigma).unsqueeze(-1))
        return (w * self.divergence.integrand(log_p, log_q)).sum(-1)

    def derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Loss [b], gradient [b, 2] and, if asked, Hessian [b, 2, 2] (rows are independent)."""
        if self.moments is not None:
            return self._moment_derivatives(theta, hessian)
        if self.divergence.pointwise and self.estimator.fixed_nodes:
            return self._pointwise_derivatives(theta, hessian)
        if self._native():
            return self._native_derivatives(theta, hessian)
        if (
            self.cache is None
            and self.moments is None
            and self.divergence.measure == "q"
            and self.estimator.fixed_nodes
            and self.divergence.log_q_derivatives is not None
        ):
            return self._closed_form_derivatives(theta, hessian)
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self(theta)
            (grad,) = torch.autograd.grad(loss.sum(), theta, create_graph=hessian)
            hess = None
            if hessian:
                rows = [
                    torch.autograd.grad(grad[:, i].sum(), theta, retain_graph=i == 0)[0] for i in range(2)
                ]
                hess = torch.stack(rows, 1).detach()
        return loss.detach(), grad.detach(), hess

    def _moment_derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Derivatives of the moment form :math:`L = c + m_0(s + \tfrac12\log 2\pi) + \tfrac12 S e^{-2s}`.

        Here :math:`s = \log\sigma`, :math:`d = \mu - \text{ref}` and :math:`S = m_2 - 2 d m_1 + d^2 m_0`.
        """
        const, m0, m1, m2, ref = self.moments
        d, s = theta[:, 0] - ref, theta[:, 1]
        inv = torch.exp(-2 * s)
        sq = m2 - 2 * d * m1 + d * d * m0
        loss = const + m0 * (s + 0.5 * LOG_2PI) + 0.5 * sq * inv
        g_mu = inv * (d * m0 - m1)
        grad = torch.stack([g_mu, m0 - sq * inv], -1)
        if not hessian:
            return loss, grad, None
        h_ms = -2 * g_mu
        hess = torch.stack([torch.stack([inv * m0, h_ms], -1), torch.stack([h_ms, 2 * sq * inv], -1)], -2)
        return loss, grad, hess

    def _native(self) -> bool:
        """True when the fused kernel computes these derivatives (see :mod:`kl_sweep.core.native`)."""
        return (
            self.divergence.native == "reverse_kl"
            and type(self.estimator) is Quadrature
            and self.mixture.means.shape[-1] == 2
            and self.cache is None
            and self.moments is None
            and native.available()
        )

    def _native_derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`_closed_form_derivatives` for the reverse KL on the Quadrature rule, in one fused
        pass per row (the same rule and formulas; they agree to about 1e-14)."""
        rule = native.quadrature_rule(
            SCALE_OFFSETS, SWITCH_OFFSETS, SUPPORT_SDS, self.estimator.nodes_per_panel
        )
        return native.reverse_kl(theta, self.mixture, rule, hessian)

    def _closed_form_derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Derivatives of :math:`L = \sum_i r_i\, q(x_i)\, \phi(\log p_i, \log q_i)` on fixed nodes.

        With :math:`z = (x - \mu)/\sigma` and :math:`\ell = \log q`, the derivatives in
        :math:`\theta = (\mu, \log\sigma)` are :math:`\partial\ell = (z/\sigma,\, z^2 - 1)` and
        :math:`\partial^2\ell = [[-1/\sigma^2, -2z/\sigma], [-2z/\sigma, -2z^2]]`, so
        :math:`\partial L = \sum w (\phi + \phi')\,\partial\ell` and
        :math:`\partial^2 L = \sum w [(\phi + 2\phi' + \phi'')\,\partial\ell\,\partial\ell^T
        + (\phi + \phi')\,\partial^2\ell]` with :math:`w = r\,q`. The same values autograd gives
        (a test checks it), without building a graph.
        """
        mu, log_sigma = theta[:, 0], theta[:, 1]
        # Nodes in Q's standard units z = (x - mu) / sigma: then log q, the weights and log p
        # (a quadratic in z per component) each take one or two passes over [b, N].
        z, rule = self.estimator.standard_rule(self.mixture, mu, log_sigma, self.divergence.nodes_cover)
        sigma = torch.exp(log_sigma)
        zz = z * z
        log_q = torch.add((-0.5 * LOG_2PI - log_sigma).unsqueeze(-1), zz, alpha=-0.5)
        w = torch.exp(log_q).mul_(rule)  # q(x) dx
        log_p = self.mixture.log_prob_standard(z, mu, sigma)
        phi = self.divergence.integrand(log_p, log_q)
        d1, d2 = self.divergence.log_q_derivatives(log_p, log_q)
        # Every sum runs along the last (node) axis only: a row's result then never depends on
        # which other rows share its batch, so sweeps give the same bits in any chunking.
        if isinstance(d1, float) and d1 == 1.0:  # KL(Q||P): a = w (phi + 1) in one pass
            a = torch.addcmul(w, w, phi)
            a_sum = a.sum(-1)
            loss = a_sum - w.sum(-1)
        else:
            a = w * (phi + d1)
            a_sum = a.sum(-1)
            loss = (w * phi).sum(-1)
        az_sum, azz_sum = (a * z).sum(-1), (a * zz).sum(-1)
        grad = torch.stack([az_sum / sigma, azz_sum - a_sum], -1)
        if not hessian:
            return loss, grad, None
        b = w * (phi + (2 * d1 + d2))
        zz1 = zz - 1.0
        h_mm = ((b * zz).sum(-1) - a_sum) / (sigma * sigma)
        h_ms = ((b * z * zz1).sum(-1) - 2 * az_sum) / sigma
        h_ss = (b * zz1 * zz1).sum(-1) - 2 * azz_sum
        hess = torch.stack([torch.stack([h_mm, h_ms], -1), torch.stack([h_ms, h_ss], -1)], -2)
        return loss, grad, hess

    def _pointwise_derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Derivatives of :math:`D = \sum_i r_i\,t_0(\log p_i, \log q_i)` for a pointwise density.

        The alpha family and Jensen-Shannon: with the weighted log-q derivatives :math:`t_1, t_2`
        of :mod:`kl_sweep.core.alpha`, :math:`\partial D = \sum r\,t_1\,\partial\ell` and
        :math:`\partial^2 D = \sum r\,(t_2\,\partial\ell\,\partial\ell^T + t_1\,\partial^2\ell)`
        (as in :meth:`_closed_form_derivatives`); then the member's scale and, for Renyi, its
        monotone transform by the chain rule. Rows where the divergence is infinite get +inf.
        """
        div = self.divergence
        a = div.orders(self.alpha, theta.shape[0], theta.dtype)
        if a is not None:
            # Each row is done on its layout's panels (core.alpha.layout), which depend on its own
            # a only: its bits then do not depend on the batch it is in.
            kinds = family.layout(a)
            if len(kinds) and not (kinds == kinds[0]).all():
                masks = [kinds == kind for kind in kinds.unique().tolist()]  # the layouts, not rows
                parts = [self.subset(m)._pointwise_derivatives(theta[m], hessian) for m in masks]
                out = [
                    None if p is None else theta.new_empty((theta.shape[0], *p.shape[1:])) for p in parts[0]
                ]
                for mask, part in zip(masks, parts):
                    for o, p in zip(out, part):
                        if o is not None:
                            o[mask] = p
                return tuple(out)
        mu, log_sigma = theta[:, 0], theta[:, 1]
        extra = div.panel_points(self.mixture, mu, log_sigma, a)
        z, rule = self.estimator.standard_rule(self.mixture, mu, log_sigma, div.nodes_cover, extra)
        sigma = torch.exp(log_sigma)
        zz = z * z
        log_q = torch.add((-0.5 * LOG_2PI - log_sigma).unsqueeze(-1), zz, alpha=-0.5)
        log_p = self.mixture.log_prob_standard(z, mu, sigma)
        ak = None if a is None else a.unsqueeze(-1)
        t0, t1, t2 = div.fit_terms(log_p, log_q, ak)
        loss = family.integral_over_nodes(rule, t0)
        a_ = rule * t1
        a_sum, az_sum, azz_sum = a_.sum(-1), (a_ * z).sum(-1), (a_ * zz).sum(-1)
        grad = torch.stack([az_sum / sigma, azz_sum - a_sum], -1)
        hess = None
        if hessian:
            b = rule * t2
            zz1 = zz - 1.0
            h_mm = ((b * zz).sum(-1) - a_sum) / (sigma * sigma)
            h_ms = ((b * z * zz1).sum(-1) - 2 * az_sum) / sigma
            h_ss = (b * zz1 * zz1).sum(-1) - 2 * azz_sum
            hess = torch.stack([torch.stack([h_mm, h_ms], -1), torch.stack([h_ms, h_ss], -1)], -2)
        loss, grad = div.scale * loss, div.scale * grad
        hess = None if hess is None else div.scale * hess
        if div.transform is not None:
            alpha = torch.as_tensor(self.alpha, dtype=loss.dtype).expand_as(loss)
            loss, d1, d2 = div.transform(loss, alpha)
            if hess is not None:
                hess = d1[:, None, None] * hess + d2[:, None, None] * grad.unsqueeze(-1) * grad.unsqueeze(-2)
            grad = d1.unsqueeze(-1) * grad
            far = _renyi_from_log(z, sigma, rule, log_p, log_q, alpha, hessian)
            near = (far[0] * (alpha - 1.0)).abs() < RENYI_NEAR
            loss = torch.where(near, loss, far[0])
            grad = torch.where(near.unsqueeze(-1), grad, far[1])
            hess = None if hess is None else torch.where(near[:, None, None], hess, far[2])
        if a is not None:
            loss = torch.where(family.is_finite(self.mixture, mu, log_sigma, a), loss, torch.inf)
        return loss, grad, hess


def _renyi_from_log(
    z: Tensor, sigma: Tensor, rule: Tensor, log_p: Tensor, log_q: Tensor, alpha: Tensor, hessian: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Renyi's :math:`R = \log I/(a-1)` and its derivatives through log I, for I far from 1.

    With :math:`\pi_i \propto r_i q_i^a p_i^{1-a}` (normalised in log space),
    :math:`\nabla\log I = a E_\pi[\partial\ell]` and
    :math:`\nabla^2\log I = a^2 \mathrm{Cov}_\pi[\partial\ell] + a E_\pi[\partial^2\ell]`.
    """
    a = alpha.unsqueeze(-1)
    log_i = family.log_renyi_integral(rule, log_p, log_q, a)
    safe = torch.where(rule > 0, rule, 1.0)
    log_t = torch.where(rule > 0, torch.log(safe) + log_q + (1.0 - a) * (log_p - log_q), -torch.inf)
    pi = torch.exp(log_t - log_i.unsqueeze(-1))
    zz = z * z
    e_z, e_zz = (pi * z).sum(-1), (pi * zz).sum(-1)
    scale = 1.0 / (alpha - 1.0)
    grad = (alpha * scale).unsqueeze(-1) * torch.stack([e_z / sigma, e_zz - 1.0], -1)
    hess = None
    if hessian:
        zz1 = zz - 1.0
        d = (pi * zz1).sum(-1)  # E[z^2 - 1]
        c_mm = (e_zz - e_z * e_z) / (sigma * sigma)
        c_ms = ((pi * z * zz1).sum(-1) - e_z * d) / sigma
        c_ss = (pi * zz1 * zz1).sum(-1) - d * d
        h_mm = alpha * alpha * c_mm - alpha / (sigma * sigma)
        h_ms = alpha * alpha * c_ms - 2 * alpha * e_z / sigma
        h_ss = alpha * alpha * c_ss - 2 * alpha * e_zz
        hess = scale[:, None, None] * torch.stack(
            [torch.stack([h_mm, h_ms], -1), torch.stack([h_ms, h_ss], -1)], -2
        )
    return log_i * scale, grad, hess


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
            objective=Objective.concat(a.objective, b.objective),
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
        on_boundary = None
        if settings.divergence.alpha_of is not None:
            _, hi, closed = settings.divergence.bounds(problem.mixture, theta[:, 0], problem.alpha)
            on_boundary = (theta[:, 1] == hi) & closed
        sigma2 = gaussian_sigma2(theta[:, 1])
        return Result(theta[:, 0], sigma2, self.loss, self.grad, self.steps, self.status, on_boundary)


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


def _codes(*pairs: tuple[Tensor, Status]) -> Tensor:
    """One status code per row from disjoint masks (RUNNING where none holds)."""
    code = torch.zeros_like(pairs[0][0], dtype=torch.long)
    for mask, status in pairs:  # over the few statuses, not over rows
        code = code.masked_fill(mask, int(status))
    return code


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
    if not fused(settings):
        yield from _stepwise(problems, settings, capacity)
        return
    for problem in problems:
        if settings.divergence.native == "reverse_kl" and problem.mixture.means.shape[-1] != 2:
            yield from _stepwise([problem], settings, capacity)
        else:
            yield _fused_fit(problem, settings)


def fused(settings: Settings) -> bool:
    """True when whole fits run in the native kernel (:func:`kl_sweep.core.native.reverse_fit`,
    :func:`~kl_sweep.core.native.moment_fit`), with Adam: the reverse KL on the Quadrature rule (for
    two-component mixtures), and a divergence in moment form (the forward KL, any estimator whose
    nodes do not move with Q).

    The kernel takes the same steps as :func:`_stepwise` by the same rules, on the same
    derivatives (the reverse KL's from one function in ``kl.c``; the moment form's from the same
    formulas). Its Adam and Newton updates are written in C, so a row's bits can differ from the
    stepwise path's by rounding (another ``expm1``, fused multiply-adds): a few steps more or fewer
    near the tolerance, the same minimum.
    """
    div, est = settings.divergence, settings.estimator
    return (
        settings.fused
        and type(settings.optimizer) is Adam
        and ((div.native == "reverse_kl" and type(est) is Quadrature) or in_moment_form(div, est))
        and native.available()
    )


@torch.no_grad()
def _fused_fit(problem: Problem, settings: Settings) -> Result:
    theta0 = torch.stack([problem.init_mu, 0.5 * torch.log(problem.init_sigma2)], -1)
    opt = settings.optimizer
    options = native.FitOptions(
        problem.lr,
        problem.max_steps,
        problem.tol,
        (opt.beta1, opt.beta2, opt.eps),
        settings.polish,
        settings.handover,
        settings.check_every,
    )
    if settings.divergence.native == "reverse_kl":
        order = settings.estimator.nodes_per_panel
        rule = native.quadrature_rule(SCALE_OFFSETS, SWITCH_OFFSETS, SUPPORT_SDS, order)
        out = native.reverse_fit(theta0, problem.mixture, rule, options)
    else:
        objective = Objective.build(settings.divergence, settings.estimator, problem.mixture, theta0)
        out = native.moment_fit(theta0, objective.moments, replace(options, trusted=objective.trusted))
    mu, log_sigma = out.theta[:, 0], out.theta[:, 1]
    return Result(mu, gaussian_sigma2(log_sigma), out.loss, out.grad_norm, out.steps, out.status)


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
    theta0 = torch.stack([problem.init_mu, 0.5 * torch.log(problem.init_sigma2)], -1)
    B = theta0.shape[0]
    block = _Block(problem, theta0, first_row)
    out.blocks.append(block)
    nan = torch.full((B,), float("nan"), dtype=theta0.dtype)
    steps = torch.zeros(B, dtype=torch.long)
    rows = _Rows(
        rows=torch.arange(first_row, first_row + B),
        theta=theta0,
        objective=Objective.build(
            settings.divergence, settings.estimator, problem.mixture, theta0, problem.alpha
        ),
        lr=problem.lr,
        max_steps=problem.max_steps,
        tol=problem.tol,
        steps=steps,
        state={**settings.optimizer.init_state(theta0), "damp": torch.ones(B, dtype=theta0.dtype)},
        best=torch.full((B,), float("inf"), dtype=theta0.dtype),
        kept={"theta": theta0.clone(), "loss": nan, "grad": nan.clone(), "steps": steps.clone()},
    )
    if settings.divergence.alpha_of is not None:
        # A start where the divergence is infinite has no fit: it is reported as such, loss +inf.
        start = settings.divergence.finite(problem.mixture, theta0[:, 0], theta0[:, 1], problem.alpha)
        if not start.all():
            rows.kept["loss"] = torch.where(start, rows.kept["loss"], torch.inf)
            out.finish(rows, _codes((~start, Status.INFINITE)))
            rows = rows.subset(start)
    return block, rows


#: Where a fit counts as diverged: sigma^2 outside (e^-200, e^200) ~ (1e-87, 1e87), or |mu| past
#: 1e100. Nothing meaningful lies out there, and inside these bounds every reported quantity (both
#: KLs, their gradients) stays representable in float64.
MAX_ABS_LOG_SIGMA = 100.0
MAX_ABS_MU = 1e100


_BOUNDS = torch.tensor([MAX_ABS_MU, MAX_ABS_LOG_SIGMA], dtype=torch.float64)


def _healthy(loss: Tensor, grad: Tensor, theta: Tensor) -> Tensor:
    """Rows whose loss, gradient and parameters are finite and within the bounds above."""
    # Few ops: each costs microseconds on the handful of rows a fit's last steps have.
    values = torch.cat([loss.unsqueeze(-1), grad], -1)
    return torch.isfinite(values).all(-1) & (theta.abs() < _BOUNDS.to(theta.dtype)).all(-1)


def _first_order_step(
    group: _Rows, settings: Settings, out: _Outputs, check: bool
) -> tuple[_Rows, _Rows | None]:
    """Evaluate, retire finished rows, hand basin-bound rows to Newton, step the rest."""
    if not len(group):
        return group, None
    loss, grad, hess = group.objective.derivatives(group.theta, hessian=check)
    on_edge = _pushed_to_edge(group, grad)
    gnorm = _projected_norm(grad, on_edge)
    finite = _healthy(loss, grad, group.theta)
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
        if handover.any():
            to_newton = group.subset(handover)
            to_newton.best = torch.full_like(to_newton.best, float("inf"))
            leaving = leaving | handover
    if leaving.any():
        codes = _codes((converged, Status.CONVERGED), (~finite, Status.DIVERGED), (budget, Status.MAX_STEPS))
        out.finish(group, codes)
        group, grad, loss = group.subset(~leaving), grad[~leaving], loss[~leaving]
    grad = _damped(group, grad, loss)
    group.theta = _keep_finite(group, settings.optimizer.step(group.theta, grad, group.lr, group.state))
    group.steps = group.steps + 1
    return group, to_newton


def _newton_step(group: _Rows, settings: Settings, out: _Outputs) -> tuple[_Rows, _Rows | None]:
    """One Newton iteration on the polish group.

    A row stops once its gradient norm is at most ``tol`` and one more Newton step no longer
    lowers it: quadratic convergence makes that last step take the error from ``tol`` down to
    rounding level, which is what lets converged fits match closed forms to 1e-8 relative. A row
    whose Hessian stops being positive definite (it was near a fold of the landscape) goes back to
    the first-order group from its best point.
    """
    if not len(group):
        return group, None
    loss, grad, hess = group.objective.derivatives(group.theta, hessian=True)
    on_edge = _pushed_to_edge(group, grad)
    gnorm = _projected_norm(grad, on_edge)
    step, _, pd = _newton(grad, hess, on_edge)
    finite = _healthy(loss, grad, group.theta)
    better = finite & (gnorm < group.best)
    group.keep_if(better, loss, gnorm)
    group.best = torch.where(better, gnorm, group.best)
    converged = group.best <= group.tol
    done = converged & ~better
    budget = ~done & (group.steps >= group.max_steps)
    ending = done | budget
    if ending.any():
        finished = done | (budget & converged)
        out.finish(group, _codes((finished, Status.CONVERGED), (budget & ~converged, Status.MAX_STEPS)))
    retreat = ~done & ~budget & (~finite | ~pd)
    # Along an edge the loss can be far from quadratic: a step that made the gradient worse is
    # taken back and the next one halved (backtracking), so the polish cannot cycle there.
    worse = finite & ~converged & (gnorm > group.best)
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
    if group.objective.divergence.alpha_of is None or not len(group):
        return None
    _, hi, closed = group.objective.bounds(group.theta[:, 0])
    return (group.theta[:, 1] == hi) & closed & (grad[:, 1] < 0)


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


def _damped(group: _Rows, grad: Tensor, loss: Tensor) -> Tensor:
    r"""The gradient the first-order update is fed: that of :math:`\log(1 + D)` for a outside [0, 1].

    There D grows like an exponential towards the edge of its finite region (3e7 nats at a = 2,
    sigma^2 = 1, two modes 2.8 apart), and Adam's second-moment estimate would remember such
    gradients for thousands of steps, stalling the fit. :math:`\log(1 + D)` has the same
    stationary points and minima; convergence is still judged on D's own gradient.
    """
    objective = group.objective
    if objective.divergence.alpha_of is None or not len(group):
        return grad
    a = objective.divergence.orders(objective.alpha, len(group), grad.dtype)
    steep = (a < 0.0) | (a > 1.0)
    return torch.where(steep.unsqueeze(-1), grad / (1.0 + loss.clamp_min(0.0)).unsqueeze(-1), grad)


#: Halvings of a step that would leave the finite region before the row stays where it is.
MAX_HALVINGS = 60


def _keep_finite(group: _Rows, theta: Tensor) -> Tensor:
    """The proposed ``theta``, kept where the divergence is finite: never a step outside.

    Past a closed edge (a < 0, mu between the widest modes) log sigma is set on the edge; towards
    an open one (a > 1) it goes halfway to it; a step that still lands where the divergence is
    infinite is halved until it does not.
    """
    objective = group.objective
    if objective.divergence.alpha_of is None or not len(group):
        return theta
    old = group.theta
    lo, hi, _ = objective.bounds(theta[:, 0])
    log_sigma = torch.where(theta[:, 1] <= lo, 0.5 * (old[:, 1] + lo), theta[:, 1])
    landing = (log_sigma >= hi) & (old[:, 1] < hi)
    if landing.any():
        # A row that reaches the edge now solves a problem in mu alone: its first-order state
        # (Adam's moments, remembering the steep way in) starts afresh.
        for key, value in group.state.items():
            if key != "damp":
                value[landing] = 0
    theta = torch.stack([theta[:, 0], torch.minimum(log_sigma, hi)], -1)
    for _ in range(MAX_HALVINGS):  # over halvings, not over rows
        bad = ~objective.divergence.finite(objective.mixture, theta[:, 0], theta[:, 1], objective.alpha)
        bad = bad & torch.isfinite(theta).all(-1)
        if not bad.any():
            return theta
        theta = torch.where(bad.unsqueeze(-1), old + 0.5 * (theta - old), theta)
    return torch.where(bad.unsqueeze(-1), old, theta)


def _take(parts: tuple[Tensor, ...] | None, keep: Tensor) -> tuple[Tensor, ...] | None:
    return None if parts is None else tuple(p[keep] for p in parts)
