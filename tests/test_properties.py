"""Property-based tests (issue 5): the divergences and the forward optimum over random valid parameters.

Every property compares the core, called in-process, with a method that shares no code with it:
scipy's adaptive quadrature (``conftest.scipy_kl``), Gaussian closed forms evaluated in mpmath, the
mixture's moments written out by hand, or :func:`reference_kl` below, which reduces each KL to
closed forms plus one bounded one-dimensional integral and so stays exact for huge and extreme
parameters where plain quadrature cannot (it is itself checked against scipy and mpmath here).
"""

import math

import mpmath
import numpy as np
import torch
from conftest import scipy_kl
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from scipy import integrate, special

from kl_sweep.core.divergences import DIVERGENCES, divergence_exact, divergence_value
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Problem, Settings, Status, fit
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam

torch.set_default_dtype(torch.float64)

LOG_2PI = math.log(2 * math.pi)
NAMES = ("forward", "reverse")
# derandomize: the same examples on every run, so a failure is reproducible from its report; no
# shrinking and no example database, so a failing run stays as quick as a passing one.
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow],
)


# --- an independent reference for KL between P = w N(-s/2, v) + (1 - w) N(s/2, v) and Q = N(mu, s2) ---


def _expect_softplus(md: float, sd: float) -> float:
    """E[log(1 + e^D)] for D ~ N(md, sd^2) with md <= 0.

    E[max(D, 0)] in closed form, plus E[log1p(exp(-|D|))] (bounded by log 2) by scipy quadrature in
    D itself, split at the kink D = 0 and on the density's own scale.
    """
    if sd < 1e-4:  # D is nearly constant: second-order expansion, error O(sd^4)
        s = math.exp(md) / (1.0 + math.exp(md))
        return math.log1p(math.exp(md)) + 0.5 * sd * sd * s * (1.0 - s)
    z = md / sd
    e_max = sd * math.exp(-0.5 * z * z - 0.5 * LOG_2PI) + md * special.ndtr(z)
    lo, hi = max(-60.0, md - 40 * sd), min(60.0, md + 40 * sd)  # log1p(e^-60) < 1e-26
    if hi <= lo:
        return e_max

    def rest(u: float) -> float:
        t = (u - md) / sd
        return math.exp(-0.5 * t * t - 0.5 * LOG_2PI) / sd * math.log1p(math.exp(-abs(u)))

    cuts = [0.0, md, *(md + k * sd for k in (-8, -4, -2, -1, 1, 2, 4, 8)), *map(float, range(-60, 61, 5))]
    edges = sorted({lo, hi, *(c for c in cuts if lo < c < hi)})
    return e_max + sum(
        integrate.quad(rest, a, b, epsabs=1e-17, epsrel=1e-13, limit=200)[0]
        for a, b in zip(edges[:-1], edges[1:])
    )


def expect_log_p(m: float, s2: float, separation: float, weight: float, v: float) -> float:
    """E[log p(x)] for x ~ N(m, s2), P = weight N(-separation/2, v) + (1 - weight) N(separation/2, v).

    With l_k = log w_k + log N(x; m_k, v), log p = l_dominant + log(1 + e^{-|l_1 - l_2|}); the
    difference l_1 - l_2 = logit(weight) - separation x / v is linear in x, so it is a Gaussian D,
    and every term is a closed form except the bounded E[log1p(exp(-|D|))]. Nothing cancels.
    """
    means, log_w = (-separation / 2, separation / 2), (math.log(weight), math.log1p(-weight))
    ell = [
        lw - 0.5 * (LOG_2PI + math.log(v)) - ((m - mk) ** 2 + s2) / (2 * v) for lw, mk in zip(log_w, means)
    ]
    md = log_w[0] - log_w[1] - separation * m / v
    sd = separation * math.sqrt(s2) / v
    return (ell[0] if md >= 0 else ell[1]) + _expect_softplus(-abs(md), sd)


