r"""Two components with a shared covariance in :math:`\mathbb R^d`: every divergence, exactly, in 1-D.

The target is :math:`P = w\,\mathcal N(m_1, \Sigma) + (1-w)\,\mathcal N(m_2, \Sigma)` with
:math:`m_{1,2} = c\mathbf 1 \mp \tfrac s2 u` and :math:`\Sigma = v R`,
:math:`R = (1-\rho) I + \rho\mathbf 1\mathbf 1^T`. With the Mahalanobis separation
:math:`\Delta = s\sqrt{u^T\Sigma^{-1}u}` and the projection
:math:`\tau(x) = b^T(x - c\mathbf 1)`, :math:`b = \Sigma^{-1}u/\sqrt{u^T\Sigma^{-1}u}`:

.. math:: \log p(x) = \log\mathcal N(x; m_1, \Sigma) + \log\big(w + (1-w)e^{\Delta\tau}\big),

and in whitened coordinates P is the 1-D mixture :math:`p_1 = w\mathcal N(-\Delta/2, 1) +
(1-w)\mathcal N(\Delta/2, 1)` along one axis times a standard normal across it. Under any Gaussian
Q = N(mu, S), :math:`\tau` is 1-D Gaussian, so:

- reverse KL: :math:`\mathrm{KL}(Q\Vert P) = \mathrm{KL}(q_1\Vert p_1) + G`, with
  :math:`q_1 = \mathcal N(b^T\tilde\mu, b^TSb)` (:math:`\tilde\mu = \mu - c\mathbf 1`) and the
  closed form :math:`G = \tfrac12[\log\det\Sigma - \log\det S + \log C + \tilde\mu^T\Sigma^{-1}\tilde\mu
  - m^2 + \mathrm{tr}(\Sigma^{-1}S) - C - (d-1)]`, :math:`m = b^T\tilde\mu`, :math:`C = b^TSb`
  (the chain rule of KL along and across the axis);
- forward KL: :math:`-H(P) - E_P\log q`, closed form in P's mean and covariance once
  :math:`H(P) = H(p_1) + \tfrac{d-1}2\log(2\pi e) + \tfrac12\log\det\Sigma` (H(p_1) by the 1-D
  quadrature, once per fit);
- the alpha family: :math:`\mathcal N(x; m_1,\Sigma)^a q^{1-a} = K\,\mathcal N(x; m_*, C_*)` with
  :math:`C_*^{-1} = a\Sigma^{-1} + (1-a)S^{-1}`, which must be positive definite (else
  :math:`\int p^a q^{1-a}` is infinite); then :math:`\int p^a q^{1-a} = K\,E[(w + (1-w)e^{\Delta\tau})^a]`
  under :math:`\tau \sim \mathcal N(b^T(m_* - c\mathbf 1), b^TC_*b)`, and that 1-D expectation is
  :math:`I_1/K_1` for the 1-D alpha integral :math:`I_1 = \int p_1^a q_1^{1-a}` of the 1-D Gaussian
  :math:`q_1` with :math:`n_1^a q_1^{1-a} = K_1\mathcal N(\tau; b^T(m_*-c), b^TC_*b)`. With
  :math:`\kappa = \log K - \log K_1`, :math:`D_a = e^\kappa D_a^{(1)} - \mathrm{expm1}(\kappa)/(a(1-a))`
  and Renyi :math:`R = R^{(1)} - \kappa/a`.

So each row costs one 1-D problem of the registry (on the same quadrature, the same native kernel)
plus closed forms. Derivatives in the family's parameters: the 1-D quantity F at
:math:`\phi_0 = \phi(\theta_0)` is replaced by its second-order Taylor polynomial
:math:`\tilde F(\phi) = F + g^T(\phi-\phi_0) + \tfrac12(\phi-\phi_0)^T H(\phi-\phi_0)` (value,
gradient g and Hessian H from the 1-D objective), which has the same first and second derivatives
at :math:`\theta_0`; autograd then differentiates the closed forms around it exactly.

Jensen-Shannon (:math:`\log(p + q)`) does not reduce; it is not available here.
All quantities are in nats (the alpha family's :math:`D_a` is dimensionless).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from kl_sweep.core.divergences import DIVERGENCES, Divergence, divergence_exact, kl_pair_exact
from kl_sweep.core.estimators import Estimator
from kl_sweep.core.gaussians import LOG_2PI, Family, MixtureND
from kl_sweep.core.mixture import Mixture

#: Entries of a [b, P, P] Hessian formed at once (32 MB of float64 per temporary).
HESSIAN_ENTRIES = 4_000_000
#: The divergences this reduction serves (Jensen-Shannon does not reduce to 1-D).
REDUCIBLE = ("forward", "reverse", "alpha", "hellinger", "chi2", "renyi")
DIRECTIONS = ("axis", "diagonal")


def direction_vector(direction: str, dim: int, dtype=torch.float64) -> Tensor:
    """u [d]: e_1 (``axis``) or the ones vector over sqrt(d) (``diagonal``)."""
    if direction == "axis":
        u = torch.zeros(dim, dtype=dtype)
        u[0] = 1.0
        return u
    if direction == "diagonal":
        return torch.full((dim,), 1.0 / math.sqrt(dim), dtype=dtype)
    raise ValueError(f"unknown direction {direction!r}: one of {', '.join(DIRECTIONS)}")


@dataclass(frozen=True)
class SharedPair:
    r"""A batch of two-component targets with a shared equicorrelated covariance, all [B].

    :math:`\Sigma^{-1} = \alpha I + \beta\mathbf 1\mathbf 1^T` with :math:`\alpha = 1/(v(1-\rho))`,
    :math:`\beta = -\alpha\rho/(1 + (d-1)\rho)`: every product with it costs O(d).
    """

    separation: Tensor
    weight: Tensor
    center: Tensor
    component_var: Tensor
    correlation: Tensor
    dim: int
    direction: str

    FIELDS = ("separation", "weight", "center", "component_var", "correlation")

    def __getitem__(self, index: Tensor) -> SharedPair:
        return replace(self, **{f: getattr(self, f)[index] for f in self.FIELDS})

    @classmethod
    def cat(cls, parts: list[SharedPair]) -> SharedPair:
        return replace(parts[0], **{f: torch.cat([getattr(p, f) for p in parts]) for f in cls.FIELDS})

    @property
    def u(self) -> Tensor:
        return direction_vector(self.direction, self.dim, self.separation.dtype)

    def precision_parts(self) -> tuple[Tensor, Tensor]:
        r"""(alpha, beta) [B] with :math:`\Sigma^{-1} = \alpha I + \beta\mathbf 1\mathbf 1^T`."""
        rho, d = self.correlation, self.dim
        alpha = 1.0 / (self.component_var * (1.0 - rho))
        return alpha, -alpha * rho / (1.0 + (d - 1) * rho)

    def log_det_cov(self) -> Tensor:
        r""":math:`\log\det\Sigma = d\log v + (d-1)\log(1-\rho) + \log(1 + (d-1)\rho)`."""
        rho, d = self.correlation, self.dim
        return d * torch.log(self.component_var) + (d - 1) * torch.log1p(-rho) + torch.log1p((d - 1) * rho)

    def precision_times(self, x: Tensor) -> Tensor:
        r""":math:`\Sigma^{-1}x` for x [B, d]."""
        alpha, beta = self.precision_parts()
        return alpha.unsqueeze(-1) * x + (beta * x.sum(-1)).unsqueeze(-1)

    def mahalanobis_unit(self) -> Tensor:
        r""":math:`\sqrt{u^T\Sigma^{-1}u}` [B]."""
        alpha, beta = self.precision_parts()
        ones_u = float(self.u.sum())
        return torch.sqrt(alpha + beta * ones_u * ones_u)

    def mahalanobis_separation(self) -> Tensor:
        r""":math:`\Delta = s\sqrt{u^T\Sigma^{-1}u}` [B]: the separation in component sds."""
        return self.separation * self.mahalanobis_unit()

    def projection(self) -> Tensor:
        r"""b [B, d] with :math:`\tau = b^T(x - c\mathbf 1)`: unit variance under each component."""
        u = self.u.expand(self.separation.shape[0], -1)
        return self.precision_times(u) / self.mahalanobis_unit().unsqueeze(-1)

    def line(self) -> Mixture:
        r"""The 1-D mixture :math:`p_1` of :math:`\tau`: means :math:`\mp\Delta/2`, variances 1."""
        zero = torch.zeros_like(self.separation)
        return Mixture.two_component(self.mahalanobis_separation(), self.weight, zero, torch.ones_like(zero))

    def centre(self) -> Tensor:
        """c 1 [B, d]."""
        return self.center.unsqueeze(-1).expand(-1, self.dim)

    def mean(self) -> Tensor:
        r""":math:`E_P x = c\mathbf 1 + \tfrac s2(1-2w)u` [B, d]."""
        return self.centre() + (0.5 * self.separation * (1.0 - 2.0 * self.weight)).unsqueeze(-1) * self.u

    def covariance(self) -> Tensor:
        r""":math:`\mathrm{Cov}_P = vR + w(1-w)s^2uu^T` [B, d, d]."""
        d, rho, v = self.dim, self.correlation, self.component_var
        eye = torch.eye(d, dtype=v.dtype)
        R = (1.0 - rho)[:, None, None] * eye + rho[:, None, None]
        between = self.weight * (1.0 - self.weight) * self.separation**2
        u = self.u
        return v[:, None, None] * R + between[:, None, None] * (u[:, None] * u[None, :])

    def marginal_variances(self) -> Tensor:
        """P's variance along each axis [B, d]."""
        between = self.weight * (1.0 - self.weight) * self.separation**2
        return self.component_var.unsqueeze(-1) + between.unsqueeze(-1) * self.u**2

    def is_gaussian(self) -> Tensor:
        """True [B] where P is a single Gaussian (no separation)."""
        return self.separation == 0

    def as_mixture(self) -> MixtureND:
        """The same target as a general mixture (for what does not reduce: Jensen-Shannon)."""
        d, rho = self.dim, self.correlation
        eye = torch.eye(d, dtype=rho.dtype)
        R = (1.0 - rho)[:, None, None] * eye + rho[:, None, None]
        L = torch.linalg.cholesky(self.component_var[:, None, None] * R)
        half = (0.5 * self.separation).unsqueeze(-1) * self.u
        means = torch.stack([self.centre() - half, self.centre() + half], 1)
        log_w = torch.stack([torch.log(self.weight), torch.log1p(-self.weight)], -1)
        return MixtureND(log_w, means, torch.stack([L, L], 1))


