r"""Divergences between a general Gaussian mixture P and a Gaussian Q in :math:`\mathbb R^d`.

The target is :math:`p(x) = \sum_{k=1}^K w_k\,\mathcal N(x; m_k, \Sigma_k)` with its own weight,
mean and covariance per component (unequal covariances allowed), and
:math:`Q = \mathcal N(\mu, S)`, :math:`S = LL^T`. Every divergence of the registry
(:data:`kl_sweep.core.divergences.DIVERGENCES`) is the integral dx of a non-negative pointwise
density of :math:`(\log p, \log q)` taken from the registry itself: ``exact_term`` for the two KLs
(:math:`p(\delta + e^{-\delta} - 1)`, :math:`\delta = \log p - \log q`, and its mirror), ``density``
for the alpha family and Jensen-Shannon. Those integrals are computed here by two rules, and the
registry's scale and Renyi transform (``_finish``) turn them into the reported value. Units: nats
for the KLs, Renyi and Jensen-Shannon; the alpha-divergences :math:`D_a` are dimensionless,
:math:`H^2 \in [0, 1]`, :math:`\chi^2` dimensionless.

**Sources.** Where the integrand has its mass is known in closed form: around each component
:math:`(m_k, \Sigma_k)`, around Q, and for the alpha family of order a also around each tilted
Gaussian :math:`w_k^a\mathcal N_k^a q^{1-a} \propto \mathcal N(m^*_k, \Lambda_k^{-1})`,

.. math:: \Lambda_k = a\Sigma_k^{-1} + (1-a)S^{-1},\qquad
          m^*_k = \Lambda_k^{-1}\big(a\Sigma_k^{-1}m_k + (1-a)S^{-1}\mu\big),

where :math:`\Lambda_k` is positive definite (it can lie far from P and Q: a = 2 with a narrow Q).
For a < 0 an *envelope* source is added: with :math:`\tau` in the simplex and
:math:`\Lambda_\tau = \sum_k\tau_k\Lambda_k` positive definite (found by :func:`alpha_finite`),
:math:`p^a q^{1-a} \le \min_k (w_k\mathcal N_k)^a q^{1-a} \le \prod_k ((w_k\mathcal N_k)^a q^{1-a})^{\tau_k}`,
a Gaussian of precision :math:`\Lambda_\tau` that bounds the integrand where no single
:math:`\Lambda_k` is positive definite. Besides the sources, :math:`\log p` switches between
components over a width :math:`1/|\nabla(\ell_j - \ell_k)|` (:math:`\ell_k = \log w_k\mathcal N_k`)
on the surfaces :math:`\ell_j = \ell_k`; for Jensen-Shannon, :math:`\log(p + q)` switches between
P's components and Q too.

**d <= 3: nested composite Gauss-Legendre ("panels", :class:`Panels`).** The integral is iterated,
:math:`\int f = \int dx_1 \int dx_2 \cdots \int dx_d\, f`, in the coordinates of x (offsets from
Q's mean). At level l, on each line (x_1..x_{l-1} fixed by the outer nodes), every source is a 1-D
Gaussian in x_l: the conditional, given the prefix, of its (x_1..x_l)-marginal, with centre
:math:`m_l + \sum_{i<l} L_{li} z_i` and standard deviation :math:`L_{ll}` from its Cholesky factor
(z: the prefix in the source's whitened coordinates). A switch is a root, on that line, of the
difference of two members' (x_1..x_l)-marginal log densities (a quadratic), kept when the two are
the top two members there. The line gets ``panels`` composite Gauss-Legendre panels of ``order``
nodes each, their edges equidistributing the mesh density

.. math:: \rho(x) = \max\Big(\max_s \frac{1}{h_s(A + B|z_s|)},\
          \max_r \frac{1}{\varepsilon_r(A_r + B_r|t_r|)}\Big) + \frac{1}{\mathrm{hi} - \mathrm{lo}},

(:math:`z_s` the offset in units of source s's conditional sd :math:`h_s`, :math:`t_r` that from a
switch in units of its width :math:`\varepsilon_r`), so each source gets panels about 1.2 sd wide
at its centre growing linearly outwards, each switch panels a few widths wide growing outwards,
and the panels are shared where sources overlap. The line is cut at :data:`REACH` = 9 standard
deviations beyond the sources relevant on it (a source is relevant where the prefix is within
:data:`RELEVANT` = 7 of its Mahalanobis units; beyond, its mass on the line is below 1e-10 of
its peak). Nodes do not depend on the batch: a row's bits are its own. The value is exact for the
rule (no randomness; ``error`` is 0); the rule's own error is measured, not estimated (see the
benchmark ``benchmarks/cubature_accuracy.py``): against scipy's adaptive cubature in 2-D it is
below 1e-8 relative for the default panels on well-separated, overlapping and narrow components.

**d > 3: randomised quasi-Monte Carlo (:class:`QuasiMonteCarlo`).** A defensive mixture proposal
:math:`h = \frac1S\sum_s g_s` over the valid sources (P's components, Q, and for the alpha family
the tilted and envelope Gaussians), sampled with the component choice stratified: each source gets
``points`` (a power of 2) scrambled Sobol points mapped through the inverse normal CDF,
:math:`x = c_s + A_s\Phi^{-1}(u)`, and the estimate is
:math:`\sum_s \frac1S\frac1n\sum_i f(x_{si})/h(x_{si})` (multiple importance sampling with the
balance heuristic; unbiased for every randomisation). ``randomisations`` R independent scramblings
(default 8) give the value (their mean) and its standard error (their standard deviation over
:math:`\sqrt R`), propagated through the Renyi transform. The Sobol points depend on ``seed``, d
and the randomisation only: they are shared by every row and fixed for a fit (common random
numbers), so the objective an optimiser sees is a deterministic smooth function of Q, and a
row's value does not depend on its batch. Points are reparameterised (they move with Q), so
autograd differentiates exactly the estimate that is returned.

**Differentiability.** ``value`` is differentiable by autograd in ``mean`` and ``scale_tril``, twice
(Hessians by double backward): panel nodes are placed without a graph (differentiating under the
integral sign on fixed nodes), and everything on the path of the parameters is smooth.

**Where the divergence is infinite** (:func:`alpha_finite`), decided analytically, never from the
rule's finite number. Only :math:`\int p^a q^{1-a}` can diverge (the alpha family, Renyi, chi2);
the KLs, Hellinger and Jensen-Shannon are always finite between Gaussian mixtures and Gaussians.
Far out along a unit direction u, p is dominated by the component with the smallest
:math:`u^T\Sigma_k^{-1}u`, so :math:`\log p^a q^{1-a} = -\tfrac{r^2}2 Q_a(u) + O(r)` with

- a in [0, 1]: always finite (:math:`p^aq^{1-a} \le ap + (1-a)q`). Exact.
- a > 1: :math:`Q_a(u) = \min_k u^T\Lambda_k u`: finite iff **every** :math:`\Lambda_k` is
  positive definite; on the boundary (one singular) the integral diverges along its null
  direction. Exact.
- a < 0: :math:`Q_a(u) = \max_k u^T\Lambda_k u`: finite if :math:`\min_{|u|=1}\max_k u^T\Lambda_k u > 0`
  and infinite if it is < 0. Decided
  - exactly for d = 1 (the largest :math:`\Lambda_k > 0`) and d = 2 (the minimum over the circle
    of the upper envelope of the K sinusoids :math:`u^T\Lambda_k u`, at the minima of each and at
    their pairwise crossings, in closed form), for every K;
  - exactly for K <= 2 in any d: for K = 1, :math:`\Lambda_1 \succ 0`; for K = 2, by Yuan's
    lemma (1990), :math:`\max_k u^T\Lambda_k u > 0` for all :math:`u \ne 0` iff some
    :math:`\tau\Lambda_1 + (1-\tau)\Lambda_2 \succ 0`, :math:`\tau\in[0,1]`, searched by golden
    section on the concave :math:`\lambda_{\min}`;
  - **approximately for K >= 3 and d >= 3**: reported finite iff a convex combination
    :math:`\sum_k\tau_k\Lambda_k \succ 0` is found (exponentiated supergradient ascent of
    :math:`\lambda_{\min}` over the simplex, 300 steps). This is a *sufficient* condition only:
    a configuration that is finite without such a certificate is reported +inf (never the
    reverse: a reported finite value is finite).
  The boundary itself (minimum exactly 0: measure zero, where the integral may or may not
  converge, as at the 1-D edge of :func:`kl_sweep.core.alpha.edge_is_finite`) is reported +inf.
  Near the boundary (minimum within rounding of 0) the decision follows the rounding.

Everything is float64, in log space (densities are exponentiated only inside the registry's
density functions), batched over rows with no loop over rows: loops run over components, sources,
levels, panels or randomisations only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from kl_sweep.core import alpha as family
from kl_sweep.core.divergences import Divergence, _finish, get_divergence
from kl_sweep.core.gaussians import LOG_2PI, MixtureND
from kl_sweep.core.mixture import logaddexp

#: Sources are followed to this many of their standard deviations (beyond: 2e-19 of the mass).
REACH = 9.0
#: A source is relevant on a line whose prefix is within this Mahalanobis distance of its centre.
RELEVANT = 7.0
#: Mesh density of a source: panels of width (A + B|z|) sd at z sd from its centre.
SOURCE_WIDTH = (1.2, 0.35)
#: Mesh density of a switch: panels of width (A + B|t|) widths at t widths from it, to SWITCH_REACH.
SWITCH_WIDTH = (3.0, 0.5)
SWITCH_REACH = 40.0
#: Where the mesh density is sampled (before equidistribution), in sd of a source / widths of a switch.
_SOURCE_ANCHORS = (-9.0, -5.0, -2.5, -1.0, 0.0, 1.0, 2.5, 5.0, 9.0)
_SWITCH_ANCHORS = (-40.0, -10.0, -3.0, 0.0, 3.0, 10.0, 40.0)
#: Members of the alpha family whose order is set per row (their rules have the envelope slot).
_PER_ROW_ORDER = ("alpha", "renyi")


# --- the rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panels:
    """Nested composite Gauss-Legendre, for d <= 3 (see the module docstring).

    ``order`` nodes per panel; ``panels`` per level (an int for every level, or one per level), or
    None for :func:`default_panels`. Nodes per row: (panels * order) ** d.
    """

    order: int | None = None
    panels: int | tuple[int, ...] | None = None


@dataclass(frozen=True)
class QuasiMonteCarlo:
    """Randomised quasi-Monte Carlo, for any d (the default above d = 3; see the module docstring).

    ``points`` per source per randomisation (a power of 2: Sobol points are balanced in blocks of
    2^m), ``randomisations`` independent scramblings (>= 2, for the error estimate), ``seed`` for
    the scrambling: the same seed gives the same points, and so the same bits, in any batch.
    """

    points: int = 1024
    randomisations: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.points < 1 or self.points & (self.points - 1):
            raise ValueError(f"points must be a power of 2, got {self.points}")
        if self.randomisations < 2:
            raise ValueError(f"randomisations must be at least 2, got {self.randomisations}")


def default_rule(dim: int) -> Panels | QuasiMonteCarlo:
    """The rule :func:`divergence_nd` uses by default: :class:`Panels` for d <= 3, else QMC."""
    return Panels() if dim <= 3 else QuasiMonteCarlo()


def default_order(dim: int) -> int:
    """Gauss-Legendre nodes per panel: 8 up to d = 2, 6 in d = 3 (finer panels for fewer nodes)."""
    return 8 if dim <= 2 else 6


def default_panels(dim: int, n_sources: int, n_pairs: int) -> int:
    """Panels per level for ``n_sources`` source slots and ``n_pairs`` switching pairs.

    Calibrated in ``benchmarks/cubature_accuracy.py``: about 1e-8 relative or better in 2-D. In
    3-D the count is lower (the nodes grow as its cube) and so is the accuracy (see there).
    """
    if dim <= 2:
        return 8 + 3 * n_sources + 2 * n_pairs
    return 4 + 2 * n_sources + n_pairs


# --- sources -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    """Gaussians where the integrand has mass: centres [B, S, d] (offsets from the origin), lower
    Cholesky factors of their covariances [B, S, d, d], and which slots are in use [B, S]."""

    centres: Tensor
    trils: Tensor
    valid: Tensor


def _triangular_inverse(tril: Tensor) -> Tensor:
    """L^-1 [..., d, d] for lower-triangular L (differentiable, twice)."""
    eye = torch.eye(tril.shape[-1], dtype=tril.dtype).expand_as(tril)
    return torch.linalg.solve_triangular(tril, eye, upper=False)


def _tilted(mixture: MixtureND, centre: Tensor, q_whiten: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    r"""Precisions :math:`\Lambda_k = a\Sigma_k^{-1} + (1-a)S^{-1}` [B, K, d, d] and the linear terms
    :math:`a\Sigma_k^{-1}(m_k - o) + (1-a)S^{-1}(\mu - o)` [B, K, d] of :math:`(w_k\mathcal N_k)^a q^{1-a}`.

    ``centre`` is :math:`\mu - o`, ``q_whiten`` is :math:`L^{-1}` (so :math:`S^{-1} = L^{-T}L^{-1}`).
    """
    comp_whiten = _triangular_inverse(mixture.scale_trils)
    sigma_inv = comp_whiten.transpose(-1, -2) @ comp_whiten
    s_inv = q_whiten.transpose(-1, -2) @ q_whiten
    ak = a[:, None, None, None]
    prec = ak * sigma_inv + (1.0 - ak) * s_inv.unsqueeze(1)
    offsets = mixture.means - (centre.detach() * 0.0 + _origin_of(centre)).unsqueeze(1)
    lin = ak[..., 0] * (sigma_inv @ offsets.unsqueeze(-1)).squeeze(-1)
    lin = lin + (1.0 - ak[..., 0]) * (s_inv @ centre.unsqueeze(-1)).squeeze(-1).unsqueeze(1)
    return prec, lin


def _origin_of(centre: Tensor) -> Tensor:  # placeholder replaced below
    raise NotImplementedError
