"""Batched one-dimensional Gaussian mixtures P and the Gaussian Q = N(mu, sigma^2).

Every tensor carries a leading batch dimension B (one row per configuration) so that one call
evaluates many configurations at once. Densities are only ever handled as log densities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    r"""Log density of :math:`\mathcal N(\text{mean}, \text{var})` at ``x``, in nats.

    ``mean`` and ``var`` broadcast against ``x``; the normalising constant is included, so
    :math:`\int \exp(\cdot)\,dx = 1` (the original notebook put :math:`2\pi\sigma^2` into the exponent).
    """
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) * (x - mean) / var)


@dataclass(frozen=True)
class Mixture:
    r"""A batch of Gaussian mixtures :math:`p(x) = \sum_k w_k\,\mathcal N(x; m_k, v_k)`.

    ``means``, ``variances`` and ``log_weights`` have shape [B, K]; K is any number of components.
    """

    means: Tensor
    variances: Tensor
    log_weights: Tensor

    @classmethod
    def two_component(
        cls, separation: Tensor, weight: Tensor, center: Tensor, component_var: Tensor
    ) -> Mixture:
        r"""``weight * N(center - s/2, v) + (1 - weight) * N(center + s/2, v)``, each argument [B]."""
        half = 0.5 * separation
        means = torch.stack([center - half, center + half], dim=-1)
        variances = torch.stack([component_var, component_var], dim=-1)
        # log1p keeps 1 - weight exact when weight is within 1e-16 of 0.
        log_weights = torch.stack([torch.log(weight), torch.log1p(-weight)], dim=-1)
        return cls(means, variances, log_weights)

    @classmethod
    def cat(cls, parts: list[Mixture]) -> Mixture:
        """The rows of several batches, one after the other."""
        out = cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("means", "variances", "log_weights")))
        cached = [p.__dict__.get("_crossings") for p in parts]
        if all(c is not None for c in cached):
            out.__dict__["_crossings"] = tuple(torch.cat(c) for c in zip(*cached))
        return out

    def __getitem__(self, index: Tensor) -> Mixture:
        out = Mixture(self.means[index], self.variances[index], self.log_weights[index])
        cached = self.__dict__.get("_crossings")
        if cached is not None:  # rows leaving a fit keep theirs: computed once per fit
            out.__dict__["_crossings"] = tuple(c[index] for c in cached)
        return out

    @property
    def weights(self) -> Tensor:
        return torch.exp(self.log_weights)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density at ``x`` of shape [B, N]: [B, N]."""
        zero = torch.zeros_like(self.means[:, 0])
        return self.log_prob_standard(x, zero, torch.ones_like(zero))

    def log_prob_standard(self, z: Tensor, origin: Tensor, scale: Tensor) -> Tensor:
        r"""Log density at :math:`x = \text{origin} + \text{scale}\cdot z`, for z [B, N]: [B, N].

        Each weighted component is :math:`\log w_k - \tfrac12\log(2\pi v_k) - d^2/(2 v_k)` with
        :math:`d = \text{scale}\cdot z + (\text{origin} - m_k)` formed directly: x itself is never
        rounded (a Q narrower than the float spacing of its mean stays resolved), and nothing
        cancels however far a component sits from the others in units of its own width. The
        components are combined with ``logaddexp``: no density is ever exponentiated.
        """
        const = self.log_weights - 0.5 * (LOG_2PI + torch.log(self.variances))
        # e = d / sqrt(2 v_k) = z * (scale k) + (origin - m_k) k with k = sqrt(1 / (2 v_k)): the
        # per-row factors are folded in first, so each component costs two passes over [B, N].
        k = torch.rsqrt(2.0 * self.variances)
        shift = (origin.unsqueeze(-1) - self.means) * k
        slope = scale.unsqueeze(-1) * k
        out = None
        for c in range(self.means.shape[-1]):  # over the K components, not over configurations
            e = torch.addcmul(shift[:, c : c + 1], z, slope[:, c : c + 1])
            ell = torch.addcmul(const[:, c : c + 1], e, e, value=-1.0)
            out = ell if out is None else logaddexp(out, ell)
        return out

    def mean(self) -> Tensor:
        r""":math:`E_P[x] = \sum_k w_k m_k`, shape [B]."""
        return (self.weights * self.means).sum(-1)

    def variance(self) -> Tensor:
        r""":math:`\mathrm{Var}_P[x] = \sum_k w_k (v_k + (m_k - E_P x)^2)`, shape [B].

        Written around the mean, not as :math:`E[x^2] - E[x]^2`, so nothing cancels.
        """
        return (self.weights * (self.variances + _square(self.means - self.mean().unsqueeze(-1)))).sum(-1)

    def crossings(self) -> tuple[Tensor, Tensor]:
        r"""Where two weighted components are equally dense, and how sharp the switch is there.

        For each pair (j, k), :math:`d(x) = \ell_j(x) - \ell_k(x)` with
        :math:`\ell_k = \log w_k + \log\mathcal N(x; m_k, v_k)` is a quadratic in x. Around its real
        roots :math:`\log p` turns from one component's parabola to the other's over a width
        :math:`1/|d'(r)|`: the one place where :math:`\log p` is not smooth on the scale of the
        components, and where quadrature needs extra nodes. Complex roots give the vertex of d and
        the width :math:`|a|^{-1/2}`. Returns ``(points, widths)``, each [B, 2 * K(K-1)/2].

        They say where to lay out nodes, nothing to differentiate: they are computed without a
        graph, once per mixture (and carried over to its row subsets), not at every step of a fit.
        """
        cached = self.__dict__.get("_crossings")
        if cached is None:
            with torch.no_grad():
                cached = self._crossings()
            self.__dict__["_crossings"] = cached
        return cached

    def _crossings(self) -> tuple[Tensor, Tensor]:
        K = self.means.shape[-1]
        points, widths = [], []
        for j in range(K):  # K is the number of components (2 here), not the batch
            for k in range(j + 1, K):
                mj, mk = self.means[..., j], self.means[..., k]
                vj, vk = self.variances[..., j], self.variances[..., k]
                a = 0.5 * (1.0 / vk - 1.0 / vj)
                b = mj / vj - mk / vk
                c = (
                    self.log_weights[..., j]
                    - self.log_weights[..., k]
                    - 0.5 * (torch.log(vj) - torch.log(vk))
                    - 0.5 * (mj * mj / vj - mk * mk / vk)
                )
                points_jk, widths_jk = _quadratic_roots(a, b, c)
                points += points_jk
                widths += widths_jk
        if not points:  # one component (a target file's): no switch anywhere
            empty = self.means[..., :0]
            return empty, empty.clone()
        return torch.stack(points, -1), torch.stack(widths, -1)