# --- the family's covariance in the products the reduction needs --------------------------------


@dataclass(frozen=True)
class _Scale:
    """Q's covariance S through the few products the closed forms use, O(d^2) for ``full``,
    O(d) for ``diag`` and ``iso``: never a d x d inverse."""

    family: Family
    theta: Tensor

    def __post_init__(self) -> None:
        d = self.family.dim
        scale = self.theta[:, d:]
        name = self.family.name
        if name == "full":
            object.__setattr__(self, "L", self.family.scale_tril(self.theta)[1])
        elif name == "diag":
            object.__setattr__(self, "var", torch.exp(2.0 * scale))
        else:
            object.__setattr__(self, "var", torch.exp(2.0 * scale).expand(-1, d))

    def quad(self, v: Tensor) -> Tensor:
        """v^T S v [B] for v [B, d]."""
        if self.family.name == "full":
            y = (self.L * v.unsqueeze(-1)).sum(-2)  # L^T v
            return (y * y).sum(-1)
        return (self.var * v * v).sum(-1)

    def trace(self) -> Tensor:
        if self.family.name == "full":
            return (self.L * self.L).sum((-1, -2))
        return self.var.sum(-1)

    def sum_all(self) -> Tensor:
        """1^T S 1."""
        return self.quad(torch.ones_like(self.theta[:, : self.family.dim]))

    def log_det(self) -> Tensor:
        return self.family.log_det(self.theta)

    def dense(self) -> Tensor:
        if self.family.name == "full":
            return self.L @ self.L.transpose(-1, -2)
        return torch.diag_embed(self.var)


