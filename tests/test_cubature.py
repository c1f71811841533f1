"""kl_sweep.core.cubature: general mixture targets in d dimensions, checked against independent methods.

- 2-D: every divergence against scipy's adaptive cubature (``scipy.integrate.cubature``) of the
  textbook integrands, written here in numpy on scipy.stats densities, on a well-separated, an
  overlapping and a narrow-component mixture with unequal covariances.
- K = 1 in d = 2, 3, 5, 8: against the closed forms between Gaussians (KL both ways; the alpha and
  Renyi divergences from Gil, Alajaji and Linder 2013); QMC (d > 3) within 4 of its standard errors.
- Where the divergence is infinite, against a dense sampling of directions of the quadratic forms.
- The gradient against central differences, the Hessian against differences of the gradient.
- A row's bits alone and in any batch.
"""

import math

import numpy as np
import pytest
import torch
from conftest import torch_threads
from scipy import integrate, stats
from scipy.special import logsumexp

from kl_sweep.core import cubature as cb
from kl_sweep.core.gaussians import MixtureND


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (the bits test sets its own): this machine's cores are shared, and a parallel
    region waiting on a busy core costs milliseconds per operation."""
    with torch_threads(1):
        yield


# --- targets ----------------------------------------------------------------------------------------

#: (weights, means, covariances, Q's mean, Q's covariance): Q is chosen so that chi2 (a = 2) and the
#: alpha-divergence at a = -0.5 are both finite (S > Sigma_k / 2 for every k, and S below 3 Sigma
#: of the widest component in every direction).
TARGETS_2D = {
    "separated": (
        [0.4, 0.6],
        [[-4.0, 0.0], [4.0, 1.0]],
        [[[1.0, 0.3], [0.3, 0.5]], [[0.6, -0.2], [-0.2, 1.2]]],
        [0.0, 0.5],
        [[1.5, 0.2], [0.2, 1.1]],
    ),
    "overlapping": (  # conf/targets/example.yaml
        [0.5, 0.3, 0.2],
        [[-2.0, 0.0], [2.0, 1.0], [1.0, -2.5]],
        [[[1.5, 0.9], [0.9, 1.5]], [[0.3, 0.0], [0.0, 0.3]], [[1.2, -0.2], [-0.2, 0.25]]],
        [0.2, -0.3],
        [[1.6, 0.3], [0.3, 1.3]],
    ),
    "narrow": (
        [0.7, 0.3],
        [[0.0, 0.0], [0.8, 0.5]],
        [[[2.0, 0.5], [0.5, 1.0]], [[0.01, 0.004], [0.004, 0.0025]]],
        [0.3, 0.1],
        [[1.5, 0.3], [0.3, 1.0]],
    ),
}

#: (registry name, alpha, key of the scipy integrals below)
MEMBERS_2D = [
    ("forward", None),
    ("reverse", None),
    ("alpha", 0.5),
    ("alpha", 2.0),
    ("alpha", -0.5),
    ("renyi", 0.5),
    ("hellinger", None),
    ("chi2", None),
    ("jensen_shannon", None),
]


def mixture(weights, means, covs) -> MixtureND:
    w, m, c = (torch.tensor(x, dtype=torch.float64) for x in (weights, means, covs))
    return MixtureND(torch.log(w)[None], m[None], torch.linalg.cholesky(c)[None])


def gaussian(mean, cov) -> tuple[torch.Tensor, torch.Tensor]:
    m, c = (torch.tensor(x, dtype=torch.float64) for x in (mean, cov))
    return m[None], torch.linalg.cholesky(c)[None]


# --- the independent reference: scipy cubature of the textbook integrands ----------------------------


def scipy_divergences(weights, means, covs, q_mean, q_cov, rtol=1e-12, kl_only=False, converged=True) -> dict:
    """Every member of MEMBERS_2D by one adaptive cubature of a vector of textbook integrands
    (``kl_only``: the two KLs only); ``converged``: fail unless scipy reports convergence.
    (``benchmarks/cubature_accuracy.py`` uses it too.)"""
    comps = [stats.multivariate_normal(m, c) for m, c in zip(means, covs)]
    q = stats.multivariate_normal(q_mean, q_cov)
    log_w = np.log(weights)

    def integrands(x):
        lp = logsumexp(np.stack([lw + c.logpdf(x) for lw, c in zip(log_w, comps)], -1), -1)
        lq = q.logpdf(x)
        p, qq = np.exp(lp), np.exp(lq)
        lm = np.logaddexp(lp, lq) - math.log(2.0)
        if kl_only:
            return np.stack([p * (lp - lq), qq * (lq - lp)], -1)
        return np.stack(
            [
                p * (lp - lq),  # KL(P||Q)
                qq * (lq - lp),  # KL(Q||P)
                np.exp(0.5 * lp + 0.5 * lq),  # int p^a q^(1-a), a = 1/2
                np.exp(2.0 * lp - lq),  # a = 2
                np.exp(-0.5 * lp + 1.5 * lq),  # a = -1/2
                0.5 * p * (lp - lm) + 0.5 * qq * (lq - lm),  # Jensen-Shannon
            ],
            -1,
        )

    # A box holding all but ~1e-30 of every integrand: 14 sd around the components, Q and the
    # tilted Gaussians p_k^a q^(1-a) of a = 2 and -1/2 (their mass can lie away from P and Q).
    centres, sds = [], []
    for m, c in [*zip(means, covs), (q_mean, q_cov)]:
        centres.append(np.asarray(m))
        sds.append(np.sqrt(np.diag(c)))
    s_inv = np.linalg.inv(q_cov)
    for a in (2.0, -0.5):
        for m, c in zip(means, covs):
            prec = a * np.linalg.inv(c) + (1 - a) * s_inv
            if np.all(np.linalg.eigvalsh(prec) > 0):
                cov = np.linalg.inv(prec)
                centres.append(cov @ (a * np.linalg.solve(c, m) + (1 - a) * s_inv @ np.asarray(q_mean)))
                sds.append(np.sqrt(np.diag(cov)))
    lo = np.min([c - 14 * s for c, s in zip(centres, sds)], 0)
    hi = np.max([c + 14 * s for c, s in zip(centres, sds)], 0)
    res = integrate.cubature(integrands, lo, hi, rtol=rtol, atol=0.0, max_subdivisions=200000)
    assert res.status == "converged" or not converged
    if kl_only:
        return {("forward", None): res.estimate[0], ("reverse", None): res.estimate[1]}
    fwd, rev, i_half, i_two, i_minus, js = res.estimate
    return {
        ("forward", None): fwd,
        ("reverse", None): rev,
        ("alpha", 0.5): (1.0 - i_half) / 0.25,
        ("alpha", 2.0): (1.0 - i_two) / (2.0 * -1.0),
        ("alpha", -0.5): (1.0 - i_minus) / (-0.5 * 1.5),
        ("renyi", 0.5): math.log(i_half) / (0.5 - 1.0),  # R_1/2(Q||P) = -2 log int q^1/2 p^1/2
        ("hellinger", None): 1.0 - i_half,
        ("chi2", None): i_two - 1.0,
        ("jensen_shannon", None): js,
    }


@pytest.mark.parametrize("target", list(TARGETS_2D))
def test_every_divergence_matches_scipy_adaptive_cubature_in_2d(target):
    """The default panel rule against scipy's adaptive Gauss-Kronrod cubature, to 1e-7 relative
    (measured: below 1e-9 on these targets; see benchmarks/cubature_accuracy.py)."""
    weights, means, covs, q_mean, q_cov = TARGETS_2D[target]
    reference = scipy_divergences(weights, means, covs, q_mean, q_cov)
    mix = mixture(weights, means, covs)
    mean, tril = gaussian(q_mean, q_cov)
    for name, alpha in MEMBERS_2D:
        value, error = cb.divergence_nd(name, mix, mean, tril, alpha)
        ref = reference[(name, alpha)]
        assert math.isfinite(ref) and ref > 0
        assert error.item() == 0.0
        assert value.item() == pytest.approx(ref, rel=1e-7), (target, name, alpha)


def test_in_one_dimension_it_agrees_with_the_projects_1d_rule():
    """d = 1 (the nested rule with one level) against the 1-D ``divergence_exact`` (composite
    Gauss-Legendre with its own panels, tails and finite-region rules): to 1e-9, +inf alike."""
    from kl_sweep.core.divergences import DIVERGENCES, divergence_exact
    from kl_sweep.core.mixture import Mixture

    g = torch.Generator().manual_seed(0)
    B = 16
    means = torch.randn(B, 2, generator=g, dtype=torch.float64) * 3
    var = torch.exp(torch.randn(B, 2, generator=g, dtype=torch.float64))
    w = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.1
    log_w = torch.stack([torch.log(w), torch.log1p(-w)], -1)
    mu = torch.randn(B, generator=g, dtype=torch.float64)
    log_sigma = 0.5 * torch.randn(B, generator=g, dtype=torch.float64)
    nd = MixtureND(log_w, means[..., None], torch.sqrt(var)[..., None, None])
    for name, alpha in [*MEMBERS_2D, ("renyi", 2.0)]:
        ref = divergence_exact(DIVERGENCES[name], Mixture(means, var, log_w), mu, log_sigma, alpha=alpha)
        value, _ = cb.divergence_nd(name, nd, mu[:, None], torch.exp(log_sigma)[:, None, None], alpha)
        assert torch.equal(torch.isfinite(value), torch.isfinite(ref)), (name, alpha)
        finite = torch.isfinite(ref)
        assert finite.any()
        assert torch.allclose(value[finite], ref[finite], rtol=1e-9, atol=0.0), (name, alpha)


# --- K = 1: closed forms ------------------------------------------------------------------------------


def kl_gaussians(m0, S0, m1, S1) -> float:
    """KL(N(m0, S0) || N(m1, S1)), the textbook closed form."""
    d = len(m0)
    S1_inv = np.linalg.inv(S1)
    dm = np.asarray(m1) - np.asarray(m0)
    _, ld0 = np.linalg.slogdet(S0)
    _, ld1 = np.linalg.slogdet(S1)
    return 0.5 * (np.trace(S1_inv @ S0) + dm @ S1_inv @ dm - d + ld1 - ld0)


def renyi_gaussians(alpha, m0, S0, m1, S1) -> float:
    """Renyi's R_alpha(N(m0, S0) || N(m1, S1)) = log int p0^alpha p1^(1-alpha) / (alpha - 1)
    (Gil, Alajaji and Linder 2013, eq. 10), S_alpha = alpha S1 + (1 - alpha) S0."""
    Sa = alpha * np.asarray(S1) + (1 - alpha) * np.asarray(S0)
    if np.linalg.eigvalsh(Sa).min() <= 0:  # the integral diverges (their condition)
        return math.inf if alpha > 1 else -math.inf
    dm = np.asarray(m1) - np.asarray(m0)
    _, lda = np.linalg.slogdet(Sa)
    _, ld0 = np.linalg.slogdet(S0)
    _, ld1 = np.linalg.slogdet(S1)
    quad = dm @ np.linalg.solve(Sa, dm)
    return 0.5 * alpha * quad - (lda - (1 - alpha) * ld0 - alpha * ld1) / (2 * (alpha - 1))


def _renyi_qp(alpha, m0, S0, m1, S1) -> float:
    value = renyi_gaussians(alpha, m1, S1, m0, S0)
    return math.inf if math.isinf(value) else value


def closed_form(name, alpha, m0, S0, m1, S1) -> float:
    """The divergence between P = N(m0, S0) and Q = N(m1, S1) in the registry's conventions."""
    if name == "forward":
        return kl_gaussians(m0, S0, m1, S1)
    if name == "reverse":
        return kl_gaussians(m1, S1, m0, S0)
    if name == "renyi":  # R_alpha(Q||P)
        return _renyi_qp(alpha, m0, S0, m1, S1)
    a = {"alpha": alpha, "hellinger": 0.5, "chi2": 2.0}[name]
    renyi = renyi_gaussians(a, m0, S0, m1, S1)
    if math.isinf(renyi):
        return math.inf
    integral = math.exp((a - 1) * renyi)  # int p^a q^(1-a)
    scale = {"alpha": 1.0, "hellinger": 0.25, "chi2": 2.0}[name]
    return scale * (1.0 - integral) / (a * (1.0 - a))


