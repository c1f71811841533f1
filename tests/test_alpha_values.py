"""The alpha family (alpha, hellinger, chi2, renyi, jensen_shannon) against an independent reference.

The reference below shares no code with kl_sweep: scipy's adaptive quadrature (``integrate.quad``)
over the real line, in plain Python floats, on log densities (``log p`` by a log-sum-exp), split at
every place the integrand has structure:

- P's components and Q, on their own scales;
- the switch of ``log p`` between P's components (width ``v / s``);
- the *tilted* centres: ``p^a q^(1-a)`` is, up to a factor in ``[2^-|a|, 2^|a|]``, the max (a > 0)
  or the min (a < 0) of the two Gaussian bumps ``(w_k N_k)^a q^(1-a)``, centred at
  ``(a m_k / v + (1-a) mu / sigma2) / (a / v + (1-a) / sigma2)``. For a outside [0, 1] these can
  lie far from both P and Q (a = 4, sigma2 = 1, s = 20, mu = 0: at x = 40), and quad only finds
  that mass because it is told where it is;
- on the edge of the finite region (a < 0, the bumps have zero curvature) the tails decay only
  exponentially: quad integrates them out to +-inf.

The values are computed without cancellation:

- ``I(a) = int p^a q^(1-a) dx`` in log space (scaled by its largest value), so Renyi divergences
  of e^1000-sized integrals and alpha-divergences of e^-1000-sized overlaps keep their digits;
- ``D_a = (1 - I) / (a (1 - a))`` from ``expm1(log I)`` where ``|log I| >= 0.05``; elsewhere (P and
  Q nearly agree, or a within 1e-9 of 0 or 1, where dividing by a (1 - a) would magnify the
  rounding of I) by integrating the pointwise non-negative density
  ``[a p + (1-a) q - p^a q^(1-a)] / (a (1-a)) = t E(1-a, d) - q E(a, d)``, with ``d = log p - log q``,
  ``t = p^a q^(1-a)`` and ``E(e, d) = expm1(e d) / e`` (``E(0, d) = d``): well defined at a = 0 and
  1 (it is then the KL's own density) and summed as a power series for ``|d| < 0.1``;
- the KLs and Jensen-Shannon from the non-negative densities ``a (d + e^-d - 1)``.

The reference is itself checked against Gaussian closed forms (separation 0) and, on a few
points, against mpmath (tanh-sinh, 20 digits).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import warnings

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, special

from kl_sweep.core.divergences import DIVERGENCES, divergence_exact, divergence_value, finite_region
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.mixture import Mixture

torch.set_default_dtype(torch.float64)

LOG_2PI = math.log(2 * math.pi)
LOG_2 = math.log(2.0)
LOG_FLOAT_MAX = math.log(np.finfo(np.float64).max)

# The quadrature grid of tests/test_divergences.py (component variance v = 1, centre 0).
SEPARATIONS = (0.0, 0.5, 3.0, 8.0, 20.0)
WEIGHTS = (0.01, 0.5, 0.99)
MUS = (-3.0, 0.3, 10.0)
SIGMA2S = (1e-3, 1.0, 1e3)
GRID = list(itertools.product(SEPARATIONS, WEIGHTS, MUS, SIGMA2S))

ALPHAS = (-3.0, -1.0, -0.5, 0.25, 0.5, 0.75, 1.5, 2.0, 4.0)
RENYI_ORDERS = (0.3, 0.5, 2.0, 3.0)
#: Every member with its parameter: (name, alpha or None).
MEMBERS = (
    [("alpha", a) for a in ALPHAS]
    + [("hellinger", None), ("chi2", None)]
    + [("renyi", a) for a in RENYI_ORDERS]
    + [("jensen_shannon", None)]
)


def member_id(member) -> str:
    name, a = member
    return name if a is None else f"{name}({a:g})"


# ---------------------------------------------------------------------------------------------
# Analytic finite regions (written out here, not taken from the library)


def alpha_edge(a: float, v: float) -> float | None:
    """The sigma2 where D_a(P||Q) stops being finite (v: the components' variance); None if never."""
    if a > 1:
        return v * (a - 1) / a  # finite above
    if a < 0:
        return v * (1 - a) / (-a)  # finite below
    return None


def alpha_finite(a: float, s: float, mu: float, s2: float, v: float = 1.0, center: float = 0.0) -> bool:
    """D_a(P||Q) < inf: int p^a q^(1-a) dx converges.

    Each weighted component gives a log integrand a log(w_k N_k) + (1-a) log q, a quadratic with
    x^2 coefficient -(a/v + (1-a)/sigma2)/2; log p is within log 2 of the largest component. On the
    a < 0 edge the quadratics turn linear with slopes |a| (mu - m_k) / v, and p^a q^(1-a) is within
    a factor 2^|a| of the smallest of their exponentials: it decays both ways iff m_1 < mu < m_2.
    On the a > 1 edge it is the largest, and one of them never decays.
    """
    edge = alpha_edge(a, v)
    if edge is None:
        return True
    if a > 1:
        return s2 > edge
    if s2 < edge:
        return True
    return s2 == edge and center - s / 2 < mu < center + s / 2


def member_alpha(name: str, a: float | None) -> float | None:
    """The alpha-divergence order a member integrates p^a q^(1-a) at (None for JS and the KLs)."""
    return {"alpha": a, "hellinger": 0.5, "chi2": 2.0, "renyi": None if a is None else 1.0 - a}.get(name)


def member_finite(name, a, s, mu, s2, v=1.0, center=0.0) -> bool:
    order = member_alpha(name, a)
    return True if order is None else alpha_finite(order, s, mu, s2, v, center)


def member_edge(name, a, v=1.0) -> float | None:
    order = member_alpha(name, a)
    return None if order is None else alpha_edge(order, v)


def inside_edge(name, a, s2, margin, v=1.0) -> bool:
    """sigma2 at least ``margin`` (relative) inside the finite side of the member's edge, if any."""
    edge, order = member_edge(name, a, v), member_alpha(name, a)
    if edge is None:
        return True
    return s2 >= edge * (1 + margin) if order > 1 else s2 <= edge * (1 - margin)


# ---------------------------------------------------------------------------------------------
# The scipy reference


def _logaddexp(x: float, y: float) -> float:
    top = max(x, y)
    if top == -math.inf:
        return top
    return top + math.log1p(math.exp(-abs(x - y)))


class Setup:
    """P = w N(c - s/2, v) + (1 - w) N(c + s/2, v) and Q = N(mu, sigma2), as plain floats."""

    def __init__(self, s, w, mu, s2, v=1.0, center=0.0):
        self.s, self.w, self.mu, self.s2, self.v, self.center = s, w, mu, s2, v, center
        self.m = (center - s / 2, center + s / 2)
        self.lw = (math.log(w), math.log1p(-w))
        self.cp = -0.5 * (LOG_2PI + math.log(v))
        self.cq = -0.5 * (LOG_2PI + math.log(s2))

    def log_components(self, x):
        return tuple(lw + self.cp - (x - m) ** 2 / (2 * self.v) for lw, m in zip(self.lw, self.m))

    def log_p(self, x):
        return _logaddexp(*self.log_components(x))

    def log_q(self, x):
        return self.cq - (x - self.mu) ** 2 / (2 * self.s2)

    def features(self, a: float | None = None) -> list[tuple[float, float]]:
        """(centre, width) of every structure of the integrands: P, Q, the switch, the tilted bumps."""
        v, s2, mu = self.v, self.s2, self.mu
        out = [(m, math.sqrt(v)) for m in self.m] + [(mu, math.sqrt(s2))]
        if self.s > 0:
            cross = self.center + v * (self.lw[0] - self.lw[1]) / self.s
            out.append((cross, v / self.s))
        if a is not None and a not in (0.0, 1.0):
            prec = a / v + (1 - a) / s2
            wide = 10 * max(math.sqrt(v), math.sqrt(s2))
            if prec > 0:
                out += [((a * m / v + (1 - a) * mu / s2) / prec, 1 / math.sqrt(prec)) for m in self.m]
            if a < 0 and (prec <= 0 or 1 / math.sqrt(prec) > wide):
                # At (or near) the edge the mass decays exponentially away from the switch, at
                # rates |a| |mu - m_k| / v.
                for m in self.m:
                    if m != mu:
                        out.append((mu, v / (abs(a) * abs(mu - m))))
                        if self.s > 0:
                            out.append((cross, v / (abs(a) * abs(mu - m))))
        return out


OFFSETS = (-12.0, -6.0, -3.0, -1.5, 0.0, 1.5, 3.0, 6.0, 12.0)
REACH = 40.0  # beyond 40 widths of every structure: below e^-800 of it


def _integrate(f, features, scale_estimate=None) -> float:
    """int f over the real line, split at every feature's centre + OFFSETS widths; tails to +-inf.

    Any IntegrationWarning is an error: a reference that did not converge must not pass silently.
    """
    lo = min(c - REACH * w for c, w in features)
    hi = max(c + REACH * w for c, w in features)
    pts = {lo, hi}
    for c, w in features:
        pts.update(c + k * w for k in OFFSETS)
    pts = sorted(p for p in pts if lo <= p <= hi)
    # Drop breakpoints closer than rounding: no zero-length pieces.
    edges = [pts[0]]
    for p in pts[1:]:
        if p - edges[-1] > 1e-13 * max(1.0, abs(p)):
            edges.append(p)
    if scale_estimate is None:
        vals = [abs(f(x)) for x in edges]
        scale_estimate = sum(0.5 * (a + b) * (y - x) for a, b, x, y in zip(vals, vals[1:], edges, edges[1:]))
    epsabs = max(1e-16 * scale_estimate, 1e-30)  # 1e-30: D = 0 exactly (Q = P) is all rounding
    with warnings.catch_warnings():
        warnings.simplefilter("error", integrate.IntegrationWarning)
        total = 0.0
        for x0, x1 in zip(edges, edges[1:]):
            total += integrate.quad(f, x0, x1, epsabs=epsabs, epsrel=1e-13, limit=200)[0]
        total += integrate.quad(f, -math.inf, edges[0], epsabs=epsabs, epsrel=1e-13, limit=200)[0]
        total += integrate.quad(f, edges[-1], math.inf, epsabs=epsabs, epsrel=1e-13, limit=200)[0]
    return total


@functools.cache
def ref_log_integral(a: float, key: tuple) -> float:
    """log int p^a q^(1-a) dx (+inf where it diverges)."""
    st = Setup(*key)
    s, w, mu, s2, v, center = key
    if not alpha_finite(a, s, mu, s2, v, center):
        return math.inf
    feats = st.features(a)

    def g(x):
        return a * st.log_p(x) + (1 - a) * st.log_q(x)

    top = max(g(c) for c, _ in feats)
    total = _integrate(lambda x: math.exp(g(x) - top), feats)
    return top + math.log(total)


def _log_abs_e(e: float, d: float) -> float:
    """log |expm1(e d) / e| (log |d| at e = 0), for d != 0, without overflow."""
    if e == 0.0:
        return math.log(abs(d))
    y = e * d
    if y > 30.0:
        body = y + math.log1p(-math.exp(-y))
    else:
        body = math.log(abs(math.expm1(y)))
    return body - math.log(abs(e))


def alpha_density(a: float, lp: float, lq: float) -> float:
    """[a p + (1-a) q - p^a q^(1-a)] / (a (1-a)) >= 0 pointwise; the KLs' densities at a = 1, 0."""
    d = lp - lq
    if abs(d) < 0.1:
        # q * sum_{n>=2} d^n / n! * (1 + a + ... + a^(n-2))
        total, term, geo, power = 0.0, d, 1.0, 1.0
        for n in range(2, 24):
            term *= d / n
            if n > 2:
                power *= a
                geo += power
            total += term * geo
        return math.exp(lq) * total
    # t E(1-a, d) - q E(a, d); both terms have the sign of d, and their difference is >= 0.
    big = a * lp + (1 - a) * lq + _log_abs_e(1 - a, d)
    small = lq + _log_abs_e(a, d)
    if big > 700 or small > 700:
        raise OverflowError("density beyond float range: use the log-integral route")
    return math.copysign(1.0, d) * (math.exp(big) - math.exp(small))


@functools.cache
def ref_alpha_density_integral(a: float, key: tuple) -> float:
    st = Setup(*key)
    return _integrate(lambda x: alpha_density(a, st.log_p(x), st.log_q(x)), st.features(a))


@functools.cache
def ref_alpha(a: float, key: tuple) -> float:
    """D_a(P||Q) in Minka's convention, any real a (a = 0, 1: the KLs); +inf where infinite."""
    s, w, mu, s2, v, center = key
    if not alpha_finite(a, s, mu, s2, v, center):
        return math.inf
    if a in (0.0, 1.0):
        return ref_kl("forward" if a == 1.0 else "reverse", key)
    log_i = ref_log_integral(a, key)
    if abs(log_i) >= 0.05:
        # (1 - I) / (a (1 - a)) = -expm1(log I) / (a (1 - a)), well conditioned: |I / (1 - I)| < 21.
        if log_i > 30:  # I - 1 = I to rounding; keep the value in log space until the end
            log_d = log_i - math.log(a * (a - 1))
            return math.exp(log_d) if log_d < LOG_FLOAT_MAX else math.inf
        return -math.expm1(log_i) / (a * (1 - a))
    return ref_alpha_density_integral(a, key)


def _kl_term(la: float, lb: float) -> float:
    """a log(a/b) - a + b >= 0 pointwise: a (d + e^-d - 1), d = log a - log b."""
    d = la - lb
    if abs(d) < 0.1:
        total, term = 0.0, 1.0
        for n in range(1, 24):
            term *= -d / n
            if n >= 2:
                total += term
        return math.exp(la) * total  # sum_{n>=2} (-d)^n / n! = e^-d - 1 + d
    if d < -30.0:
        return math.exp(la) * (d - 1.0) + math.exp(lb)
    return math.exp(la) * (d + math.expm1(-d))


@functools.cache
def ref_kl(direction: str, key: tuple) -> float:
    """KL(P||Q) ("forward") or KL(Q||P) ("reverse") from the non-negative KL density."""
    st = Setup(*key)
    if direction == "forward":
        f = lambda x: _kl_term(st.log_p(x), st.log_q(x))  # noqa: E731
    else:
        f = lambda x: _kl_term(st.log_q(x), st.log_p(x))  # noqa: E731
    return _integrate(f, st.features())


@functools.cache
def ref_js(key: tuple) -> float:
    """KL(P||M)/2 + KL(Q||M)/2, M = (P + Q)/2, from the KL densities against M."""
    st = Setup(*key)

    def f(x):
        lp, lq = st.log_p(x), st.log_q(x)
        lm = _logaddexp(lp, lq) - LOG_2
        return 0.5 * (_kl_term(lp, lm) + _kl_term(lq, lm))

    return _integrate(f, st.features())


def ref_renyi(a: float, key: tuple) -> float:
    """R_a(Q||P) = log(int q^a p^(1-a) dx) / (a - 1) = -log I(a') / a' with a' = 1 - a."""
    s, w, mu, s2, v, center = key
    if a == 1.0:
        return ref_kl("reverse", key)
    b = 1.0 - a
    if not alpha_finite(b, s, mu, s2, v, center):
        return math.inf
    log_i = ref_log_integral(b, key)
    if abs(log_i) < 0.05:  # I = 1 - b (1 - b) D_b, with D_b free of cancellation
        log_i = math.log1p(-b * (1 - b) * ref_alpha_density_integral(b, key))
    return -log_i / b


def reference(name: str, a: float | None, s, w, mu, s2, v=1.0, center=0.0) -> float:
    key = (float(s), float(w), float(mu), float(s2), float(v), float(center))
    if name == "alpha":
        return ref_alpha(float(a), key)
    if name == "hellinger":
        return ref_alpha(0.5, key) / 4
    if name == "chi2":
        return 2 * ref_alpha(2.0, key)
    if name == "renyi":
        return ref_renyi(float(a), key)
    if name == "jensen_shannon":
        return ref_js(key)
    if name in ("forward", "reverse"):
        return ref_kl(name, key)
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Gaussian closed forms (P = N(m1, v1), Q = N(m2, v2))


def gauss_log_integral(a, m1, v1, m2, v2) -> float:
    """log int N(m1, v1)^a N(m2, v2)^(1-a) dx; +inf where a v2 + (1-a) v1 <= 0.

    The exponent is -[a (x-m1)^2 / v1 + (1-a) (x-m2)^2 / v2] / 2; completing the square with
    precision L = a/v1 + (1-a)/v2 = K / (v1 v2), K = a v2 + (1-a) v1, leaves
    a (1-a) (m1-m2)^2 / (2 K), and the Gaussian integral sqrt(2 pi / L) against the normalisers
    (2 pi)^(-1/2) v1^(-a/2) v2^(-(1-a)/2) gives
    I = sqrt(v1^(1-a) v2^a / K) exp(-a (1-a) (m1-m2)^2 / (2 K)).
    """
    k = a * v2 + (1 - a) * v1
    if k <= 0:
        return math.inf
    return 0.5 * ((1 - a) * math.log(v1) + a * math.log(v2) - math.log(k)) - a * (1 - a) * (m1 - m2) ** 2 / (
        2 * k
    )


# ---------------------------------------------------------------------------------------------
# Calling the library


def library(fn, name, a, rows, v=1.0, center=0.0, **kwargs):
    """``fn`` (divergence_exact, finite_region, or a partial of divergence_value) on rows (s, w, mu, s2);
    ``v`` and ``center``: one number for all rows, or one per row."""
    s, w, mu, s2 = (torch.tensor([float(r[i]) for r in rows]) for i in range(4))
    v, center = (torch.as_tensor(x, dtype=s.dtype).expand_as(s).clone() for x in (v, center))
    mix = Mixture.two_component(s, w, center, v)
    alpha = None if a is None else torch.full_like(s, float(a))
    return fn(DIVERGENCES[name], mix, mu, 0.5 * torch.log(s2), alpha=alpha, **kwargs)


def exact(name, a, rows, **kw) -> np.ndarray:
    return library(divergence_exact, name, a, rows, **kw).numpy()


def fitted(name, a, rows, **kw) -> np.ndarray:
    def value(div, mix, mu, log_sigma, alpha):
        return divergence_value(div, Quadrature(), mix, mu, log_sigma, alpha=alpha)

    return library(value, name, a, rows, **kw).detach().numpy()


def assert_relative(got, want, rows, rtol, what="", label="(s, w, mu, sigma2)"):
    got, want = np.asarray(got, float), np.asarray(want, float)
    err = np.abs(got - want) / np.abs(want)
    bad = ~(err <= rtol)  # NaN counts as bad
    if bad.any():
        lines = [
            f"  {label}={rows[i]}: got {got[i]!r}, want {want[i]!r}, rel err {err[i]:.2e}"
            for i in np.flatnonzero(bad)[:12]
        ]
        raise AssertionError(f"{what}: {bad.sum()} of {len(rows)} beyond {rtol:g}\n" + "\n".join(lines))


def subset(rows, k, seed):
    """A fixed subset of ``k`` rows: the 16 extreme corners that are present, then a seeded sample."""
    lo_hi = [(min(c), max(c)) for c in (SEPARATIONS, WEIGHTS, MUS, SIGMA2S)]
    corners = [r for r in rows if all(x in ends for x, ends in zip(r, lo_hi))]
    rest = [r for r in rows if r not in corners]
    return corners + random.Random(seed).sample(rest, max(0, min(len(rest), k - len(corners))))


def log_integral_bounds(a: float, s, w, mu, s2, v=1.0) -> tuple[float, float]:
    """Closed-form bounds on log int p^a q^(1-a) dx for a outside [0, 1], inside the finite region.

    Each weighted component gives a Gaussian bump (w_k N_k)^a q^(1-a) = w_k^a I_k N(c_k, 1/prec)
    (gauss_log_integral gives log I_k). For a > 1, (w_k N_k)^a <= p^a <= 2^a sum_k (w_k N_k)^a.
    For a < 0, p^a <= (w_k N_k)^a for each k; and where component j dominates P (its side of the
    switch), p^a >= 2^a (w_j N_j)^a, which leaves a normal tail probability.
    """
    if s == 0:  # P is N(0, v): the closed form itself
        value = gauss_log_integral(a, 0.0, v, mu, s2)
        return value, value
    lw = (math.log(w), math.log1p(-w))
    m = (-s / 2, s / 2)
    terms = [a * lw[k] + gauss_log_integral(a, m[k], v, mu, s2) for k in range(2)]
    if a > 1:
        return max(terms), a * LOG_2 + max(terms) + LOG_2
    prec = a / v + (1 - a) / s2
    cross = v * (lw[0] - lw[1]) / s
    centres = [(a * m[k] / v + (1 - a) * mu / s2) / prec for k in range(2)]
    sides = [
        special.log_ndtr((cross - centres[0]) * math.sqrt(prec)),
        special.log_ndtr((centres[1] - cross) * math.sqrt(prec)),
    ]
    lower = a * LOG_2 + max(t + side for t, side in zip(terms, sides))
    return lower, min(terms)


def overflows(name, a, row, v=1.0) -> bool:
    """The member's true value is finite but beyond float64 (e^1014 / 12 for a = 4, s = 20, mu = -3)."""
    order = member_alpha(name, a)
    if name not in ("alpha", "chi2") or order is None or 0 <= order <= 1:
        return False
    s, w, mu, s2 = row
    if not member_finite(name, a, s, mu, s2, v):
        return False
    log_scale = math.log(order * (order - 1)) - (LOG_2 if name == "chi2" else 0.0)  # value = (I - 1) / scale
    if order * s2 + (1 - order) * v > 0:  # off the edge: the bounds decide unless they straddle
        lower, upper = log_integral_bounds(order, s, w, mu, s2, v)
        if upper - log_scale < LOG_FLOAT_MAX - 1:
            return False
        if lower - log_scale > LOG_FLOAT_MAX + 1:
            return True
    return ref_log_integral(order, (s, w, mu, s2, v, 0.0)) - log_scale > LOG_FLOAT_MAX


def comparable_rows(member, margin=0.02):
    """Grid rows where the member is finite, sigma2 is at least ``margin`` inside its edge, and the
    value fits in a float64."""
    name, a = member
    return [
        r
        for r in GRID
        if member_finite(name, a, r[0], r[2], r[3]) and inside_edge(name, a, r[3], margin)
        if not overflows(name, a, r)
    ]


# ---------------------------------------------------------------------------------------------
# 1, 2. Every member against scipy


# Compared only where the member is finite and sigma2 is at least 2% inside the edge of its finite
# region (closer in, the integrand's tails decay ever more slowly; the edge itself is test 7), and
# where the value fits in a float64 (the rest: test_values_beyond_float_range_are_inf). No point is
# skipped for conditioning: the reference never forms 1 - I where I is within 5% of 1 (it integrates
# the non-negative density instead), so it keeps ~1e-12 relative accuracy down to tiny values.
# A fixed subset of 60 rows per member: the extreme corners of the grid, then a seeded sample.
@pytest.mark.parametrize("member", MEMBERS, ids=member_id)
def test_exact_value_matches_scipy_to_1e8(member):
    name, a = member
    rows = subset(comparable_rows(member), 60, seed=MEMBERS.index(member))
    want = [reference(name, a, *r) for r in rows]
    assert_relative(exact(name, a, rows), want, rows, 1e-8, f"divergence_exact {member_id(member)}")


@pytest.mark.parametrize("member", MEMBERS, ids=member_id)
def test_fit_objective_matches_scipy_to_1e8(member):
    # The fit's estimator (6-node panels) where it promises 1e-8: finite, 2% off the edge.
    name, a = member
    rows = subset(comparable_rows(member), 24, seed=100 + MEMBERS.index(member))
    want = [reference(name, a, *r) for r in rows]
    assert_relative(fitted(name, a, rows), want, rows, 1e-8, f"divergence_value {member_id(member)}")


def test_values_beyond_float_range_are_inf():
    # Finite in exact arithmetic (finite_region says so), but above 1.8e308: the one float that
    # can stand for them is +inf; never NaN, never a wrapped-around finite number.
    seen = 0
    for name, a in MEMBERS:
        rows = [r for r in GRID if overflows(name, a, r)]
        if not rows:
            continue
        seen += len(rows)
        got = exact(name, a, rows)
        assert np.isposinf(got).all(), (name, a, [(r, g) for r, g in zip(rows, got) if not np.isposinf(g)])
        assert library(finite_region, name, a, rows).all()
    assert seen > 0


def mpmath_log_integral(a, s, w, mu, s2, v=1.0) -> float:
    """log int p^a q^(1-a) dx by mpmath's tanh-sinh quadrature (20 digits), split at P's means, mu
    and the tilted centres: a second, independent integrator for the reference."""
    with mpmath.workdps(20):
        a, s, w, mu, s2, v = map(mpmath.mpf, (a, s, w, mu, s2, v))
        m = (-s / 2, s / 2)
        prec = a / v + (1 - a) / s2
        centres = [(a * mk / v + (1 - a) * mu / s2) / prec for mk in m]
        pts = sorted(
            {c + k / mpmath.sqrt(prec) for c in centres for k in (-8, -3, 0, 3, 8)} | {m[0], m[1], mu}
        )

        def f(x):
            p = w * mpmath.npdf(x, m[0], mpmath.sqrt(v)) + (1 - w) * mpmath.npdf(x, m[1], mpmath.sqrt(v))
            return p**a * mpmath.npdf(x, mu, mpmath.sqrt(s2)) ** (1 - a)

        return float(mpmath.log(mpmath.quad(f, [-mpmath.inf, *pts, mpmath.inf])))


@pytest.mark.parametrize(
    "a, s, w, mu, s2",
    [
        (4.0, 20.0, 0.5, 0.0, 1.0),  # the mass of p^4 q^-3 sits at x = +-40: log I = 597.9
        (0.7, 20.0, 0.99, 0.3, 1e-3),  # renyi(0.3)'s integral, e^-37.7 (a narrow Q between modes)
        (2.0, 8.0, 0.01, 0.3, 1e3),
    ],
)
def test_reference_agrees_with_mpmath(a, s, w, mu, s2):
    # The reference checks itself: scipy against mpmath on hard cases (the closed forms of the
    # next test check it at separation 0).
    got = ref_log_integral(a, (s, w, mu, s2, 1.0, 0.0))
    assert got == pytest.approx(mpmath_log_integral(a, s, w, mu, s2), rel=1e-12, abs=1e-12)
    lower, upper = log_integral_bounds(a, s, w, mu, s2) if not 0 <= a <= 1 else (-math.inf, 0.0)
    assert lower <= got <= upper


# ---------------------------------------------------------------------------------------------
# 3. Closed forms at separation 0: P = N(center, v)


def gauss_member_mp(name, a, m1, v1, m2, v2) -> float:
    """The member between P = N(m1, v1) and Q = N(m2, v2) from :func:`gauss_log_integral`'s closed
    form, in 50-digit arithmetic (no cancellation in 1 - I whatever I is)."""
    with mpmath.workdps(50):
        a = None if a is None else mpmath.mpf(a)
        order = (1 - a) if name == "renyi" else mpmath.mpf(member_alpha(name, a))
        m1, v1, m2, v2 = map(mpmath.mpf, (m1, v1, m2, v2))
        k = order * v2 + (1 - order) * v1
        log_i = ((1 - order) * mpmath.log(v1) + order * mpmath.log(v2) - mpmath.log(k)) / 2 - order * (
            1 - order
        ) * (m1 - m2) ** 2 / (2 * k)
        if name == "renyi":
            return float(-log_i / order)
        d = -mpmath.expm1(log_i) / (order * (1 - order))
        return float({"alpha": d, "hellinger": d / 4, "chi2": 2 * d}[name])


CLOSED_FORM_MEMBERS = [
    ("alpha", -1.0),
    ("alpha", 0.3),
    ("alpha", 2.0),
    ("chi2", None),
    ("hellinger", None),
] + [("renyi", a) for a in (0.3, 0.5, 2.0, 3.0)]
POINT = "(center, v, mu, sigma2)"
# (center, v, mu, sigma2), chosen inside every member's finite region (0.5 v < sigma2 < 1.5 v) and
# a few (sigma2 far from v) that only some members allow.
CLOSED_FORM_POINTS = [
    (0.0, 1.0, 0.3, 1.0),
    (0.0, 1.0, -1.7, 0.7),
    (0.0, 1.0, 2.5, 1.4),
    (5.0, 2.5, 4.0, 2.0),
    (-3.0, 0.25, -3.001, 0.3),
    (0.0, 1.0, 1e-3, 1.0 + 1e-3),
    (0.0, 1.0, 10.0, 1.2),
    (0.0, 1.0, 0.5, 1e-3),
    (0.0, 1.0, -3.0, 1e3),
]


@pytest.mark.parametrize("member", CLOSED_FORM_MEMBERS, ids=member_id)
def test_closed_form_between_gaussians(member):
    name, a = member
    points = [
        (c, v, m, s2)
        for c, v, m, s2 in CLOSED_FORM_POINTS
        if member_finite(name, a, 0.0, m, s2, v, c) and inside_edge(name, a, s2, 0.02, v)
    ]
    assert len(points) >= 4
    want = np.array([gauss_member_mp(name, a, c, v, m, s2) for c, v, m, s2 in points])
    # The closed form is checked against the scipy reference first (its derivation is the thing
    # under test here as much as the library) ...
    ref = [reference(name, a, 0.0, 0.5, m, s2, v, c) for c, v, m, s2 in points]
    assert_relative(ref, want, points, 1e-11, f"scipy vs closed form {member_id(member)}", POINT)
    # ... then the library against it (center and v vary from row to row).
    got = exact(
        name,
        a,
        [(0.0, 0.5, m, s2) for _, _, m, s2 in points],
        v=[p[1] for p in points],
        center=[p[0] for p in points],
    )
    assert_relative(got, want, points, 1e-10, f"divergence_exact vs closed form {member_id(member)}", POINT)


def test_jensen_shannon_value_where_p_and_q_nearly_agree():
    # Where P and Q nearly agree, log(1 -+ u) are small: formed as log 2 minus a softplus with the
    # vector log1p's 4 ulp they lost digits, and the kernel's values were off by 2.5e-12 here.
    # (The scipy reference agrees with mpmath's 40-digit quadrature to 5e-16 on these rows.)
    rows = [(0.0, 0.7, mu, s2) for mu, s2 in [(0.07, 1.0), (0.3, 1.0), (-0.5, 0.8), (0.02, 1.1), (1.5, 1.0)]]
    want = np.array([reference("jensen_shannon", None, *row) for row in rows])
    assert_relative(exact("jensen_shannon", None, rows), want, rows, 1e-13, "divergence_exact vs scipy")


# ---------------------------------------------------------------------------------------------
# 4. Zero at Q = P, and never negative


ALL_MEMBERS = MEMBERS + [
    ("alpha", 0.0),
    ("alpha", 1.0),
    ("renyi", 1.0),
    ("forward", None),
    ("reverse", None),
]


@pytest.mark.parametrize("member", ALL_MEMBERS, ids=member_id)
def test_zero_when_q_is_p_and_never_negative(member):
    name, a = member
    # separation 0: P = N(center, v); Q = P (sigma2 = exp(2 log sigma) is v to the last bit here).
    cases = [(0.0, 1.0, 0.5), (5.0, 4.0, 0.1), (-2.0, 0.25, 0.9)]  # (center, v, w)
    got = exact(
        name, a, [(0.0, w, c, v) for c, v, w in cases], v=[c[1] for c in cases], center=[c[0] for c in cases]
    )
    assert (np.abs(got) <= 1e-14).all(), list(zip(cases, got))
    got = exact(name, a, GRID)
    assert not np.isnan(got).any(), [r for r, g in zip(GRID, got) if np.isnan(g)]
    assert (got >= 0).all(), [(r, g) for r, g in zip(GRID, got) if g < 0]
    # The upper bounds, up to rounding (disjoint P and Q give log 2 and 1 to the last bit or two).
    if name == "jensen_shannon":
        assert (got <= LOG_2 * (1 + 4e-16)).all(), got.max() - LOG_2
    if name == "hellinger":
        assert (got <= 1 + 4e-16).all(), got.max() - 1


# ---------------------------------------------------------------------------------------------
# 5. Continuity at the KL limits

# A sample of the grid, and rows where Q is close to P (there D_a is within 1e-9 of the KL at
# |a - limit| = 1e-9; on most of the grid it is not, see below).
LIMIT_ROWS = subset(GRID, 20, seed=5) + [
    (0.0, 0.5, 0.3, 1.0),
    (0.5, 0.5, 0.0, 1.1),
    (1.0, 0.3, 0.5, 1.2),
    (3.0, 0.5, 0.0, 3.0),
    (0.0, 0.5, 0.01, 0.98),
]


@pytest.mark.parametrize(
    "a, direction",
    [
        (0.0, "reverse"),
        (1e-9, "reverse"),
        (-1e-9, "reverse"),
        (1.0, "forward"),
        (1 - 1e-9, "forward"),
        (1 + 1e-9, "forward"),
    ],
)
def test_alpha_near_zero_and_one_tends_to_the_kls(a, direction):
    got = exact("alpha", a, LIMIT_ROWS)
    assert not np.isnan(got).any()
    key = [(float(s), float(w), float(m), float(s2), 1.0, 0.0) for s, w, m, s2 in LIMIT_ROWS]
    kl = np.array([ref_kl(direction, k) for k in key])
    if a in (0.0, 1.0):
        assert_relative(got, kl, LIMIT_ROWS, 1e-8, f"alpha({a}) vs KL")
        return
    # Against the reference at this very a (integrating the non-negative density, which has no
    # 1 / (a (1 - a)) to amplify rounding) ...
    want = np.array([ref_alpha(a, k) for k in key])
    assert_relative(got, want, LIMIT_ROWS, 1e-8, f"alpha({a!r}) vs scipy")
    # ... and against the KL itself wherever D_a is within 1e-9 of it. Not everywhere: D_a moves
    # off the KL at a rate ~E[(log p - log q)^2] / 2, so for sigma2 = 1e-3 under a wide P,
    # D_{1 +- 1e-9} differs from KL(P||Q) by 1e-4 relative (that is correct, not an error).
    close = np.abs(want - kl) <= 1e-9 * kl
    assert close.sum() >= 5
    rows = [r for r, c in zip(LIMIT_ROWS, close) if c]
    assert_relative(got[close], kl[close], rows, 1e-8, f"alpha({a!r}) vs KL")


@pytest.mark.parametrize("a", [1.0, 1 - 1e-9, 1 + 1e-9])
def test_renyi_at_one_is_the_reverse_kl(a):
    got = exact("renyi", a, LIMIT_ROWS)
    assert not np.isnan(got).any()
    want = np.array([reference("renyi", a, *r) for r in LIMIT_ROWS])
    assert_relative(got, want, LIMIT_ROWS, 1e-8, f"renyi({a!r}) vs scipy")
    # And against KL(Q||P) itself: everywhere at a = 1, and where R_a is within 1e-9 of it at
    # a = 1 +- 1e-9 (as for alpha above, R_a moves off the KL at a rate ~Var_Q(log q - log p) / 2).
    kl = np.array([reference("reverse", None, *r) for r in LIMIT_ROWS])
    close = np.abs(want - kl) <= 1e-9 * kl
    assert close.sum() >= (len(LIMIT_ROWS) if a == 1.0 else 5)
    rows = [r for r, c in zip(LIMIT_ROWS, close) if c]
    assert_relative(got[close], kl[close], rows, 1e-8, f"renyi({a!r}) vs KL(Q||P)")


# ---------------------------------------------------------------------------------------------
# 6. Relations between members (library against library: secondary to the scipy tests above)


def test_members_relations():
    rows = GRID
    for name, a, scale in [("chi2", 2.0, 2.0), ("hellinger", 0.5, 0.25)]:
        got, want = exact(name, None, rows), scale * exact("alpha", a, rows)
        ok = np.isfinite(want)
        assert (np.isposinf(got) == np.isposinf(want)).all(), name
        assert_relative(got[ok], want[ok], [r for r, k in zip(rows, ok) if k], 1e-12, name)
    for a in RENYI_ORDERS:
        got, d = exact("renyi", a, rows), exact("alpha", 1 - a, rows)
        finite = np.array([member_finite("renyi", a, r[0], r[2], r[3]) for r in rows])
        assert (np.isposinf(got) == ~finite).all(), a
        inner = 1 - a * (1 - a) * d  # = int q^a p^(1-a) dx; log of it is well conditioned if >= 1e-3
        ok = np.isfinite(d) & (inner >= 1e-3)
        want = np.log(inner[ok]) / (a - 1)
        assert_relative(got[ok], want, [r for r, k in zip(rows, ok) if k], 1e-10, f"renyi({a})")


# ---------------------------------------------------------------------------------------------
# 7. The infinite regions and their edges

#: Members with an edge: (name, alpha, component variance v). v is chosen so that the edge is a
#: short binary fraction (2, 1.5, 0.5, 0.75): then sigma2 = exp(2 log sigma) lands on it exactly
#: and "on the edge" means the same thing however the library phrases the comparison.
EDGE_MEMBERS = [
    ("alpha", -3.0, 1.0),  # edge 4/3: not exact, so no on-the-edge row
    ("alpha", -1.0, 1.0),  # 2
    ("alpha", -0.5, 0.5),  # 1.5
    ("alpha", 1.5, 1.0),  # 1/3: not exact
    ("alpha", 2.0, 1.0),  # 0.5
    ("alpha", 4.0, 1.0),  # 0.75
    ("chi2", None, 1.0),  # 0.5
    ("renyi", 2.0, 1.0),  # 2
    ("renyi", 3.0, 1.0),  # 1.5
]
#: (s, w, mu) in units of the components' sd: mu strictly between the means, on a mean, outside,
#: and one Gaussian P (s = 0).
EDGE_ROWS = [
    (2.8, 0.5, 0.0),
    (2.8, 0.3, 1.0),
    (6.0, 0.9, -2.5),
    (2.8, 0.5, 1.4),
    (3.0, 0.5, -1.5),
    (2.8, 0.5, 3.0),
    (20.0, 0.01, -12.0),
    (0.0, 0.5, 0.0),
    (0.0, 0.5, 0.7),
]


def exactly_on(edge: float) -> bool:
    return (edge * 2**10).is_integer() and torch.exp(2 * (0.5 * torch.log(torch.tensor(edge)))).item() == edge


def edge_rows(member):
    """Rows on both sides of the member's edge (1e-2 and 1e-6 relative) and, if exact, on it;
    with, per row: finite (analytic), beyond float range, and at 1e-6 from the edge."""
    name, a, v = member
    sd, edge = math.sqrt(v), member_edge(name, a, v)
    factors = [1 - 1e-2, 1 - 1e-6, 1 + 1e-6, 1 + 1e-2] + ([1.0] if exactly_on(edge) else [])
    rows = [(s * sd, w, mu * sd, edge * f) for s, w, mu in EDGE_ROWS for f in factors]
    finite = np.array([member_finite(name, a, r[0], r[2], r[3], v) for r in rows])
    # Close to the edge the values grow like exp(c / distance): past 1.8e308 the float is +inf
    # although the divergence is (and finite_region rightly says) finite.
    big = np.array([overflows(name, a, r, v) for r in rows])
    near = np.array([1e-7 < abs(r[3] / edge - 1) < 1e-5 for r in rows])
    return rows, finite, big, near


EDGE_IDS = [member_id(m[:2]) for m in EDGE_MEMBERS]


@pytest.mark.parametrize("member", EDGE_MEMBERS, ids=EDGE_IDS)
def test_finite_region_at_the_edges(member):
    name, a, v = member
    rows, finite, _, _ = edge_rows(member)
    assert finite.any() and (~finite).any()
    region = library(finite_region, name, a, rows, v=v).numpy()
    mismatch = [(r, bool(f)) for r, f, g in zip(rows, finite, region) if f != g]
    assert not mismatch, f"finite_region disagrees (row, analytic): {mismatch}"


@pytest.mark.parametrize("member", EDGE_MEMBERS, ids=EDGE_IDS)
def test_inf_exactly_where_infinite_at_the_edges(member):
    name, a, v = member
    rows, finite, big, near = edge_rows(member)
    got = exact(name, a, rows, v=v)
    wrong = [
        (r, "finite" if f else "infinite", "beyond float" if b else "", g)
        for r, f, b, g in zip(rows, finite, big, got)
        if np.isnan(g) or np.isposinf(g) != (not f or b)
    ]
    assert not wrong, f"want +inf exactly where infinite or beyond float range; (row, truth, got): {wrong}"
    if name == "renyi":
        # 1e-6 inside the edge: log I ~ 1e6, Renyi = log I / (a - 1), a finite number that the
        # closed-form bounds on log I (log_integral_bounds) bracket.
        for r, g in zip(np.array(rows, dtype=object)[near & finite], got[near & finite]):
            lower, upper = log_integral_bounds(1 - a, r[0], r[1], r[2], r[3], v)
            assert lower / (a - 1) * (1 - 1e-8) <= g <= upper / (a - 1) * (1 + 1e-8), (r, g, lower, upper)


@pytest.mark.parametrize("member", EDGE_MEMBERS, ids=EDGE_IDS)
def test_values_next_to_and_on_the_edges_match_scipy(member):
    # Finite values against scipy: 1% inside, and on the a < 0 edge with mu between the means,
    # where the tails decay like exp(-|a| |mu - m_k| x / v) and quad integrates them out to +-inf.
    # (1e-6 inside, the integrand's mass sits ~1e6 away where log p and log q are ~1e11 and their
    # combination loses ~1e-5 to rounding: no quadrature reference there; see the test above.)
    name, a, v = member
    rows, finite, big, near = edge_rows(member)
    check = [i for i in range(len(rows)) if finite[i] and not big[i] and not near[i]]
    assert check
    got = exact(name, a, [rows[i] for i in check], v=v)
    want = [reference(name, a, *rows[i], v=v) for i in check]
    assert_relative(got, want, [rows[i] for i in check], 1e-8, f"finite values {member_id(member[:2])}")


def test_the_edge_example_of_the_brief():
    # a = -1, P = N(-1.4, 1)/2 + N(1.4, 1)/2: the edge is sigma2 = 2. With mu = 0 between the
    # means the divergence is finite there; with mu = 3 (outside) it is not.
    rows = [(2.8, 0.5, 0.0, 2.0), (2.8, 0.5, 3.0, 2.0)]
    got = exact("alpha", -1.0, rows)
    assert library(finite_region, "alpha", -1.0, rows).tolist() == [True, False]
    assert np.isposinf(got[1])
    assert_relative(got[:1], [reference("alpha", -1.0, *rows[0])], rows[:1], 1e-8, "on the edge")


def test_finite_region_on_the_whole_grid():
    for name, a in ALL_MEMBERS:
        want = np.array([member_finite(name, a, r[0], r[2], r[3]) for r in GRID])
        got = library(finite_region, name, a, GRID).numpy()
        assert (got == want).all(), (name, a, [r for r, g, f in zip(GRID, got, want) if g != f])
        values = exact(name, a, GRID)
        fits = np.array([not overflows(name, a, r) for r in GRID])
        wrong = [
            (r, g)
            for r, g, f, b in zip(GRID, values, want, fits)
            if (not f and not np.isposinf(g)) or (f and b and not np.isfinite(g))
        ]
        assert not wrong, (
            f"{member_id((name, a))}: +inf where infinite, finite where finite; (row, got): {wrong}"
        )


# ---------------------------------------------------------------------------------------------
# 8. Stability where log p - log q is huge

STIFF_ROWS = list(itertools.product([20.0], [0.01, 0.5, 0.99], [-10.0, -3.0, 0.0, 0.3, 10.0], [1e-3]))
STIFF_MEMBERS = (
    [("alpha", a) for a in (0.25, 0.5, 0.75, -0.5, -1.0, -3.0)]
    + [("hellinger", None), ("jensen_shannon", None)]
    + [("renyi", a) for a in RENYI_ORDERS]
)


@pytest.mark.parametrize("member", STIFF_MEMBERS, ids=member_id)
def test_huge_log_ratios_stay_finite_and_exact(member):
    # s = 20, sigma2 = 1e-3: log p - log q runs from -5e4 to +5e5 over the nodes. Every one of these
    # members is finite here (a in (0, 1), or a < 0 with sigma2 far inside its edge).
    name, a = member
    assert all(member_finite(name, a, r[0], r[2], r[3]) for r in STIFF_ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = exact(name, a, STIFF_ROWS)
        obj = fitted(name, a, STIFF_ROWS)
    assert np.isfinite(got).all() and (got >= 0).all(), got
    assert np.isfinite(obj).all(), obj
    want = [reference(name, a, *r) for r in STIFF_ROWS]
    assert_relative(got, want, STIFF_ROWS, 1e-8, f"divergence_exact {member_id(member)}")
