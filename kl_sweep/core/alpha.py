r"""The alpha family's pointwise terms, in log space, for every real alpha and every log p - log q.

Amari's alpha-divergence in Minka's (2005) convention,

.. math:: D_a(P\Vert Q) = \frac{1}{a(1-a)} \int \big[a\,p + (1-a)\,q - p^a q^{1-a}\big]\,dx ,

is dimensionless; it tends to :math:`\mathrm{KL}(P\Vert Q)` as a -> 1 and to
:math:`\mathrm{KL}(Q\Vert P)` as a -> 0 (both in nats), is :math:`4 H^2` at a = 1/2 and half of
Pearson's :math:`\chi^2(P\Vert Q)` at a = 2. Its integrand is non-negative point by point, and this
module evaluates it without the 0/0 at a = 0 and 1 and without the cancellation TFP's
``amari_alpha`` warns of: with :math:`E(x) = e^x - 1 - x`,

.. math:: a\,p + (1-a)\,q - p^a q^{1-a} = q\,\big[a E(\delta) - E(a\delta)\big],
          \quad \delta = \log p - \log q,

and for a > 1/2 the mirror form with P and Q exchanged and a -> 1 - a. Each :math:`w E(\cdot)` is a
series where its argument is small and separately exponentiated densities elsewhere, so a density
that underflows loses nothing.

Where the integral is infinite is decided here analytically (:func:`log_sigma_bounds`,
:func:`edge_is_finite`), never by a quadrature rule, which always returns a finite number.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kl_sweep.core.mixture import Mixture, logaddexp, softplus

#: |x| below which E(x) = e^x - 1 - x is summed as a series (truncation error below 1e-17 of it
#: there; above, expm1(x) - x loses at most 2 eps/x, 4e-15, to cancellation).
SERIES_BELOW = 0.05
_SERIES_TERMS = 8
_LOG2 = math.log(2.0)


def _excess_over(y: Tensor) -> Tensor:
    r""":math:`E(y)/y = y/2! + y^2/3! + \dots` by Horner's rule, for :math:`|y| <` :data:`SERIES_BELOW`."""
    out = torch.full_like(y, 1.0 / math.factorial(_SERIES_TERMS + 1))
    for k in range(_SERIES_TERMS, 1, -1):
        out = out * y + 1.0 / math.factorial(k)
    return out * y


def relative_expm1(y: Tensor) -> Tensor:
    """expm1(y) / y, equal to 1 at y = 0 (where it is the limit)."""
    zero = y == 0
    return torch.where(zero, 1.0, torch.expm1(y) / torch.where(zero, 1.0, y))


def _weighted_excess(log_w: Tensor, x: Tensor, c: Tensor) -> Tensor:
    r""":math:`w\,E(c x)/c` (and :math:`w\,x^2/2 \cdot c` -> 0 as c -> 0), with :math:`w = e^{\log w}`."""
    y = c * x
    near = y.abs() < SERIES_BELOW  # (for c = 1 the far branch is two densities and q log(p/q))
    w = torch.exp(log_w)
    y_near = torch.where(near, y, 0.0)
    near_value = w * x * _excess_over(y_near)
    c_far = torch.where(near, 1.0, c)
    y_far = torch.where(near, 0.0, y)
    far_value = (torch.exp(log_w + y_far) - w) / c_far - w * x
    return torch.where(near, near_value, far_value)


