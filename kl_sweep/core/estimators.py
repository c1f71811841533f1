r"""How expectations :math:`E_M[f(x)]` under M = P or M = Q are computed: :math:`\sum_i w_i f(x_i)`.

Each estimator returns nodes ``x`` [B, N] and weights ``w`` [B, N] for a measure; the weights
carry the density, so ``(w * f(x)).sum(-1)`` is the expectation. Nodes that do not move with Q
are detached from the graph: the gradient then flows through the density in the weights, which is
exact for quadrature (differentiating under the integral sign) and cheaper than moving the nodes.

- :class:`Quadrature`: composite Gauss-Legendre on panels laid on the measure's own scale and
  refined where :math:`\log p` switches between components. Plain Gauss-Hermite under Q cannot do
  this: when Q is much wider than the switch (sigma^2 = 1e3 against separation 20) the integrand
  has a kink on Q's scale and Gauss-Hermite converges only algebraically.
- :class:`Grid`: the trapezoid rule on an even grid whose range covers the measure's mass.
- :class:`MonteCarlo`: reparameterised samples, reproducible for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from kl_sweep.core.mixture import Mixture, gaussian_sigma2, normal_log_prob

Measure = Literal["p", "q"]

# Switch points are kept within 12 standard deviations of the measure (mass beyond: 1e-32).
SUPPORT_SDS = 12.0
# Panel edges on a Gaussian's own scale, in its standard deviations; beyond 9 sd lies 2e-19 of
# the mass, far below the 1e-8 nats promised (the integrands grow only like z^2).
SCALE_OFFSETS = (-9.0, -6.0, -4.0, -2.5, -1.2, 0.0, 1.2, 2.5, 4.0, 6.0, 9.0)
# Panel edges around a switch between components, in units of its width 1/|d'(r)|.
SWITCH_OFFSETS = (-40.0, -15.0, -6.0, -2.0, 0.0, 2.0, 6.0, 15.0, 40.0)


class Estimator(Protocol):
    def nodes(
        self, measure: Measure, mixture: Mixture, mu: Tensor, log_sigma: Tensor
    ) -> tuple[Tensor, Tensor]: ...

    #: True when the nodes for measure P do not depend on Q, so they can be computed once a fit.
    static_p: bool
    #: True when nodes are fixed in x and Q enters only through the density in the weights.
    fixed_nodes: bool

    def standard_rule(
        self, mixture: Mixture, mu: Tensor, log_sigma: Tensor, cover: str = "q"
    ) -> tuple[Tensor, Tensor]:
        """Nodes z = (x - mu) / sigma in Q's standard units, with weights for integrals dx."""
        ...


