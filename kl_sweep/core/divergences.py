r"""Divergences between the mixture P and the Gaussian Q, as expectations of log-space integrands.

Each divergence is a measure (the distribution the expectation is taken under) and an integrand,
a pure function of :math:`\log p(x)` and :math:`\log q(x)`:

- ``forward``: :math:`\mathrm{KL}(P\Vert Q) = E_P[\log p - \log q]`, mass-covering;
  its minimiser over Q matches P's mean and variance.
- ``reverse``: :math:`\mathrm{KL}(Q\Vert P) = E_Q[\log q - \log p]`, mode-seeking; it has one
  minimum per mode once the modes are far enough apart.

The alpha family (:mod:`kl_sweep.core.alpha`), all built from one pointwise density:

- ``alpha``: Amari's :math:`D_a(P\Vert Q)` in Minka's convention, any real ``divergence.alpha``;
  a -> 1 is KL(P||Q), a -> 0 is KL(Q||P) (a row key: one batch holds many alphas).
- ``hellinger``: :math:`H^2 = 1 - \int\sqrt{pq}\,dx = D_{1/2}/4`, in [0, 1].
- ``chi2``: Pearson's :math:`\chi^2(P\Vert Q) = \int p^2/q\,dx - 1 = 2 D_2`, as CHIVI minimises.
- ``renyi``: Renyi's :math:`R_a(Q\Vert P) = \frac{1}{a-1}\log\int q^a p^{1-a}\,dx`, a > 0, in
  nats, the VR bound's divergence: :math:`\log(1 - a(1-a) D_{1-a}(P\Vert Q))/(a-1)`, so it has
  the optima of :math:`D_{1-a}`; a = 1 is KL(Q||P).

And ``jensen_shannon``: :math:`\tfrac12\mathrm{KL}(P\Vert M) + \tfrac12\mathrm{KL}(Q\Vert M)`,
M = (P + Q)/2, in [0, log 2] nats (an f-divergence outside the alpha family).

The KLs, Renyi and Jensen-Shannon are in nats; the alpha-divergences are dimensionless (their
limits at a = 0, 1 are the KLs in nats). Working with log densities throughout means no density
underflows to 0 and no ``+ 1e-12`` is needed. Where a member is infinite (alpha outside [0, 1]
with Q too narrow or too wide) it is reported as +inf, decided analytically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kl_sweep.config import DIVERGENCE_NAMES
from kl_sweep.core import alpha as family
from kl_sweep.core import native
from kl_sweep.core.estimators import SCALE_OFFSETS, SUPPORT_SDS, SWITCH_OFFSETS, Estimator, Measure
from kl_sweep.core.mixture import LOG_2PI, Mixture, gaussian_sigma2, normal_log_prob, softplus


def kl_forward(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""Integrand of :math:`\mathrm{KL}(P\Vert Q)` under P: :math:`\log p - \log q`."""
    return log_p - log_q