def reference_kl(divergence: str, separation, weight, v, mu, s2) -> float:
    """KL(P||Q) ("forward") or KL(Q||P) ("reverse") in nats, P centred at 0; see the module docstring."""
    separation, weight, v, mu, s2 = map(float, (separation, weight, v, mu, s2))
    if divergence == "reverse":  # -H(Q) - E_Q[log p]
        return -0.5 * (LOG_2PI + 1 + math.log(s2)) - expect_log_p(mu, s2, separation, weight, v)
    half = separation / 2
    mean = half * (1 - 2 * weight)
    var = v + separation**2 * weight * (1 - weight)
    e_log_q = -0.5 * (LOG_2PI + math.log(s2)) - (var + (mean - mu) ** 2) / (2 * s2)  # from P's moments
    e_log_p = weight * expect_log_p(-half, v, separation, weight, v)
    e_log_p += (1 - weight) * expect_log_p(half, v, separation, weight, v)
    return e_log_p - e_log_q


def _gauss_expect(g, md: float, sd: float) -> float:
    """E[g(D)] for D ~ N(md, sd^2) and a smooth g that is constant to 1e-17 outside |D| <= 40."""
    if sd == 0:
        return g(md)

    def f(t: float) -> float:
        return math.exp(-0.5 * t * t - 0.5 * LOG_2PI) * g(md + sd * t)

    cuts = ((c - md) / sd for c in (-40.0, -20.0, -10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0, 20.0, 40.0))
    edges = sorted({-40.0, 40.0, *(t for t in cuts if -40.0 < t < 40.0)})
    return sum(
        integrate.quad(f, a, b, epsabs=1e-17, epsrel=1e-13, limit=200)[0]
        for a, b in zip(edges[:-1], edges[1:])
    )


def _sigmoid(u: float) -> float:
    return 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))


def reference_grad(divergence: str, separation, weight, v, mu, s2) -> tuple[float, float]:
    """The gradient of :func:`reference_kl` in (mu, log sigma), the coordinates the fit works in.

    Forward: from P's moments. Reverse: with log p = l_base + softplus(D') as in :func:`expect_log_p`,
    d/dmu E_Q[log p] = E_Q[d log p / dx], and d/dlog sigma of E_Q[softplus(D')] is
    sd^2 E[sigmoid'(D')] (Stein's lemma), so only two bounded expectations remain.
    """
    separation, weight, v, mu, s2 = map(float, (separation, weight, v, mu, s2))
    if divergence == "forward":
        mean = separation / 2 * (1 - 2 * weight)
        spread = v + separation**2 * weight * (1 - weight) + (mean - mu) ** 2
        return (mu - mean) / s2, 1.0 - spread / s2
    means = (-separation / 2, separation / 2)
    md = math.log(weight) - math.log1p(-weight) - separation * mu / v  # D = l_1 - l_2
    sd = separation * math.sqrt(s2) / v
    base, sign = (0, -1.0) if md >= 0 else (1, 1.0)  # log p = l_base + softplus(sign D)
    e_sig = _gauss_expect(_sigmoid, -abs(md), sd)
    e_slope = _gauss_expect(lambda u: _sigmoid(u) * _sigmoid(-u), -abs(md), sd)
    e_dlogp_dx = -(mu - means[base]) / v + e_sig * sign * (-separation / v)
    return -e_dlogp_dx, -1.0 + s2 / v - sd * sd * e_slope


def gaussian_kl(m_a, v_a, m_b, v_b) -> mpmath.mpf:
    """KL(N(m_a, v_a) || N(m_b, v_b)) in 50-digit arithmetic, from the exact binary inputs."""
    with mpmath.workdps(50):
        m_a, v_a, m_b, v_b = (mpmath.mpf(float(x)) for x in (m_a, v_a, m_b, v_b))
        return (mpmath.log(v_b / v_a) + (v_a + (m_a - m_b) ** 2) / v_b - 1) / 2