def _quadratic_roots(a: Tensor, b: Tensor, c: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Real roots of a x^2 + b x + c with the width 1/|slope| there; the vertex if complex."""
    tiny = torch.finfo(a.dtype).tiny
    disc = b * b - 4 * a * c
    linear = a.abs() <= 1e-12 * b.abs().clamp_min(tiny)
    sqrt_disc = torch.sqrt(disc.clamp_min(0.0))
    # The numerically stable pair: q = -(b + sign(b) sqrt(disc)) / 2, roots q/a and c/q.
    sign_b = torch.where(b >= 0, 1.0, -1.0)
    q = -0.5 * (b + sign_b * sqrt_disc)
    safe_q = torch.where(q == 0, tiny, q)
    safe_a = torch.where(linear, 1.0, a)
    r1 = torch.where(linear, -c / torch.where(b == 0, tiny, b), q / safe_a)
    r2 = torch.where(linear, r1, c / safe_q)
    vertex = -b / (2 * safe_a)
    complex_ = (disc < 0) & ~linear
    # A constant d (equal components) has no switch: a far-away finite point stands in.
    r1 = torch.where(complex_, vertex, r1).clamp(-1e300, 1e300)
    r2 = torch.where(complex_, vertex, r2).clamp(-1e300, 1e300)
    w_vertex = 1.0 / torch.sqrt(a.abs().clamp_min(tiny))
    widths = []
    for r in (r1, r2):
        slope = torch.where(linear, b, 2 * a * r + b).abs()
        widths.append(torch.where(complex_, w_vertex, 1.0 / slope.clamp_min(tiny)))
    return [r1, r2], widths


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(e^a + e^b) as max + log1p(e^-|a - b|), for autograd: torch.logaddexp's second derivative
    is inf/inf (NaN) once |a - b| passes ~709, as it does far out in a tail."""
    return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))


def logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(e^a + e^b) with the same bits wherever an element sits in its tensor; under autograd,
    :func:`_logaddexp` (finite second derivatives). Neither input is modified.

    Not torch.logaddexp: its vectorised loop and its scalar tail (libm exp/log1p) can round
    differently, and with several threads the tail falls at the end of each thread's chunk of the
    flattened [B, N] tensor, inside whichever row the split lands in. logsigmoid runs its tail
    through the vector code (a partial load), and max, min and sub are exact:
    log(e^a + e^b) = max - logsigmoid(max - min).
    """
    if torch.is_grad_enabled():
        return _logaddexp(a, b)
    hi = torch.maximum(a, b)
    return hi - torch.nn.functional.logsigmoid(hi - torch.minimum(a, b))


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) as -logsigmoid(-x): exact at every x (torch's softplus returns x itself past 20,
    off by e^-20), and the same bits wherever an element sits (see :func:`logaddexp`)."""
    return -torch.nn.functional.logsigmoid(-x)


def _square(x: Tensor) -> Tensor:
    # x * x, not x ** 2: torch's vectorised pow can differ in the last bit from its scalar tail,
    # which would make a row's result depend on its position in the batch.
    return x * x


def gaussian_sigma2(log_sigma: Tensor) -> Tensor:
    """sigma^2 from the optimised log sigma: positive by construction."""
    return torch.exp(2.0 * log_sigma)
