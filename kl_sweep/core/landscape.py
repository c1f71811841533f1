r"""The loss as a function of the state and the parameters, with the derivatives continuation needs.

A point is :math:`u = (\mu, s, d, w)`, shape [B, 4]: Q's mean and log standard deviation
:math:`s = \log\sigma` (the state :math:`\theta`), the separation d of P's two means and the weight
w of its left component (the parameters). For one divergence, center c and component variance v,

.. math:: L(u) = D\big(P_{d,w},\, \mathcal N(\mu, e^{2s})\big) \quad\text{in nats,}

with :math:`P_{d,w} = w\,\mathcal N(c - d/2, v) + (1 - w)\,\mathcal N(c + d/2, v)`. Stationary
points of L in :math:`\theta` are the fits; their branches, folds and cusps are in
:mod:`kl_sweep.core.bifurcation`.

:meth:`Landscape.jet` returns, for every row at once, the loss, its gradient in u, the mixed second
derivatives :math:`\partial^2 L / \partial\theta_i\,\partial u_j` and, when asked, the gradient of
:math:`\det H` (H the 2x2 Hessian in :math:`\theta`): third derivatives, which the fold system needs.
They come from torch autograd through the core's own fixed-node quadrature
(:func:`kl_sweep.core.divergences.divergence_value`): its panels are laid out under ``no_grad`` and
the derivatives flow through the densities, so each derivative is the same Gauss-Legendre rule
applied to the differentiated integrand (differentiation under the integral sign), as accurate as
the loss itself. Rows are independent, so the gradient of a sum over rows is every row's gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kl_sweep.core.divergences import Divergence, divergence_value
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.gaussians import Family
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.reduction import ReducedObjective, SharedPair, reverse_parts

#: Rows per autograd graph in :meth:`Landscape.jet` (chunks, not configurations, are looped over).
JET_CHUNK = 512
#: Column of each coordinate in u.
MU, LOG_SIGMA, SEPARATION, WEIGHT = range(4)


@dataclass
class Jet:
    """Derivatives of L at a batch of points u [B, n + 2] (see :meth:`Landscape.jet`): n state
    coordinates theta (2 on the line: mu, log sigma), then the two parameters."""

    loss: Tensor
    #: dL/du, [B, n + 2]; its first n columns are the gradient F in theta.
    grad: Tensor
    #: dF_i/du_j, [B, n, n + 2]; its first n columns are the Hessian H in theta.
    second: Tensor | None = None
    #: d(det H)/du, [B, n + 2] (third derivatives of L).
    det_grad: Tensor | None = None
    #: The number of state coordinates.
    n: int = 2

    @property
    def gradient(self) -> Tensor:
        """F = dL/dtheta, [B, n]."""
        return self.grad[:, : self.n]

    @property
    def hessian(self) -> Tensor:
        """H = d^2L/dtheta^2, [B, n, n], symmetrised."""
        h = self.second[:, :, : self.n]
        return 0.5 * (h + h.transpose(-1, -2))

    @property
    def det(self) -> Tensor:
        """det H, [B]."""
        return determinant(self.hessian)

    @property
    def minimum(self) -> Tensor:
        """Rows whose Hessian is positive definite (a strict local minimum if F = 0)."""
        return least_eigenvalue(self.hessian) > 0


def determinant(h: Tensor) -> Tensor:
    """Determinant of square matrices [B, n, n] (2 x 2 by its closed form)."""
    if h.shape[-1] == 2:
        return h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] * h[:, 1, 0]
    return torch.linalg.det(h)


def least_eigenvalue(h: Tensor) -> Tensor:
    """The smallest eigenvalue of symmetric matrices [B, n, n]: positive exactly where H is
    positive definite. Its sign changes where a minimum is born or dies, even where det H keeps
    its sign (an even number of eigenvalues crossing zero together, as symmetry can make them)."""
    out = torch.full((h.shape[0],), float("nan"), dtype=h.dtype)
    finite = torch.isfinite(h).all(-1).all(-1)  # (a Newton iterate that ran away: NaN, not an error)
    if bool(finite.any()):
        out[finite] = torch.linalg.eigvalsh(h[finite])[:, 0]
    return out


def autograd_jet(loss_fn, u: Tensor, n: int, order: int, block: int | None = None) -> Jet:
    """The loss and its derivatives at u [B, n + 2] by autograd, up to ``order`` (1, 2 or 3), all
    detached. ``det_grad`` is the gradient of det H, or with ``block`` of the determinant of H's
    leading ``block`` x ``block`` block. Rows go through autograd in chunks of :data:`JET_CHUNK`, so
    that each chunk's graph stays in cache (several times faster than one graph over thousands of
    rows)."""
    if len(u) > JET_CHUNK:
        parts = [autograd_jet(loss_fn, chunk, n, order, block) for chunk in u.split(JET_CHUNK)]
        fields = ("loss", "grad", "second", "det_grad")
        joined = (
            None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
            for f in fields
        )
        return Jet(*joined, n=n)
    u = u.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(u)
        (grad,) = torch.autograd.grad(loss.sum(), u, create_graph=order >= 2)
        if order < 2:
            return Jet(loss.detach(), grad.detach(), n=n)
        # All n rows of dF/du in one vmapped backward pass (is_grads_batched): 3-5x faster than n
        # passes for the d > 1 families' 4 to 20 coordinates; the same numbers to rounding (1e-14).
        pick = torch.zeros(n, *grad.shape, dtype=grad.dtype)
        pick[torch.arange(n), :, torch.arange(n)] = 1.0
        (second,) = torch.autograd.grad(
            grad, u, grad_outputs=pick, is_grads_batched=True, create_graph=order >= 3, retain_graph=True
        )
        second = second.transpose(0, 1)
        det_grad = None
        if order >= 3:
            h = second[:, : block or n, : block or n]
            (det_grad,) = torch.autograd.grad(determinant(0.5 * (h + h.transpose(-1, -2))).sum(), u)
            det_grad = det_grad.detach()
    return Jet(loss.detach(), grad.detach(), second.detach(), det_grad, n=n)


@dataclass(frozen=True)
class Landscape:
    """The loss of one divergence as a function of u = (mu, log sigma, separation, weight).

    ``center`` and ``component_var`` fix P's other parameters; ``nodes_per_panel`` is the order of
    the Gauss-Legendre panels (12, as for every reported value: 1e-9 nats or better).
    """

    divergence: Divergence
    center: float = 0.0
    component_var: float = 1.0
    nodes_per_panel: int = 12
    #: The divergence's order (``divergence.alpha``) for the members that take one.
    alpha: float | None = None
    #: The state's coordinates (mu, log sigma) and the parameters after them in u.
    n_state: ClassVar[int] = 2
    #: How many of the state's coordinates are Q's means (the rest are its scale).
    n_mean: ClassVar[int] = 1
    parameters: ClassVar[tuple[str, str]] = ("separation", "weight")

    def state_bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(lower, upper) box of the state coordinates for continuation: |log sigma| <= 12."""
        return (-float("inf"), -12.0), (float("inf"), 12.0)

    def covering_ratio(self, u: Tensor) -> Tensor:
        """sigma^2 / V* [B], V* = v + w(1 - w)d^2 P's variance: 1 for the covering fit."""
        _, var = self.moment_matched(u[:, SEPARATION], u[:, WEIGHT])
        return torch.exp(2 * u[:, LOG_SIGMA]) / var

    def _alpha(self, u: Tensor) -> Tensor | None:
        return None if self.alpha is None else torch.full_like(u[:, 0], self.alpha)

    def mixture(self, u: Tensor) -> Mixture:
        """P at every row's (separation, weight)."""
        full = torch.ones_like(u[:, SEPARATION])
        return Mixture.two_component(
            u[:, SEPARATION], u[:, WEIGHT], self.center * full, self.component_var * full
        )

    def loss(self, u: Tensor) -> Tensor:
        """L(u) in nats, [B], differentiable in every column of u."""
        quadrature = Quadrature(self.nodes_per_panel)
        mixture = self.mixture(u)
        return divergence_value(
            self.divergence, quadrature, mixture, u[:, MU], u[:, LOG_SIGMA], self._alpha(u)
        )

    def moment_matched(self, separation: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        r"""P's mean and variance :math:`(c + d(1/2 - w),\; v + w(1 - w)d^2)`: the forward-KL optimum."""
        mean = self.center + separation * (0.5 - weight)
        return mean, self.component_var + weight * (1.0 - weight) * separation * separation

    def theta_jet(self, u: Tensor) -> Jet:
        """The loss, F and H at u [B, 4] from the fitting core's derivatives, without autograd.

        The core's :class:`~kl_sweep.core.fit.Objective` on the same quadrature: closed-form
        derivatives for expectations under Q, the moment form for forward KL. Several times faster
        than :meth:`jet`, for Newton on F = 0 at fixed (d, w); the d and w columns of ``grad`` and
        ``second`` are not computed (NaN).
        """
        from kl_sweep.core.fit import Objective

        theta = u[:, :2].detach()
        objective = Objective.build(
            self.divergence, Quadrature(self.nodes_per_panel), self.mixture(u.detach()), theta, self._alpha(u)
        )
        loss, grad, hess = objective.derivatives(theta, hessian=True)
        nan = torch.full_like(grad, float("nan"))
        return Jet(
            loss.detach(), torch.cat([grad, nan], -1), torch.cat([hess, nan[:, :, None].expand(-1, 2, 2)], -1)
        )

    def breaking_block(self, u: Tensor) -> None:
        """The line has no symmetric subspace to leave (:meth:`ReducedLandscape.breaking_block`)."""
        return None

    def jet(self, u: Tensor, order: int = 2) -> Jet:
        """The loss and its derivatives at u [B, 4], up to ``order`` (1, 2 or 3), all detached.

        Order 1: the gradient in u. Order 2: also dF/du. Order 3: also d(det H)/du
        (:func:`autograd_jet`).
        """
        return autograd_jet(self.loss, u, self.n_state, order)


@dataclass(frozen=True)
class ReducedLandscape:
    r"""The loss in d dimensions: two components with a shared equicorrelated covariance
    (:class:`~kl_sweep.core.reduction.SharedPair`) and Q in a family (``full``, ``diag``, ``iso``).

    A point is u = (theta, separation, p) with theta [P] the family's parameters (means, then the
    log scales and off-diagonals of :class:`~kl_sweep.core.gaussians.Family`) and p the second
    parameter, ``weight`` or ``correlation`` (:attr:`second`); the other one is fixed
    (:attr:`weight`, :attr:`correlation`). The loss is the reverse KL through the exact 1-D
    reduction, :math:`\mathrm{KL}(q_1\Vert p_1) + G` (:mod:`kl_sweep.core.reduction`): the 1-D
    term on the same Gauss-Legendre panels as :class:`Landscape`, the closed form G by torch, so
    autograd differentiates both in every coordinate of u. The forward KL has one minimum in every
    family (it is convex in Q's natural parameters), so it has no structure to continue.
    """

    family: Family
    direction: str = "axis"
    center: float = 0.0
    component_var: float = 1.0
    #: Which parameter is the second coordinate of u after the separation.
    second: str = "weight"
    weight: float = 0.5
    correlation: float = 0.0
    nodes_per_panel: int = 12
    #: Restrict Q to the target's permutation symmetry (:func:`symmetric_embedding`): the state is
    #: then a few coordinates at any d (``diag`` and ``iso`` only).
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.second not in ("weight", "correlation"):
            raise ValueError(f"second must be 'weight' or 'correlation', not {self.second!r}")
        if self.symmetric and self.family.name == "full":
            raise ValueError("the symmetric subspace is for the diag and iso families")

    @functools.cached_property
    def embedding(self) -> Tensor | None:
        """E [P, k] with theta = E z on the symmetric subspace, or None (the whole space)."""
        return symmetric_embedding(self.family, self.direction) if self.symmetric else None

    @functools.cached_property
    def breaking(self) -> Tensor | None:
        """V [P, m]: one direction per kind of parameter that breaks the permutation symmetry
        (:func:`breaking_directions`), or None."""
        return breaking_directions(self.family, self.direction) if self.symmetric else None

    def theta(self, u: Tensor) -> Tensor:
        """The family's parameters [B, P] of the state in u."""
        z = u[:, : self.n_state]
        return z if self.embedding is None else z @ self.embedding.T

    @property
    def divergence(self) -> Divergence:
        from kl_sweep.core.divergences import DIVERGENCES

        return DIVERGENCES["reverse"]

    @property
    def n_state(self) -> int:
        return self.family.n_params if self.embedding is None else self.embedding.shape[1]

    @property
    def n_mean(self) -> int:
        if self.embedding is None:
            return self.family.dim
        return len(coordinate_groups(self.direction, self.family.dim))

    @property
    def parameters(self) -> tuple[str, str]:
        return ("separation", self.second)

    def state_bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """|log scale| <= 12 for the family's log scales; means and off-diagonals are free."""
        mask = self.family.log_scale_mask()
        if self.embedding is not None:
            mask = (self.embedding.T @ mask.to(self.embedding.dtype)) > 0
        mask = mask.tolist()
        lower = tuple(-12.0 if m else -float("inf") for m in mask)
        return lower, tuple(-x for x in lower)

    def target(self, u: Tensor) -> SharedPair:
        """P at every row's parameters."""
        n = self.n_state
        sep, p = u[:, n], u[:, n + 1]
        full = torch.ones_like(sep)
        weight = p if self.second == "weight" else self.weight * full
        rho = p if self.second == "correlation" else self.correlation * full
        return SharedPair(
            sep, weight, self.center * full, self.component_var * full, rho, self.family.dim, self.direction
        )

    def loss(self, u: Tensor) -> Tensor:
        """KL(Q || P) in nats, [B], differentiable in every column of u."""
        target = self.target(u)
        phi, closed = reverse_parts(target, self.family, self.theta(u))
        line = divergence_value(
            self.divergence, Quadrature(self.nodes_per_panel), target.line(), phi[:, 0], phi[:, 1]
        )
        return line + closed

    def theta_jet(self, u: Tensor) -> Jet:
        """The loss, F and H at u from the fitting core's closed-form derivatives
        (:class:`~kl_sweep.core.reduction.ReducedObjective`), without autograd; the parameter
        columns of ``grad`` and ``second`` are NaN."""
        n = self.n_state
        loss, grad, hess = self._derivatives(u)
        if self.embedding is not None:
            E = self.embedding
            grad, hess = grad @ E, E.T @ hess @ E
        nan = torch.full((len(u), 2), float("nan"), dtype=u.dtype)
        second = torch.cat([hess, nan[:, None, :].expand(-1, n, 2)], -1)
        return Jet(loss.detach(), torch.cat([grad, nan], -1), second, n=n)

    def _derivatives(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, gradient [B, P], Hessian [B, P, P]) in the family's parameters, closed form."""
        objective = ReducedObjective.build(
            self.divergence, Quadrature(self.nodes_per_panel), self.target(u.detach()), self.family
        )
        return objective.derivatives(self.theta(u.detach()), hessian=True)

    def jet(self, u: Tensor, order: int = 2) -> Jet:
        """The loss and its derivatives at u [B, n + 2] by autograd, up to ``order``."""
        return autograd_jet(self.loss, u, self.n_state, order)

    def breaking_block(self, u: Tensor) -> Tensor | None:
        """B = V^T H V / 2 [B, m, m], the Hessian on the symmetry-breaking directions (closed
        form), or None off the symmetric subspace. The Hessian in all P parameters is positive
        definite exactly where this block and the subspace's are (it commutes with the
        permutations, so it splits into their symmetric part and copies of B)."""
        if self.breaking is None or self.breaking.shape[1] == 0:
            return None
        _, _, hess = self._derivatives(u)
        V = self.breaking
        return 0.5 * (V.T @ hess @ V)

    def covering_ratio(self, u: Tensor) -> Tensor:
        r""":math:`u^TSu / u^T\mathrm{Cov}_P u` [B]: Q's variance along the separation over P's."""
        target = self.target(u)
        _, S = self.family.covariance(self.theta(u))
        along = target.u
        q_var = torch.einsum("i,bij,j->b", along, S, along)
        p_var = torch.einsum("i,bij,j->b", along, target.covariance(), along)
        return q_var / p_var


def coordinate_groups(direction: str, dim: int) -> tuple[tuple[int, ...], ...]:
    """The coordinates that the target (:class:`~kl_sweep.core.reduction.SharedPair`) treats alike:
    its covariance is equicorrelated, so permuting coordinates leaves it unchanged, and the means
    are unchanged by permutations of all coordinates (``diagonal``) or of all but the first (``axis``)."""
    if direction == "diagonal":
        return (tuple(range(dim)),)
    return ((0,), tuple(range(1, dim))) if dim > 1 else ((0,),)


def symmetric_embedding(family: Family, direction: str) -> Tensor:
    """E [P, k]: the family's parameters theta = E z that are equal within each coordinate group
    (:func:`coordinate_groups`): one mean per group, then one log scale per group (``diag``) or the
    one log scale (``iso``). A fit started symmetric stays on this subspace, so its branches,
    folds and mirror pitchforks can be continued in k = 2 to 4 coordinates at any d."""
    if family.name == "full":
        raise ValueError("the symmetric subspace is for the diag and iso families")
    d, groups = family.dim, coordinate_groups(direction, family.dim)
    columns = []
    for offset in (0, d) if family.name == "diag" else (0,):
        for group in groups:
            column = torch.zeros(family.n_params, dtype=torch.float64)
            column[[offset + i for i in group]] = 1.0
            columns.append(column)
    if family.name == "iso":
        column = torch.zeros(family.n_params, dtype=torch.float64)
        column[d] = 1.0
        columns.append(column)
    return torch.stack(columns, -1)


def breaking_directions(family: Family, direction: str) -> Tensor:
    """V [P, m]: for each kind of parameter that has one per coordinate (means; log scales for
    ``diag``), e_i - e_j for two coordinates i, j of a group; m = 0 if no group has two."""
    d = family.dim
    groups = [g for g in coordinate_groups(direction, d) if len(g) >= 2]
    columns = []
    for group in groups[:1]:  # (at most one group has two coordinates or more)
        for offset in (0, d) if family.name == "diag" else (0,):
            column = torch.zeros(family.n_params, dtype=torch.float64)
            column[offset + group[0]], column[offset + group[1]] = 1.0, -1.0
            columns.append(column)
    return torch.stack(columns, -1) if columns else torch.zeros(family.n_params, 0, dtype=torch.float64)