def kl_tolerance(kl: float) -> float:
    """How close a float64 evaluation of a KL can get: 1e-9 relative, down to the rounding floor.

    The integrand's delta = log a - log b carries an absolute rounding error of about 5e-15 (the
    log densities are O(10) at the nodes), which moves KL = E[delta + e^-delta - 1] by about
    sqrt(2 KL) * 5e-15: a KL of 5e-15 keeps 7 digits, one of 1e-20 keeps 5, and 0 stays below 1e-30.
    """
    return 1e-9 * kl + 1e-14 * math.sqrt(kl) + 1e-30


def _batch(separation, weight, center, component_var, mu, sigma2):
    col = [torch.tensor([float(x)]) for x in (separation, weight, center, component_var)]
    return (
        Mixture.two_component(*col),
        torch.tensor([float(mu)]),
        0.5 * torch.log(torch.tensor([float(sigma2)])),
    )


def _core(name, separation, weight, component_var, mu, sigma2, center=0.0):
    """(divergence_value with Quadrature(), divergence_exact) for one configuration."""
    mix, m, log_sigma = _batch(separation, weight, center, component_var, mu, sigma2)
    div = DIVERGENCES[name]
    return (
        divergence_value(div, Quadrature(), mix, m, log_sigma).item(),
        divergence_exact(div, mix, m, log_sigma).item(),
    )


def log_uniform(lo: float, hi: float):
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda t: min(max(10.0**t, lo), hi))


# The range the quadrature estimator promises 1e-8 nats on (component_var = 1).
separations = st.floats(0.0, 20.0)
weights = st.floats(0.01, 0.99)
mus = st.floats(-10.0, 10.0)
sigma2s = log_uniform(1e-3, 1e3)
# The extremes, and everything in between.
wide_separations = st.floats(0.0, 50.0)
wide_weights = st.one_of(log_uniform(1e-6, 0.5), log_uniform(1e-6, 0.5).map(lambda t: 1.0 - t))
wide_vars = log_uniform(1e-6, 1e6)
wide_mus = st.floats(-1000.0, 1000.0)
wide_sigma2s = log_uniform(1e-8, 1e8)


# --- the reference itself, against the two other independent methods ---


@PROPERTY
@given(separation=separations, weight=weights, mu=mus, sigma2=sigma2s)
def test_reference_agrees_with_scipy_quadrature(separation, weight, mu, sigma2):
    for name in NAMES:
        want = scipy_kl(name, separation, weight, 1.0, mu, sigma2)
        got = reference_kl(name, separation, weight, 1.0, mu, sigma2)
        assert abs(got - want) <= 1e-10 * max(1.0, abs(want)), (name, got, want)


@PROPERTY
@given(
    weight=wide_weights,
    v=wide_vars,
    mu=wide_mus,
    sigma2=wide_sigma2s,
)
def test_reference_agrees_with_mpmath_where_the_modes_do_not_overlap(weight, v, mu, sigma2):
    # separation 50 with v <= 1e-2: the components overlap by less than e^-30000, so
    # KL(P||Q) = sum_k w_k (log w_k - H(N_k) - E_{N_k}[log q]) exactly, in closed form.
    v = min(v, 1e-2)
    with mpmath.workdps(40):
        w, vv, m, s2 = (mpmath.mpf(x) for x in (weight, v, mu, sigma2))
        want = 0
        for wk, mk in ((w, -25), (1 - w, 25)):
            e_log_q = -mpmath.log(2 * mpmath.pi * s2) / 2 - (vv + (mk - m) ** 2) / (2 * s2)
            want += wk * (mpmath.log(wk) - mpmath.log(2 * mpmath.pi * mpmath.e * vv) / 2 - e_log_q)
        want = float(want)
    got = reference_kl("forward", 50.0, weight, v, mu, sigma2)
    assert abs(got - want) <= 1e-13 * max(1.0, abs(want))


