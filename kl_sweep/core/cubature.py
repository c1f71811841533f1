r"""Divergences between a general Gaussian mixture P and a Gaussian Q in :math:`\mathbb R^d`.

The target is :math:`p(x) = \sum_{k=1}^K w_k\,\mathcal N(x; m_k, \Sigma_k)`, each component with its
own weight, mean and covariance (unequal covariances allowed), and :math:`Q = \mathcal N(\mu, S)`,
:math:`S = LL^T`. Every divergence of the registry (:data:`kl_sweep.core.divergences.DIVERGENCES`)
is the integral dx of a non-negative pointwise density of :math:`(\log p, \log q)` taken from the
registry itself: ``exact_term`` for the two KLs (:math:`p(\delta + e^{-\delta} - 1)`,
:math:`\delta = \log p - \log q`, and its mirror), ``density`` for the alpha family and
Jensen-Shannon (with :func:`kl_sweep.core.alpha.integral_over_nodes` and, for Renyi,
:func:`kl_sweep.core.alpha.log_renyi_integral`); the registry's scale and Renyi transform
(``divergences._finish``) turn the integral into the value. Units: nats for the KLs, Renyi and
Jensen-Shannon; :math:`D_a`, :math:`H^2 \in [0, 1]` and :math:`\chi^2` are dimensionless.

API: :func:`divergence_nd` (value and error per row), :func:`finite_nd` / :func:`alpha_finite`
(where it is finite), the rules :class:`Panels` and :class:`QuasiMonteCarlo`, :func:`default_rule`.

**Where the integrand has mass (sources).** Around each component, around Q and, for the alpha
family of order a, around each tilted Gaussian
:math:`(w_k\mathcal N_k)^a q^{1-a} \propto \mathcal N(\Lambda_k^{-1}\eta_k, \Lambda_k^{-1})`,

.. math:: \Lambda_k = a\Sigma_k^{-1} + (1-a)S^{-1},\qquad \eta_k = a\Sigma_k^{-1}m_k + (1-a)S^{-1}\mu,

where :math:`\Lambda_k \succ 0` (it can lie far from both P and Q: a = 2 with a narrow Q). For
a < 0, where no :math:`\Lambda_k` is positive definite, an *envelope* source: with :math:`\tau` in
the simplex and :math:`\Lambda_\tau = \sum_k\tau_k\Lambda_k \succ 0` (from the finiteness search
below; :math:`\tau` rounded to 1/4096),
:math:`p^a q^{1-a} \le \min_k (w_k\mathcal N_k)^a q^{1-a} \le \prod_k ((w_k\mathcal N_k)^a q^{1-a})^{\tau_k}`,
a Gaussian of precision :math:`\Lambda_\tau`. Besides, :math:`\log p` switches between components
j, k over a width :math:`1/|\nabla g|`, :math:`g = \ell_j - \ell_k`
(:math:`\ell_k = \log w_k\mathcal N_k`), on the quadric :math:`g = 0`; for Jensen-Shannon
:math:`\log(p + q)` switches between the components and Q too.

**d <= 3: nested composite Gauss-Legendre (:class:`Panels`).** The integral is iterated,
:math:`\int dx_1\int dx_2\cdots f`, in the coordinates of x (offsets from Q's mean). On each line
of level l (the outer coordinates fixed by the outer nodes) every source is a 1-D Gaussian in x_l:
the conditional of its (x_1..x_l)-marginal, centre :math:`m_l + \sum_{i<l}L_{li}z_i`, standard
deviation :math:`L_{ll}` (Cholesky factor L, z the outer coordinates whitened by that source).
Switch points on the line: the roots of the difference of two members' (x_1..x_l)-marginal log
densities, and, on outer levels, the *folds*: the roots of g at its critical point over the inner
coordinates y (:math:`\partial_y g = 0`, a Schur complement), where the inner integrals change
form; each is kept where the two members are the top two. The line then gets ``panels``
Gauss-Legendre panels of ``order`` nodes, their edges equidistributing the mesh density

.. math:: \rho(x) = \max\Big(\max_s \frac{1}{h_s(1.2 + 0.35|z_s|)},\
          \max_r \frac{1}{\varepsilon_r(3 + 0.5|t_r|)}\Big) + \frac{1}{\mathrm{hi} - \mathrm{lo}}

(:math:`z_s`: the offset in source s's conditional sd :math:`h_s`; :math:`t_r`: in switch r's widths
:math:`\varepsilon_r`; integrated by Simpson between anchor points and inverted piecewise
linearly): panels 1.2 sd wide at a source's centre widening outwards, a few widths at a switch,
shared where sources overlap. The line is cut :data:`REACH` = 9 sd beyond the sources relevant on
it (within :data:`RELEVANT` = 7 Mahalanobis units of the outer coordinates; the nearest always
is). Nodes are laid without a graph; the value is the rule's (``error`` is 0).

Defaults: ``order`` 8; ``panels`` per level :func:`default_panels` = 4 + 6(K + 1) + 2 per further
source slot (tilted, envelope) + 2 per switching pair (:func:`structure`), capped at
:data:`MAX_PANELS_3D` = 14 in 3-D. Nodes per row in 2-D: KL 16,384 (K = 1), 36,864 (K = 2),
73,984 (K = 3); Jensen-Shannon / Hellinger 20,736 / 50,176 / 102,400; alpha and Renyi 25,600 /
57,600 / 112,896. In 3-D: 1,404,928 for every K. Measured (``benchmarks/cubature_accuracy.py``):

- 2-D against scipy's adaptive cubature (rtol 1e-12) on a well-separated, an overlapping (K = 3)
  and a narrow-component target: every member within 4e-9 relative (most 1e-12..1e-15).
- 2-D random targets (24 a K, components up to 20:1 elongated and 20x narrower than Q), worst
  relative error at the defaults: K = 1 <= 3e-10, K = 2 <= 1e-9 for every member; K = 3 <= 2e-8
  except the reverse KL at 4e-6 (values near 100 nats: narrow elongated components far apart under
  a much wider Q, where the switch curves of three components meet; the points where they meet
  are not given panels). 16 panels a level (16,384 nodes, a cheaper rule for fit steps): K = 2
  <= 6e-7, K = 3 <= 5e-4.
- 3-D: K = 1 <= 2e-9 (forward) at the default; K >= 2 on such random targets only ~3e-4
  (forward) and ~3e-6 (reverse): ~1e-8 there needs about 24 panels a level (7 million nodes).
  The K = 2 shared-covariance targets have their exact 1-D reduction instead.

**d > 3: randomised quasi-Monte Carlo (:class:`QuasiMonteCarlo`).** A defensive mixture proposal
:math:`h = \frac1S\sum_s g_s` over the S valid sources (components, Q; for the alpha family the
tilted and envelope Gaussians), the component choice stratified: each source gets ``points``
scrambled Sobol points mapped through the inverse normal CDF, :math:`x = c_s + A_s\Phi^{-1}(u)`,
and the estimate is :math:`\sum_s\frac1S\frac1n\sum_i f(x_{si})/h(x_{si})` (multiple importance
sampling, balance heuristic: unbiased for every randomisation). R = ``randomisations`` independent
scramblings give the value (their mean) and its standard error (their sd over :math:`\sqrt R`;
for Renyi through :math:`|dR/dD| = \alpha/\int q^\alpha p^{1-\alpha}`). Defaults: 1024 points a
source, R = 8, seed 0: R * S * 1024 points a row (S = K + 1 for the KLs, Jensen-Shannon; 2K + 1
for Hellinger and chi2; 2K + 2 for alpha and Renyi). The points depend on (seed, d, points,
randomisation) only: shared by every row, fixed during a fit (common random numbers), and moving
with Q (reparameterised), so the value is a deterministic smooth function of Q and autograd
differentiates exactly the returned estimate. Measured: standard error ~4e-4..1e-3 of the value
for K = 1, 2 in d = 5, 8; against the closed forms (K = 1) the error is within 2.5 standard errors
in d = 5, but on extreme targets (sds 0.2..4.4 in 8-D, reverse KL ~200 nats) the estimate from
8 randomisations can understate the error several-fold (the per-randomisation estimates are
heavy-tailed): raise ``randomisations`` there.

**Differentiability.** The value is differentiable twice by autograd in ``mean`` and
``scale_tril`` (Hessians by double backward): everything on the path of the parameters is
elementwise arithmetic, exp/log and the registry's densities.

**Bits.** A row's value and error do not depend on the other rows of its batch, nor on how many
threads torch runs: no LAPACK call or batched matmul reaches a value (their last bits can depend on
the batch: MKL's kernels depend on memory alignment; a batch of one folds into another BLAS call);
the small linear algebra here (Cholesky, triangular inverse, eigenvalues for d <= 3) is written
elementwise, the only batched matmuls are per-row ``bmm`` calls, and node sums are taken one level
(< torch's parallel grain) at a time. Exception: for a < 0 in d >= 4 with K >= 2 and no positive
definite :math:`\Lambda_k`, the envelope's :math:`\tau` is searched with LAPACK eigenvalues; it is
rounded to 1/4096, so its bits change only if it lies within ~1e-8 of a rounding boundary.

**Where the divergence is infinite** (:func:`alpha_finite`), decided analytically, never from the
rule's finite number. Only :math:`\int p^a q^{1-a}` can diverge (alpha, Renyi, chi2); the KLs,
Hellinger and Jensen-Shannon are always finite here. Far out along a unit direction u, p is
dominated by the component with the smallest :math:`u^T\Sigma_k^{-1}u`, so
:math:`\log p^a q^{1-a} = -\tfrac{r^2}2 Q_a(u) + O(r)`:

- a in [0, 1]: always finite (:math:`p^aq^{1-a} \le ap + (1-a)q`). Exact.
- a > 1: :math:`Q_a(u) = \min_k u^T\Lambda_k u`: finite iff **every** :math:`\Lambda_k \succ 0`
  (on the boundary the integral diverges along the null direction). Exact.
- a < 0: :math:`Q_a(u) = \max_k u^T\Lambda_k u`: finite if :math:`\min_{|u|=1}\max_k u^T\Lambda_k u
  > 0`, infinite if < 0. Decided
  - exactly for d = 1 (the largest :math:`\Lambda_k > 0`) and d = 2 (the minimum over the circle of
    the upper envelope of the K sinusoids :math:`u^T\Lambda_k u`, at each one's minimum and at the
    pairwise crossings, in closed form), any K;
  - exactly for K <= 2, any d: K = 1, :math:`\Lambda_1 \succ 0`; K = 2, by Yuan's lemma (1990),
    iff some :math:`\tau\Lambda_1 + (1-\tau)\Lambda_2 \succ 0`, :math:`\tau \in [0, 1]`, found by
    golden section on the concave :math:`\lambda_{\min}` (:data:`GOLDEN_STEPS` steps);
  - **approximately for K >= 3 and d >= 3**: finite iff a convex combination
    :math:`\sum_k\tau_k\Lambda_k \succ 0` is found (exponentiated supergradient ascent of
    :math:`\lambda_{\min}` over the simplex, :data:`MIRROR_STEPS` steps). A *sufficient*
    condition: a value reported finite is finite; a finite configuration without such a
    combination is reported +inf.
  The boundary itself (minimum exactly 0, measure zero, where the integral may converge, as at the
  1-D edge of :func:`kl_sweep.core.alpha.edge_is_finite`) is reported +inf; near it the decision
  follows the rounding.

Everything is float64, in log space (densities are exponentiated only inside the registry's
functions), batched over rows: loops run over components, sources, levels, matrix indices and
randomisations, never over rows. Memory: the integrand is formed on all of a row's nodes at once
(B = 1000 rows, K = 2, 2-D: 4.4 GB peak for the value, 5.6 GB with its gradient; 5-D QMC: 1.3 /
11 GB), so callers with more rows chunk them.
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
#: Mesh density of a switch: panels of width (A + B|t|) widths at t widths from it.
SWITCH_WIDTH = (3.0, 0.5)
#: Where the mesh density is sampled (before equidistribution), in sd of a source / widths of a switch.
_SOURCE_ANCHORS = (-9.0, -5.0, -2.5, -1.0, 0.0, 1.0, 2.5, 5.0, 9.0)
_SWITCH_ANCHORS = (-40.0, -10.0, -3.0, 0.0, 3.0, 10.0, 40.0)
#: Golden-section steps of the K = 2 search (the bracket shrinks to 0.618^48 ~ 1e-10).
GOLDEN_STEPS = 48
#: Exponentiated supergradient steps of the K >= 3 search.
MIRROR_STEPS = 200
#: Members of the alpha family whose order is set per row (their rules have the envelope slot).
_PER_ROW_ORDER = ("alpha", "renyi")


# --- the rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panels:
    """Nested composite Gauss-Legendre, for d <= 3 (see the module docstring).

    ``order`` Gauss-Legendre nodes per panel and ``panels`` per level (one int for every level, or
    one per level); None takes :func:`default_order` and :func:`default_panels`. Nodes per row:
    the product over the levels of panels * order.
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
    """Gauss-Legendre nodes per panel: 8 (at equal nodes per level, 8 beats 6 in 2-D and 3-D)."""
    return 8


