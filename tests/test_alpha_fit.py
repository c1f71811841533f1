"""Fits under the alpha family: the KL ends, stationary minima, optima on the edge of the finite
region, starts where the divergence is infinite, and the sweep's alpha axis."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from scipy import optimize
from test_alpha_values import reference

from kl_sweep.core.divergences import DIVERGENCES, divergence_value
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Objective, Problem, Settings, Status, fit
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam


def problem(rows, alpha, max_steps=5000, tol=1e-8):
    """rows: (separation, weight, init_mu, init_sigma2); alpha: one value or one per row."""
    s, w, mu0, s20 = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    n = len(rows)
    mix = Mixture.two_component(s, w, torch.zeros(n), torch.ones(n))
    a = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float64).expand(n).clone()
    return Problem(
        mix, mu0, s20, torch.full((n,), 0.05), torch.full((n,), max_steps), torch.full((n,), tol), a
    )


def run(name, rows, alpha=None, fused=True, **kw):
    prob = problem(rows, alpha, **kw)
    return prob, fit(prob, Settings(DIVERGENCES[name], Quadrature(), Adam(), fused=fused))


ROWS = [(s, w, mu0, 1.0) for s in (0.0, 2.0, 5.0) for w in (0.3, 0.5, 0.8) for mu0 in (-2.0, 1.5)]


def test_alpha_one_is_moment_matching_to_1e8():
    prob, res = run("alpha", ROWS, 1.0)
    assert (res.status == Status.CONVERGED).all()
    mean, var = prob.mixture.mean(), prob.mixture.variance()
    np.testing.assert_allclose(res.mu.numpy(), mean.numpy(), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(res.sigma2.numpy(), var.numpy(), rtol=1e-8)


def test_alpha_near_zero_reproduces_the_reverse_kl_fits():
    _, rev = run("reverse", ROWS)
    _, near = run("alpha", ROWS, 1e-9)
    assert (near.status == Status.CONVERGED).all() and (rev.status == Status.CONVERGED).all()
    # Same basin from every start, and the optimum moves by O(1e-9) only.
    np.testing.assert_allclose(near.mu.numpy(), rev.mu.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(near.sigma2.numpy(), rev.sigma2.numpy(), rtol=1e-6)


CASES = [("alpha", a) for a in (-1.0, -0.5, 0.3, 0.7, 1.5, 2.0)] + [
    ("chi2", None),
    ("renyi", 0.5),
    ("renyi", 2.0),
    ("jensen_shannon", None),
    ("hellinger", None),
]


@pytest.mark.parametrize("name,alpha", CASES, ids=[f"{n}({a})" if a is not None else n for n, a in CASES])
def test_converged_rows_are_local_minima_by_autograd(name, alpha):
    rows = [(s, w, mu0, 1.0) for s in (1.0, 3.0, 6.0) for w in (0.5, 0.8) for mu0 in (-3.0, 0.5, 3.0)]
    prob, res = run(name, rows, alpha)
    assert (res.status == Status.CONVERGED).float().mean() > 0.9, res.status
    div = DIVERGENCES[name]
    checked = 0
    for i in torch.nonzero(res.status == Status.CONVERGED).flatten().tolist():
        one = prob.mixture[torch.tensor([i])]

        def f(t, one=one):
            return divergence_value(div, Quadrature(12), one, t[:1], t[1:], alpha).sum()

        theta = torch.tensor([res.mu[i].item(), 0.5 * math.log(res.sigma2[i].item())])
        g = torch.autograd.functional.jacobian(f, theta)
        h = torch.autograd.functional.hessian(f, theta)
        if res.on_boundary is not None and res.on_boundary[i]:
            # A constrained minimum: stationary along the edge, pushed outward, convex along it.
            assert abs(g[0].item()) <= 1e-7 and g[1].item() < 0 and h[0, 0].item() > 0, (rows[i], g, h)
        else:
            assert g.norm().item() <= 1e-7, (rows[i], g)
            assert torch.linalg.eigvalsh(h).min().item() > 0, (rows[i], h)
        checked += 1
    assert checked >= len(rows) * 0.9


def test_the_neyman_edge_optimum_of_the_issue_and_its_kkt_conditions():
    # alpha = -1, weight 0.5, separation 2.8: D_-1 is finite only for sigma^2 < 2 (and on the edge
    # with mu between the modes). The best Q sits on the edge, sigma^2 = 2 exactly.
    rows = [(2.8, 0.5, mu0, s20) for mu0 in (-1.0, 0.3, 1.0) for s20 in (0.5, 1.0, 1.9)]
    prob, res = run("alpha", rows, -1.0)
    assert (res.status == Status.CONVERGED).all()
    assert res.on_boundary.all()
    np.testing.assert_allclose(res.sigma2.numpy(), 2.0, rtol=1e-15)
    np.testing.assert_allclose(res.mu.numpy(), 0.0, atol=1e-9)
    # Independently (scipy quadrature and a scalar minimiser): along the edge the minimum is at
    # mu = 0, and inside the edge the value is higher, so the gradient pushes outward.
    along = optimize.minimize_scalar(
        lambda m: reference("alpha", -1.0, 2.8, 0.5, m, 2.0),
        bounds=(-1, 1),
        method="bounded",
        options={"xatol": 1e-8},
    )
    assert abs(along.x) < 1e-5
    on_edge = reference("alpha", -1.0, 2.8, 0.5, 0.0, 2.0)
    inside = reference("alpha", -1.0, 2.8, 0.5, 0.0, 2.0 * (1 - 1e-4))
    assert inside > on_edge
    got = divergence_value(
        DIVERGENCES["alpha"],
        Quadrature(12),
        prob.mixture[:1],
        res.mu[:1],
        0.5 * torch.log(res.sigma2[:1]),
        -1.0,
    )
    assert got.item() == pytest.approx(on_edge, rel=1e-9)


@pytest.mark.parametrize(
    "alpha,edge,mu0,inside_side",
    [(2.0, 0.5, 0.0, 1.0), (-1.0, 2.0, 0.0, -1.0), (3.0, 2.0 / 3.0, 1.0, 1.0), (-0.5, 3.0, -0.3, -1.0)],
)
def test_starts_on_either_side_of_an_edge(alpha, edge, mu0, inside_side):
    # 1e-6 to either side of the edge, and on it: inside fits, outside is reported infinite.
    eps = 1e-6
    starts = [edge * (1 + inside_side * eps), edge * (1 - inside_side * eps), edge]
    rows = [(3.0, 0.5, mu0, s) for s in starts]
    prob, res = run("alpha", rows, alpha)
    assert res.status[0].item() != Status.INFINITE
    assert res.status[1].item() == Status.INFINITE
    assert math.isinf(res.loss[1].item()) and res.loss[1].item() > 0
    # On the edge: finite only for a < 0 with mu strictly between the modes (-1.5, 1.5).
    on_edge_finite = alpha < 0 and -1.5 < mu0 < 1.5
    assert (res.status[2].item() != Status.INFINITE) == on_edge_finite


def test_the_optimiser_never_evaluates_where_the_divergence_is_infinite(monkeypatch):
    # The torch loop, observed at every evaluation; the kernel (whose steps happen in C) must then
    # reach the same points, which a step outside the finite region would have made impossible.
    rows = [(2.8, 0.5, 0.0, 1.99), (6.0, 0.5, 2.5, 1.9), (2.8, 0.7, 2.0, 0.51), (5.0, 0.5, -2.0, 0.55)]
    alphas = [-1.0, -1.0, 2.0, 2.0]
    _, fused = run("alpha", rows, alphas)
    seen = []
    original = Objective.derivatives

    def recording(self, theta, hessian):
        seen.append(self.divergence.finite(self.mixture, theta[:, 0], theta[:, 1], self.alpha).all().item())
        return original(self, theta, hessian)

    monkeypatch.setattr(Objective, "derivatives", recording)
    # Starts close to the edges, with gradients that push across them.
    _, res = run("alpha", rows, alphas, fused=False)
    assert seen and all(seen)
    assert (res.status == Status.CONVERGED).all() and (fused.status == Status.CONVERGED).all()
    np.testing.assert_allclose(fused.mu.numpy(), res.mu.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fused.sigma2.numpy(), res.sigma2.numpy(), rtol=1e-10)


def test_a_sweep_over_alpha_is_one_batch_with_the_new_columns(tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "divergence=alpha",
        "divergence.alpha=-1,0,0.5,2",
        "separation=2.8",
        "weight=0.5",
        "init_mu=0.3",
        "init_sigma2=1,3",
        f"hydra.sweep.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Launching 1 jobs" in proc.stderr + proc.stdout  # one group: alpha is a row key
    t = pd.read_parquet(out / "results.parquet").sort_values(["alpha", "init_sigma2"], ignore_index=True)
    assert list(t.alpha) == [-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 2.0, 2.0]
    # alpha = -1 from sigma^2 = 3 starts outside (sigma^2 < 2 needed): infinite, no finite loss.
    assert t.status[1] == "infinite" and np.isposinf(t.loss[1])
    assert bool(t.on_boundary[0]) and t.sigma2[0] == pytest.approx(2.0, rel=1e-15)
    assert not t.on_boundary[2:].any()
    assert (t.status.drop(index=1) == "converged").all()
    # alpha = 0 is KL(Q||P): its loss column equals its kl_reverse column.
    assert t.loss[2] == pytest.approx(t.kl_reverse[2], rel=1e-9)


@pytest.mark.parametrize("alpha", [-0.5, -1.0, -2.0, -3.0])
def test_the_edge_pitchfork_matches_its_closed_form(alpha):
    # On the edge sigma^2 = (1 - a)/(-a) (v = 1, w = 1/2), p^a q^(1-a) is proportional to
    # exp(|a| mu x - |a| mu^2/2) / cosh(d x/2)^|a|, whose integral is a Beta function in mu. Its
    # log has zero curvature at mu = 0 where d^2 = 2 |a| psi_1(|a|/2) (trigamma): d = pi at a = -1.
    from scipy.special import polygamma

    from kl_sweep.core.bifurcation import edge_pitchfork
    from kl_sweep.core.landscape import Landscape

    got = edge_pitchfork(Landscape(DIVERGENCES["alpha"], alpha=alpha), (0.5, 12.0))
    want = math.sqrt(2 * abs(alpha) * polygamma(1, abs(alpha) / 2))
    assert got.numel() == 1
    assert got.item() == pytest.approx(want, rel=1e-9)
    if alpha == -1.0:
        assert got.item() == pytest.approx(math.pi, rel=1e-12)