def random_gaussian_pair(d, seed, spread=0.5):
    """P = N(m0, S0), Q = N(m1, S1), randomly rotated, every variance in [e^-0.5, e^0.5]: S1 is then
    within a factor e < 3 of S0 in every direction, so that a = 1.5 and a = -0.5 are finite too."""
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    S0 = rot @ np.diag(np.exp(rng.uniform(-spread, spread, d))) @ rot.T
    rot2, _ = np.linalg.qr(rng.normal(size=(d, d)))
    S1 = rot2 @ np.diag(np.exp(rng.uniform(-spread, spread, d))) @ rot2.T
    return rng.normal(size=d), S0, 0.6 * rng.normal(size=d), S1


K1_MEMBERS = [
    ("forward", None),
    ("reverse", None),
    ("alpha", 0.3),
    ("alpha", 1.5),
    ("alpha", -0.5),
    ("renyi", 2.0),
]


@pytest.mark.parametrize("d", [2, 3, 5, 8])
def test_a_single_gaussian_target_matches_the_closed_forms(d):
    """Panels (d <= 3) to 1e-9 relative; randomised QMC (d > 3) within 4 standard errors, with an
    error estimate that is neither 0 nor larger than 2 % of the value; +inf where the closed form's
    condition fails (Renyi of order 2 needs S < 2 Sigma). In 3-D with 10 panels a level (1e6 nodes
    a row at the default 14: measured 5e-13 there, 3e-11 at 10, in 5x the time)."""
    rule = cb.Panels(panels=10) if d == 3 else None
    rows = [random_gaussian_pair(d, seed) for seed in range(3)]
    checked = 0
    mix = MixtureND(
        torch.zeros(3, 1, dtype=torch.float64),
        torch.tensor(np.stack([r[0] for r in rows]))[:, None],
        torch.linalg.cholesky(torch.tensor(np.stack([r[1] for r in rows])))[:, None],
    )
    mean = torch.tensor(np.stack([r[2] for r in rows]))
    tril = torch.linalg.cholesky(torch.tensor(np.stack([r[3] for r in rows])))
    for name, alpha in K1_MEMBERS:
        value, error = cb.divergence_nd(name, mix, mean, tril, alpha, rule=rule)
        for i, (m0, S0, m1, S1) in enumerate(rows):
            exact = closed_form(name, alpha, m0, S0, m1, S1)
            if math.isinf(exact):
                assert value[i].item() == math.inf and error[i].item() == 0.0, (name, alpha, i)
                continue
            checked += 1
            if d <= 3:
                assert error[i].item() == 0.0
                assert value[i].item() == pytest.approx(exact, rel=1e-9), (d, name, alpha, i)
            else:
                assert 0.0 < error[i].item() < 0.02 * abs(exact), (d, name, alpha, i, error[i].item())
                assert abs(value[i].item() - exact) <= 4.0 * error[i].item(), (d, name, alpha, i)
    assert checked >= 15