#: The panel count per level is capped at this in 3-D, where the nodes grow as its cube.
MAX_PANELS_3D = 14


def default_panels(dim: int, n_components: int, n_sources: int, n_pairs: int) -> int:
    """Panels per level for a K-component target with ``n_sources`` source slots and ``n_pairs``
    switching pairs (:func:`structure`): 6 per component and for Q, 2 per further source slot and
    per pair, plus 4 (K = 2, KL: 24 panels, 192 nodes per level), calibrated in
    ``benchmarks/cubature_accuracy.py``. In 3-D it is capped at :data:`MAX_PANELS_3D` (1.4 million
    nodes per row): enough for about 1e-8 with K = 1, not for larger K (see the module docstring).
    The count depends on the divergence, K and d only, never on a row's values, so a row's nodes
    are its own whatever the batch."""
    K = n_components
    panels = 4 + 6 * (K + 1) + 2 * (n_sources - K - 1) + 2 * n_pairs
    return panels if dim <= 2 else min(panels, MAX_PANELS_3D)


def structure(divergence: Divergence, n_components: int) -> tuple[int, int]:
    """(source slots, switching pairs) of a divergence on a K-component target.

    Slots: the K components and Q; for the alpha family K tilted Gaussians too, and for the members
    whose order is set per row (``alpha``, ``renyi``, which may be negative) the envelope. Pairs:
    those of P's components, and for Jensen-Shannon also each component with Q.
    """
    K = n_components
    sources = K + 1
    if divergence.alpha_of is not None:
        sources += K + (1 if divergence.name in _PER_ROW_ORDER else 0)
    pairs = K * (K - 1) // 2 + (K if divergence.name == "jensen_shannon" else 0)
    return sources, pairs


