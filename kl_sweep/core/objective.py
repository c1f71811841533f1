"""The objective of a 1-D fit: the divergence as a function of theta = (mu, log sigma), with its
derivative paths (moment form, closed forms on fixed nodes, the pointwise alpha family, the native
kernel, autograd), and where it is finite (the edges of the alpha family's finite region).

The fit loop (:mod:`kl_sweep.core.loop`) asks an objective for derivatives, for where it is finite
and for its edges; :class:`kl_sweep.core.reduction.ReducedObjective` answers the same questions in
d > 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kl_sweep.core import alpha as family
from kl_sweep.core import native
from kl_sweep.core.divergences import (
    NATIVE_TERMS,
    RENYI_NEAR,
    Divergence,
    divergence_value,
    native_member,
    native_rule,
)
from kl_sweep.core.estimators import (
    SCALE_OFFSETS,
    SUPPORT_SDS,
    SWITCH_OFFSETS,
    Estimator,
    Quadrature,
)
from kl_sweep.core.mixture import LOG_2PI, Mixture, gaussian_sigma2, normal_log_prob
from kl_sweep.core.problem import MAX_ABS_LOG_SIGMA, MAX_ABS_MU

#: How far from 1 the mass a rule's nodes see of P may be before the estimator counts as blind.
TRUSTED_MASS = 1e-6


def in_moment_form(divergence: Divergence, estimator: Estimator) -> bool:
    """True when :meth:`Objective.build` gives the moment form: an integrand affine in log q (the
    forward KL) under nodes that do not move with Q."""
    return divergence.measure == "p" and estimator.static_p and divergence.affine_in_log_q


_BOUNDS = torch.tensor([MAX_ABS_MU, MAX_ABS_LOG_SIGMA], dtype=torch.float64)


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

    @property
    def has_edges(self) -> bool:
        """True for the alpha family: its finite region has edges in log sigma (see :meth:`bounds`)."""
        return self.divergence.alpha_of is not None

    def finite(self, theta: Tensor) -> Tensor:
        """True [B] where the divergence is finite at theta (decided analytically)."""
        return self.divergence.finite(self.mixture, theta[:, 0], theta[:, 1], self.alpha)

    def parameter_bounds(self, dtype: torch.dtype) -> Tensor:
        """|theta| bounds [2] beyond which a row counts as diverged."""
        return _BOUNDS.to(dtype)

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

    def _native_pointwise(self) -> bool:
        """True when the pointwise kernel computes these derivatives (:func:`native.pointwise`)."""
        return (
            self.divergence.native in NATIVE_TERMS
            and type(self.estimator) is Quadrature
            and self.mixture.means.shape[-1] == 2
            and native.available()
        )

    def _pointwise_derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Derivatives of :math:`D = \sum_i r_i\,t_0(\log p_i, \log q_i)` for a pointwise density.

        The alpha family and Jensen-Shannon: with the weighted log-q derivatives :math:`t_1, t_2`
        of :mod:`kl_sweep.core.alpha`, :math:`\partial D = \sum r\,t_1\,\partial\ell` and
        :math:`\partial^2 D = \sum r\,(t_2\,\partial\ell\,\partial\ell^T + t_1\,\partial^2\ell)`
        (as in :meth:`_closed_form_derivatives`); then the member's scale and, for Renyi, its
        monotone transform by the chain rule. Rows where the divergence is infinite get +inf.
        """
        div = self.divergence
        if self._native_pointwise():  # the same rule and terms, one fused pass a row (core.native)
            member = native_member(div, self.mixture, self.alpha, theta.shape[0])
            return native.pointwise(theta, self.mixture, native_rule(self.estimator), member, hessian)
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


def _take(parts: tuple[Tensor, ...] | None, keep: Tensor) -> tuple[Tensor, ...] | None:
    return None if parts is None else tuple(p[keep] for p in parts)