def alpha_density(log_p: Tensor, log_q: Tensor, a: Tensor) -> Tensor:
    r"""Pointwise non-negative density of :math:`D_a(P\Vert Q)`: integrate it dx.

    ``a`` broadcasts against the log densities ([B, 1] against [B, N]). For a <= 1/2 it is
    :math:`q\,[E(\delta) - E(a\delta)/a]/(1-a)`; for a > 1/2 the same with p and q exchanged and
    a replaced by 1 - a (the integrand is symmetric under that exchange). At a = 0 it is the
    density :math:`p - q - q\log(p/q)` of KL(Q||P), at a = 1 that of KL(P||Q).
    """
    a = torch.as_tensor(a, dtype=log_p.dtype)
    mirror = a > 0.5
    c = torch.where(mirror, 1.0 - a, a)
    log_w = torch.where(mirror, log_p, log_q)
    x = torch.where(mirror, log_q - log_p, log_p - log_q)
    one = torch.ones_like(c)
    return (_weighted_excess(log_w, x, one) - _weighted_excess(log_w, x, c)) / (1.0 - c)


def alpha_weighted_derivatives(log_p: Tensor, log_q: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    r"""The density's derivatives in :math:`\ell = \log q` at fixed p, as the fit uses them.

    With :math:`t_0 = q\,\phi(\delta)` the density, :math:`t_1 = \partial t_0/\partial\ell /` (its
    :math:`\partial\ell` factor) :math:`= -q\,\operatorname{expm1}(a\delta)/a` and
    :math:`t_2 = q\,e^{a\delta} + t_1`, so that the gradient of :math:`\sum r_i t_0` in
    :math:`\theta` is :math:`\sum r\,t_1\,\partial\ell` and its Hessian
    :math:`\sum r\,(t_2\,\partial\ell\,\partial\ell^T + t_1\,\partial^2\ell)`. Neither has a
    singularity at a = 0 or 1.
    """
    a = torch.as_tensor(a, dtype=log_p.dtype)
    delta = log_p - log_q
    y = a * delta
    near = y.abs() < 0.5
    q = torch.exp(log_q)
    tilted = torch.exp(log_q + torch.where(near, y, 0.0))  # q e^{a delta} on the near branch
    near_t1 = -q * delta * relative_expm1(torch.where(near, y, 0.0))
    tilted_far = torch.exp(log_q + torch.where(near, 0.0, y))
    far_t1 = (q - tilted_far) / torch.where(near, 1.0, a)
    t1 = torch.where(near, near_t1, far_t1)
    return t1, torch.where(near, tilted, tilted_far) + t1


def alpha_fit_terms(log_p: Tensor, log_q: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""(t0, t1, t2) for the fit, in fewer passes than :func:`alpha_density` plus its derivatives.

    With :math:`T = p^a q^{1-a}` the density is
    :math:`t_0 = (p - q + (q - T)/a)/(1-a)` for a <= 1/2 and :math:`(q - p + (p - T)/(1-a))/a`
    for a > 1/2, where :math:`(q - T)/a = t_1` and :math:`(p - T)/(1-a) = p\,\delta\,
    \operatorname{expm1}(-(1-a)\delta)/(-(1-a)\delta)` have no 0/0 at the KL ends. Near P = Q the
    difference loses digits relative to :math:`t_0` itself (not to the sum): the fit's steps and
    stopping use :math:`t_1, t_2` only, and every reported value comes from :func:`alpha_density`.
    """
    t1, t2 = alpha_weighted_derivatives(log_p, log_q, a)
    p, q = torch.exp(log_p), torch.exp(log_q)
    low = a <= 0.5
    c = 1.0 - a
    delta = log_p - log_q
    y = torch.where(low, 0.0, -c * delta)
    near = y.abs() < 0.5
    tilted = torch.exp(log_q + torch.where(near, 0.0, a * delta))  # T = p^a q^(1-a)
    mirrored = torch.where(  # (p - T)/(1 - a), with no 0/0 at a = 1 and no overflow far out
        near, p * delta * relative_expm1(torch.where(near, y, 0.0)), (p - tilted) / torch.where(near, 1.0, c)
    )
    t0 = torch.where(
        low, (p - q + t1) / torch.where(low, c, 1.0), (q - p + mirrored) / torch.where(low, 1.0, a)
    )
    return t0, t1, t2


def jensen_shannon_fit_terms(
    log_p: Tensor, log_q: Tensor, a: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(t0, t1, t2) of Jensen-Shannon for the fit (see :func:`alpha_fit_terms`)."""
    return (jensen_shannon_density(log_p, log_q), *jensen_shannon_weighted_derivatives(log_p, log_q))


def _h(u: Tensor, log1pu: Tensor, log1mu: Tensor) -> Tensor:
    r""":math:`(1+u)\log(1+u) + (1-u)\log(1-u) = \sum_k u^{2k}/(k(2k-1))`, non-negative."""
    near = u.abs() < 0.05
    s = torch.where(near, u * u, 0.0)
    series = s * (1.0 + s * (1.0 / 6 + s * (1.0 / 15 + s * (1.0 / 28 + s / 45))))
    direct = (1.0 + u) * log1pu + (1.0 - u) * log1mu
    return torch.where(near, series, direct)


def jensen_shannon_density(log_p: Tensor, log_q: Tensor, a: Tensor | None = None) -> Tensor:
    r"""Pointwise non-negative density of :math:`\mathrm{JS}(P, Q) = \tfrac12\mathrm{KL}(P\Vert M)
    + \tfrac12\mathrm{KL}(Q\Vert M)`, M = (P + Q)/2, in nats.

    Written as :math:`\tfrac14 (p+q)\,h(u)` with :math:`u = \tanh(\delta/2) = (p-q)/(p+q)`, where
    :math:`1 \pm u = 2\,\mathrm{sigmoid}(\pm\delta)` are formed without cancellation.
    """
    delta = log_p - log_q
    u = torch.tanh(0.5 * delta)
    log1pu = _LOG2 - softplus(-delta)
    log1mu = _LOG2 - softplus(delta)
    return 0.25 * torch.exp(logaddexp(log_p, log_q)) * _h(u, log1pu, log1mu)


def jensen_shannon_weighted_derivatives(
    log_p: Tensor, log_q: Tensor, a: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r""":math:`t_1 = \tfrac12 q \log(2q/(p+q))` and :math:`t_2 = t_1 + \tfrac12\,pq/(p+q)` (see
    :func:`alpha_weighted_derivatives` for their meaning)."""
    delta = log_p - log_q
    q = torch.exp(log_q)
    t1 = 0.5 * q * (_LOG2 - softplus(delta))
    return t1, t1 + 0.5 * q * torch.exp(torch.nn.functional.logsigmoid(delta))


def log_renyi_integral(rule: Tensor, log_p: Tensor, log_q: Tensor, alpha: Tensor) -> Tensor:
    r""":math:`\log I = \log\int q^a p^{1-a}\,dx` by log-sum-exp over the nodes [B, N] (a [B, 1]).

    Renyi's :math:`R_a(Q\Vert P) = \log I/(a-1)`: where I is far from 1 (P and Q barely
    overlap, or a near the edge), forming I as 1 - a(1-a)D would lose every digit.
    """
    safe = torch.where(rule > 0, rule, 1.0)
    terms = torch.where(rule > 0, torch.log(safe) + log_q + (1.0 - alpha) * (log_p - log_q), -math.inf)
    return torch.logsumexp(terms, -1)


def integral_over_nodes(rule: Tensor, density: Tensor) -> Tensor:
    r""":math:`\sum_i r_i t_i` with zero-width panels left out: where a density overflows to inf
    (a value beyond float64, reported as inf) a zero weight must not make it NaN."""
    return torch.where(rule > 0, rule * density, 0.0).sum(-1)


# --- where the integral is finite -------------------------------------------------------------


def log_sigma_bounds(mixture: Mixture, a: Tensor) -> tuple[Tensor, Tensor]:
    r"""The interval of log sigma outside which :math:`\int p^a q^{1-a}` diverges, per row.

    The tails of :math:`p^a q^{1-a}` are Gaussians of precision :math:`a/v + (1-a)/\sigma^2`
    (v: the widest component's variance), which must be positive: for a > 1 that needs
    :math:`\sigma^2 > v(a-1)/a`, for a < 0 :math:`\sigma^2 < v(1-a)/(-a)`; 0 <= a <= 1 is always
    finite. Returns (lo, hi), with -inf / +inf where there is no bound.
    """
    v = mixture.variances.max(-1).values
    lo = torch.where(a > 1.0, 0.5 * torch.log(v * (a - 1.0) / torch.where(a > 1.0, a, 1.0)), -math.inf)
    hi = torch.where(a < 0.0, 0.5 * torch.log(v * (1.0 - a) / torch.where(a < 0.0, -a, 1.0)), math.inf)
    return lo, hi


def closed_edge(mixture: Mixture, a: Tensor) -> tuple[Tensor, Tensor]:
    r"""(left, right) per row: the upper edge of a < 0 is finite for mu strictly between them.

    There the tails of :math:`p^a q^{1-a}` are exponentials, :math:`e^{-|a|(m - \mu)x/v}` beyond
    the outermost of the widest components (mean m): both decay when mu lies strictly between the
    leftmost and rightmost means of the widest components, and one grows otherwise (in particular
    when P is a single Gaussian). On the lower edge of a > 1 the integral always diverges: there,
    and for 0 <= a <= 1, (left, right) = (+inf, -inf).
    """
    v = mixture.variances.max(-1, keepdim=True).values
    widest = mixture.variances == v
    inf = torch.full_like(mixture.means, math.inf)
    left = torch.where(widest, mixture.means, inf).min(-1).values
    right = torch.where(widest, mixture.means, -inf).max(-1).values
    closed = a < 0.0
    return torch.where(closed, left, math.inf), torch.where(closed, right, -math.inf)


def edge_is_finite(mixture: Mixture, mu: Tensor, a: Tensor) -> Tensor:
    """Whether the integral stays finite exactly on the upper edge (a < 0), per row (see
    :func:`closed_edge`)."""
    left, right = closed_edge(mixture, a)
    return (left < mu) & (mu < right)


def is_finite(mixture: Mixture, mu: Tensor, log_sigma: Tensor, a: Tensor) -> Tensor:
    """True where :math:`D_a` is finite at (mu, log sigma): inside the bounds, or on a finite edge."""
    lo, hi = log_sigma_bounds(mixture, a)
    inside = (log_sigma > lo) & (log_sigma < hi)
    return inside | ((log_sigma == hi) & edge_is_finite(mixture, mu, a))


# --- where the integrand's mass is -------------------------------------------------------------

#: Offsets in decay lengths along an exponential tail (e^-42 ~ 6e-19 of it lies beyond).
TAIL_OFFSETS = (1.0, 3.0, 7.0, 14.0, 25.0, 42.0)
#: How far from P and Q (in units of their spread) tilted panels may reach; beyond, within 1e-8
#: of the edge of the finite region, the tail is cut there.
REACH = 1e8


def panel_points(
    mixture: Mixture, mu: Tensor, log_sigma: Tensor, a: Tensor, scale_offsets: Tensor, tails: bool
) -> Tensor:
    r"""Extra quadrature panel edges [B, M] (absolute x) where :math:`p^a q^{1-a}` has its mass.

    Per component k, :math:`p_k^a q^{1-a}` is a Gaussian of precision
    :math:`\pi_k = a/v_k + (1-a)/\sigma^2` and centre :math:`(a m_k/v_k + (1-a)\mu/\sigma^2)/\pi_k`,
    which can lie far from both P and Q (a = 4, sigma^2 = 1, modes at +-10, Q at 0: at x = 40).
    Its scale points are added. With ``tails`` (a outside [0, 1]) exponential tails are added
    too, out of each mean (its own component) and out of the switch between the components (both;
    for a < 0, p^a peaks in the valley between the modes), with the local decay length: this is
    what the integrand becomes on the edge of the finite region. For a in (0, 1) the tilted
    Gaussian lies between P's component and Q, but can be :math:`1/\sqrt{\min(a, 1-a)}` times
    wider than the narrower of them (:func:`layout`).
    """
    inv_s2 = torch.exp(-2.0 * log_sigma).unsqueeze(-1)
    ak = a.unsqueeze(-1)
    prec = ak / mixture.variances + (1.0 - ak) * inv_s2
    lin = ak * mixture.means / mixture.variances + (1.0 - ak) * mu.unsqueeze(-1) * inv_s2
    sd = torch.exp(log_sigma)
    spread = (mixture.means.max(-1).values - mixture.means.min(-1).values) + sd
    spread = spread + torch.sqrt(mixture.variances.max(-1).values)
    lo = torch.minimum(mixture.means.min(-1).values, mu) - REACH * spread
    hi = torch.maximum(mixture.means.max(-1).values, mu) + REACH * spread
    positive = prec > 0
    safe_prec = torch.where(positive, prec, 1.0)
    centre = torch.where(positive, lin / safe_prec, mu.unsqueeze(-1))
    width = torch.where(positive, torch.rsqrt(safe_prec), 0.0)
    points = [(centre.unsqueeze(-1) + width.unsqueeze(-1) * scale_offsets).flatten(-2)]
    if tails:
        switch, _ = mixture.crossings()
        if switch.shape[-1] == 2 and torch.equal(switch[..., 0], switch[..., 1]):
            switch = switch[..., :1]  # equal variances: one switch (as Quadrature.edges)
        # (equal components have none: a far point stands in, clipped to near P and Q)
        near_lo = (lo + (REACH - 10.0) * spread).unsqueeze(-1)
        near_hi = (hi - (REACH - 10.0) * spread).unsqueeze(-1)
        switch = torch.minimum(torch.maximum(switch, near_lo), near_hi)
        offsets = torch.as_tensor(TAIL_OFFSETS, dtype=mu.dtype)
        # out of each mean along its own component; out of each switch along every component
        own = _tail(mixture.means, prec * mixture.means - lin, offsets)
        rate = prec.unsqueeze(-1) * switch.unsqueeze(-2) - lin.unsqueeze(-1)  # [B, K, S]
        valley = _tail(switch.unsqueeze(-2).expand_as(rate), rate, offsets)
        points += [own, valley]
    points = torch.cat(points, -1)
    points = torch.where(torch.isfinite(points), points, mu.unsqueeze(-1))
    return torch.minimum(torch.maximum(points, lo.unsqueeze(-1)), hi.unsqueeze(-1))


def _tail(start: Tensor, rate: Tensor, offsets: Tensor) -> Tensor:
    """Points start + offsets / rate (an exponential decaying at ``rate`` per unit x, either way),
    flattened over every axis after the batch's."""
    length = torch.where(rate != 0, 1.0 / torch.where(rate != 0, rate, 1.0), 0.0)
    return (start.unsqueeze(-1) + length.unsqueeze(-1) * offsets).flatten(1)


#: Quadrature layouts of the alpha family: P and Q's panels only; also the tilted Gaussians';
#: also exponential tails.
COMPACT, TILTED, TAILS = 0, 1, 2


def layout(a: Tensor) -> Tensor:
    """Each row's layout, from its own order a only (so its nodes, and bits, do not depend on the
    batch): compact for a within 0.1 of 1/2 and at the KL ends a = 0 and 1, whose integrands live on
    P and Q's own scales; tilted for the rest of (0, 1); tails outside [0, 1]."""
    inner = ((a >= 0.4) & (a <= 0.6)) | (a == 0.0) | (a == 1.0)
    outside = (a < 0.0) | (a > 1.0)
    return torch.where(inner, COMPACT, torch.where(outside, TAILS, TILTED))