@dataclass(frozen=True)
class _Sources:
    """Gaussians where the integrand has mass: centres [B, S, d] (offsets from the origin), lower
    Cholesky factors of their covariances [B, S, d, d], and which slots are in use [B, S]."""

    centres: Tensor
    trils: Tensor
    valid: Tensor


# --- linear algebra ----------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _legendre(order: int) -> tuple[Tensor, Tensor]:
    t, w = np.polynomial.legendre.leggauss(order)
    return torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64)


# Small dense linear algebra by elementwise operations, looping over the matrix indices: LAPACK and
# batched matmul are not used on anything that reaches a value, because their last bits can depend on
# the batch (MKL's kernels depend on memory alignment; a batch of one may be folded into another
# BLAS call). Elementwise arithmetic rounds the same wherever a row sits. All are differentiable.


def _mv(A: Tensor, x: Tensor) -> Tensor:
    """A x for matrices [..., m, n] and vectors [..., n]: [..., m]."""
    out = A[..., 0] * x[..., 0, None]
    for k in range(1, A.shape[-1]):
        out = out + A[..., k] * x[..., k, None]
    return out


def _mm(A: Tensor, B: Tensor) -> Tensor:
    """A B for matrices [..., m, k] and [..., k, n]: [..., m, n]."""
    out = A[..., :, 0, None] * B[..., 0, None, :]
    for k in range(1, A.shape[-1]):
        out = out + A[..., :, k, None] * B[..., k, None, :]
    return out


def _gram(W: Tensor) -> Tensor:
    """W^T W [..., d, d] (a precision from a whitening map)."""
    return _mm(W.transpose(-1, -2), W)


def _cholesky(A: Tensor) -> tuple[Tensor, Tensor]:
    """(L, ok): the lower Cholesky factor of symmetric A [..., d, d] and whether A is positive
    definite [...]; where it is not, L is finite but meaningless."""
    d = A.shape[-1]
    L = [[None] * d for _ in range(d)]
    ok = torch.ones(A.shape[:-2], dtype=torch.bool)
    zero = torch.zeros_like(A[..., 0, 0])
    for j in range(d):
        pivot = A[..., j, j]
        for k in range(j):
            pivot = pivot - L[j][k] * L[j][k]
        ok = ok & (pivot > 0) & torch.isfinite(pivot)
        L[j][j] = torch.sqrt(torch.where(pivot > 0, pivot, 1.0))
        for i in range(j + 1, d):
            v = A[..., i, j]
            for k in range(j):
                v = v - L[i][k] * L[j][k]
            L[i][j] = v / L[j][j]
    rows = [torch.stack([L[i][j] if j <= i else zero for j in range(d)], -1) for i in range(d)]
    return torch.stack(rows, -2), ok


def _triangular_inverse(tril: Tensor) -> Tensor:
    """:math:`L^{-1}` [..., d, d] of lower-triangular L, by forward substitution."""
    d = tril.shape[-1]
    X = [[None] * d for _ in range(d)]
    zero = torch.zeros_like(tril[..., 0, 0])
    for i in range(d):
        X[i][i] = 1.0 / tril[..., i, i]
        for j in range(i):
            v = tril[..., i, j] * X[j][j]
            for k in range(j + 1, i):
                v = v + tril[..., i, k] * X[k][j]
            X[i][j] = -v / tril[..., i, i]
    rows = [torch.stack([X[i][j] if j <= i else zero for j in range(d)], -1) for i in range(d)]
    return torch.stack(rows, -2)


def _cholesky_solve(b: Tensor, U: Tensor) -> Tensor:
    """:math:`(UU^T)^{-1} b` for lower-triangular U [..., d, d] and b [..., d]."""
    X = _triangular_inverse(U)
    return _mv(X.transpose(-1, -2), _mv(X, b))


def _small_inverse(A: Tensor) -> tuple[Tensor, Tensor]:
    """(inverse, determinant) of 1 x 1 or 2 x 2 matrices [..., n, n], in closed form."""
    if A.shape[-1] == 1:
        det = A[..., 0, 0]
        return (1.0 / torch.where(det != 0, det, 1.0))[..., None, None], det
    a, b, c, e = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
    det = a * e - b * c
    safe = torch.where(det != 0, det, 1.0)
    inverse = torch.stack([torch.stack([e, -b], -1), torch.stack([-c, a], -1)], -2) / safe[..., None, None]
    return inverse, det


