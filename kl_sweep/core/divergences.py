r"""Divergences between the mixture P and the Gaussian Q, as expectations of log-space integrands.

Each divergence is a measure (the distribution the expectation is taken under) and an integrand,
a pure function of :math:`\log p(x)` and :math:`\log q(x)`:

- :func:`kl_forward`: :math:`\mathrm{KL}(P\Vert Q) = E_P[\log p - \log q]`, mass-covering;
  its minimiser over Q matches P's mean and variance.
- :func:`kl_reverse`: :math:`\mathrm{KL}(Q\Vert P) = E_Q[\log q - \log p]`, mode-seeking; it has one
  minimum per mode once the modes are far enough apart.

Both are in nats. Working with log densities throughout means no density underflows to 0 and no
``+ 1e-12`` is needed. A new divergence (the planned alpha family) is one more :class:`Divergence`.
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


DIVERGENCES: dict[str, Divergence] = {
    "forward": Divergence("forward", "p", kl_forward, affine_in_log_q=True, exact_term=kl_density_term),
    "reverse": Divergence(
        "reverse",
        "q",
        kl_reverse,
        log_q_derivatives=lambda log_p, log_q: (1.0, 0.0),
        exact_term=lambda log_p, log_q: kl_density_term(log_q, log_p),
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
    u, rule = estimator.relative_rule(divergence.measure, mixture, mu, log_sigma, origin)
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
