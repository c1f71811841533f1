"""d dimensions (issue 21): the reduction to 1-D against scipy, the closed forms of Bishop's fig. 10.2
and of Margossian and Saul, the affine invariance of a full Q, and the forward KL's moment matching.

Every expected value comes from an independent method: scipy's adaptive cubature in 2-D, textbook
closed forms written out here in numpy, and the 1-D fits of the existing core at the Mahalanobis
separation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Problem, Settings, Status, fit
from kl_sweep.core.gaussians import Family
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam
from kl_sweep.core.reduction import ReducedObjective, SharedPair, exact_value

F64 = torch.float64


def pair(separation, weight, center, var, rho, dim, direction) -> SharedPair:
    def col(x):
        return torch.as_tensor(np.atleast_1d(np.asarray(x, dtype=float)), dtype=F64)

    cols = [col(v) for v in (separation, weight, center, var, rho)]
    n = max(len(c) for c in cols)
    cols = [c.expand(n).clone() for c in cols]
    return SharedPair(*cols, dim=dim, direction=direction)


def fit_rows(
    target: SharedPair, family: str, divergence: str, init_mu, alpha=None, init_sigma2=1.0, fused=True
):
    B = target.separation.shape[0]
    one = torch.ones(B, dtype=F64)
    problem = Problem(
        target.line(),
        torch.as_tensor(init_mu, dtype=F64).expand(B).clone(),
        init_sigma2 * one,
        0.05 * one,
        torch.full((B,), 5000),
        1e-8 * one,
        alpha=None if alpha is None else alpha * one,
        target=target,
        family=Family(family, target.dim),
    )
    return fit(problem, Settings(DIVERGENCES[divergence], Quadrature(6), Adam(), fused=fused))


def numpy_target(separation, weight, center, var, rho, dim, direction):
    u = np.eye(dim)[0] if direction == "axis" else np.ones(dim) / math.sqrt(dim)
    R = (1 - rho) * np.eye(dim) + rho * np.ones((dim, dim))
    c = center * np.ones(dim)
    return c - separation / 2 * u, c + separation / 2 * u, var * R, u


# --- the reduction against scipy's adaptive cubature in 2-D ----------------------------------------

CASE = dict(separation=2.5, weight=0.7, center=0.3, var=1.3, rho=0.6, dim=2, direction="diagonal")
THETA = [0.4, -0.2, math.log(1.6), 0.3, math.log(1.5)]  # a full Q: mean, then L's lower triangle
#: A narrower Q, where D_a at a = -0.5 is finite (a Sigma^-1 + (1 - a) S^-1 positive definite).
NARROW = [0.4, -0.2, math.log(1.1), 0.3, math.log(0.8)]


def densities(values):
    """p and q as plain functions of (x, y) (closed-form 2-D Gaussians: scipy's integrator calls
    them a few hundred thousand times), and theta."""
    m1, m2, cov, _ = numpy_target(**CASE)
    theta = torch.tensor([values], dtype=F64)
    mean, L = Family("full", 2).scale_tril(theta)

    def gaussian(m, c):
        (a, b), (_, d) = np.linalg.inv(c)
        norm = 1.0 / (2 * math.pi * math.sqrt(np.linalg.det(c)))
        m0, m1_ = float(m[0]), float(m[1])

        def pdf(x, y):
            u, v = x - m0, y - m1_
            return norm * math.exp(-0.5 * (a * u * u + 2 * b * u * v + d * v * v))

        return pdf

    P1, P2 = gaussian(m1, cov), gaussian(m2, cov)
    Q = gaussian(mean[0].numpy(), (L @ L.mT)[0].numpy())
    w = CASE["weight"]

    def p(x, y):
        return w * P1(x, y) + (1 - w) * P2(x, y)

    return p, Q, theta


def cubature(f) -> float:
    return integrate.dblquad(lambda y, x: f(x, y), -14, 14, -14, 14, epsabs=1e-12, epsrel=1e-10)[0]


KL_Q = lambda p, q: cubature(lambda x, y: q(x, y) * math.log(q(x, y) / p(x, y)))  # noqa: E731
KL_P = lambda p, q: cubature(lambda x, y: p(x, y) * math.log(p(x, y) / q(x, y)))  # noqa: E731
ROOT = lambda p, q: cubature(lambda x, y: math.sqrt(p(x, y) * q(x, y)))  # noqa: E731


@pytest.mark.parametrize(
    "name, alpha, theta, reference",
    [
        ("reverse", None, THETA, KL_Q),
        ("reverse", None, NARROW, KL_Q),
        ("forward", None, THETA, KL_P),
        ("forward", None, NARROW, KL_P),
        ("alpha", 0.5, THETA, lambda p, q: (1 - ROOT(p, q)) / 0.25),
        ("alpha", 2.0, THETA, lambda p, q: (1 - cubature(lambda x, y: p(x, y) ** 2 / q(x, y))) / -2.0),
        (
            "alpha",
            -0.5,
            NARROW,
            lambda p, q: (1 - cubature(lambda x, y: p(x, y) ** -0.5 * q(x, y) ** 1.5)) / -0.75,
        ),
        ("renyi", 0.5, THETA, lambda p, q: math.log(ROOT(p, q)) / -0.5),
        ("hellinger", None, THETA, lambda p, q: 1 - ROOT(p, q)),
        ("chi2", None, THETA, lambda p, q: cubature(lambda x, y: p(x, y) ** 2 / q(x, y)) - 1),
    ],
)
def test_every_reducible_divergence_matches_scipy_cubature_in_2d(name, alpha, theta, reference):
    p, q, theta = densities(theta)
    expected = reference(p, q)
    target = pair(**CASE)
    alpha_t = None if alpha is None else torch.tensor([alpha], dtype=F64)
    got = exact_value(DIVERGENCES[name], target, Family("full", 2), theta, alpha_t).item()
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_an_infinite_alpha_divergence_is_reported_infinite():
    """a = -0.5 with Q wider than the components: a S^-1... not positive definite, so +inf (a
    box-limited quadrature would return a large finite number)."""
    target = pair(**CASE)
    wide = torch.tensor([[0.0, 0.0, math.log(3.0), 0.0, math.log(3.0)]], dtype=F64)
    narrow = torch.tensor([NARROW], dtype=F64)
    a = torch.tensor([-0.5], dtype=F64)
    assert exact_value(DIVERGENCES["alpha"], target, Family("full", 2), wide, a).item() == math.inf
    assert math.isfinite(exact_value(DIVERGENCES["alpha"], target, Family("full", 2), narrow, a).item())


@pytest.mark.parametrize("family", ["full", "diag", "iso"])
@pytest.mark.parametrize("dim", [2, 4])
def test_closed_form_reverse_derivatives_equal_autograd(family, dim):
    g = torch.Generator().manual_seed(dim)
    B = 6
    target = SharedPair(
        4 * torch.rand(B, dtype=F64, generator=g),
        0.3 + 0.5 * torch.rand(B, dtype=F64, generator=g),
        torch.randn(B, dtype=F64, generator=g),
        0.5 + torch.rand(B, dtype=F64, generator=g),
        torch.full((B,), 0.4, dtype=F64),
        dim,
        "diagonal",
    )
    fam = Family(family, dim)
    theta = 0.3 * torch.randn(B, fam.n_params, dtype=F64, generator=g)
    objective = ReducedObjective.build(DIVERGENCES["reverse"], Quadrature(6), target, fam)
    loss, grad, hess = objective.derivatives(theta, hessian=True)
    ref = objective._through_line(theta, True, "reverse")  # autograd through the closed forms
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hess, ref[2], rtol=1e-10, atol=1e-12)
    # and against central differences of the loss, independently of both
    eps = 1e-6
    for i in range(fam.n_params):
        step = torch.zeros_like(theta)
        step[:, i] = eps
        fd = (objective(theta + step) - objective(theta - step)) / (2 * eps)
        torch.testing.assert_close(grad[:, i], fd, rtol=1e-6, atol=1e-7)


# --- closed forms: Bishop fig. 10.2, Margossian and Saul -----------------------------------------


def test_bishop_fig_10_2_diag_reverse_shrinks_forward_keeps_marginals_full_recovers_R():
    rho = 0.9
    target = pair(0.0, 0.5, 0.0, 1.0, rho, 2, "axis")
    rev = fit_rows(target, "diag", "reverse", 0.5)
    fwd = fit_rows(target, "diag", "forward", 0.5)
    R = np.array([[1, rho], [rho, 1]])
    for result, expected in ((rev, 1 / np.diag(np.linalg.inv(R))), (fwd, np.diag(R))):
        assert int(result.status[0]) == Status.CONVERGED
        S = Family("diag", 2).covariance(result.theta)[1][0].numpy()
        np.testing.assert_allclose(np.diag(S), expected, rtol=1e-8)
    np.testing.assert_allclose(np.diag(S), [1.0, 1.0], rtol=1e-8)
    assert 1 / np.linalg.inv(R)[0, 0] == pytest.approx(1 - rho**2)
    for name in ("reverse", "forward"):
        full = fit_rows(target, "full", name, 0.5)
        S = Family("full", 2).covariance(full.theta)[1][0].numpy()
        np.testing.assert_allclose(S, R, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dim", [2, 5, 10])
@pytest.mark.parametrize("rho", [-0.1, 0.3, 0.9])
def test_margossian_saul_variance_ratio_and_entropy_gap_of_the_diag_fit(dim, rho):
    """P = N(0, R) equicorrelated: the diag reverse-KL fit has variances 1/(R^-1)_ii, so its
    variance ratio is that and its entropy gap H(P) - H(Q) = (log det R - sum log 1/(R^-1)_ii) / 2."""
    if rho <= -1 / (dim - 1):
        pytest.skip("R is not positive definite")  # never taken for these values
    target = pair(0.0, 0.5, 0.0, 1.0, rho, dim, "axis")
    result = fit_rows(target, "diag", "reverse", 0.3)
    assert int(result.status[0]) == Status.CONVERGED
    R = (1 - rho) * np.eye(dim) + rho * np.ones((dim, dim))
    variances = 1 / np.diag(np.linalg.inv(R))
    S = Family("diag", dim).covariance(result.theta)[1][0].numpy()
    np.testing.assert_allclose(np.diag(S), variances, rtol=1e-8)
    gap = 0.5 * (np.linalg.slogdet(R)[1] - np.log(variances).sum())
    got_gap = 0.5 * (target.log_det_cov() - Family("diag", dim).log_det(result.theta)).item()
    assert got_gap == pytest.approx(gap, rel=1e-7, abs=1e-9)
    assert gap >= 0  # a mean-field Q under-reports the entropy: the trade-off's shrinkage


# --- a full Q is affine invariant: its minima are the 1-D minima at the Mahalanobis separation ---


def one_d_minima(delta: float, weight: float) -> list[tuple[float, float, float]]:
    """Every distinct minimum (mu, sigma2, loss) of the 1-D reverse KL at separation delta, unit
    variances, found by the existing 1-D core from a grid of starts."""
    starts = torch.linspace(-8, 8, 33, dtype=F64)
    B = len(starts)
    one = torch.ones(B, dtype=F64)
    mixture = Mixture.two_component(delta * one, weight * one, 0 * one, one)
    problem = Problem(mixture, starts, one, 0.05 * one, torch.full((B,), 5000), 1e-10 * one)
    result = fit(problem, Settings(DIVERGENCES["reverse"], Quadrature(6), Adam()))
    found = []
    for mu, s2, loss in zip(result.mu.tolist(), result.sigma2.tolist(), result.loss.tolist()):
        if not any(abs(mu - f[0]) < 1e-6 for f in found):
            found.append((mu, s2, loss))
    return found


@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("direction", ["axis", "diagonal"])
def test_full_q_minima_are_the_1d_minima_at_the_mahalanobis_separation(dim, direction):
    weight, center, var, rho, delta = 0.6, 0.4, 1.7, 0.5, 5.0
    *_, cov, u = numpy_target(1.0, weight, center, var, rho, dim, direction)
    separation = delta / math.sqrt(u @ np.linalg.solve(cov, u))  # the same Mahalanobis separation
    m1, m2, cov, u = numpy_target(separation, weight, center, var, rho, dim, direction)
    assert math.sqrt((m2 - m1) @ np.linalg.solve(cov, m2 - m1)) == pytest.approx(delta)
    minima = one_d_minima(delta, weight)
    assert len(minima) == 2  # this separation is bistable in 1-D
    starts = [-4.0, -1.0, 0.5, 2.0, 4.0]
    target = pair(separation, weight, center, var, rho, dim, direction)
    target = SharedPair(
        *(getattr(target, f).expand(len(starts)).clone() for f in SharedPair.FIELDS), dim, direction
    )
    result = fit_rows(target, "full", "reverse", starts)
    b = np.linalg.solve(cov, u) / math.sqrt(u @ np.linalg.solve(cov, u))  # tau = b^T (x - c 1)
    sb = cov @ b
    mean, S = Family("full", dim).covariance(result.theta)
    seen = set()
    for i in range(len(starts)):
        assert int(result.status[i]) == Status.CONVERGED
        match = [k for k, (m, _, _) in enumerate(minima) if abs(m - b @ (mean[i].numpy() - center)) < 1e-6]
        assert len(match) == 1
        m, s2, loss = minima[match[0]]
        seen.add(match[0])
        np.testing.assert_allclose(mean[i].numpy(), center + m * sb, rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(S[i].numpy(), cov + (s2 - 1) * np.outer(sb, sb), rtol=1e-7, atol=1e-8)
        kl = exact_value(
            DIVERGENCES["reverse"], target[torch.tensor([i])], Family("full", dim), result.theta[i : i + 1]
        )
        assert kl.item() == pytest.approx(loss, rel=1e-8, abs=1e-12)
    assert seen == {0, 1}  # both modes are reached from these starts


# --- the forward KL: moment matching in each family --------------------------------------------


@pytest.mark.parametrize("family", ["full", "diag", "iso"])
def test_forward_fit_is_the_family_moment_match(family):
    dim, direction = 3, "diagonal"
    separation, weight, center, var, rho = 2.5, 0.7, -0.5, 1.4, 0.3
    m1, m2, cov, u = numpy_target(separation, weight, center, var, rho, dim, direction)
    mean_p = weight * m1 + (1 - weight) * m2
    cov_p = cov + weight * (1 - weight) * np.outer(m2 - m1, m2 - m1)
    expected = {"full": cov_p, "diag": np.diag(np.diag(cov_p)), "iso": np.trace(cov_p) / dim * np.eye(dim)}
    result = fit_rows(pair(separation, weight, center, var, rho, dim, direction), family, "forward", 1.0)
    assert int(result.status[0]) == Status.CONVERGED
    mean, S = Family(family, dim).covariance(result.theta)
    np.testing.assert_allclose(mean[0].numpy(), mean_p, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(S[0].numpy(), expected[family], rtol=1e-8, atol=1e-10)


def test_converged_d_dimensional_fits_are_minima():
    """Gradient norm <= tol and a positive-definite Hessian, for each family and both KLs."""
    target = pair([0.0, 2.0, 4.0], [0.5, 0.6, 0.8], 0.0, 1.0, 0.5, 3, "axis")
    for family in ("full", "diag", "iso"):
        for name in ("reverse", "forward", "hellinger") if family == "full" else ("reverse", "forward"):
            result = fit_rows(target, family, name, 1.0)
            assert (result.status == Status.CONVERGED).all()
            assert (result.grad_norm <= 1e-8).all()
            objective = ReducedObjective.build(DIVERGENCES[name], Quadrature(6), target, Family(family, 3))
            _, _, hess = objective.derivatives(result.theta, hessian=True)
            assert (torch.linalg.eigvalsh(hess) > 0).all()


# --- general targets: integrated in R^d, checked against the reduction ---------------------------


def test_a_general_target_of_two_shared_components_fits_as_the_reduction_does(tmp_path):
    """The same P, once as keys (reduced to 1-D exactly) and once as a target file (integrated in
    2-D by nested panels): the fits and their losses agree."""
    import pandas as pd

    from kl_sweep.rows import rows_frame
    from kl_sweep.table import run_rows

    m1, m2, cov, _ = numpy_target(3.0, 0.7, 0.2, 1.1, 0.5, 2, "diagonal")
    path = tmp_path / "pair.yaml"
    covs = [cov.tolist(), cov.tolist()]
    path.write_text(f"weights: [0.7, 0.3]\nmeans: [{m1.tolist()}, {m2.tolist()}]\ncovs: {covs}\n")
    base = {
        **{"estimator.name": "quadrature", "estimator.nodes_per_panel": 6, "optimizer.name": "adam"},
        **{"optimizer.beta1": 0.9, "optimizer.beta2": 0.999, "optimizer.eps": 1e-8, "polish": True},
        **{"divergence.name": "reverse", "dim": 2, "q_family": "full", "direction": "axis"},
    }
    rows = rows_frame(
        {
            **{"separation": 3.0, "weight": 0.7, "center": 0.2, "component_var": 1.1, "init_mu": 1.0},
            **{"init_sigma2": 1.0, "optimizer.lr": 0.05, "optimizer.max_steps": 5000, "optimizer.tol": 1e-8},
        },
        1,
    )
    keys = run_rows(rows, {**base, "correlation": 0.5, "direction": "diagonal", "target.file": None})
    general = run_rows(rows, {**base, "correlation": 0.0, "target.file": str(path)})
    assert keys["status"].iloc[0] == general["status"].iloc[0] == "converged"
    np.testing.assert_allclose(
        list(general["mean"].iloc[0]), list(keys["mean"].iloc[0]), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(list(general["cov"].iloc[0]), list(keys["cov"].iloc[0]), rtol=1e-6, atol=1e-7)
    for column in ("loss", "kl_forward", "kl_reverse"):
        assert general[column].iloc[0] == pytest.approx(keys[column].iloc[0], rel=1e-7)
    assert isinstance(general, pd.DataFrame) and general["loss_error"].iloc[0] == 0.0


def test_d_dimensional_rows_run_in_blocks_within_the_hessian_budget(monkeypatch):
    """With a budget of 10 rows' Hessians, at most 1.5 blocks are at work whenever Hessians are
    formed, and every row's result is bit for bit the one of an unblocked fit (on the torch loop:
    the native kernel holds one row's Hessian at a time)."""
    import kl_sweep.core.fit as fit_module

    g = torch.Generator().manual_seed(3)
    B = 60
    target = SharedPair(
        6 * torch.rand(B, dtype=F64, generator=g),
        0.5 + 0.4 * torch.rand(B, dtype=F64, generator=g),
        torch.zeros(B, dtype=F64),
        torch.ones(B, dtype=F64),
        torch.full((B,), 0.5, dtype=F64),
        2,
        "axis",
    )
    starts = -3 + 6 * torch.rand(B, dtype=F64, generator=g)
    whole = fit_rows(target, "full", "reverse", starts, fused=False)
    seen = []
    original = ReducedObjective.derivatives

    def counting(self, theta, hessian):
        if hessian:
            seen.append(theta.shape[0])
        return original(self, theta, hessian)

    monkeypatch.setattr(ReducedObjective, "derivatives", counting)
    monkeypatch.setattr(fit_module, "HESSIAN_BUDGET", 10 * 5 * 5)
    blocked = fit_rows(target, "full", "reverse", starts, fused=False)
    assert seen and max(seen) <= 15
    for name in ("theta", "loss", "grad_norm", "steps", "status"):
        assert torch.equal(getattr(blocked, name), getattr(whole, name)), name