def reverse_parts(target: SharedPair, family: Family, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(phi [B, 2] = (m, log sd) of q_1, G [B]) of the reverse KL's reduction."""
    d = family.dim
    mean = theta[:, :d] - target.centre()
    S = _Scale(family, theta)
    b = target.projection()
    m = (b * mean).sum(-1)
    C = S.quad(b)
    alpha, beta = target.precision_parts()
    trace = alpha * S.trace() + beta * S.sum_all()
    total = mean.sum(-1)
    maha = alpha * (mean * mean).sum(-1) + beta * total * total
    log_c = torch.log(C)
    G = 0.5 * (target.log_det_cov() - S.log_det() + log_c + (maha - m * m) + (trace - C) - (d - 1))
    return torch.stack([m, 0.5 * log_c], -1), G


def _forward_value(target: SharedPair, family: Family, theta: Tensor, entropy: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(P\Vert Q) = -H(P) + \tfrac12[d\log 2\pi + \log\det S + \mathrm{tr}(S^{-1}\Sigma_P)
    + (\mu - \bar m)^T S^{-1}(\mu - \bar m)]`, given H(P) [B]."""
    d = family.dim
    mean, L = family.scale_tril(theta)
    cov_p = target.covariance()
    # tr(S^-1 Sigma_P) = |L^-1 chol(Sigma_P)|_F^2 and the Mahalanobis term as |L^-1 (mu - m)|^2.
    root = torch.linalg.cholesky(cov_p)
    diff = (mean - target.mean()).unsqueeze(-1)
    solved = torch.linalg.solve_triangular(L, torch.cat([root, diff], -1), upper=False)
    trace = (solved[..., :d] ** 2).sum((-1, -2))
    maha = (solved[..., d] ** 2).sum(-1)
    return -entropy + 0.5 * (d * LOG_2PI + family.log_det(theta) + trace + maha)


def line_entropy(line: Mixture, nodes_per_panel: int = 12) -> Tensor:
    r""":math:`H(p_1)` [B], nats: :math:`\tfrac12\log(2\pi e V) - \mathrm{KL}(p_1\Vert\mathcal N(E p_1, V))`,
    V the variance of :math:`p_1`. Computed once for each distinct mixture of the batch (a sweep's
    rows share a few separations and weights): each row's value is its own mixture's, the same bits
    in any batch."""
    key = torch.cat([line.means, line.variances, line.log_weights], -1).contiguous().numpy()
    rows = key.view(np.dtype((np.void, key.strides[0])))  # a row as one value (numpy sorts bytes fast)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    if len(first) < len(key):
        entropy = line_entropy(line[torch.from_numpy(first)], nodes_per_panel)
        return entropy[torch.from_numpy(inverse.reshape(-1))]
    var = line.variance()
    kl = kl_pair_exact(line, line.mean(), 0.5 * torch.log(var), nodes_per_panel)[0]
    return 0.5 * (LOG_2PI + 1.0 + torch.log(var)) - kl


def target_entropy(target: SharedPair) -> Tensor:
    r""":math:`H(P) = H(p_1) + \tfrac{d-1}2\log(2\pi e) + \tfrac12\log\det\Sigma` [B], nats."""
    d = target.dim
    return line_entropy(target.line()) + 0.5 * (d - 1) * (LOG_2PI + 1.0) + 0.5 * target.log_det_cov()


def _alpha_parts(
    target: SharedPair, family: Family, theta: Tensor, a: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""(phi [B, 2] of q_1, kappa [B], finite [B]) of the alpha family's reduction at order a [B].

    Dense in d (a Cholesky of :math:`a\Sigma^{-1} + (1-a)S^{-1}`): O(d^3) a row.
    """
    d = family.dim
    dtype = theta.dtype
    mean, L = family.scale_tril(theta)
    mu = mean - target.centre()
    eye = torch.eye(d, dtype=dtype)
    alpha_p, beta_p = target.precision_parts()
    prec_p = alpha_p[:, None, None] * eye + beta_p[:, None, None]
    L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    prec_q = L_inv.transpose(-1, -2) @ L_inv
    ak = a[:, None, None]
    lam = ak * prec_p + (1.0 - ak) * prec_q
    lam = 0.5 * (lam + lam.transpose(-1, -2))
    chol, info = torch.linalg.cholesky_ex(lam)
    finite = info == 0
    chol = torch.where(finite[:, None, None], chol, eye)
    u = target.u
    m1 = (-0.5 * target.separation).unsqueeze(-1) * u  # component 1's mean, relative to c 1
    h = a.unsqueeze(-1) * (prec_p @ m1.unsqueeze(-1)).squeeze(-1) + (1.0 - a).unsqueeze(-1) * (
        prec_q @ mu.unsqueeze(-1)
    ).squeeze(-1)
    w = torch.linalg.solve_triangular(chol, h.unsqueeze(-1), upper=False).squeeze(-1)  # chol^-1 h
    log_det_lam = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    quad_p = (m1 * (prec_p @ m1.unsqueeze(-1)).squeeze(-1)).sum(-1)
    quad_q = (mu * (prec_q @ mu.unsqueeze(-1)).squeeze(-1)).sum(-1)
    log_k = (
        -0.5 * a * target.log_det_cov()
        - 0.5 * (1.0 - a) * family.log_det(theta)
        - 0.5 * log_det_lam
        - 0.5 * (a * quad_p + (1.0 - a) * quad_q - (w * w).sum(-1))
    )
    b = target.projection()
    cb = torch.linalg.solve_triangular(chol, b.unsqueeze(-1), upper=False).squeeze(-1)  # chol^-1 b
    v1 = (cb * cb).sum(-1)  # b^T lam^-1 b
    m_star = (cb * w).sum(-1)  # b^T lam^-1 h
    # q_1 with n_1^a q_1^(1-a) proportional to N(m_star, v1); n_1 = N(-Delta/2, 1).
    half_delta = 0.5 * target.mahalanobis_separation()
    gap = 1.0 / v1 - a
    vq = (1.0 - a) / gap
    mq = (m_star / v1 + a * half_delta) / gap
    log_k1 = -0.5 * (1.0 - a) * torch.log(vq) + 0.5 * torch.log(v1)
    log_k1 = log_k1 - 0.5 * (a * half_delta * half_delta + (1.0 - a) * mq * mq / vq - m_star * m_star / v1)
    return torch.stack([mq, 0.5 * torch.log(vq)], -1), log_k - log_k1, finite


# --- the objective the fit loop steps on ---------------------------------------------------------


@dataclass
class ReducedObjective:
    """The divergence of each active row as a function of the family's theta [B, P]; the same
    interface as :class:`kl_sweep.core.objective.Objective`, which the fit loop steps on."""

    divergence: Divergence
    estimator: Estimator
    target: SharedPair
    family: Family
    alpha: Tensor | None = None
    #: H(P) per row, for the forward KL.
    entropy: Tensor | None = None
    trusted: Tensor | None = None
    #: The line mixture p_1 per row (its switch points computed once per fit, not per step).
    line: Mixture | None = None

    @classmethod
    def build(
        cls,
        divergence: Divergence,
        estimator: Estimator,
        target: SharedPair,
        family: Family,
        alpha: Tensor | None = None,
    ) -> ReducedObjective:
        if divergence.name not in REDUCIBLE:
            raise ValueError(f"divergence {divergence.name!r} has no 1-D reduction in d > 1")
        # H(P) for the forward KL, and for alpha rows of order 1 (the forward KL's limit).
        entropy = target_entropy(target) if divergence.name in ("forward", "alpha") else None
        return cls(divergence, estimator, target, family, alpha, entropy, line=target.line())

    def subset(self, keep: Tensor) -> ReducedObjective:
        if keep.dtype == torch.bool:
            keep = keep.nonzero().squeeze(-1)
        return replace(
            self,
            target=self.target[keep],
            alpha=None if self.alpha is None else self.alpha[keep],
            entropy=None if self.entropy is None else self.entropy[keep],
            line=self.line[keep],
        )

    @staticmethod
    def concat(a: ReducedObjective, b: ReducedObjective) -> ReducedObjective:
        def cat(x, y):
            return None if x is None else torch.cat([x, y])

        return replace(
            a,
            target=SharedPair.cat([a.target, b.target]),
            alpha=cat(a.alpha, b.alpha),
            entropy=cat(a.entropy, b.entropy),
            line=Mixture.cat([a.line, b.line]),
        )

    #: No edge optima in d > 1: the finite region of the alpha family is a matrix inequality, and
    #: a step that would leave it is halved (see the README's exceptions).
    has_edges = False

    # -- what the loop asks of an objective --

    def orders(self, n: int, dtype: torch.dtype) -> Tensor | None:
        return self.divergence.orders(self.alpha, n, dtype)

    def finite(self, theta: Tensor) -> Tensor:
        """True [B] where the divergence is finite at theta (decided analytically)."""
        a = self.orders(theta.shape[0], theta.dtype)
        if a is None:
            return torch.ones(theta.shape[0], dtype=torch.bool)
        with torch.no_grad():
            return _alpha_parts(self.target, self.family, theta, a)[2] | ((a >= 0) & (a <= 1))

    def parameter_bounds(self, dtype: torch.dtype) -> Tensor:
        """|theta| bounds [P] beyond which a row counts as diverged (as in 1-D)."""
        from kl_sweep.core.problem import MAX_ABS_LOG_SIGMA, MAX_ABS_MU

        mask = self.family.log_scale_mask()
        bounds = torch.full(mask.shape, MAX_ABS_MU, dtype=dtype)
        return bounds.masked_fill(mask, MAX_ABS_LOG_SIGMA)

    def __call__(self, theta: Tensor) -> Tensor:
        return self.derivatives(theta, hessian=False)[0]

    def derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Loss [b], gradient [b, P] and, if asked, Hessian [b, P, P] in the family's parameters.

        Hessians are formed a block of rows at a time (at most :data:`HESSIAN_ENTRIES` entries
        in each of their temporaries), so memory stays bounded however large P and the batch.
        """
        B, P = theta.shape
        rows = max(1, HESSIAN_ENTRIES // (P * P))
        if hessian and B > rows:
            parts = [
                self.subset(torch.arange(i, min(i + rows, B))).derivatives(theta[i : i + rows], True)
                for i in range(0, B, rows)  # over blocks of rows, each a batch of its own
            ]
            return tuple(torch.cat(part) for part in zip(*parts))
        return _per_kind(
            self.kinds(theta),
            lambda kind, rows: self._rows(rows)._derivatives_of(kind, _take_rows(theta, rows), hessian),
        )

    def _rows(self, rows: Tensor | None) -> ReducedObjective:
        return self if rows is None else self.subset(rows)

    def kinds(self, theta: Tensor) -> Tensor:
        """Per row [B]: :data:`REVERSE` (the reverse KL, and an alpha order 0: its limit),
        :data:`FORWARD` (the forward KL, and an order 1) or :data:`LINE` (every other order)."""
        name, n = self.divergence.name, theta.shape[0]
        if name in ("reverse", "forward"):
            return torch.full((n,), REVERSE if name == "reverse" else FORWARD)
        a = self.orders(n, theta.dtype)
        return torch.where(a == 0, REVERSE, torch.where(a == 1, FORWARD, LINE))

    def _derivatives_of(
        self, kind: int, theta: Tensor, hessian: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if kind == REVERSE:
            return self._reverse_derivatives(theta, hessian)
        if kind == FORWARD:
            entropy = self.entropy
            return _autograd(lambda t: _forward_value(self.target, self.family, t, entropy), theta, hessian)
        a = self.orders(theta.shape[0], theta.dtype)
        return self._through_line(theta, hessian, self.divergence.name, a)

    def _reverse_derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""The reverse KL's loss, gradient and Hessian in closed form, O(d^2) a row for ``full``.

        With :math:`s = \tfrac12\log C` the loss is :math:`\hat F(m, s) + \tfrac12\tilde\mu^T\Sigma^{-1}
        \tilde\mu + \tfrac12\mathrm{tr}(\Sigma^{-1}S) - \tfrac12\log\det S` + const, where
        :math:`\hat F = F + s - m^2/2 - e^{2s}/2` and F is the 1-D reverse KL (value, gradient and
        Hessian from the 1-D objective, the native kernel where available). m is linear in the
        mean; C and the trace are quadratic in the entries of L, each diagonal entry held as its
        log: the chain rule below is written once for all three families (``diag`` is ``full``
        with its diagonal entries only, ``iso`` ties those to one parameter). The same values as
        autograd on :func:`reverse_parts` (a test checks it), without a graph.
        """
        target, family = self.target, self.family
        d, B = family.dim, theta.shape[0]
        centred = theta[:, :d] - target.centre()
        b = target.projection()
        alpha, beta = target.precision_parts()
        rows, cols = entries(family)
        on_diag = rows == cols
        psi = theta[:, d:] if family.name != "iso" else theta[:, d:].expand(-1, d)
        vals = torch.where(on_diag, torch.exp(psi), psi)
        r = theta.new_zeros((B, d)).index_add_(1, cols, b[:, rows] * vals)  # L^T b
        C = (r * r).sum(-1)
        m = (b * centred).sum(-1)
        s = 0.5 * torch.log(C)
        f, g, H = _line_objective(self, "reverse", torch.stack([m, s], -1)).derivatives(
            torch.stack([m, s], -1), hessian
        )
        col_sum = theta.new_zeros((B, d)).index_add_(1, cols, vals)
        prec_l = alpha.unsqueeze(-1) * vals + beta.unsqueeze(-1) * col_sum[:, cols]  # (Sigma^-1 L)_k
        total = centred.sum(-1)
        prec_mean = alpha.unsqueeze(-1) * centred + (beta * total).unsqueeze(-1)
        n_diag = on_diag.to(theta.dtype)
        log_det_s = 2.0 * (torch.where(on_diag, psi, 0.0)).sum(-1)
        loss = (
            f
            + s
            - 0.5 * m * m
            - 0.5 * C
            + 0.5 * (centred * prec_mean).sum(-1)
            + 0.5 * (vals * prec_l).sum(-1)
            - 0.5 * log_det_s
            + 0.5 * target.log_det_cov()
            - 0.5 * (d - 1)
        )
        f_m, f_s = g[:, 0] - m, g[:, 1] + 1.0 - C
        jac = torch.where(on_diag, vals, 1.0)
        dc_l = 2.0 * b[:, rows] * r[:, cols]
        dc = dc_l * jac
        ds = dc / (2.0 * C).unsqueeze(-1)
        dt = prec_l * jac - n_diag
        grad_scale = f_s.unsqueeze(-1) * ds + dt
        grad_mean = f_m.unsqueeze(-1) * b + prec_mean
        if family.name == "iso":
            grad_scale = grad_scale.sum(-1, keepdim=True)
        grad = torch.cat([grad_mean, grad_scale], -1)
        if not hessian:
            return loss, grad, None
        f_mm, f_ms, f_ss = H[:, 0, 0] - 1.0, H[:, 0, 1], H[:, 1, 1] - 2.0 * C
        same_col = (cols.unsqueeze(-1) == cols.unsqueeze(0)).to(theta.dtype)
        same_row = (rows.unsqueeze(-1) == rows.unsqueeze(0)).to(theta.dtype)
        outer_jac = jac.unsqueeze(-1) * jac.unsqueeze(-2)
        br = b[:, rows]
        d2c = 2.0 * br.unsqueeze(-1) * br.unsqueeze(-2) * same_col * outer_jac
        d2c = d2c + torch.diag_embed(n_diag * vals * dc_l)
        d2s = (
            d2c / (2.0 * C)[:, None, None]
            - dc.unsqueeze(-1) * dc.unsqueeze(-2) / (2.0 * C * C)[:, None, None]
        )
        prec_entries = alpha[:, None, None] * same_row + beta[:, None, None]
        d2t = prec_entries * same_col * outer_jac + torch.diag_embed(n_diag * vals * prec_l)
        h_ss = f_ss[:, None, None] * ds.unsqueeze(-1) * ds.unsqueeze(-2) + f_s[:, None, None] * d2s + d2t
        h_ms = f_ms[:, None, None] * b.unsqueeze(-1) * ds.unsqueeze(-2)
        eye = torch.eye(d, dtype=theta.dtype)
        h_mm = f_mm[:, None, None] * b.unsqueeze(-1) * b.unsqueeze(-2) + alpha[:, None, None] * eye
        h_mm = h_mm + beta[:, None, None]
        if family.name == "iso":
            h_ss = h_ss.sum((-1, -2), keepdim=True)
            h_ms = h_ms.sum(-1, keepdim=True)
        hess = torch.cat([torch.cat([h_mm, h_ms], -1), torch.cat([h_ms.transpose(-1, -2), h_ss], -1)], -2)
        return loss, grad, hess

    def _line_objective(self, name: str, theta1: Tensor):
        return _line_objective(self, name, theta1)

    def _through_line(
        self, theta: Tensor, hessian: bool, name: str, a: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        target, family = self.target, self.family
        with torch.no_grad():
            if a is None:
                phi0, _ = reverse_parts(target, family, theta)
                finite = torch.ones(theta.shape[0], dtype=torch.bool)
            else:
                phi0, _, finite = _alpha_parts(target, family, theta, a)
                phi0 = torch.where(finite.unsqueeze(-1), phi0, 0.0)
            f, g, H = self._line_objective(name, phi0).derivatives(phi0, hessian)
        if H is None:
            H = torch.zeros(theta.shape[0], 2, 2, dtype=theta.dtype)
        ok = torch.isfinite(f) & finite
        f = torch.where(ok, f, 0.0)
        g = torch.where(ok.unsqueeze(-1), g, 0.0)
        H = torch.where(ok[:, None, None], H, 0.0)

        def value(t: Tensor) -> Tensor:
            if a is None:
                phi, G = reverse_parts(target, family, t)
            else:
                phi, kappa, _ = _alpha_parts(target, family, t, a)
            step = phi - phi0
            F = f + (g * step).sum(-1) + 0.5 * (step * (H @ step.unsqueeze(-1)).squeeze(-1)).sum(-1)
            return F + G if a is None else _compose(self.divergence, F, kappa, a)

        loss, grad, hess = _autograd(value, theta, hessian)
        loss = torch.where(ok, loss, torch.inf)
        return loss, grad, hess


def entries(family: Family) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the entries of L the family's scale parameters set (``iso``: the diagonal,
    tied to one parameter)."""
    d = family.dim
    if family.name == "full":
        rows, cols = torch.tril_indices(d, d)
        return rows, cols
    index = torch.arange(d)
    return index, index


def _line_objective(objective: ReducedObjective, name: str, theta1: Tensor):
    """The 1-D objective of the line mixture p_1 at theta1 = (m, log sd) [B, 2]."""
    from kl_sweep.core.objective import Objective

    alpha = objective.alpha if DIVERGENCES[name].parameter else None
    return Objective.build(DIVERGENCES[name], objective.estimator, objective.line, theta1, alpha)


def _autograd(fn, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """fn(theta) [b], its gradient [b, P] and, if asked, Hessian [b, P, P] (rows are independent)."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = fn(theta)
        (grad,) = torch.autograd.grad(loss.sum(), theta, create_graph=hessian)
        hess = None
        if hessian:
            P = theta.shape[1]
            rows = [torch.autograd.grad(grad[:, i].sum(), theta, retain_graph=i < P - 1)[0] for i in range(P)]
            hess = torch.stack(rows, 1).detach()
    return loss.detach(), grad.detach(), hess


# --- exact values at a fitted point --------------------------------------------------------------


def exact_value(
    divergence: Divergence, target: SharedPair, family: Family, theta: Tensor, alpha: Tensor | None = None
) -> Tensor:
    """The divergence at theta [B, P] to near rounding level (12 Gauss-Legendre nodes a panel)."""
    from kl_sweep.core.estimators import Quadrature

    objective = ReducedObjective.build(divergence, Quadrature(12), target, family, alpha)
    with torch.no_grad():
        return _per_kind(
            objective.kinds(theta),
            lambda kind, rows: (_exact_of(kind, objective._rows(rows), _take_rows(theta, rows)),),
        )[0]


def _exact_of(kind: int, objective: ReducedObjective, theta: Tensor) -> Tensor:
    target, family, divergence = objective.target, objective.family, objective.divergence
    if kind == FORWARD:
        return _forward_value(target, family, theta, objective.entropy)
    if kind == REVERSE:
        phi, G = reverse_parts(target, family, theta)
        return kl_pair_exact(objective.line, phi[:, 0], phi[:, 1], 12)[1] + G
    a = objective.orders(theta.shape[0], theta.dtype)
    phi, kappa, finite = _alpha_parts(target, family, theta, a)
    phi = torch.where(finite.unsqueeze(-1), phi, 0.0)
    f = divergence_exact(divergence, objective.line, phi[:, 0], phi[:, 1], 12, alpha=objective.alpha)
    return torch.where(finite & torch.isfinite(f), _compose(divergence, f, kappa, a), torch.inf)


def _compose(divergence: Divergence, line_value: Tensor, kappa: Tensor, a: Tensor) -> Tensor:
    r"""The member in R^d from its 1-D value and :math:`\kappa = \log K - \log K_1`:
    :math:`R = R^{(1)} - \kappa/a` for Renyi, :math:`e^\kappa D + s(1 - e^\kappa)/(a(1-a))` (scale s)
    for the others (module docstring)."""
    if divergence.transform is not None:
        return line_value - kappa / a
    return torch.exp(kappa) * line_value - divergence.scale * torch.expm1(kappa) / (a * (1.0 - a))


def _take_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[rows]


#: The kinds of row of :meth:`ReducedObjective.kinds`.
REVERSE, FORWARD, LINE = 0, 1, 2


def _per_kind(kinds: Tensor, compute) -> tuple[Tensor | None, ...]:
    """``compute(kind, rows)`` for each kind of row present (rows None: all of them), put back in row
    order: one tuple of [B, ...] tensors (the kinds are few; a row's result depends on itself only)."""
    present = kinds.unique().tolist()
    if len(present) == 1:  # the common case: all rows at once, nothing copied
        return compute(present[0], None)
    parts = [
        (rows, compute(kind, rows)) for kind in present for rows in [(kinds == kind).nonzero().squeeze(-1)]
    ]
    out = []
    for j, first in enumerate(parts[0][1]):
        if first is None:
            out.append(None)
            continue
        full = first.new_empty((len(kinds), *first.shape[1:]))
        for rows, result in parts:
            full[rows] = result[j]
        out.append(full)
    return tuple(out)


def kl_pair(target: SharedPair, family: Family, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(P||Q), KL(Q||P)) [B] at theta, exact."""
    return (
        exact_value(DIVERGENCES["forward"], target, family, theta),
        exact_value(DIVERGENCES["reverse"], target, family, theta),
    )