def support(
    measure: Measure | str,
    mixture: Mixture,
    mu: Tensor,
    log_sigma: Tensor,
    origin: Tensor | float = 0.0,
    extra: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """An interval [lo, hi] per row, relative to ``origin``, holding all but 1e-32 of the measure's
    mass ("pq": of both), stretched to hold the ``extra`` points [B, M] (absolute x) too."""
    if extra is not None:
        lo, hi = support(measure, mixture, mu, log_sigma, origin)
        o = origin.unsqueeze(-1) if isinstance(origin, Tensor) else origin
        rel = extra - o
        return torch.minimum(lo, rel.min(-1).values), torch.maximum(hi, rel.max(-1).values)
    if measure == "pq":
        (lo_p, hi_p), (lo_q, hi_q) = (support(m, mixture, mu, log_sigma, origin) for m in ("p", "q"))
        return torch.minimum(lo_p, lo_q), torch.maximum(hi_p, hi_q)
    if measure == "q":
        sd = torch.exp(log_sigma)
        return (mu - origin) - SUPPORT_SDS * sd, (mu - origin) + SUPPORT_SDS * sd
    sd = torch.sqrt(mixture.variances)
    means = mixture.means - (origin.unsqueeze(-1) if isinstance(origin, Tensor) else origin)
    return (means - SUPPORT_SDS * sd).min(-1).values, (means + SUPPORT_SDS * sd).max(-1).values


def default_origin(cover: str, mixture: Mixture, mu: Tensor) -> Tensor:
    """Where a cover's nodes are laid out from: Q's mean when Q must be resolved, else P's centre.

    Nodes are built as offsets u from this origin. A Q narrower than the float spacing of its mean
    (sigma ~ 1e-16 at mu ~ 1e3) would otherwise have every panel edge mu + sigma * c round to mu.
    """
    return mixture.means.mean(-1) if cover == "p" else mu


def measure_log_prob(measure: Measure, x: Tensor, mixture: Mixture, mu: Tensor, log_sigma: Tensor) -> Tensor:
    if measure == "q":
        return normal_log_prob(x, mu.unsqueeze(-1), gaussian_sigma2(log_sigma).unsqueeze(-1))
    return mixture.log_prob(x)


@lru_cache(maxsize=16)
def _legendre(order: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(order)


class FixedNodeEstimator:
    """An estimator whose nodes sit at fixed x: Q enters only through the density in the weights.

    Subclasses give :meth:`relative_rule`: nodes as offsets u from an origin, and weights for
    integrals dx over a cover; expectations, the x-space rule and Q's standard-unit form follow.
    """

    static_p = True
    fixed_nodes = True

    def relative_rule(
        self,
        cover: str,
        mixture: Mixture,
        mu: Tensor,
        log_sigma: Tensor,
        origin: Tensor,
        extra: Tensor | None = None,
        unit: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Nodes as offsets from ``origin`` (in units of ``unit`` [B, 1] if given) and weights for
        integrals dx over the mass of ``cover``, and around the ``extra`` points [B, M] (absolute x)
        where the integrand has mass of its own."""
        raise NotImplementedError

    def rule(self, cover: str, mixture: Mixture, mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Nodes x and weights for integrals dx over the mass of ``cover`` ("p", "q", "pq")."""
        origin = default_origin(cover, mixture, mu).detach()  # fixed nodes: they do not follow Q
        u, rule = self.relative_rule(cover, mixture, mu, log_sigma, origin)
        return origin.unsqueeze(-1) + u, rule

    def nodes(
        self, measure: Measure, mixture: Mixture, mu: Tensor, log_sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        x, rule = self.rule(measure, mixture, mu, log_sigma)
        return x, rule * torch.exp(measure_log_prob(measure, x, mixture, mu, log_sigma))

    def standard_rule(
        self, mixture: Mixture, mu: Tensor, log_sigma: Tensor, cover: str = "q", extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The ``cover`` rule (default "q") with nodes in Q's standard units z = (x - mu) / sigma,
        weights still for dx."""
        # The panel edges, not every node, are put in Q's units: one pass over [B, N] fewer.
        unit = torch.exp(log_sigma.detach()).unsqueeze(-1)
        return self.relative_rule(cover, mixture, mu, log_sigma, mu.detach(), extra, unit)


@dataclass(frozen=True)
class Quadrature(FixedNodeEstimator):
    """Composite Gauss-Legendre with ``nodes_per_panel`` nodes on each panel.

    Panel edges: the measure's scale points (:data:`SCALE_OFFSETS` standard deviations around Q,
    or around every component of P) and the switch points of :meth:`Mixture.crossings`
    (:data:`SWITCH_OFFSETS` widths around each), clipped to :func:`support` and sorted per row.
    """

    nodes_per_panel: int = 6

    def relative_rule(
        self,
        cover: str,
        mixture: Mixture,
        mu: Tensor,
        log_sigma: Tensor,
        origin: Tensor,
        extra: Tensor | None = None,
        unit: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Nodes (offsets from ``origin``, in units of ``unit`` if given) and weights for integrals
        dx over the mass of ``cover``.

        Under P alone the nodes stay put for a whole fit (they are computed once), so they get
        twice the order at no cost per step: the forward optimum is then P's moments to rounding.
        """
        with torch.no_grad():
            order = 2 * self.nodes_per_panel if cover == "p" else self.nodes_per_panel
            edges = self.edges(cover, mixture, mu, log_sigma, origin, extra)
            if unit is None:
                return self._panels(edges, order=order)
            return self._panels(edges / unit, order=order, scale=unit.unsqueeze(-1))

    @staticmethod
    def _panels(edges: Tensor, order: int, scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
        """Gauss-Legendre nodes on each panel between consecutive edges; weights times ``scale``."""
        t, w = (torch.as_tensor(a, dtype=edges.dtype) for a in _legendre(order))
        left, right = edges[..., :-1, None], edges[..., 1:, None]
        half = 0.5 * (right - left)
        return torch.addcmul(left, half, t + 1.0).flatten(-2), (half * scale * w).flatten(-2)

    def edges(
        self,
        measure: Measure | str,
        mixture: Mixture,
        mu: Tensor,
        log_sigma: Tensor,
        origin: Tensor,
        extra: Tensor | None = None,
    ) -> Tensor:
        """Sorted panel edges per row, as offsets from ``origin`` (never as x: see :func:`default_origin`),
        with the ``extra`` points [B, M] (absolute x) among them."""
        o = origin.unsqueeze(-1)
        lo, hi = support(measure, mixture, mu, log_sigma, origin, extra)
        scale = torch.as_tensor(SCALE_OFFSETS, dtype=mu.dtype)
        centres, sds = [], []
        if "q" in measure:
            centres.append((mu - origin).unsqueeze(-1))
            sds.append(torch.exp(log_sigma).unsqueeze(-1))
        if "p" in measure:
            centres.append(mixture.means - o)
            sds.append(torch.sqrt(mixture.variances))
        centres, sds = torch.cat(centres, -1), torch.cat(sds, -1)
        points = [(centres.unsqueeze(-1) + sds.unsqueeze(-1) * scale).flatten(-2)]
        switch, width = mixture.crossings()
        if switch.shape[-1] == 2 and torch.equal(switch[..., 0], switch[..., 1]):
            # Equal component variances (the two-component config): d(x) is linear, one root.
            switch, width = switch[..., :1], width[..., :1]
        offsets = torch.as_tensor(SWITCH_OFFSETS, dtype=mu.dtype)
        width = width.clamp_max(1e300)
        points.append(((switch - o).unsqueeze(-1) + width.unsqueeze(-1) * offsets).flatten(-2))
        if extra is not None:
            points.append(extra - o)
        points = torch.cat(points, -1)
        points = torch.minimum(torch.maximum(points, lo.unsqueeze(-1)), hi.unsqueeze(-1))
        return torch.sort(points, -1).values


@dataclass(frozen=True)
class Grid(FixedNodeEstimator):
    """Trapezoid rule on ``num_points`` evenly spaced points over :func:`support`.

    The notebook's method done right: the grid spacing enters the weights (a KL in nats, not a
    grid-dependent sum) and the range follows P and Q, so no mass falls off the ends.
    """

    num_points: int = 4001

    def relative_rule(
        self,
        cover: str,
        mixture: Mixture,
        mu: Tensor,
        log_sigma: Tensor,
        origin: Tensor,
        extra: Tensor | None = None,
        unit: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Grid points (offsets from ``origin``, in units of ``unit`` if given) and trapezoid
        weights over the mass of ``cover``."""
        with torch.no_grad():
            lo, hi = support(cover, mixture, mu, log_sigma, origin, extra)
            t = torch.linspace(0.0, 1.0, self.num_points, dtype=mu.dtype)
            u = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * t
            h = ((hi - lo) / (self.num_points - 1)).unsqueeze(-1)
            rule = torch.full_like(u, 1.0) * h
            rule[..., 0] *= 0.5
            rule[..., -1] *= 0.5
            return (u if unit is None else u / unit), rule


@dataclass(frozen=True)
class MonteCarlo:
    """Reparameterised Monte Carlo with ``num_samples`` draws from a generator seeded by ``seed``.

    The standard normal draws are shared by every row and fixed for the whole fit (common random
    numbers), so a row's result depends on its own parameters and the seed only: not on the batch
    it runs in, the chunk size or the shard. Under Q, x = mu + sigma * eps keeps the gradient; under
    P, a component is chosen by inverse CDF of a uniform draw and x = m_k + sqrt(v_k) * eps.
    """

    num_samples: int = 4096
    seed: int = 0
    #: Fresh draws every step (a stochastic fit, :mod:`kl_sweep.core.stochastic`) instead of these.
    resample: bool = False
    #: A stochastic fit's gradient estimator: "reparam", or "stl" (sticking the landing).
    gradient: str = "reparam"
    static_p: bool = True
    fixed_nodes: bool = False

    def draws(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        eps = torch.randn(self.num_samples, generator=gen, dtype=dtype)
        u = torch.rand(self.num_samples, generator=gen, dtype=dtype)
        return eps, u

    def nodes(
        self, measure: Measure, mixture: Mixture, mu: Tensor, log_sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        eps, u = self.draws(mu.dtype)
        weights = torch.full((mu.shape[0], self.num_samples), 1.0 / self.num_samples, dtype=mu.dtype)
        if measure == "q":
            return mu.unsqueeze(-1) + torch.exp(log_sigma).unsqueeze(-1) * eps, weights
        cdf = torch.cumsum(mixture.weights, -1)
        k = torch.searchsorted(cdf, u.expand(mu.shape[0], -1).contiguous())
        k = k.clamp_max(mixture.means.shape[-1] - 1)
        means = torch.gather(mixture.means, -1, k)
        sds = torch.sqrt(torch.gather(mixture.variances, -1, k))
        return means + sds * eps, weights


def make_estimator(name: str, **options) -> Estimator:
    """The estimator called ``name`` with its options (the config's ``estimator`` node)."""
    kinds = {"quadrature": Quadrature, "grid": Grid, "mc": MonteCarlo}
    return kinds[name](**options)