@pytest.mark.parametrize(("family", "dim"), [("full", 2), ("diag", 2), ("iso", 3), ("full", 4), ("diag", 6)])
def test_the_kernels_reverse_fits_in_d_dimensions_are_the_torch_loops(family, dim):
    """The native kernel's whole d > 1 reverse-KL fits (kl.c: reduced_fit) follow the torch loop's
    rules: the same status and minima equal to rounding (the loop's derivatives are torch's closed
    forms, checked against autograd and scipy above), on starts in both basins. Adam's path differs
    in its last bits, so a row may take a few steps more or fewer to the same minimum."""
    from kl_sweep.core import native

    assert native.available()  # (CI has a C compiler; tests/test_native.py checks the build)
    g = torch.Generator().manual_seed(11)
    B = 48
    target = SharedPair(
        6 * torch.rand(B, dtype=F64, generator=g),
        0.5 + 0.45 * torch.rand(B, dtype=F64, generator=g),
        torch.rand(B, dtype=F64, generator=g) - 0.5,
        0.5 + torch.rand(B, dtype=F64, generator=g),
        torch.full((B,), 0.4, dtype=F64),
        dim,
        "diagonal" if dim % 2 else "axis",
    )
    starts = -3 + 6 * torch.rand(B, dtype=F64, generator=g)
    kernel = fit_rows(target, family, "reverse", starts, init_sigma2=0.7)
    loop = fit_rows(target, family, "reverse", starts, init_sigma2=0.7, fused=False)
    assert torch.equal(kernel.status, loop.status) and (kernel.status == Status.CONVERGED).all()
    torch.testing.assert_close(kernel.theta, loop.theta, rtol=0, atol=1e-10)
    torch.testing.assert_close(kernel.loss, loop.loss, rtol=0, atol=1e-12)
    assert (kernel.grad_norm <= 1e-8).all()


