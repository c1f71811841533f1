r"""The objective of targets that do not reduce to 1-D: a general mixture in :math:`\mathbb R^d`
(``target.file``), or Jensen-Shannon on any target. The divergence is integrated in R^d by
:func:`kl_sweep.core.cubature.divergence_nd`, and differentiated by autograd in the family's
parameters. It is the same interface as :class:`kl_sweep.core.objective.Objective`, so the one fit
loop steps on it. With randomised QMC (d > 3), the points are fixed by their seed, so the
optimiser sees a deterministic objective (common random numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kl_sweep.core.cubature import divergence_nd, finite_nd
from kl_sweep.core.divergences import Divergence
from kl_sweep.core.estimators import Estimator
from kl_sweep.core.gaussians import Family, MixtureND


@dataclass
class GeneralObjective:
    """The divergence of each active row as a function of the family's theta [B, P]."""

    divergence: Divergence
    estimator: Estimator
    target: MixtureND
    family: Family
    alpha: Tensor | None = None
    trusted: Tensor | None = None

    #: No edge optima in d > 1 (as for :class:`~kl_sweep.core.reduction.ReducedObjective`).
    has_edges = False

    @classmethod
    def build(
        cls,
        divergence: Divergence,
        estimator: Estimator,
        target: MixtureND,
        family: Family,
        alpha: Tensor | None = None,
    ) -> GeneralObjective:
        return cls(divergence, estimator, target, family, alpha)

    def subset(self, keep: Tensor) -> GeneralObjective:
        if keep.dtype == torch.bool:
            keep = keep.nonzero().squeeze(-1)
        alpha = None if self.alpha is None else self.alpha[keep]
        return replace(self, target=self.target[keep], alpha=alpha)

    @staticmethod
    def concat(a: GeneralObjective, b: GeneralObjective) -> GeneralObjective:
        alpha = None if a.alpha is None else torch.cat([a.alpha, b.alpha])
        return replace(a, target=MixtureND.cat([a.target, b.target]), alpha=alpha)

    def finite(self, theta: Tensor) -> Tensor:
        mean, L = self.family.scale_tril(theta)
        return finite_nd(self.divergence, self.target, mean, L, self.alpha)

    def parameter_bounds(self, dtype: torch.dtype) -> Tensor:
        from kl_sweep.core.problem import MAX_ABS_LOG_SIGMA, MAX_ABS_MU

        bounds = torch.full((self.family.n_params,), MAX_ABS_MU, dtype=dtype)
        return bounds.masked_fill(self.family.log_scale_mask(), MAX_ABS_LOG_SIGMA)

    def value(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(value, error) [B] at theta."""
        mean, L = self.family.scale_tril(theta)
        return divergence_nd(self.divergence, self.target, mean, L, self.alpha)

    def __call__(self, theta: Tensor) -> Tensor:
        with torch.no_grad():
            return self.value(theta)[0]

    def derivatives(self, theta: Tensor, hessian: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Loss [b], gradient [b, P] and, if asked, Hessian [b, P, P], by autograd (rows are
        independent: derivatives of the sum over rows are each row's own)."""
        from kl_sweep.core.reduction import _autograd

        loss, grad, hess = _autograd(lambda t: self.value(t)[0], theta, hessian)
        finite = torch.isfinite(loss)
        grad = torch.where(finite.unsqueeze(-1), grad, 0.0)
        return loss, grad, hess
