r"""Divergences between the mixture P and the Gaussian Q, as expectations of log-space integrands.

Each divergence is a measure (the distribution the expectation is taken under) and an integrand,
a pure function of :math:`\log p(x)` and :math:`\log q(x)`:

- :func:`kl_forward`: :math:`\mathrm{KL}(P\Vert Q) = E_P[\log p - \log q]`, mass-covering;
  its minimiser over Q matches P's mean and variance.
- :func:`kl_reverse`: :math:`\mathrm{KL}(Q\Vert P) = E_Q[\log q - \log p]`, mode-seeking; it has one
  minimum per mode once the modes are far enough apart.

- ``hellinger``: the squared Hellinger distance :math:`H^2(P, Q) = 1 - \int\sqrt{pq}\,dx
  = \tfrac14 D_{1/2}`, symmetric, in [0, 1]: the alpha-divergence at alpha = 1/2
  (:func:`alpha_integrand`), between the two KLs.

The KLs are in nats. Working with log densities throughout means no density underflows to 0 and
no ``+ 1e-12`` is needed. A new divergence (the rest of the alpha family) is one more
:class:`Divergence`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kl_sweep.config import DIVERGENCE_NAMES
from kl_sweep.core.estimators import Estimator, Measure
from kl_sweep.core.mixture import LOG_2PI, Mixture, gaussian_sigma2, normal_log_prob


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
    a, b = torch.exp(log_a), torch.exp(log_b)
    near = delta.abs() < 1.0
    small = a * (delta + torch.expm1(-torch.where(near, delta, 0.0)))
    return torch.where(near, small, a * delta + b - a)


def alpha_integrand(alpha: float) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable]:
    r"""Amari's alpha-divergence (Minka's convention) as an expectation under Q, for alpha in (0, 1).

    .. math:: D_\alpha(P\Vert Q) = \frac{1}{\alpha(1-\alpha)} \int \big[\alpha p + (1-\alpha) q
              - p^\alpha q^{1-\alpha}\big]\,dx
              = E_Q\Big[\frac{-\operatorname{expm1}(\alpha\delta)}{\alpha(1-\alpha)}\Big],
              \quad \delta = \log p - \log q,

    dimensionless (it tends to the KLs, in nats, as alpha -> 0 or 1). The first two terms
    integrate to 1 exactly, so only :math:`p^\alpha q^{1-\alpha}` is integrated, and ``expm1``
    keeps the digits when P and Q nearly agree. Returns the integrand
    :math:`\phi(\log p, \log q)` and its first two derivatives in :math:`\log q`,
    :math:`e^{\alpha\delta}/(1-\alpha)` and :math:`-\alpha e^{\alpha\delta}/(1-\alpha)`, which the
    fit's closed-form gradient and Hessian use. (The whole family, with alpha outside (0, 1) and
    its infinite regions, is issue #9.)
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha}: allowed is 0 < alpha < 1")
    scale = 1.0 / (alpha * (1.0 - alpha))

    # Where q underflows (far outside Q, on P's panels) p^alpha q^-alpha overflows, and q times it
    # would be inf * 0. The exponent is capped at 700 (e^700 is finite); q there is below e^-700
    # times p^alpha, so the capped terms are zero after weighting, as the true ones are.
    def integrand(log_p: Tensor, log_q: Tensor) -> Tensor:
        return -scale * torch.expm1(torch.clamp(alpha * (log_p - log_q), max=700.0))

    def log_q_derivatives(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.exp(torch.clamp(alpha * (log_p - log_q), max=700.0))
        return e / (1.0 - alpha), (-alpha / (1.0 - alpha)) * e

    return integrand, log_q_derivatives


def scaled(
    pair: tuple[Callable[[Tensor, Tensor], Tensor], Callable], factor: float
) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable]:
    """An integrand and its log-q derivatives, both multiplied by ``factor``."""
    integrand, derivatives = pair

    def d(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        d1, d2 = derivatives(log_p, log_q)
        return factor * d1, factor * d2

    return (lambda log_p, log_q: factor * integrand(log_p, log_q)), d


def hellinger_density_term(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""Pointwise non-negative density of the squared Hellinger distance, :math:`(\sqrt p - \sqrt q)^2/2`."""
    return 0.5 * (torch.exp(0.5 * log_p) - torch.exp(0.5 * log_q)) ** 2


#: The squared Hellinger distance H^2 = 1 - int sqrt(p q) dx = D_{1/2} / 4, in [0, 1].
_HELLINGER = scaled(alpha_integrand(0.5), 0.25)


@dataclass(frozen=True)
class Divergence:
    """``measure``: the distribution the expectation is under; ``integrand(log_p, log_q)``.

    ``affine_in_log_q`` marks integrands of the form ``g(log_p) - log_q``: under a fixed P their
    expectation needs only the measure's first three moments, because log q is quadratic in x.
    ``log_q_derivatives(log_p, log_q)`` gives the integrand's first and second derivatives in
    log q, which lets expectations under Q on fixed nodes be differentiated in closed form.
    """

    name: str
    measure: Measure
    integrand: Callable[[Tensor, Tensor], Tensor]
    affine_in_log_q: bool = False
    log_q_derivatives: Callable[[Tensor | None, Tensor], tuple[Tensor | float, Tensor | float]] | None = None
    #: ``(log_p, log_q) -> density-weighted non-negative term`` to integrate dx over P and Q's mass.
    exact_term: Callable[[Tensor, Tensor], Tensor] | None = None
    #: Whose mass the fit's nodes cover ("q", "p" or "pq"); None: the measure's. An integrand that
    #: peaks where P does (sqrt(p/q) for Hellinger) needs P's panels too when Q is much wider.
    cover: str | None = None

    @property
    def nodes_cover(self) -> str:
        return self.cover or self.measure


DIVERGENCES: dict[str, Divergence] = {
    "forward": Divergence("forward", "p", kl_forward, affine_in_log_q=True, exact_term=kl_density_term),
    "reverse": Divergence(
        "reverse",
        "q",
        kl_reverse,
        log_q_derivatives=lambda log_p, log_q: (1.0, 0.0),
        exact_term=lambda log_p, log_q: kl_density_term(log_q, log_p),
    ),
    "hellinger": Divergence(
        "hellinger",
        "q",
        _HELLINGER[0],
        log_q_derivatives=_HELLINGER[1],
        exact_term=hellinger_density_term,
        cover="pq",
    ),
}

assert tuple(DIVERGENCES) == DIVERGENCE_NAMES, "kl_sweep.config.DIVERGENCE_NAMES lists the divergences"


def get_divergence(name: str, alpha: float | Tensor | None = None) -> Divergence:
    """The divergence called ``name``, with its parameter ``alpha`` where it has one.

    The one way code outside this module (the fit's table builder, the continuation, the analysis)
    turns a name and an optional parameter into a :class:`Divergence`.
    """
    if alpha is not None:
        raise ValueError(f"divergence {name!r} takes no alpha")
    return DIVERGENCES[name]


def integrand_terms(
    divergence: Divergence, x: Tensor, mixture: Mixture, mu: Tensor, log_sigma: Tensor
) -> Tensor:
    """The divergence's integrand at nodes x [B, N] for each row's P and Q."""
    log_q = normal_log_prob(x, mu.unsqueeze(-1), gaussian_sigma2(log_sigma).unsqueeze(-1))
    return divergence.integrand(mixture.log_prob(x), log_q)


def divergence_value(
    divergence: Divergence, estimator: Estimator, mixture: Mixture, mu: Tensor, log_sigma: Tensor
) -> Tensor:
    """The divergence in nats for every row, shape [B], differentiable in (mu, log_sigma)."""
    from kl_sweep.core.estimators import FixedNodeEstimator, default_origin

    if not isinstance(estimator, FixedNodeEstimator):  # Monte Carlo: samples carry the measure
        x, w = estimator.nodes(divergence.measure, mixture, mu, log_sigma)
        return (w * integrand_terms(divergence, x, mixture, mu, log_sigma)).sum(-1)
    origin = default_origin(divergence.measure, mixture, mu).detach()
    u, rule = estimator.relative_rule(divergence.nodes_cover, mixture, mu, log_sigma, origin)
    log_p, log_q = _log_densities(u, origin, mixture, mu, log_sigma)
    density = torch.exp(log_q if divergence.measure == "q" else log_p)
    return (rule * density * divergence.integrand(log_p, log_q)).sum(-1)


def _log_densities(
    u: Tensor, origin: Tensor, mixture: Mixture, mu: Tensor, log_sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """log p and log q at x = origin + u, computed from u so that nothing rounds x."""
    z = (u - (mu - origin).unsqueeze(-1)) / torch.exp(log_sigma).unsqueeze(-1)
    log_q = -0.5 * (LOG_2PI + z * z) - log_sigma.unsqueeze(-1)
    return mixture.log_prob_standard(u, origin, torch.ones_like(origin)), log_q


def divergence_exact(
    divergence: Divergence, mixture: Mixture, mu: Tensor, log_sigma: Tensor, nodes_per_panel: int = 12
) -> Tensor:
    """The divergence in nats to near rounding level: what every reported value is.

    Composite Gauss-Legendre with panels over both P's and Q's mass, integrating the divergence's
    :attr:`~Divergence.exact_term` (exact for tiny and huge values alike) where it has one.
    """
    from kl_sweep.core.estimators import Quadrature

    # Nodes as offsets u from an origin: Q's mean for expectations under Q, P's centre under P,
    # so that the distribution that weights the integrand is resolved whatever its width.
    origin = mu if divergence.measure == "q" else mixture.means.mean(-1)
    u, rule = Quadrature(nodes_per_panel).relative_rule("pq", mixture, mu, log_sigma, origin)
    log_p, log_q = _log_densities(u, origin, mixture, mu, log_sigma)
    if divergence.exact_term is not None:
        return (rule * divergence.exact_term(log_p, log_q)).sum(-1)
    density = torch.exp(log_q if divergence.measure == "q" else log_p)
    return (rule * density * divergence.integrand(log_p, log_q)).sum(-1)