def test_alpha_orders_0_and_1_in_one_batch_are_the_kl_limits():
    """divergence.alpha over 0, 1/2 and 1 as one batch in d = 2: the order-0 and order-1 rows are
    the reverse and forward KL fits (their limits), the 1/2 row the Hellinger fit scaled by 4."""
    target = pair([3.0, 3.0, 3.0], 0.7, 0.0, 1.0, 0.5, 2, "axis")
    alpha = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    B = 3
    one = torch.ones(B, dtype=F64)
    problem = Problem(
        target.line(),
        one,
        one,
        0.05 * one,
        torch.full((B,), 5000),
        1e-8 * one,
        alpha=alpha,
        target=target,
        family=Family("full", 2),
    )
    mixed = fit(problem, Settings(DIVERGENCES["alpha"], Quadrature(6), Adam()))
    assert (mixed.status == Status.CONVERGED).all()
    for row, name in ((0, "reverse"), (1, "hellinger"), (2, "forward")):
        alone = fit_rows(target[torch.tensor([row])], "full", name, 1.0)
        torch.testing.assert_close(mixed.theta[row], alone.theta[0], rtol=1e-7, atol=1e-8)
    exact = exact_value(DIVERGENCES["alpha"], target, Family("full", 2), mixed.theta, alpha)
    hellinger = exact_value(
        DIVERGENCES["hellinger"], target[torch.tensor([1])], Family("full", 2), mixed.theta[1:2]
    )
    kl = [
        exact_value(DIVERGENCES[n], target[torch.tensor([r])], Family("full", 2), mixed.theta[r : r + 1])
        for r, n in ((0, "reverse"), (2, "forward"))
    ]
    assert exact[0].item() == pytest.approx(kl[0].item(), rel=1e-12)
    assert exact[2].item() == pytest.approx(kl[1].item(), rel=1e-12)
    assert exact[1].item() == pytest.approx(4 * hellinger.item(), rel=1e-10)
