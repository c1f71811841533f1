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

from dataclasses import dataclass

import torch
from torch import Tensor

from kl_sweep.core.divergences import Divergence, divergence_value
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.mixture import Mixture

#: Rows per autograd graph in :meth:`Landscape.jet` (chunks, not configurations, are looped over).
JET_CHUNK = 512
#: Column of each coordinate in u.
MU, LOG_SIGMA, SEPARATION, WEIGHT = range(4)


@dataclass
class Jet:
    """Derivatives of L at a batch of points u [B, 4] (see :meth:`Landscape.jet`)."""

    loss: Tensor
    #: dL/du, [B, 4]; its first two columns are the gradient F in theta.
    grad: Tensor
    #: dF_i/du_j, [B, 2, 4]; its first two columns are the Hessian H in theta.
    second: Tensor | None = None
    #: d(det H)/du, [B, 4] (third derivatives of L).
    det_grad: Tensor | None = None

    @property
    def gradient(self) -> Tensor:
        """F = dL/dtheta, [B, 2]."""
        return self.grad[:, :2]

    @property
    def hessian(self) -> Tensor:
        """H = d^2L/dtheta^2, [B, 2, 2], symmetrised."""
        h = self.second[:, :, :2]
        return 0.5 * (h + h.transpose(-1, -2))

    @property
    def det(self) -> Tensor:
        """det H, [B]."""
        return determinant(self.hessian)

    @property
    def minimum(self) -> Tensor:
        """Rows whose Hessian is positive definite (a strict local minimum if F = 0)."""
        h = self.hessian
        return (h[:, 0, 0] > 0) & (self.det > 0)


def determinant(h: Tensor) -> Tensor:
    """Determinant of 2x2 matrices [B, 2, 2]."""
    return h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] * h[:, 1, 0]


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

    def jet(self, u: Tensor, order: int = 2) -> Jet:
        """The loss and its derivatives at u [B, 4], up to ``order`` (1, 2 or 3), all detached.

        Order 1: the gradient in u. Order 2: also dF/du. Order 3: also d(det H)/du. Rows go through
        autograd in chunks of :data:`JET_CHUNK` so that each chunk's graph stays in cache (several
        times faster than one graph over thousands of rows).
        """
        if len(u) > JET_CHUNK:
            parts = [self._jet(chunk, order) for chunk in u.split(JET_CHUNK)]
            return Jet(
                *(
                    None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                    for f in ("loss", "grad", "second", "det_grad")
                )
            )
        return self._jet(u, order)

    def _jet(self, u: Tensor, order: int) -> Jet:
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(u)
            (grad,) = torch.autograd.grad(loss.sum(), u, create_graph=order >= 2)
            if order < 2:
                return Jet(loss.detach(), grad.detach())
            rows = [
                torch.autograd.grad(grad[:, i].sum(), u, create_graph=order >= 3, retain_graph=True)[0]
                for i in range(2)
            ]
            second = torch.stack(rows, 1)
            det_grad = None
            if order >= 3:
                h = second[:, :, :2]
                (det_grad,) = torch.autograd.grad(determinant(0.5 * (h + h.transpose(-1, -2))).sum(), u)
                det_grad = det_grad.detach()
        return Jet(loss.detach(), grad.detach(), second.detach(), det_grad)