@PROPERTY
@given(separation=separations, weight=weights, mu=mus, sigma2=sigma2s)
def test_reference_gradient_agrees_with_finite_differences(separation, weight, mu, sigma2):
    h = 1e-5
    log_sigma = 0.5 * math.log(sigma2)
    for name in NAMES:

        def f(m, ls, name=name):
            return reference_kl(name, separation, weight, 1.0, m, math.exp(2 * ls))

        g_mu, g_s = reference_grad(name, separation, weight, 1.0, mu, sigma2)
        fd_mu = (f(mu + h, log_sigma) - f(mu - h, log_sigma)) / (2 * h)
        fd_s = (f(mu, log_sigma + h) - f(mu, log_sigma - h)) / (2 * h)
        scale = max(1.0, abs(f(mu, log_sigma)))
        assert abs(g_mu - fd_mu) <= 1e-5 * scale and abs(g_s - fd_s) <= 1e-5 * scale, (
            name,
            g_mu,
            fd_mu,
            g_s,
            fd_s,
        )


# --- the core ---


@PROPERTY
@given(separation=separations, weight=weights, mu=mus, sigma2=sigma2s)
def test_divergences_agree_with_scipy_quadrature_to_1e8(separation, weight, mu, sigma2):
    for name in NAMES:
        want = scipy_kl(name, separation, weight, 1.0, mu, sigma2)
        value, exact = _core(name, separation, weight, 1.0, mu, sigma2)
        scale = max(1.0, abs(want))
        assert abs(value - want) <= 1e-8 * scale, ("divergence_value", name, value, want)
        assert abs(exact - want) <= 1e-8 * scale, ("divergence_exact", name, exact, want)


@PROPERTY
@given(
    separation=wide_separations,
    weight=wide_weights,
    center=st.floats(-100.0, 100.0),
    v=wide_vars,
    offset=wide_mus,
    sigma2=wide_sigma2s,
)
@example(separation=0.0, weight=0.5, center=0.0, v=1.0, offset=0.0, sigma2=1.0)
@example(separation=50.0, weight=1e-6, center=0.0, v=1e-6, offset=1000.0, sigma2=1e-8)
def test_divergences_are_never_negative(separation, weight, center, v, offset, sigma2):
    mix, m, log_sigma = _batch(separation, weight, center, v, center + offset, sigma2)
    for name in NAMES:
        exact = divergence_exact(DIVERGENCES[name], mix, m, log_sigma).item()
        assert exact >= 0.0 and math.isfinite(exact), (name, exact)


@PROPERTY
@given(
    weight=wide_weights,
    center=st.floats(-1000.0, 1000.0),
    v=wide_vars,
)
def test_divergences_vanish_when_q_is_the_gaussian_p(weight, center, v):
    # separation 0: P is exactly N(center, v), whatever the weight.
    for name in NAMES:
        value, exact = _core(name, 0.0, weight, v, center, v, center=center)
        assert 0.0 <= exact <= 1e-15, (name, exact)
        assert abs(value) <= 1e-12, (name, value)


