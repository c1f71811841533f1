r"""Gaussians and Gaussian mixtures in :math:`\mathbb R^d`, and the families Q is fitted in.

A family is a parametrisation :math:`\theta \leftrightarrow (m, S)` of Q = N(m, S), with
:math:`\theta` = (the mean, then the scale parameters), a [B, P] tensor with one row per
configuration, as Pyro and TFP hold them:

- ``full``: :math:`S = L L^T` with L lower triangular; its entries row by row (row-major lower
  triangle), each diagonal entry as :math:`\log L_{ii}` so that S is positive definite by
  construction (Pyro's AutoMultivariateNormal ``scale_tril``). P = d + d(d+1)/2.
- ``diag``: mean-field, :math:`S = \mathrm{diag}(\sigma_i^2)`, held as :math:`\log\sigma_i`
  (AutoNormal). P = 2d.
- ``iso``: :math:`S = \sigma^2 I`, held as :math:`\log\sigma`. P = d + 1.

In d = 1 all three are the 1-D Q with :math:`\theta = (\mu, \log\sigma)`. Everything is float64
and batched; no function loops over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kl_sweep.core.mixture import Mixture

LOG_2PI = math.log(2.0 * math.pi)
#: The families of Q, by their config name (``q_family``).
FAMILY_NAMES = ("full", "diag", "iso")


@dataclass(frozen=True)
class Family:
    """One family of Gaussians Q = N(m, S) in d dimensions (see the module docstring)."""

    name: str
    dim: int

    def __post_init__(self) -> None:
        if self.name not in FAMILY_NAMES:
            raise ValueError(f"unknown family {self.name!r}: one of {', '.join(FAMILY_NAMES)}")

    @property
    def n_scale(self) -> int:
        d = self.dim
        return {"full": d * (d + 1) // 2, "diag": d, "iso": 1}[self.name]

    @property
    def n_params(self) -> int:
        return self.dim + self.n_scale

    def log_scale_mask(self) -> Tensor:
        """True [P] at the parameters that are logs of a scale (the rest are means or off-diagonals)."""
        mask = torch.zeros(self.n_params, dtype=torch.bool)
        if self.name == "full":
            rows, cols = torch.tril_indices(self.dim, self.dim)
            mask[self.dim :] = rows == cols
        else:
            mask[self.dim :] = True
        return mask

    def scale_tril(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(mean [B, d], L [B, d, d]) with S = L L^T, differentiable in ``theta`` [B, P]."""
        d = self.dim
        mean, scale = theta[:, :d], theta[:, d:]
        if self.name == "iso":
            sigma = torch.exp(scale)  # [B, 1]
            return mean, torch.diag_embed(sigma.expand(-1, d))
        if self.name == "diag":
            return mean, torch.diag_embed(torch.exp(scale))
        rows, cols = torch.tril_indices(d, d)
        diagonal = (rows == cols).to(theta.device)
        values = torch.where(diagonal, torch.exp(scale), scale)
        # Each entry of L picks its value (1 + its index in the lower triangle) or a zero (index 0).
        pick = torch.zeros(d * d, dtype=torch.long)
        pick[rows * d + cols] = torch.arange(1, len(rows) + 1)
        padded = torch.cat([torch.zeros_like(values[:, :1]), values], -1)
        return mean, padded[:, pick].reshape(-1, d, d)

    def covariance(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(mean [B, d], S [B, d, d])."""
        mean, L = self.scale_tril(theta)
        return mean, L @ L.transpose(-1, -2)

    def log_det(self, theta: Tensor) -> Tensor:
        r""":math:`\log\det S` [B], from the log-scale parameters directly."""
        scale = theta[:, self.dim :]
        if self.name == "iso":
            return 2.0 * self.dim * scale[:, 0]
        if self.name == "diag":
            return 2.0 * scale.sum(-1)
        return 2.0 * scale[:, self.log_scale_mask()[self.dim :]].sum(-1)

    def from_moments(self, mean: Tensor, cov: Tensor) -> Tensor:
        r"""The member closest to N(mean, cov) in KL(N(mean, cov) || Q): theta [B, P].

        This is the forward KL's minimiser over the family when (mean, cov) are P's moments:
        ``full`` takes cov itself (its Cholesky factor), ``diag`` its diagonal, ``iso`` the
        average variance :math:`\mathrm{tr}(\mathrm{cov})/d`.
        """
        d = self.dim
        if self.name == "iso":
            var = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1, keepdim=True)
            return torch.cat([mean, 0.5 * torch.log(var)], -1)
        if self.name == "diag":
            var = torch.diagonal(cov, dim1=-2, dim2=-1)
            return torch.cat([mean, 0.5 * torch.log(var)], -1)
        L = torch.linalg.cholesky(cov)
        rows, cols = torch.tril_indices(d, d)
        values = L[:, rows, cols]
        values = torch.where(rows == cols, torch.log(values.clamp_min(torch.finfo(L.dtype).tiny)), values)
        return torch.cat([mean, values], -1)

    def initial(self, mean: Tensor, var: Tensor) -> Tensor:
        """theta [B, P] of Q = N(mean, var I): ``mean`` [B, d], ``var`` [B]."""
        d = self.dim
        log_sigma = 0.5 * torch.log(var).unsqueeze(-1)
        if self.name == "iso":
            return torch.cat([mean, log_sigma], -1)
        if self.name == "diag":
            return torch.cat([mean, log_sigma.expand(-1, d)], -1)
        rows, cols = torch.tril_indices(d, d)
        scale = torch.where(rows == cols, log_sigma, torch.zeros_like(log_sigma))
        return torch.cat([mean, scale], -1)


@dataclass(frozen=True)
class MixtureND:
    r"""A batch of Gaussian mixtures :math:`p(x) = \sum_k w_k\,\mathcal N(x; m_k, \Sigma_k)` in R^d.

    ``log_weights`` [B, K], ``means`` [B, K, d], ``scale_trils`` [B, K, d, d] (lower Cholesky
    factors of the :math:`\Sigma_k`).
    """

    log_weights: Tensor
    means: Tensor
    scale_trils: Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def __getitem__(self, index: Tensor) -> MixtureND:
        return MixtureND(self.log_weights[index], self.means[index], self.scale_trils[index])

    @classmethod
    def cat(cls, parts: list[MixtureND]) -> MixtureND:
        return cls(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("log_weights", "means", "scale_trils"))
        )

    @property
    def u(self) -> Tensor:
        """The direction the table's ``mu`` and ``sigma2`` are taken along: e_1."""
        u = torch.zeros(self.dim, dtype=self.means.dtype)
        u[0] = 1.0
        return u

    def marginal_variances(self) -> Tensor:
        """P's variance along each axis [B, d]."""
        return torch.diagonal(self.covariance(), dim1=-2, dim2=-1)

    def is_gaussian(self) -> Tensor:
        """True [B] where P has one component."""
        return torch.full((self.means.shape[0],), self.means.shape[1] == 1)

    def log_det_cov(self) -> Tensor:
        """log det of the first component's covariance [B] (P's own where it is one Gaussian)."""
        return 2.0 * torch.log(torch.diagonal(self.scale_trils[:, 0], dim1=-2, dim2=-1)).sum(-1)

    def line(self) -> Mixture:
        """The 1-D mixture of x_1 (P's marginal along e_1)."""
        variances = self.covariances()[:, :, 0, 0]
        return Mixture(self.means[..., 0], variances, self.log_weights)

    def covariances(self) -> Tensor:
        L = self.scale_trils
        return L @ L.transpose(-1, -2)

    def mean(self) -> Tensor:
        r""":math:`E_P[x] = \sum_k w_k m_k`, [B, d]."""
        return (torch.exp(self.log_weights).unsqueeze(-1) * self.means).sum(-2)

    def covariance(self) -> Tensor:
        r""":math:`\mathrm{Cov}_P[x] = \sum_k w_k (\Sigma_k + (m_k - \bar m)(m_k - \bar m)^T)`, [B, d, d]."""
        w = torch.exp(self.log_weights)[..., None, None]
        dev = self.means - self.mean().unsqueeze(-2)
        outer = dev.unsqueeze(-1) * dev.unsqueeze(-2)
        return (w * (self.covariances() + outer)).sum(-3)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density at ``x`` [B, N, d]: [B, N], by logsumexp over the components."""
        parts = [
            self.log_weights[:, k : k + 1] + mvn_log_prob(x, self.means[:, k], self.scale_trils[:, k])
            for k in range(self.means.shape[1])  # over the K components, not over rows
        ]
        return torch.logsumexp(torch.stack(parts, -1), -1)


def mvn_log_prob(x: Tensor, mean: Tensor, scale_tril: Tensor) -> Tensor:
    r"""Log density of N(mean, L L^T) at ``x`` [B, N, d], in nats: [B, N]; ``mean`` [B, d], L [B, d, d]."""
    d = x.shape[-1]
    diff = (x - mean.unsqueeze(-2)).transpose(-1, -2)  # [B, d, N]
    z = torch.linalg.solve_triangular(scale_tril, diff, upper=False)
    half_log_det = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (d * LOG_2PI + (z * z).sum(-2)) - half_log_det.unsqueeze(-1)