def kl_reverse(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""Integrand of :math:`\mathrm{KL}(Q\Vert P)` under Q: :math:`\log q - \log p`."""
    return log_q - log_p


def kl_density_term(log_a: Tensor, log_b: Tensor) -> Tensor:
    r"""Pointwise non-negative density of KL(A||B): :math:`a\,(\delta + e^{-\delta} - 1)`.

    With :math:`\delta = \log a - \log b` this is :math:`a\delta + b - a`; the added :math:`b - a`
    integrates to 0 when the nodes cover both A and B, so the integral is the KL, but each term is
    non-negative: a KL of 1e-12 keeps its digits and is never negative. For :math:`|\delta| < 1`
    ``expm1`` avoids the cancellation of :math:`b - a`; elsewhere the three terms are exponentiated
    separately, so a density that underflows (a narrow P seen from a wide Q) loses nothing.
    """
    delta = log_a - log_b
    near = delta.abs() < 1.0
    return _kl_term(torch.exp(log_a), torch.exp(log_b), delta, torch.where(near, delta, 0.0), near)


def _kl_term(a: Tensor, b: Tensor, delta: Tensor, near_delta: Tensor, near: Tensor) -> Tensor:
    """:func:`kl_density_term` from its pieces (``near_delta``: delta where ``near``, else 0)."""
    return torch.where(near, a * (delta + torch.expm1(-near_delta)), a * delta + b - a)


def _kl_density_terms(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`kl_density_term` of (P, Q) and of (Q, P), bit for bit, sharing p, q and the ratio."""
    delta = log_p - log_q
    p, q = torch.exp(log_p), torch.exp(log_q)
    near = delta.abs() < 1.0
    d0 = torch.where(near, delta, 0.0)
    return _kl_term(p, q, delta, d0, near), _kl_term(q, p, -delta, -d0, near)


def _constant(a: float) -> Callable[[Tensor | None, int, torch.dtype], Tensor]:
    def of(alpha: Tensor | None, n: int, dtype: torch.dtype) -> Tensor:
        return torch.full((n,), a, dtype=dtype)

    return of


def _given(alpha: Tensor | None, n: int, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(alpha, dtype=dtype).expand(n)


def _one_minus(alpha: Tensor | None, n: int, dtype: torch.dtype) -> Tensor:
    return 1.0 - _given(alpha, n, dtype)


def renyi_from_alpha(d: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Renyi's :math:`R_a(Q\Vert P)` from :math:`D = D_{1-a}(P\Vert Q)`, with dR/dD and d^2R/dD^2.

    :math:`\int q^a p^{1-a} = I = 1 - a(1-a)D`, so :math:`R = \log I/(a-1) = a D\,L(-a(1-a)D)` with
    :math:`L(y) = \log(1+y)/y` (1 at y = 0): no 0/0 at a = 1, where R is KL(Q||P) = D.
    """
    c = alpha * (1.0 - alpha)
    y = -c * d
    small = y == 0
    ratio = torch.where(small, 1.0, torch.log1p(y) / torch.where(small, 1.0, y))
    integral = 1.0 + y
    return alpha * d * ratio, alpha / integral, alpha * c / (integral * integral)


@dataclass(frozen=True)
class Divergence:
    """``measure``: the distribution the expectation is under; ``integrand(log_p, log_q)``.

    ``affine_in_log_q`` marks integrands of the form ``g(log_p) - log_q``: under a fixed P their
    expectation needs only the measure's first three moments, because log q is quadratic in x.
    ``log_q_derivatives(log_p, log_q)`` gives the integrand's first and second derivatives in
    log q, which lets expectations under Q on fixed nodes be differentiated in closed form.

    Members of the alpha family (and Jensen-Shannon) are given instead by a pointwise density
    ``density(log_p, log_q, a)`` (integrated dx) and ``fit_terms`` (it and its weighted log-q
    derivatives), with ``alpha_of(alpha, n, dtype)`` mapping the user's ``divergence.alpha`` to
    the a of :math:`D_a`, a ``scale`` and, for Renyi, a monotone ``transform`` of :math:`D_a`.
    """

    name: str
    measure: Measure
    integrand: Callable[[Tensor, Tensor], Tensor] | None = None
    affine_in_log_q: bool = False
    log_q_derivatives: Callable[[Tensor | None, Tensor], tuple[Tensor | float, Tensor | float]] | None = None
    #: ``(log_p, log_q) -> density-weighted non-negative term`` to integrate dx over P and Q's mass.
    exact_term: Callable[[Tensor, Tensor], Tensor] | None = None
    #: Whose mass the fit's nodes cover ("q", "p" or "pq"); None: the measure's. An integrand that
    #: peaks where P does (sqrt(p/q) for Hellinger) needs P's panels too when Q is much wider.
    cover: str | None = None
    #: ``(log_p, log_q, a) -> t0``: the pointwise non-negative density (alpha family, JS).
    density: Callable[..., Tensor] | None = None
    #: ``(log_p, log_q, a) -> (t0, t1, t2)``: the density and its weighted derivatives in log q
    #: (see core.alpha), as the fit's steps use them.
    fit_terms: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None
    #: ``(alpha, n, dtype) -> a [n]``: the alpha-divergence order behind this member.
    alpha_of: Callable[[Tensor | None, int, torch.dtype], Tensor] | None = None
    scale: float = 1.0
    #: ``(D, alpha) -> (value, dvalue/dD, d2value/dD2)``: a monotone function of the scaled D.
    transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    #: The key of this member's parameter (``alpha``: set as ``divergence.alpha``), or None.
    parameter: str | None = None
    #: The kernel in :mod:`kl_sweep.core.native` that computes what this divergence's fit needs on
    #: the Quadrature rule (the reverse KL's derivatives, the forward KL's moments, the pointwise
    #: terms of the alpha family or of Jensen-Shannon), or None.
    native: str | None = None

    @property
    def nodes_cover(self) -> str:
        return self.cover or self.measure

    @property
    def pointwise(self) -> bool:
        """True for members given by a pointwise density (the alpha family and Jensen-Shannon)."""
        return self.density is not None

    def orders(
        self, alpha: Tensor | float | None, n: int, dtype: torch.dtype = torch.float64
    ) -> Tensor | None:
        """The a of :math:`D_a` per row [n] (None outside the alpha family)."""
        if self.alpha_of is None:
            return None
        if self.parameter is not None and alpha is None:
            raise ValueError(f"divergence {self.name!r} needs its alpha")
        return self.alpha_of(alpha, n, dtype)

    def panel_points(
        self, mixture: Mixture, mu: Tensor, log_sigma: Tensor, a: Tensor | None
    ) -> Tensor | None:
        """Extra panel edges where the integrand has mass away from P and Q, for rows that all have
        one :func:`~kl_sweep.core.alpha.layout` (callers split a batch by it)."""
        if a is None or len(a) == 0:
            return None
        kind = int(family.layout(a[:1]).item())
        if kind == family.COMPACT:
            return None
        with torch.no_grad():
            offsets = torch.as_tensor(SCALE_OFFSETS, dtype=mu.dtype)
            tails = kind == family.TAILS
            return family.panel_points(mixture, mu.detach(), log_sigma.detach(), a, offsets, tails)

    def finite(
        self, mixture: Mixture, mu: Tensor, log_sigma: Tensor, alpha: Tensor | float | None = None
    ) -> Tensor:
        """True where this divergence is finite at (mu, log sigma), decided analytically."""
        a = self.orders(alpha, mu.shape[0], mu.dtype)
        if a is None:
            return torch.ones_like(mu, dtype=torch.bool)
        return family.is_finite(mixture, mu, log_sigma, a)

    def bounds(
        self, mixture: Mixture, mu: Tensor, alpha: Tensor | float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(lo, hi, closed): the log-sigma interval where it is finite, and whether hi itself is."""
        a = self.orders(alpha, mu.shape[0], mu.dtype)
        if a is None:
            inf = torch.full_like(mu, float("inf"))
            return -inf, inf, torch.zeros_like(mu, dtype=torch.bool)
        lo, hi = family.log_sigma_bounds(mixture, a)
        return lo, hi, family.edge_is_finite(mixture, mu, a)


def _alpha_member(name: str, alpha_of, scale: float = 1.0, **options) -> Divergence:
    return Divergence(
        name,
        "q",
        density=family.alpha_density,
        fit_terms=family.alpha_fit_terms,
        alpha_of=alpha_of,
        scale=scale,
        cover="pq",
        native="alpha_terms",
        **options,
    )


DIVERGENCES: dict[str, Divergence] = {
    "forward": Divergence(
        "forward", "p", kl_forward, affine_in_log_q=True, exact_term=kl_density_term, native="forward_moments"
    ),
    "reverse": Divergence(
        "reverse",
        "q",
        kl_reverse,
        log_q_derivatives=lambda log_p, log_q: (1.0, 0.0),
        exact_term=lambda log_p, log_q: kl_density_term(log_q, log_p),
        native="reverse_kl",
    ),
    "hellinger": _alpha_member("hellinger", _constant(0.5), 0.25),
    "alpha": _alpha_member("alpha", _given, parameter="alpha"),
    "chi2": _alpha_member("chi2", _constant(2.0), 2.0),
    "renyi": _alpha_member("renyi", _one_minus, transform=renyi_from_alpha, parameter="alpha"),
    "jensen_shannon": Divergence(
        "jensen_shannon",
        "q",
        density=family.jensen_shannon_density,
        fit_terms=family.jensen_shannon_fit_terms,
        cover="pq",
        native="jensen_shannon_terms",
    ),
}

assert tuple(DIVERGENCES) == DIVERGENCE_NAMES, "kl_sweep.config.DIVERGENCE_NAMES lists the divergences"


def get_divergence(name: str) -> Divergence:
    """The divergence called ``name``: the one way code outside this module looks one up."""
    return DIVERGENCES[name]


def finite_region(
    divergence: Divergence,
    mixture: Mixture,
    mu: Tensor,
    log_sigma: Tensor,
    alpha: Tensor | float | None = None,
) -> Tensor:
    """True [B] where the divergence is finite at (mu, log sigma), decided analytically."""
    return divergence.finite(mixture, mu, log_sigma, alpha)


def integrand_terms(
    divergence: Divergence, x: Tensor, mixture: Mixture, mu: Tensor, log_sigma: Tensor
) -> Tensor:
    """The divergence's integrand at nodes x [B, N] for each row's P and Q."""
    log_q = normal_log_prob(x, mu.unsqueeze(-1), gaussian_sigma2(log_sigma).unsqueeze(-1))
    return divergence.integrand(mixture.log_prob(x), log_q)


#: Renyi is formed from D where |log I| is below this, I = int q^a p^(1-a) (see renyi_value).
RENYI_NEAR = math.log(2.0)


def renyi_value(d: Tensor, log_i: Tensor, alpha: Tensor) -> Tensor:
    """Renyi from D_{1-a} where I is within a factor 2 of 1 (no 0/0 at a = 1), from log I
    elsewhere (1 - a(1 - a) D would lose every digit of a tiny I, and overflow for a huge one)."""
    near = log_i.abs() < RENYI_NEAR
    from_d = renyi_from_alpha(torch.where(near, d, 0.0), alpha)[0]
    from_log = log_i / torch.where(near, 1.0, alpha - 1.0)
    return torch.where(near, from_d, from_log)


def _finish(
    divergence: Divergence, d: Tensor, alpha, finite: Tensor | None, log_i: Tensor | None = None
) -> Tensor:
    """Scale, transform (Renyi) and +inf where infinite: the value from the integral of the density."""
    d = divergence.scale * d
    if divergence.transform is not None:
        d = renyi_value(d, log_i, torch.as_tensor(alpha, dtype=d.dtype).expand_as(d))
    if finite is not None:
        d = torch.where(finite, d, torch.inf)
    return d


def divergence_value(
    divergence: Divergence,
    estimator: Estimator,
    mixture: Mixture,
    mu: Tensor,
    log_sigma: Tensor,
    alpha: Tensor | float | None = None,
) -> Tensor:
    """The divergence in nats for every row, shape [B], differentiable in (mu, log_sigma)."""
    from kl_sweep.core.estimators import FixedNodeEstimator, default_origin

    a = divergence.orders(alpha, mu.shape[0], mu.dtype)
    finite = None if a is None else family.is_finite(mixture, mu.detach(), log_sigma.detach(), a)
    if not isinstance(estimator, FixedNodeEstimator):  # Monte Carlo: samples carry the measure
        if not divergence.pointwise:
            x, w = estimator.nodes(divergence.measure, mixture, mu, log_sigma)
            m, s = _density_parameters(estimator, divergence.measure, mu, log_sigma)
            return (w * integrand_terms(divergence, x, mixture, m, s)).sum(-1)
        return _monte_carlo(divergence, estimator, mixture, mu, log_sigma, alpha, a, finite)
    if divergence.pointwise:
        if a is not None:
            kinds = family.layout(a)
            if len(kinds) and not (kinds == kinds[0]).all():  # each row on its own layout
                d, log_i = torch.zeros_like(mu), torch.zeros_like(mu)
                for kind in kinds.unique().tolist():  # over the three layouts, not over rows
                    m = kinds == kind
                    part = _pointwise_integral(divergence, estimator, mixture[m], mu[m], log_sigma[m], a[m])
                    d = d.index_put((m,), part[0])
                    log_i = log_i if part[1] is None else log_i.index_put((m,), part[1])
                return _finish(divergence, d, alpha, finite, log_i)
        d, log_i = _pointwise_integral(divergence, estimator, mixture, mu, log_sigma, a)
        return _finish(divergence, d, alpha, finite, log_i)
    origin = default_origin(divergence.measure, mixture, mu).detach()
    u, rule = estimator.relative_rule(divergence.nodes_cover, mixture, mu, log_sigma, origin)
    log_p, log_q = _log_densities(u, origin, mixture, mu, log_sigma)
    density = torch.exp(log_q if divergence.measure == "q" else log_p)
    return (rule * density * divergence.integrand(log_p, log_q)).sum(-1)


def _pointwise_integral(
    divergence: Divergence, estimator, mixture: Mixture, mu: Tensor, log_sigma: Tensor, a: Tensor | None
) -> Tensor:
    """The integral of the member's pointwise density, unscaled, on fixed nodes.

    Rows get the panels of their :func:`~kl_sweep.core.alpha.layout`; the caller keeps the layouts
    apart, so that a row's nodes (and so its bits) depend on itself only.
    """
    extra = divergence.panel_points(mixture, mu, log_sigma, a)
    origin = mu.detach()
    u, rule = estimator.relative_rule(divergence.nodes_cover, mixture, mu, log_sigma, origin, extra)
    log_p, log_q = _log_densities(u, origin, mixture, mu, log_sigma)
    ak = None if a is None else a.unsqueeze(-1)
    d = family.integral_over_nodes(rule, divergence.density(log_p, log_q, ak))
    log_i = None
    if divergence.transform is not None:  # Renyi: log int q^alpha p^(1 - alpha), alpha = 1 - a
        log_i = family.log_renyi_integral(rule, log_p, log_q, 1.0 - ak)
    return d, log_i


def _density_parameters(estimator, measure: Measure, mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
    """The (mu, log sigma) that log q is evaluated with at Monte Carlo draws: held where the
    estimator sticks the landing (:class:`kl_sweep.core.stochastic.FreshDraws`), else live."""
    held = getattr(estimator, "density_parameters", None)
    return (mu, log_sigma) if held is None else held(measure, mu, log_sigma)


def _log_ratio(measure: Measure, estimator: Estimator, mixture: Mixture, mu: Tensor, log_sigma: Tensor):
    """Samples' log p - log q under ``measure``, with their weights."""
    x, w = estimator.nodes(measure, mixture, mu, log_sigma)
    mu, log_sigma = _density_parameters(estimator, measure, mu, log_sigma)
    log_q = normal_log_prob(x, mu.unsqueeze(-1), gaussian_sigma2(log_sigma).unsqueeze(-1))
    return mixture.log_prob(x) - log_q, w


def _monte_carlo(divergence: Divergence, estimator, mixture, mu, log_sigma, alpha, a, finite) -> Tensor:
    r"""Monte Carlo for the pointwise members, each in its bounded or standard form.

    - alpha family: :math:`E_Q[-\operatorname{expm1}(a\delta)]/(a(1-a))` for a <= 1/2 and
      :math:`E_P[-\operatorname{expm1}((1-a)(-\delta))]/(a(1-a))` for a > 1/2, unbiased, with
      no 0/0 at a = 0 or 1 (the KL estimators there). Adding :math:`a p + (1-a) q` back in would
      bring :math:`E_Q[p/q]`, whose variance is the chi-square: often huge, even infinite.
    - Renyi: the VR bound's log-mean-exp (:func:`_renyi_log_mean_exp`), biased.
    - Jensen-Shannon: :math:`\tfrac12 E_P[\log\frac{2p}{p+q}] + \tfrac12 E_Q[\log\frac{2q}{p+q}]`.
    """
    if divergence.transform is not None:
        delta, w = _log_ratio("q", estimator, mixture, mu, log_sigma)
        return _renyi_log_mean_exp(delta, w, divergence, alpha, finite)
    delta_q, w_q = _log_ratio("q", estimator, mixture, mu, log_sigma)
    delta_p, w_p = _log_ratio("p", estimator, mixture, mu, log_sigma)
    if a is None:  # Jensen-Shannon
        log2 = math.log(2.0)
        return 0.5 * (w_p * (log2 - softplus(-delta_p))).sum(-1) + 0.5 * (
            w_q * (log2 - softplus(delta_q))
        ).sum(-1)
    ak = a.unsqueeze(-1)
    under_q = (w_q * -delta_q * family.relative_expm1(ak * delta_q)).sum(-1) / (1.0 - a).where(a <= 0.5, 1.0)
    c = 1.0 - a
    under_p = (w_p * delta_p * family.relative_expm1(-c.unsqueeze(-1) * delta_p)).sum(-1) / a.where(
        a > 0.5, 1.0
    )
    return _finish(divergence, torch.where(a <= 0.5, under_q, under_p), alpha, finite)


def _renyi_log_mean_exp(delta: Tensor, w: Tensor, divergence: Divergence, alpha, finite) -> Tensor:
    r"""Monte Carlo Renyi as the VR bound forms it: :math:`\frac{1}{a-1}\log\frac1n\sum_i e^{(1-a)\delta_i}`.

    Biased by Jensen's inequality: :math:`E[\log \hat I] \le \log I`, so for a < 1 the estimate
    is high on average and for a > 1 low, by about :math:`\mathrm{Var}(e^{(1-a)\delta})/(2nI^2|1-a|)`.
    At a = 1 it is the plain mean of :math:`-\delta`, KL(Q||P).
    """
    a = torch.as_tensor(alpha, dtype=delta.dtype).expand(delta.shape[0]).unsqueeze(-1)
    b = 1.0 - a
    log_mean = torch.logsumexp(b * delta + torch.log(w), -1)
    plain = (w * -delta).sum(-1)
    safe_b = torch.where(b == 0, 1.0, b)[:, 0]
    value = torch.where(b[:, 0] == 0, plain, -log_mean / safe_b)
    return value if finite is None else torch.where(finite, value, torch.inf)


def _log_densities(
    u: Tensor, origin: Tensor, mixture: Mixture, mu: Tensor, log_sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """log p and log q at x = origin + u, computed from u so that nothing rounds x."""
    z = (u - (mu - origin).unsqueeze(-1)) / torch.exp(log_sigma).unsqueeze(-1)
    log_q = -0.5 * (LOG_2PI + z * z) - log_sigma.unsqueeze(-1)
    return mixture.log_prob_standard(u, origin, torch.ones_like(origin)), log_q


#: :attr:`Divergence.native` of the pointwise members, with their terms in the kernel.
NATIVE_TERMS = {"alpha_terms": native.ALPHA_TERMS, "jensen_shannon_terms": native.JENSEN_SHANNON_TERMS}


def native_rule(estimator: Estimator) -> native.Rule:
    """The Quadrature estimator's rule for Q's (or P and Q's) cover, as the kernels take it."""
    return native.quadrature_rule(SCALE_OFFSETS, SWITCH_OFFSETS, SUPPORT_SDS, estimator.nodes_per_panel)


def native_member(divergence: Divergence, mixture: Mixture, alpha: Tensor | None, n: int) -> native.Member:
    """A pointwise divergence for the kernel (:class:`native.Member`), for n rows of ``mixture``."""
    a = divergence.orders(alpha, n)
    renyi = None
    if divergence.transform is not None:
        renyi = torch.as_tensor(alpha, dtype=torch.float64).expand(n)
    region = steep = None
    if a is not None:
        lo, hi = family.log_sigma_bounds(mixture, a)
        region = (lo, hi, *family.closed_edge(mixture, a))
        steep = torch.where(a > 1.0, 2, (a < 0.0).to(torch.long))
    tail = torch.as_tensor(family.TAIL_OFFSETS, dtype=torch.float64)
    terms = NATIVE_TERMS[divergence.native]
    return native.Member(terms, a, renyi, divergence.scale, tail, family.REACH, region, steep)


def divergence_exact(
    divergence: Divergence,
    mixture: Mixture,
    mu: Tensor,
    log_sigma: Tensor,
    nodes_per_panel: int = 12,
    alpha: Tensor | float | None = None,
) -> Tensor:
    """The divergence in nats to near rounding level: what every reported value is (+inf where infinite).

    Composite Gauss-Legendre with panels over both P's and Q's mass (and, for alpha outside
    [0, 1], over the integrand's own), integrating the divergence's non-negative pointwise
    density (exact for tiny and huge values alike) where it has one.
    """
    from kl_sweep.core.estimators import Quadrature

    if divergence.pointwise:
        estimator = Quadrature(nodes_per_panel)
        if divergence.native in NATIVE_TERMS and mixture.means.shape[-1] == 2 and native.available():
            # The same rule and densities, one fused pass a row (core.native), equal to 1e-13 (and
            # to 1e-11 where D is astronomical, 1e168: exp's rounding of its large exponent).
            member = native_member(divergence, mixture, alpha, mu.shape[0])
            theta = torch.stack([mu, log_sigma], -1)
            return native.pointwise_value(theta, mixture, native_rule(estimator), member)
        return divergence_value(divergence, estimator, mixture, mu, log_sigma, alpha)
    # Nodes as offsets u from an origin: Q's mean for expectations under Q, P's centre under P,
    # so that the distribution that weights the integrand is resolved whatever its width.
    origin = mu if divergence.measure == "q" else mixture.means.mean(-1)
    u, rule = Quadrature(nodes_per_panel).relative_rule("pq", mixture, mu, log_sigma, origin)
    log_p, log_q = _log_densities(u, origin, mixture, mu, log_sigma)
    if divergence.exact_term is not None:
        return (rule * divergence.exact_term(log_p, log_q)).sum(-1)
    density = torch.exp(log_q if divergence.measure == "q" else log_p)
    return (rule * density * divergence.integrand(log_p, log_q)).sum(-1)


#: Both KLs share one set of nodes where neither P nor Q is narrower than this fraction of the
#: distance between Q's mean and P's centre: offsets from either origin then resolve both.
SHARED_ORIGIN_RESOLUTION = 1e-6


def kl_pair_exact(
    mixture: Mixture, mu: Tensor, log_sigma: Tensor, nodes_per_panel: int = 12
) -> tuple[Tensor, Tensor]:
    """(KL(P||Q), KL(Q||P)) as :func:`divergence_exact` gives each, from one set of nodes per row.

    The two differ only in their nodes' origin (P's centre for the forward KL, Q's mean for the
    reverse), which matters only when a distribution is narrower than the float spacing of that
    distance; rows where either is narrower than :data:`SHARED_ORIGIN_RESOLUTION` of it are done
    apart, as before. Every row's value depends on its own parameters only.
    """
    from kl_sweep.core.estimators import Quadrature

    narrowest = torch.minimum(torch.exp(log_sigma), torch.sqrt(mixture.variances).min(-1).values)
    shared = narrowest >= SHARED_ORIGIN_RESOLUTION * (mu - mixture.means.mean(-1)).abs()
    forward, reverse = DIVERGENCES["forward"], DIVERGENCES["reverse"]
    out = [torch.empty_like(mu), torch.empty_like(mu)]
    if shared.any():
        idx = shared.nonzero().squeeze(-1)
        m, mu_s, ls = mixture[idx], mu[idx], log_sigma[idx]
        if m.means.shape[-1] == 2 and native.available():  # the same, fused (core.native)
            rule = native.quadrature_rule(SCALE_OFFSETS, SWITCH_OFFSETS, SUPPORT_SDS, nodes_per_panel)
            pair = native.kl_pair(torch.stack([mu_s, ls], -1), m, rule)
            for o, value in zip(out, pair):
                o[idx] = value
        else:
            u, rule = Quadrature(nodes_per_panel).relative_rule("pq", m, mu_s, ls, mu_s)
            log_p, log_q = _log_densities(u, mu_s, m, mu_s, ls)
            for o, term in zip(out, _kl_density_terms(log_p, log_q)):
                o[idx] = (rule * term).sum(-1)
    if not shared.all():
        idx = (~shared).nonzero().squeeze(-1)
        for o, d in zip(out, (forward, reverse)):
            o[idx] = divergence_exact(d, mixture[idx], mu[idx], log_sigma[idx], nodes_per_panel)
    return out[0], out[1]