def _tilted(
    comp_centres: Tensor, comp_whiten: Tensor, q_centre: Tensor, q_whiten: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Precisions :math:`\Lambda_k = a\Sigma_k^{-1} + (1-a)S^{-1}` [B, K, d, d] and linear terms
    :math:`\eta_k = a\Sigma_k^{-1}m_k + (1-a)S^{-1}\mu` [B, K, d] of :math:`(w_k\mathcal N_k)^a q^{1-a}`
    (its log is :math:`-\tfrac12 x^T\Lambda_k x + \eta_k^T x` + const), with means given as offsets
    from the origin and the whitening maps :math:`L^{-1}` of the components and of Q."""
    sigma_inv = _gram(comp_whiten)
    s_inv = _gram(q_whiten)
    ak = a[:, None, None, None]
    prec = ak * sigma_inv + (1.0 - ak) * s_inv.unsqueeze(1)
    lin = a[:, None, None] * _mv(sigma_inv, comp_centres)
    lin = lin + (1.0 - a[:, None, None]) * _mv(s_inv, q_centre).unsqueeze(1)
    return prec, lin


def _positive_definite(prec: Tensor) -> Tensor:
    """True [...] where the symmetric matrices [..., d, d] have a Cholesky factor."""
    return _cholesky(prec)[1]


def _lowest(M: Tensor) -> tuple[Tensor, Tensor]:
    """The smallest eigenvalue [...] of symmetric M [..., d, d] and a unit eigenvector [..., d].

    In closed form for d <= 3 (elementwise, so a row's bits do not depend on its batch); LAPACK
    (``eigh``) above, whose last bits may (MKL's results depend on memory alignment).
    """
    d = M.shape[-1]
    if d == 1:
        return M[..., 0, 0], torch.ones_like(M[..., 0])
    if d == 2:
        a, b, c = M[..., 0, 0], 0.5 * (M[..., 0, 1] + M[..., 1, 0]), M[..., 1, 1]
        half = 0.5 * (a - c)
        lam = 0.5 * (a + c) - torch.sqrt(half * half + b * b)
        u, w = torch.stack([b, lam - a], -1), torch.stack([lam - c, b], -1)
        v = torch.where(((u * u).sum(-1) >= (w * w).sum(-1))[..., None], u, w)
    elif d == 3:
        sym = 0.5 * (M + M.transpose(-1, -2))
        q = torch.diagonal(sym, dim1=-2, dim2=-1).sum(-1) / 3.0
        shifted = sym - q[..., None, None] * torch.eye(3, dtype=M.dtype)
        p = torch.sqrt((shifted * shifted).sum((-1, -2)) / 6.0)
        safe = torch.where(p > 0, p, 1.0)
        Bm = shifted / safe[..., None, None]
        det = (
            Bm[..., 0, 0] * (Bm[..., 1, 1] * Bm[..., 2, 2] - Bm[..., 1, 2] * Bm[..., 2, 1])
            - Bm[..., 0, 1] * (Bm[..., 1, 0] * Bm[..., 2, 2] - Bm[..., 1, 2] * Bm[..., 2, 0])
            + Bm[..., 0, 2] * (Bm[..., 1, 0] * Bm[..., 2, 1] - Bm[..., 1, 1] * Bm[..., 2, 0])
        )
        phi = torch.acos((0.5 * det).clamp(-1.0, 1.0)) / 3.0
        lam = q + torch.where(p > 0, 2.0 * p * torch.cos(phi + 2.0 * math.pi / 3.0), 0.0)
        rows = sym - lam[..., None, None] * torch.eye(3, dtype=M.dtype)
        r0, r1, r2 = rows[..., 0, :], rows[..., 1, :], rows[..., 2, :]

        def cross(u: Tensor, w: Tensor) -> Tensor:
            return torch.stack(
                [
                    u[..., 1] * w[..., 2] - u[..., 2] * w[..., 1],
                    u[..., 2] * w[..., 0] - u[..., 0] * w[..., 2],
                    u[..., 0] * w[..., 1] - u[..., 1] * w[..., 0],
                ],
                -1,
            )

        crosses = torch.stack([cross(r0, r1), cross(r0, r2), cross(r1, r2)], -2)
        pick = (crosses * crosses).sum(-1).argmax(-1)
        v = crosses.gather(-2, pick[..., None, None].expand(*pick.shape, 1, 3))[..., 0, :]
    else:
        eigenvalues, vectors = torch.linalg.eigh(M)
        return eigenvalues[..., 0], vectors[..., 0]
    norm = torch.sqrt((v * v).sum(-1, keepdim=True))
    fallback = torch.zeros_like(v)
    fallback[..., 0] = 1.0
    return lam, torch.where(norm > 0, v / torch.where(norm > 0, norm, 1.0), fallback)


def _best_combination(prec: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\tau` [B, K] in the simplex making :math:`\lambda_{\min}(\sum_k\tau_k\Lambda_k)` as large as
    the search finds, and that value [B] (a concave function of :math:`\tau`).

    K = 1: :math:`\tau = 1`. K = 2: golden-section search over :math:`[0, 1]` (to rounding). K >= 3:
    exponentiated supergradient ascent (the supergradient is :math:`v^T\Lambda_k v`, v the lowest
    eigenvector), keeping the best point seen: a lower bound on the maximum.
    """
    B, K = prec.shape[:2]
    if K == 1:
        return torch.ones(B, 1, dtype=prec.dtype), _lowest(prec[:, 0])[0]
    scale = prec.flatten(-2).abs().amax(-1).amax(-1).clamp_min(torch.finfo(prec.dtype).tiny)
    prec = prec / scale[:, None, None, None]
    if K == 2:

        def value(t: Tensor) -> Tensor:
            return _lowest((1.0 - t)[:, None, None] * prec[:, 0] + t[:, None, None] * prec[:, 1])[0]

        ratio = (math.sqrt(5.0) - 1.0) / 2.0
        lo, hi = torch.zeros(B, dtype=prec.dtype), torch.ones(B, dtype=prec.dtype)
        x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        f1, f2 = value(x1), value(x2)
        for _ in range(GOLDEN_STEPS):  # one new point a step, on the side each row keeps
            left = f1 < f2  # the maximum lies in [x1, hi]: x2 becomes x1
            lo, hi = torch.where(left, x1, lo), torch.where(left, hi, x2)
            new = torch.where(left, lo + ratio * (hi - lo), hi - ratio * (hi - lo))
            f_new = value(new)
            x1, x2 = torch.where(left, x2, new), torch.where(left, new, x1)
            f1, f2 = torch.where(left, f2, f_new), torch.where(left, f_new, f1)
        candidates = torch.stack([torch.zeros_like(lo), torch.ones_like(lo), x1, x2], -1)
        values = torch.stack([value(candidates[:, 0]), value(candidates[:, 1]), f1, f2], -1)
        best, pick = values.max(-1)
        t = candidates.gather(-1, pick[:, None])[:, 0]
        return torch.stack([1.0 - t, t], -1), best * scale
    tau = torch.full((B, K), 1.0 / K, dtype=prec.dtype)
    best_tau, best = tau, torch.full((B,), -math.inf, dtype=prec.dtype)
    for step in range(MIRROR_STEPS):
        combined = (tau[:, :, None, None] * prec).sum(1)
        lowest, v = _lowest(combined)
        better = lowest > best
        best = torch.where(better, lowest, best)
        best_tau = torch.where(better[:, None], tau, best_tau)
        g = (v[:, None, :] * _mv(prec, v[:, None, :])).sum(-1)
        tau = tau * torch.exp(g * (2.0 / math.sqrt(step + 1.0)))
        tau = tau / tau.sum(-1, keepdim=True)
    return best_tau, best * scale


def _envelope_minimum_2d(prec: Tensor) -> Tensor:
    r""":math:`\min_{|u|=1}\max_k u^T\Lambda_k u` [B] for 2 x 2 precisions [B, K, 2, 2], exactly.

    With :math:`u = (\cos\phi, \sin\phi)` and :math:`\theta = 2\phi`, each form is a sinusoid
    :math:`A_k + B_k\cos\theta + C_k\sin\theta`; the minimum of their upper envelope lies at the
    minimum of one of them or where two cross, all in closed form.
    """
    A = 0.5 * (prec[..., 0, 0] + prec[..., 1, 1])
    Bc = 0.5 * (prec[..., 0, 0] - prec[..., 1, 1])
    C = 0.5 * (prec[..., 0, 1] + prec[..., 1, 0])
    thetas = [torch.atan2(-C, -Bc)]  # each sinusoid's minimum, [B, K]
    valid = [torch.ones_like(A, dtype=torch.bool)]
    K = prec.shape[1]
    for j in range(K):
        for k in range(j + 1, K):
            dA, dB, dC = A[:, j] - A[:, k], Bc[:, j] - Bc[:, k], C[:, j] - C[:, k]
            radius = torch.hypot(dB, dC)
            ok = (radius > 0) & (dA.abs() <= radius)
            phase = torch.atan2(dC, dB)
            half = torch.acos((-dA / torch.where(radius > 0, radius, 1.0)).clamp(-1.0, 1.0))
            thetas.append(torch.stack([phase + half, phase - half], -1))
            valid.append(torch.stack([ok, ok], -1))
    theta, ok = torch.cat(thetas, -1), torch.cat(valid, -1)  # [B, M]
    forms = (
        A[:, :, None] + Bc[:, :, None] * torch.cos(theta)[:, None] + C[:, :, None] * torch.sin(theta)[:, None]
    )
    envelope = forms.max(1).values
    return torch.where(ok, envelope, math.inf).min(-1).values


def _orders_finite(prec: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    r"""Whether :math:`\int p^a q^{1-a}` is finite [B], and the envelope's :math:`\tau` [B, K] (a < 0).

    See the module docstring for the rule and where it is exact.
    """
    B, K, d = prec.shape[:3]
    finite = torch.ones(B, dtype=torch.bool)
    tau = torch.full((B, K), 1.0 / K, dtype=prec.dtype)
    over = a > 1.0
    if over.any():
        finite[over] = _positive_definite(prec[over]).all(-1)
    under = a < 0.0
    if under.any():
        part = prec[under]
        t, lowest = _best_combination(part)
        tau[under] = t
        if d == 1:
            ok = part[..., 0, 0].amax(-1) > 0
        elif d == 2:
            ok = _envelope_minimum_2d(part) > 0
        else:  # exact for K <= 2 (Yuan's lemma), a sufficient condition for K >= 3
            ok = lowest > 0
        finite[under] = ok
    return finite, tau


def _q_parts(mean: Tensor, scale_tril: Tensor, mixture: MixtureND):
    """Offsets from the origin (Q's mean, without a graph): components' centres [B, K, d], Q's
    centre [B, d] (0, with the graph of ``mean``), and the whitening maps of both."""
    origin = mean.detach()
    comp_centres = mixture.means - origin.unsqueeze(1)
    return (
        comp_centres,
        mean - origin,
        _triangular_inverse(mixture.scale_trils),
        _triangular_inverse(scale_tril),
    )


def alpha_finite(mixture: MixtureND, mean: Tensor, scale_tril: Tensor, a: Tensor) -> Tensor:
    r"""True [B] where :math:`D_a(P\Vert Q)` (equivalently :math:`\int p^a q^{1-a}\,dx`) is finite, for
    the order ``a`` [B] of each row; decided analytically (module docstring: exact except for
    a < 0 with K >= 3 in d >= 3, where finiteness is certified by a sufficient condition)."""
    with torch.no_grad():
        comp_centres, q_centre, comp_whiten, q_whiten = _q_parts(mean.detach(), scale_tril.detach(), mixture)
        prec, _ = _tilted(comp_centres, comp_whiten, q_centre, q_whiten, a.to(mean.dtype))
        return _orders_finite(prec, a)[0]


def finite_nd(
    divergence: Divergence | str,
    mixture: MixtureND,
    mean: Tensor,
    scale_tril: Tensor,
    alpha: Tensor | float | None = None,
) -> Tensor:
    """True [B] where the divergence is finite at Q = N(mean, scale_tril scale_tril^T)."""
    divergence = get_divergence(divergence) if isinstance(divergence, str) else divergence
    a = divergence.orders(alpha, mean.shape[0], mean.dtype)
    if a is None:
        return torch.ones(mean.shape[0], dtype=torch.bool)
    return alpha_finite(mixture, mean, scale_tril, a)


# --- where the integrand has mass --------------------------------------------------------------


def _safe_precision(prec: Tensor, fallback: Tensor) -> tuple[Tensor, Tensor]:
    """(prec where positive definite else ``fallback``, and where it was), deciding without a graph."""
    ok = _positive_definite(prec.detach())
    return torch.where(ok[..., None, None], prec, fallback), ok


def _tilted_sources(
    divergence: Divergence, mixture: MixtureND, parts, a: Tensor, tau: Tensor, finite: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The alpha family's extra sources as (centres, precision factors U, valid) lists, one entry per
    slot: K tilted Gaussians and, for the per-row orders, the envelope (valid only for a < 0).

    Precision :math:`\\Lambda = UU^T` (U lower); an invalid slot stands in as the first component."""
    comp_centres, q_centre, comp_whiten, q_whiten = parts
    prec, lin = _tilted(comp_centres, comp_whiten, q_centre, q_whiten, a)
    comp_prec = _gram(comp_whiten)
    safe, ok = _safe_precision(prec, comp_prec)
    slots = [(safe[:, k], lin[:, k], ok[:, k] & finite) for k in range(prec.shape[1])]
    if divergence.name in _PER_ROW_ORDER:
        # Only needed where no tilted Gaussian is proper (one that is bounds p^a q^(1-a) itself, a < 0).
        # tau is rounded to 1/4096: where LAPACK found it (d >= 4) its last bits may vary with the batch.
        t = torch.round(tau.to(prec.dtype) * 4096.0) / 4096.0
        env_prec = (t[:, :, None, None] * prec).sum(1)
        env_lin = (t[:, :, None] * lin).sum(1)
        env_safe, env_ok = _safe_precision(env_prec, comp_prec[:, 0])
        slots.append((env_safe, env_lin, env_ok & finite & (a < 0.0) & ~ok.any(-1)))
    centres, factors, valid = [], [], []
    for p, eta, v in slots:
        U = _cholesky(p)[0]
        centres.append(torch.where(v[:, None], _cholesky_solve(eta, U), comp_centres[:, 0]))
        factors.append(U)
        valid.append(v)
    return centres, factors, valid


# --- d <= 3: nested panels ---------------------------------------------------------------------


def _lift(x: Tensor, extra: int) -> Tensor:
    """x with ``extra`` trailing unit axes (to broadcast an outer level against the inner ones)."""
    return x.reshape(*x.shape, *([1] * extra))


def _row(x: Tensor, ndim: int) -> Tensor:
    """A per-row [B] tensor shaped to broadcast against [B, ...] of ``ndim`` dims."""
    return x.reshape(x.shape[0], *([1] * (ndim - 1)))


def _real_roots(A: Tensor, Bq: Tensor, C: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The real roots of A t^2 + Bq t + C elementwise, each with a flag (a linear one has one root)."""
    tiny = torch.finfo(A.dtype).tiny
    linear = A.abs() <= 1e-12 * Bq.abs()
    disc = Bq * Bq - 4.0 * A * C
    root = torch.sqrt(disc.clamp_min(0.0))
    q = -0.5 * (Bq + torch.where(Bq >= 0, root, -root))
    r1 = torch.where(linear, -C / torch.where(Bq == 0, 1.0, Bq), q / torch.where(linear, 1.0, A))
    r2 = C / torch.where(q == 0, tiny, q)
    ok1 = torch.where(linear, Bq != 0, disc >= 0) & torch.isfinite(r1)
    ok2 = ~linear & (disc >= 0) & (q != 0) & torch.isfinite(r2)
    return [(torch.where(ok1, r1, 0.0), ok1), (torch.where(ok2, r2, 0.0), ok2)]


def _switch(r: Tensor, slope: Tensor, on: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A switch at r with width 1/slope, kept where ``on`` and inside (lo, hi): (where, width, kept)."""
    on = on & (r > lo) & (r < hi) & (slope > 0) & torch.isfinite(slope)
    return torch.where(on, r, lo), 1.0 / torch.where(on, slope, 1.0), on


def _member_forms(
    src: _Sources, members: list[int], member_log_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Each member's log density (weighted, less the common :math:`\tfrac d2\log 2\pi`) as the quadratic
    :math:`-\tfrac12 x^T\Lambda x + \eta^T x + \kappa` of the offsets x: (:math:`\Lambda` [B, M, d, d],
    :math:`\eta` [B, M, d], :math:`\kappa` [B, M])."""
    tril = src.trils[:, members]
    centre = src.centres[:, members]
    whiten = _triangular_inverse(tril)
    prec = _gram(whiten)
    eta = _mv(prec, centre)
    log_det = torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)
    return prec, eta, member_log_weights - 0.5 * (centre * eta).sum(-1) - log_det


def _folds(
    forms: tuple[Tensor, Tensor, Tensor], j: int, k: int, level: int, line: list[Tensor]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    r"""Where, on each line of ``level`` (0-based; the outer coordinates ``line`` [B, M] each), the surface
    :math:`g = \ell_j - \ell_k = 0` folds over the inner coordinates y (those after ``level``):
    the roots in :math:`t = x_{level}` of g at its critical point in y,
    :math:`\partial_y g = 0`. Inner integrals over y then change form there, and the outer integrand
    has a singularity smoothed over the switch width :math:`1/|\partial_t g|`. Each root comes
    with that slope and whether j and k are the top two members at the fold point.

    With :math:`g = -\tfrac12 x^TAx + b^Tx + c` the critical point is :math:`y^* = A_{yy}^{-1}(b_y -
    A_{ys}x_s)` and g there the Schur-complement quadratic in the outer coordinates s.
    """
    prec, eta, kappa = forms
    A = prec[:, j] - prec[:, k]
    b = eta[:, j] - eta[:, k]
    c = kappa[:, j] - kappa[:, k]
    d = A.shape[-1]
    o, y = slice(0, level + 1), slice(level + 1, d)
    Ayy = A[:, y, y]
    inverse, det = _small_inverse(Ayy)
    scale = A.flatten(-2).abs().amax(-1).clamp_min(torch.finfo(A.dtype).tiny)
    regular = det.abs() > 1e-10 * scale ** (d - level - 1)
    inverse = torch.where(regular[:, None, None], inverse, 0.0)
    G = _mm(A[:, o, y], inverse)
    At = A[:, o, o] - _mm(G, A[:, y, o])
    bt = b[:, o] - _mv(G, b[:, y])
    ct = c + 0.5 * (b[:, y] * _mv(inverse, b[:, y])).sum(-1)
    M = line[0].shape[1] if line else 1
    alpha = (-0.5 * At[:, level, level])[:, None].expand(-1, M)
    beta = bt[:, level, None].expand(-1, M)
    gamma = ct[:, None].expand(-1, M)
    for i, x in enumerate(line):
        beta = beta - At[:, level, i, None] * x
        gamma = gamma + bt[:, i, None] * x
        for i2, x2 in enumerate(line):
            gamma = gamma - 0.5 * At[:, i, i2, None] * x * x2
    out = []
    for r, ok in _real_roots(alpha, beta, gamma):
        outer = torch.stack([*line, r], -1) if line else r[..., None]  # [B, M, level + 1]
        rhs = b[:, None, y] - _mv(A[:, None, y, o], outer)
        inner = _mv(inverse[:, None], rhs)
        point = torch.cat([outer, inner], -1)  # [B, M, d]
        ells = (
            kappa[:, None]
            + (eta[:, None] * point[:, :, None]).sum(-1)
            - 0.5 * (point[:, :, None] * _mv(prec[:, None], point[:, :, None])).sum(-1)
        )
        tops = ells.max(-1).values
        on = ok & regular[:, None] & (ells[..., j] >= tops - 1e-9 * (1.0 + tops.abs()))
        out.append((r, (2.0 * alpha * r + beta).abs(), on))
    return out


def _panel_rule(
    src: _Sources, members: list[int], member_log_weights: Tensor, panels: tuple[int, ...], order: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Nodes and weights of the nested rule: per level l, coordinates u_l and weights w_l, each of
    shape [B, N_1, ..., N_{l+1}] (nested: u_l varies with the outer levels' nodes); the weight of a
    node is the product of its levels' weights. Built without a graph.

    ``members``: the source slots whose log densities switch (with ``member_log_weights`` [B, M]).
    """
    B, S, d = src.centres.shape
    t_gl, w_gl = _legendre(order)
    diag = torch.diagonal(src.trils, dim1=-2, dim2=-1)  # [B, S, d]
    log_diag = torch.log(diag)
    source_anchor = torch.as_tensor(_SOURCE_ANCHORS, dtype=src.centres.dtype)
    switch_anchor = torch.as_tensor(_SWITCH_ANCHORS, dtype=src.centres.dtype)
    a_s, b_s = SOURCE_WIDTH
    a_r, b_r = SWITCH_WIDTH
    prefix: list[Tensor] = []  # z_{s, i} of the outer nodes, [B, M, S] each
    line: list[Tensor] = []  # x_i of the outer nodes, [B, M] each
    forms = _member_forms(src, members, member_log_weights) if d > 1 else None
    quad = torch.zeros(B, 1, S, dtype=src.centres.dtype)
    shape = [B]
    coords, weights = [], []
    for level in range(d):
        M = quad.shape[1]
        h = diag[:, None, :, level]  # [B, 1, S]
        c = src.centres[:, None, :, level].expand(B, M, S)
        for i, z in enumerate(prefix):
            c = c + src.trils[:, None, :, level, i] * z
        nearest = torch.where(src.valid[:, None], quad, math.inf).min(-1, keepdim=True).values
        rel = src.valid[:, None] & (quad <= nearest.clamp_min(RELEVANT * RELEVANT))
        lo = torch.where(rel, c - REACH * h, math.inf).min(-1).values  # [B, M]
        hi = torch.where(rel, c + REACH * h, -math.inf).max(-1).values
        # switches: roots of the difference of two members' marginal log densities on the line
        log_det = log_diag[:, :, : level + 1].sum(-1)  # [B, S]

        def ell(j: int, t: Tensor, c=c, h=h, log_det=log_det, quad=quad) -> Tensor:
            s = members[j]
            e = (t - c[..., s]) / h[..., s]
            return member_log_weights[:, j, None] - 0.5 * quad[..., s] - log_det[:, s, None] - 0.5 * e * e

        switches = []
        for j in range(len(members)):
            for k in range(j + 1, len(members)):
                sj, sk = members[j], members[k]
                ij, ik = 1.0 / (h[..., sj] * h[..., sj]), 1.0 / (h[..., sk] * h[..., sk])
                A = 0.5 * (ik - ij)
                Bq = c[..., sj] * ij - c[..., sk] * ik
                C = ell(j, torch.zeros_like(lo)) - ell(k, torch.zeros_like(lo))
                for r, ok in _real_roots(A.expand_as(Bq), Bq, C):
                    tops = torch.stack([ell(m, r) for m in range(len(members))], -1).max(-1).values
                    on = ok & (ell(j, r) >= tops - 1e-9 * (1.0 + tops.abs()))
                    switches.append(_switch(r, (2.0 * A * r + Bq).abs(), on, lo, hi))
                if level < d - 1:  # where the switch surface folds over the inner coordinates
                    for r, slope, on in _folds(forms, j, k, level, line):
                        switches.append(_switch(r, slope, on, lo, hi))
        anchors = [
            torch.where(rel[..., None], c[..., None] + h[..., None] * source_anchor, lo[..., None, None])
        ]
        anchors = [anchors[0].flatten(-2)]
        for r, width, on in switches:
            anchors.append(
                torch.where(on[..., None], r[..., None] + width[..., None] * switch_anchor, lo[..., None])
            )
        anchors += [lo[..., None], hi[..., None]]
        cand = torch.cat(anchors, -1)
        cand = torch.sort(torch.minimum(torch.maximum(cand, lo[..., None]), hi[..., None]), -1).values
        mid = 0.5 * (cand[..., 1:] + cand[..., :-1])
        floor = 1.0 / (hi - lo)[..., None]

        def density(x: Tensor, c=c, h=h, rel=rel, switches=switches, floor=floor) -> Tensor:
            rho = torch.zeros_like(x)
            for s in range(S):
                z = (x - c[..., s, None]) / h[..., s, None]
                rho = torch.maximum(
                    rho, torch.where(rel[..., s, None], 1.0 / (h[..., s, None] * (a_s + b_s * z.abs())), 0.0)
                )
            for r, width, on in switches:
                t = (x - r[..., None]) / width[..., None]
                rho = torch.maximum(
                    rho, torch.where(on[..., None], 1.0 / (width[..., None] * (a_r + b_r * t.abs())), 0.0)
                )
            return rho + floor

        at_cand = density(cand)
        steps = (
            (cand[..., 1:] - cand[..., :-1])
            * (at_cand[..., 1:] + 4.0 * density(mid) + at_cand[..., :-1])
            / 6.0
        )
        phi = torch.cat([torch.zeros_like(steps[..., :1]), steps.cumsum(-1)], -1)
        n_panels = panels[level]
        targets = phi[..., -1:] * (torch.arange(n_panels + 1, dtype=phi.dtype) / n_panels)
        idx = torch.searchsorted(phi, targets, right=True).clamp(1, cand.shape[-1] - 1)
        p0, p1 = phi.gather(-1, idx - 1), phi.gather(-1, idx)
        x0, x1 = cand.gather(-1, idx - 1), cand.gather(-1, idx)
        frac = torch.where(p1 > p0, (targets - p0) / torch.where(p1 > p0, p1 - p0, 1.0), 0.0).clamp(0.0, 1.0)
        edges = torch.cat([lo[..., None], (x0 + frac * (x1 - x0))[..., 1:-1], hi[..., None]], -1)
        edges = torch.cummax(edges, -1).values  # monotone to rounding
        half = 0.5 * (edges[..., 1:] - edges[..., :-1])
        t = (edges[..., :-1, None] + half[..., None] * (t_gl + 1.0)).flatten(-2)  # [B, M, P n]
        w = (half[..., None] * w_gl).flatten(-2)
        n = t.shape[-1]
        shape = shape + [n]
        coords.append(t.reshape(shape))
        weights.append(w.reshape(shape))
        if level < d - 1:  # the next level's prefix, in every source's whitened coordinates
            z_new = (t[..., None] - c[:, :, None, :]) / h[:, :, None, :]  # [B, M, n, S]
            prefix = [z[:, :, None, :].expand(B, M, n, S).reshape(B, M * n, S) for z in prefix]
            line = [x[:, :, None].expand(B, M, n).reshape(B, M * n) for x in line] + [t.reshape(B, M * n)]
            prefix.append(z_new.reshape(B, M * n, S))
            quad = (quad[:, :, None, :] + z_new * z_new).reshape(B, M * n, S)
    return coords, weights


def _log_normal_nested(coords: list[Tensor], centre: Tensor, tril: Tensor) -> Tensor:
    r"""Log density of :math:`\mathcal N(\text{centre}, LL^T)` at the nested nodes: [B, N_1, ..., N_d].

    Forward substitution level by level: the conditional centre of level j and the log density of
    the outer levels are formed on the outer levels' (smaller) nested shape, so each level costs
    four operations on its own shape. Differentiable (twice) in ``centre`` [B, d] and ``tril``."""
    d = len(coords)
    log_det = torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)
    zs: list[Tensor] = []
    log_density = -(log_det + 0.5 * d * LOG_2PI)  # [B], then the outer levels' shape
    for j in range(d):
        nd = coords[j].dim()
        shift = _row(centre[:, j], nd - 1)  # the conditional centre on the outer shape
        for i in range(j):
            shift = shift + _row(tril[:, j, i], nd - 1) * _lift(zs[i], j - 1 - i)
        z = (coords[j] - shift.unsqueeze(-1)) * _row(1.0 / tril[:, j, j], nd)
        zs.append(z)
        log_density = _lift(log_density, 1) - 0.5 * (z * z)
    return log_density


def _nested_sum(x: Tensor, levels: int) -> Tensor:
    """Sum over the trailing ``levels`` axes one at a time: every reduction is shorter than torch's
    parallel grain, so a row's bits do not depend on how many rows share the batch."""
    for _ in range(levels):
        x = x.sum(-1)
    return x


def _nested_logsumexp(x: Tensor, levels: int) -> Tensor:
    for _ in range(levels):
        x = torch.logsumexp(x, -1)
    return x


# --- d > 3: randomised quasi-Monte Carlo --------------------------------------------------------


@lru_cache(maxsize=64)
def _sobol_normals(dim: int, points: int, seed: int, randomisation: int) -> Tensor:
    """``points`` scrambled Sobol points in [0, 1]^d mapped to N(0, I): [points, dim], a function of
    its arguments only (the scrambling's seed is derived from ``seed`` and ``randomisation``)."""
    derived = int(np.random.SeedSequence([seed, randomisation]).generate_state(1, dtype=np.uint64)[0] >> 1)
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=derived)
    u = engine.draw(points, dtype=torch.float64)
    eps = 2.0**-53
    return torch.special.ndtri(u.clamp(eps, 1.0 - eps))


def _qmc_integrals(
    divergence: Divergence,
    mixture: MixtureND,
    mean: Tensor,
    scale_tril: Tensor,
    a: Tensor | None,
    tau: Tensor | None,
    finite: Tensor | None,
    rule: QuasiMonteCarlo,
) -> tuple[Tensor, Tensor | None]:
    """Each randomisation's integral of the pointwise density, [R, B], and for Renyi its log
    :math:`\\int p^a q^{1-a}` [R, B]: the defensive-mixture estimate of the module docstring."""
    B, K, d = mixture.means.shape
    dtype = mean.dtype
    parts = _q_parts(mean, scale_tril, mixture)
    comp_centres, q_centre, comp_whiten, q_whiten = parts
    # each source: x = centre + root z, z = whiten (x - centre), log N = -|z|^2/2 + log det whiten - ...
    centres = [comp_centres[:, k] for k in range(K)] + [q_centre]
    roots = [mixture.scale_trils[:, k] for k in range(K)] + [scale_tril]
    whiten = [comp_whiten[:, k] for k in range(K)] + [q_whiten]
    valid = [torch.ones(B, dtype=torch.bool)] * (K + 1)
    if divergence.alpha_of is not None:
        for c, U, v in zip(*_tilted_sources(divergence, mixture, parts, a, tau, finite)):
            centres.append(c)
            whiten.append(U.transpose(-1, -2))
            roots.append(_triangular_inverse(U).transpose(-1, -2))
            valid.append(v)
    log_det = [torch.log(torch.diagonal(W, dim1=-2, dim2=-1)).sum(-1) - 0.5 * d * LOG_2PI for W in whiten]
    valid = torch.stack(valid, -1)
    log_beta = torch.where(valid, -torch.log(valid.sum(-1, keepdim=True).to(dtype)), -math.inf)  # [B, S]
    log_rule_base = log_beta[:, :, None] - math.log(rule.points)
    integrals, log_integrals = [], []
    for r in range(rule.randomisations):  # over randomisations, not rows
        z = _sobol_normals(d, rule.points, rule.seed, r).to(dtype)
        zb = z.expand(B, -1, -1)
        x = torch.stack(
            [c[:, None, :] + torch.bmm(zb, A.transpose(-1, -2)) for c, A in zip(centres, roots)], 1
        )
        S, n = x.shape[1], x.shape[2]
        log_g = []
        for c, W, ld in zip(centres, whiten, log_det):
            # whitened offsets of every point, [B, S, n, d]: one bmm per row (a batch of matrices
            # [S n, d] x [d, d] rounds the same for a row in any batch; a broadcast matmul does not)
            y = torch.bmm((x - c[:, None, None, :]).reshape(B, S * n, d), W.transpose(-1, -2)).reshape(
                B, S, n, d
            )
            log_g.append(-0.5 * (y * y).sum(-1) + ld[:, None, None])
        log_h = torch.logsumexp(
            torch.stack([g + log_beta[:, t, None, None] for t, g in enumerate(log_g)], -1), -1
        )
        log_q = log_g[K]
        log_p = None
        for k in range(K):  # over components
            term = log_g[k] + mixture.log_weights[:, k, None, None]
            log_p = term if log_p is None else logaddexp(log_p, term)
        rule_r = torch.exp(log_rule_base - log_h)  # [B, S, n]: weight of each point for integrals dx
        integral, log_integral = _integrate(divergence, rule_r, log_p, log_q, a, levels=2)
        integrals.append(integral)
        if log_integral is not None:
            log_integrals.append(log_integral)
    return torch.stack(integrals), (torch.stack(log_integrals) if log_integrals else None)


# --- the divergence ----------------------------------------------------------------------------


def _integrate(
    divergence: Divergence, rule: Tensor, log_p: Tensor, log_q: Tensor, a: Tensor | None, levels: int
) -> tuple[Tensor, Tensor | None]:
    """The integral [B] of the divergence's pointwise density (the registry's ``exact_term`` or
    ``density``) over nodes with weights ``rule`` (all [B, ...] with ``levels`` node axes), and for
    Renyi :math:`\\log\\int p^a q^{1-a}` [B] (:func:`kl_sweep.core.alpha.log_renyi_integral`)."""
    if divergence.exact_term is not None:
        term = divergence.exact_term(log_p, log_q)
    else:
        term = divergence.density(log_p, log_q, None if a is None else _row(a, log_p.dim()))
    integral = _nested_sum(family.integral_over_nodes(rule, term), levels - 1)
    log_integral = None
    if divergence.transform is not None:
        order = _row(1.0 - a, log_p.dim())  # Renyi's own order: log int q^order p^(1 - order)
        log_integral = _nested_logsumexp(family.log_renyi_integral(rule, log_p, log_q, order), levels - 1)
    return integral, log_integral


def _panel_integrals(
    divergence: Divergence,
    mixture: MixtureND,
    mean: Tensor,
    scale_tril: Tensor,
    a: Tensor | None,
    tau: Tensor | None,
    finite: Tensor | None,
    rule: Panels,
) -> tuple[Tensor, Tensor | None]:
    """The integral [B] (and Renyi's log integral) on the nested panel rule (module docstring)."""
    B, K, d = mixture.means.shape
    n_sources, n_pairs = structure(divergence, K)
    order = rule.order or default_order(d)
    panels = rule.panels or default_panels(d, K, n_sources, n_pairs)
    panels = (panels,) * d if isinstance(panels, int) else tuple(panels)
    if len(panels) != d:
        raise ValueError(f"panels: one count per level ({d}), got {panels}")
    with torch.no_grad():
        parts = _q_parts(mean.detach(), scale_tril.detach(), mixture)
        comp_centres, q_centre, _, _ = parts
        centres = [comp_centres[:, k] for k in range(K)] + [q_centre]
        trils = [mixture.scale_trils[:, k] for k in range(K)] + [scale_tril.detach()]
        valid = [torch.ones(B, dtype=torch.bool)] * (K + 1)
        if divergence.alpha_of is not None:
            for c, U, v in zip(*_tilted_sources(divergence, mixture, parts, a, tau, finite)):
                centres.append(c)
                whiten = _triangular_inverse(U)  # the covariance is U^-T U^-1
                trils.append(_cholesky(_mm(whiten.transpose(-1, -2), whiten))[0])
                valid.append(v)
        src = _Sources(torch.stack(centres, 1), torch.stack(trils, 1), torch.stack(valid, 1))
        members = list(range(K))
        member_log_weights = mixture.log_weights
        if divergence.name == "jensen_shannon":  # log(p + q): Q switches with the components too
            members.append(K)
            member_log_weights = torch.cat(
                [member_log_weights, torch.zeros_like(member_log_weights[:, :1])], 1
            )
        coords, weights = _panel_rule(src, members, member_log_weights, panels, order)
    origin = mean.detach()
    log_q = _log_normal_nested(coords, mean - origin, scale_tril)
    log_p = None
    for k in range(K):  # over components
        term = _log_normal_nested(coords, mixture.means[:, k] - origin, mixture.scale_trils[:, k])
        term = term + _row(mixture.log_weights[:, k], term.dim())
        log_p = term if log_p is None else logaddexp(log_p, term)
    w = weights[0]
    for level in range(1, d):
        w = _lift(w, 1) * weights[level]
    return _integrate(divergence, w, log_p, log_q, a, levels=d)


def divergence_nd(
    divergence: Divergence | str,
    mixture: MixtureND,
    mean: Tensor,
    scale_tril: Tensor,
    alpha: Tensor | float | None = None,
    *,
    rule: Panels | QuasiMonteCarlo | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The divergence between P = ``mixture`` and Q = N(``mean``, ``scale_tril`` ``scale_tril``:sup:`T`)
    for every row: (value [B], error [B]).

    ``divergence``: a registry member or its name; ``alpha``: its parameter (float or [B]) for
    ``alpha`` and ``renyi``. ``mean`` [B, d] and ``scale_tril`` [B, d, d] (lower triangular, positive
    diagonal). ``rule``: :class:`Panels` (default for d <= 3) or :class:`QuasiMonteCarlo` (default
    above). The value is in the divergence's own units (module docstring), +inf where it is
    infinite (:func:`finite_nd`), and differentiable twice by autograd in ``mean`` and
    ``scale_tril``. ``error`` is 0 for the panels (a deterministic rule) and the standard error of
    the randomised QMC estimate otherwise (0 where the value is +inf).
    """
    divergence = get_divergence(divergence) if isinstance(divergence, str) else divergence
    B, K, d = mixture.means.shape
    if mean.shape != (B, d) or scale_tril.shape != (B, d, d):
        raise ValueError(
            f"mean {tuple(mean.shape)} and scale_tril {tuple(scale_tril.shape)} for B={B}, d={d}"
        )
    rule = default_rule(d) if rule is None else rule
    a = divergence.orders(alpha, B, mean.dtype)
    finite = tau = None
    if a is not None:
        with torch.no_grad():
            parts = _q_parts(mean.detach(), scale_tril.detach(), mixture)
            prec, _ = _tilted(parts[0], parts[2], parts[1], parts[3], a)
            finite, tau = _orders_finite(prec, a)
    if isinstance(rule, QuasiMonteCarlo):
        integrals, log_integrals = _qmc_integrals(divergence, mixture, mean, scale_tril, a, tau, finite, rule)
        R = integrals.shape[0]
        integral = integrals.sum(0) / R
        spread = torch.sqrt(((integrals - integral) ** 2).sum(0) / (R - 1) / R).detach()
        log_integral = None
        if log_integrals is not None:
            log_integral = torch.logsumexp(log_integrals, 0) - math.log(R)
        value = _finish(divergence, integral, alpha, finite, log_integral)
        error = divergence.scale * spread
        if log_integral is not None:  # Renyi: |dR/dD| = order / int q^order p^(1 - order)
            order = torch.as_tensor(alpha, dtype=mean.dtype).expand(B)
            error = (order.abs() * error / torch.exp(log_integral)).detach()
        if finite is not None:
            error = torch.where(finite, error, 0.0)
        return value, error
    if d > 3:
        raise ValueError(f"the panel rule is for d <= 3 (nodes grow as the d-th power); d = {d}: use QMC")
    integral, log_integral = _panel_integrals(divergence, mixture, mean, scale_tril, a, tau, finite, rule)
    value = _finish(divergence, integral, alpha, finite, log_integral)
    return value, torch.zeros_like(value.detach())