# --- where the divergence is infinite -----------------------------------------------------------------


def sampled_verdict(a, covs, q_cov, directions) -> tuple[bool, float]:
    """(finite, margin) from the tilted precisions L_k = a Sigma_k^-1 + (1 - a) S^-1 on a dense set
    of unit directions u: for a > 1 finite iff min_u min_k u'L_k u > 0, for a < 0 iff
    min_u max_k u'L_k u > 0; ``margin`` is that minimum over the largest |u'L_k u| seen."""
    s_inv = np.linalg.inv(q_cov)
    forms = np.stack(
        [
            np.einsum("ni,ij,nj->n", directions, a * np.linalg.inv(c) + (1 - a) * s_inv, directions)
            for c in covs
        ]
    )
    worst = (forms.min(0) if a > 1 else forms.max(0)).min()
    return bool(worst > 0), float(worst / np.abs(forms).max())


def directions_on_sphere(d, n, seed=0):
    u = np.random.default_rng(seed).normal(size=(n, d))
    if d == 2:
        phi = np.linspace(0.0, np.pi, n, endpoint=False)
        u = np.stack([np.cos(phi), np.sin(phi)], -1)
    return u / np.linalg.norm(u, axis=-1, keepdims=True)


@pytest.mark.parametrize("d, K", [(2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (5, 2)])
def test_infinite_exactly_where_the_tilted_forms_say(d, K):
    """+inf exactly where a dense sampling of directions finds the integral of p^a q^(1-a) infinite
    (a = 2: some Lambda_k indefinite; a = -1/2: a direction where every Lambda_k is negative), and
    a finite value elsewhere; the KLs, Hellinger and Jensen-Shannon are finite on every row. Rows
    within 1e-3 of the boundary are left out (the sampling cannot decide them)."""
    rng = np.random.default_rng(10 * d + K)
    B = 16
    weights = rng.dirichlet(np.ones(K), size=B)
    means = rng.normal(size=(B, K, d)) * 2.0
    covs, q_covs = [], []
    for _ in range(B):
        rot = [np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(K + 1)]
        covs.append([r @ np.diag(np.exp(rng.uniform(-1.0, 1.0, d))) @ r.T for r in rot[:K]])
        q_covs.append(rot[K] @ np.diag(np.exp(rng.uniform(-1.5, 1.5, d))) @ rot[K].T)
    mix = MixtureND(
        torch.tensor(np.log(weights)),
        torch.tensor(means),
        torch.linalg.cholesky(torch.tensor(np.array(covs))),
    )
    mean = torch.tensor(rng.normal(size=(B, d)))
    tril = torch.linalg.cholesky(torch.tensor(np.array(q_covs)))
    u = directions_on_sphere(d, 4000 if d == 2 else 200000)
    rule = cb.Panels(order=2, panels=2) if d <= 3 else None  # coarse: only finiteness is checked here
    seen = {True: 0, False: 0}
    for name, alpha, a in [("chi2", None, 2.0), ("alpha", -0.5, -0.5), ("renyi", 1.5, -0.5)]:
        value, error = cb.divergence_nd(name, mix, mean, tril, alpha, rule=rule)
        finite = cb.finite_nd(name, mix, mean, tril, alpha)
        assert torch.equal(torch.isfinite(value), finite)
        assert torch.equal(error[~finite], torch.zeros_like(error[~finite]))
        for i in range(B):
            verdict, margin = sampled_verdict(a, covs[i], q_covs[i], u)
            if abs(margin) < 1e-3:
                continue
            assert bool(finite[i]) == verdict, (name, i, margin)
            seen[verdict] += 1
    assert seen[True] > 0 and seen[False] > 0, seen  # both kinds of row were decided
    for name in ("forward", "reverse", "hellinger", "jensen_shannon"):
        assert torch.isfinite(cb.divergence_nd(name, mix, mean, tril, rule=rule)[0]).all()


def test_negative_orders_with_three_components_in_3d_are_never_called_finite_wrongly():
    """K >= 3 in d >= 3, a < 0: finite only with a certificate (a positive definite convex combination
    of the tilted precisions), so a finite value is always right; the rows called +inf include every
    truly infinite one, and (a sufficient condition only) at most a few finite ones."""
    rng = np.random.default_rng(7)
    B, K, d = 40, 3, 3
    covs = [[np.diag(np.exp(rng.uniform(-1.0, 1.0, d))) for _ in range(K)] for _ in range(B)]
    q_covs = [np.diag(np.exp(rng.uniform(-1.0, 1.0, d))) for _ in range(B)]
    mix = MixtureND(
        torch.full((B, K), -math.log(K), dtype=torch.float64),
        torch.tensor(rng.normal(size=(B, K, d))),
        torch.linalg.cholesky(torch.tensor(np.array(covs))),
    )
    finite = cb.finite_nd(
        "alpha",
        mix,
        torch.zeros(B, d, dtype=torch.float64),
        torch.linalg.cholesky(torch.tensor(np.array(q_covs))),
        -1.0,
    )
    u = directions_on_sphere(d, 200000)
    verdicts = [sampled_verdict(-1.0, covs[i], q_covs[i], u) for i in range(B)]
    assert all(v for (v, _), f in zip(verdicts, finite.tolist()) if f)  # sound
    truly_finite = sum(v for v, m in verdicts if abs(m) > 1e-3)
    assert finite.sum().item() >= truly_finite - 2, (finite.sum().item(), truly_finite)
    assert 0 < finite.sum().item() < B


# --- derivatives ------------------------------------------------------------------------------------


def _entries(tril):
    return (
        [(0, 0), (1, 0), (1, 1)] if tril.shape[-1] == 2 else [(i, j) for i in range(3) for j in range(i + 1)]
    )


@pytest.mark.parametrize(
    "name, alpha",
    [
        ("forward", None),
        ("reverse", None),
        ("alpha", 2.0),
        ("alpha", -0.5),
        ("renyi", 0.5),
        ("hellinger", None),
        ("jensen_shannon", None),
    ],
)
def test_the_gradient_is_the_derivative_of_the_value_in_2d(name, alpha):
    """Autograd (nodes fixed, the integrand differentiated) against central differences of the value
    (nodes re-laid at each point) in the mean and in each entry of the Cholesky factor."""
    weights, means, covs, q_mean, q_cov = TARGETS_2D["overlapping"]
    mix = mixture(weights, means, covs)
    mean0, tril0 = gaussian(q_mean, q_cov)
    mean, tril = mean0.clone().requires_grad_(True), tril0.clone().requires_grad_(True)
    value, _ = cb.divergence_nd(name, mix, mean, tril, alpha)
    g_mean, g_tril = torch.autograd.grad(value.sum(), (mean, tril))
    h = 1e-4

    def at(m, L):
        return cb.divergence_nd(name, mix, m, L, alpha)[0].item()

    for j in range(2):
        e = torch.zeros_like(mean0)
        e[0, j] = h
        fd = (at(mean0 + e, tril0) - at(mean0 - e, tril0)) / (2 * h)
        assert g_mean[0, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-7), (name, "mean", j)
    for i, j in _entries(tril0):
        e = torch.zeros_like(tril0)
        e[0, i, j] = h
        fd = (at(mean0, tril0 + e) - at(mean0, tril0 - e)) / (2 * h)
        assert g_tril[0, i, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-7), (name, "tril", i, j)
    assert g_tril[0, 0, 1].item() == 0.0  # the upper triangle does not enter


def test_the_hessian_by_double_backward_is_the_derivative_of_the_gradient():
    """Reverse KL and chi2 in 2-D: the Hessian in (mean, lower triangle) by double backward against
    central differences of the autograd gradient."""
    weights, means, covs, q_mean, q_cov = TARGETS_2D["separated"]
    mix = mixture(weights, means, covs)
    mean0, tril0 = gaussian(q_mean, q_cov)
    x0 = torch.cat([mean0[0], tril0[0, 0, :1], tril0[0, 1]])

    for name in ("reverse", "chi2"):

        def f(x, name=name):
            L = torch.stack([torch.stack([x[2], torch.zeros_like(x[2])]), torch.stack([x[3], x[4]])])
            return cb.divergence_nd(name, mix, x[:2][None], L[None])[0].sum()

        def grad(x, f=f):
            x = x.clone().requires_grad_(True)
            return torch.autograd.grad(f(x), x)[0]

        hessian = torch.autograd.functional.hessian(f, x0)
        assert torch.allclose(hessian, hessian.T, rtol=1e-10, atol=1e-12)
        h = 1e-5
        for k in range(5):
            e = torch.zeros_like(x0)
            e[k] = h
            fd = (grad(x0 + e) - grad(x0 - e)) / (2 * h)
            assert torch.allclose(hessian[k], fd, rtol=1e-5, atol=1e-7), (name, k, hessian[k], fd)


def test_the_qmc_gradient_is_the_derivative_of_its_value():
    """QMC in d = 5 is a deterministic smooth function of Q for a seed (the points move with Q), so
    autograd matches central differences of the returned value."""
    m0, S0, m1, S1 = random_gaussian_pair(5, seed=3)
    m2, S2, _, _ = random_gaussian_pair(5, seed=4)
    mix = MixtureND(
        torch.log(torch.tensor([[0.6, 0.4]], dtype=torch.float64)),
        torch.tensor(np.stack([m0, m2 + 2.0]))[None],
        torch.linalg.cholesky(torch.tensor(np.stack([S0, S2])))[None],
    )
    mean0 = torch.tensor(m1)[None]
    tril0 = torch.linalg.cholesky(torch.tensor(S1))[None]
    rule = cb.QuasiMonteCarlo(points=256, randomisations=4, seed=5)
    for name, alpha in [("reverse", None), ("alpha", 0.3)]:
        mean, tril = mean0.clone().requires_grad_(True), tril0.clone().requires_grad_(True)
        value, _ = cb.divergence_nd(name, mix, mean, tril, alpha, rule=rule)
        g_mean, g_tril = torch.autograd.grad(value.sum(), (mean, tril))
        h = 1e-5
        for j in (0, 3):
            e = torch.zeros_like(mean0)
            e[0, j] = h
            fd = (
                cb.divergence_nd(name, mix, mean0 + e, tril0, alpha, rule=rule)[0]
                - cb.divergence_nd(name, mix, mean0 - e, tril0, alpha, rule=rule)[0]
            ).item() / (2 * h)
            assert g_mean[0, j].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
        e = torch.zeros_like(tril0)
        e[0, 2, 1] = h
        fd = (
            cb.divergence_nd(name, mix, mean0, tril0 + e, alpha, rule=rule)[0]
            - cb.divergence_nd(name, mix, mean0, tril0 - e, alpha, rule=rule)[0]
        ).item() / (2 * h)
        assert g_tril[0, 2, 1].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


# --- a row's bits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "d, rule",
    [
        (2, cb.Panels(panels=10)),
        (3, cb.Panels(panels=4)),
        (5, cb.QuasiMonteCarlo(points=512, randomisations=2)),
    ],
)
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(threads, d, rule):
    """Value and error of a row, alone, in the full batch and in a sub-batch: bit for bit, with the
    order set per row across negative, fractional and above-one values (tilted and envelope sources),
    on one thread and on two (where torch shares a tensor's elements between them). The panel counts
    are small to keep the test short: the code path is the default's."""
    rng = np.random.default_rng(d)
    B, K = 9, 2
    covs = []
    for _ in range(B):
        rotations = [np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(K)]
        covs.append([r @ np.diag(np.exp(rng.uniform(-1, 1, d))) @ r.T for r in rotations])
    mix = MixtureND(
        torch.tensor(np.log(rng.dirichlet(np.ones(K), size=B))),
        torch.tensor(rng.normal(size=(B, K, d)) * 2),
        torch.linalg.cholesky(torch.tensor(np.array(covs))),
    )
    mean = torch.tensor(rng.normal(size=(B, d)))
    tril = torch.linalg.cholesky(torch.tensor(np.array([np.eye(d) * v for v in rng.uniform(0.5, 2.0, B)])))
    members = [("jensen_shannon", None), ("alpha", torch.linspace(-1.0, 2.0, B))]
    if threads == 1:
        members.append(("reverse", None))
    with torch_threads(threads):
        for name, alpha in members:
            full = cb.divergence_nd(name, mix, mean, tril, alpha, rule=rule)
            for rows in (torch.tensor([0]), torch.tensor([4]), torch.arange(2, 7)):
                a = alpha[rows] if isinstance(alpha, torch.Tensor) else alpha
                part = cb.divergence_nd(name, mix[rows], mean[rows], tril[rows], a, rule=rule)
                for x, y in zip(full, part):
                    assert torch.equal(x[rows], y), (name, rows.tolist())