@PROPERTY
@given(
    weight=wide_weights,
    center=st.floats(-100.0, 100.0),
    v=wide_vars,
    shift=st.one_of(st.just(0.0), log_uniform(1e-7, 1e3), log_uniform(1e-7, 1e3).map(lambda t: -t)),
    ratio=st.one_of(
        log_uniform(1e-4, 1e4),
        st.floats(-1e-3, 1e-3).filter(lambda e: abs(e) >= 1e-7).map(lambda e: 1.0 + e),
    ),
)
@example(weight=1e-6, center=0.0, v=1e-6, shift=1e-7, ratio=1.0)  # KL = 5e-15
@example(weight=0.5, center=0.0, v=1e6, shift=-1e3, ratio=1e-4)  # KL ~ 5e9
def test_gaussian_kls_are_exact_when_tiny_and_when_huge(weight, center, v, shift, ratio):
    # P = N(center, v) (separation 0) against Q = N(center + shift sd, ratio v): closed forms.
    mu, sigma2 = center + shift * math.sqrt(v), ratio * v
    mix, m, log_sigma = _batch(0.0, weight, center, v, mu, sigma2)
    s2 = float(torch.exp(2 * log_sigma).item())  # the variance the core sees
    for name in NAMES:
        got = divergence_exact(DIVERGENCES[name], mix, m, log_sigma).item()
        if name == "forward":
            want = float(gaussian_kl(center, v, mu, s2))
        else:
            want = float(gaussian_kl(mu, s2, center, v))
        assert got >= 0.0
        # relative accuracy for tiny values as for huge ones (1e-6 where KL < 1e-8: the ulps of mu
        # and sigma2 alone move a KL of 1e-15 in its tenth digit)
        rtol = 1e-9 if want > 1e-8 else 1e-6
        # 1e-30: P's log density, a logaddexp of the two equal components, is exact to an ulp only
        assert abs(got - want) <= rtol * want + 1e-30, (name, got, want)


@PROPERTY
@given(
    separation=wide_separations,
    weight=wide_weights,
    v=wide_vars,
    mu=wide_mus,
    sigma2=wide_sigma2s,
)
@example(separation=50.0, weight=1e-6, v=1e-6, mu=1000.0, sigma2=1.0)
@example(separation=50.0, weight=0.999999, v=1e-6, mu=0.0, sigma2=1e8)
@example(separation=0.0, weight=0.999999, v=1e-6, mu=-1000.0, sigma2=1e-8)
@example(separation=50.0, weight=1e-6, v=1e6, mu=1000.0, sigma2=1e8)
def test_reported_divergences_stay_exact_at_the_extremes(separation, weight, v, mu, sigma2):
    """divergence_exact (what every table reports) against the reference over the issue's extremes."""
    mix, m, log_sigma = _batch(separation, weight, 0.0, v, mu, sigma2)
    s2 = float(torch.exp(2 * log_sigma).item())
    for name in NAMES:
        got = divergence_exact(DIVERGENCES[name], mix, m, log_sigma).item()
        want = reference_kl(name, separation, weight, v, mu, s2)
        assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), (name, got, want)


mixtures = st.tuples(
    st.floats(0.0, 20.0),  # separation
    st.floats(0.01, 0.99),  # weight
    st.floats(-50.0, 50.0),  # center
    log_uniform(1e-2, 1e2),  # component_var
    st.floats(-3.0, 3.0),  # init_mu, in P's standard deviations from P's mean
    log_uniform(1e-1, 1e1),  # init_sigma2, relative to P's variance
)


@settings(PROPERTY, max_examples=20)
@given(rows=st.lists(mixtures, min_size=1, max_size=6))
def test_forward_optimum_is_moment_matching(rows):
    s, w, c, v, z0, r0 = (np.array(col, dtype=np.float64) for col in zip(*rows))
    # P's moments written out: means c -+ s/2 with weights w and 1 - w.
    mean = w * (c - s / 2) + (1 - w) * (c + s / 2)
    var = v + s * s * w * (1 - w)
    n = len(rows)
    problem = Problem(
        mixture=Mixture.two_component(*(torch.tensor(a) for a in (s, w, c, v))),
        init_mu=torch.tensor(mean + z0 * np.sqrt(var)),
        init_sigma2=torch.tensor(r0 * var),
        lr=torch.full((n,), 0.05),
        max_steps=torch.full((n,), 20000, dtype=torch.long),  # the optimum is tested, not the budget
        tol=torch.full((n,), 1e-8),
    )
    result = fit(problem, Settings(DIVERGENCES["forward"], Quadrature(), Adam()))
    assert (result.status == Status.CONVERGED).all(), result.status
    np.testing.assert_array_less(np.abs(result.mu.numpy() - mean) / np.sqrt(var), 1e-8)
    np.testing.assert_array_less(np.abs(result.sigma2.numpy() - var) / var, 1e-8)
