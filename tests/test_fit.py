"""The batched fit: optima against closed forms, stationarity, statuses, batching."""

import itertools

import numpy as np
import pytest
import torch
from conftest import MEMBERS, random_rows, torch_threads

from kl_sweep.core.divergences import DIVERGENCES, divergence_value
from kl_sweep.core.estimators import Grid, MonteCarlo, Quadrature
from kl_sweep.core.fit import Objective, Problem, Settings, Status, fit, fit_stream
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import SGD, Adam


def problem(rows, lr=0.05, max_steps=5000, tol=1e-8, component_var=None):
    """rows: (separation, weight, component_var, init_mu, init_sigma2)."""
    s, w, v, mu0, s20 = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    mix = Mixture.two_component(s, w, torch.zeros_like(s), v)
    n = len(rows)
    return Problem(
        mix,
        mu0,
        s20,
        torch.full((n,), lr),
        torch.full((n,), max_steps, dtype=torch.long),
        torch.full((n,), tol),
    )


FORWARD_TABLE = list(
    itertools.product([0.0, 1.0, 3.0, 7.5], [0.1, 0.5, 0.9], [0.25, 1.0, 4.0], [-4.0, 1.0], [0.3, 5.0])
)


def test_forward_optimum_is_moment_matching_to_1e8_relative():
    prob = problem(FORWARD_TABLE)
    res = fit(prob, Settings(DIVERGENCES["forward"], Quadrature(), Adam()))
    assert (res.status == Status.CONVERGED).all()
    mean, var = prob.mixture.mean(), prob.mixture.variance()
    scale = torch.sqrt(var)  # mu's error measured against P's spread (mean can be 0)
    assert ((res.mu - mean).abs() / scale).max().item() < 1e-8
    assert ((res.sigma2 - var).abs() / var).max().item() < 1e-8
    assert (res.grad_norm <= 1e-8).all()


def test_forward_at_zero_separation_reaches_kl_zero():
    prob = problem([(0.0, 0.3, 2.0, 1.5, 0.5)])
    res = fit(prob, Settings(DIVERGENCES["forward"], Quadrature(), Adam()))
    assert res.mu.item() == pytest.approx(0.0, abs=1e-10)
    assert res.sigma2.item() == pytest.approx(2.0, rel=1e-10)
    assert abs(res.loss.item()) < 1e-14


REVERSE_TABLE = list(
    itertools.product([0.5, 2.5, 4.0, 6.0, 10.0], [0.2, 0.5, 0.85], [1.0], [-3.0, 0.0, 0.7, 3.0], [1.0])
)


def test_converged_reverse_fits_are_stationary_local_minima():
    prob = problem(REVERSE_TABLE)
    div = DIVERGENCES["reverse"]
    res = fit(prob, Settings(div, Quadrature(), Adam()))
    assert (res.status == Status.CONVERGED).all()
    for i in range(len(REVERSE_TABLE)):  # an independent autograd check, row by row
        mix = prob.mixture[torch.tensor([i])]

        def loss(theta, mix=mix):
            return divergence_value(div, Quadrature(), mix, theta[:1], theta[1:]).sum()

        theta = torch.tensor([res.mu[i].item(), 0.5 * torch.log(res.sigma2[i]).item()])
        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(t), t)
        hess = torch.autograd.functional.hessian(loss, theta)
        assert grad.norm().item() <= 1e-8, REVERSE_TABLE[i]
        assert torch.linalg.eigvalsh(hess).min().item() > 0, REVERSE_TABLE[i]


def test_reverse_at_separation_6_has_mirror_modes_and_a_centred_solution():
    prob = problem([(6.0, 0.5, 1.0, -3.0, 1.0), (6.0, 0.5, 1.0, 3.0, 1.0), (6.0, 0.5, 1.0, 0.0, 1.0)])
    res = fit(prob, Settings(DIVERGENCES["reverse"], Quadrature(), Adam()))
    left, right, centre = 0, 1, 2
    assert res.mu[left].item() == pytest.approx(-res.mu[right].item(), abs=1e-10)
    assert res.sigma2[left].item() == pytest.approx(res.sigma2[right].item(), rel=1e-10)
    assert res.loss[left].item() == pytest.approx(res.loss[right].item(), rel=1e-12)
    assert -3.1 < res.mu[left].item() < -2.9  # on the left mode
    assert abs(res.mu[centre].item()) < 1e-8  # centred, and much wider than a mode
    assert res.sigma2[centre].item() > 4 * res.sigma2[left].item()
    assert (res.status == Status.CONVERGED).all()


@pytest.mark.parametrize("estimator", [Quadrature(), Grid(2001)])
def test_closed_form_derivatives_equal_autograd(estimator):
    rows = [(3.0, 0.7, 1.0, 0.4, 1.7), (8.0, 0.2, 0.5, -2.0, 0.6), (0.0, 0.5, 2.0, 1.0, 3.0)]
    prob = problem(rows)
    theta = torch.stack([prob.init_mu + 0.1, 0.5 * torch.log(prob.init_sigma2) - 0.2], -1)
    for name, alpha in MEMBERS:
        div = DIVERGENCES[name]
        per_row = None if alpha is None else torch.full((len(rows),), alpha)
        obj = Objective.build(div, estimator, prob.mixture, theta, per_row)
        loss, grad, hess = obj.derivatives(theta, hessian=True)
        for i in range(len(rows)):
            if not torch.isfinite(loss[i]):
                assert not div.finite(prob.mixture[torch.tensor([i])], theta[i, :1], theta[i, 1:], alpha)
                continue

            def f(t, i=i, div=div, alpha=alpha):
                one = prob.mixture[torch.tensor([i])]
                return divergence_value(div, estimator, one, t[:1], t[1:], alpha).sum()

            t = theta[i].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(t), t)
            h = torch.autograd.functional.hessian(f, theta[i])
            assert loss[i].item() == pytest.approx(f(theta[i]).item(), rel=1e-12, abs=1e-14)
            np.testing.assert_allclose(grad[i].numpy(), g.numpy(), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(hess[i].numpy(), h.numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gets_the_same_derivative_bits_wherever_it_sits_in_a_batch(threads):
    """As fits run (no graph), on 1 and 2 threads: with 2 threads each thread's share of a flattened
    [B, N] tensor ends inside some row, and an op whose vector loop and scalar tail round
    differently (torch.logaddexp, softplus, sigmoid) would change that row's bits."""
    n = 400
    mix, theta = random_rows(n, seed=11)
    sizes = range(290, 400, 3)  # batches of > 32768 elements: split between the threads
    with torch_threads(threads):
        for name, alpha in [("reverse", None), ("jensen_shannon", None), ("hellinger", None), ("alpha", 2.0)]:
            per_row = None if alpha is None else torch.full((n,), alpha)
            with torch.no_grad():
                obj = Objective.build(DIVERGENCES[name], Quadrature(), mix, theta, per_row)
                full = obj.derivatives(theta, hessian=True)
                changed = 0
                for b in sizes:
                    keep = torch.arange(n) >= n - b  # the last b rows: each sits elsewhere in the batch
                    part = obj.subset(keep).derivatives(theta[keep], hessian=True)
                    for x, y in zip(full, part):
                        same = (x[keep] == y) | (x[keep].isnan() & y.isnan())
                        changed += int((~same).reshape(b, -1).any(-1).sum())
            assert changed == 0, (name, changed)


@pytest.mark.parametrize("threads", [1, 2])
def test_log_densities_get_the_same_bits_wherever_an_element_sits(threads):
    """The elementwise pieces of the fit's integrands, element by element (the derivative test above
    sees them only through sums): log p of the mixture, logaddexp, softplus, the JS terms."""
    from kl_sweep.core import alpha as family
    from kl_sweep.core.mixture import logaddexp, softplus

    gen = torch.Generator().manual_seed(5)
    n, nodes = 1200, 114
    mix = Mixture.two_component(
        torch.rand(n, generator=gen) * 3,
        0.5 + 0.45 * torch.rand(n, generator=gen),
        torch.zeros(n),
        torch.ones(n),
    )
    z = torch.randn(n, nodes, generator=gen) * 3
    origin, scale = torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.5
    log_q = -0.5 * z * z - 1.0
    with torch_threads(threads):
        with torch.no_grad():
            pieces = {
                "log_prob_standard": lambda k: mix[k].log_prob_standard(z[k], origin[k], scale[k]),
                "logaddexp": lambda k: logaddexp(z[k], log_q[k]),
                "softplus": lambda k: softplus(z[k]),
                "jensen_shannon_density": lambda k: family.jensen_shannon_density(z[k], log_q[k]),
                "jensen_shannon_derivatives": lambda k: family.jensen_shannon_weighted_derivatives(
                    z[k], log_q[k]
                )[1],
            }
            for name, piece in pieces.items():
                full = piece(torch.ones(n, dtype=torch.bool))
                changed = 0
                for b in range(300, n, 7):  # > 32768 elements: split between the threads
                    keep = torch.arange(n) >= n - b
                    changed += int((piece(keep) != full[keep]).any(-1).sum())
                assert changed == 0, (name, changed)


def test_a_row_fits_the_same_alone_or_in_a_batch():
    rows = REVERSE_TABLE[:12]
    together = fit(problem(rows), Settings(DIVERGENCES["reverse"], Quadrature(), Adam()))
    alone = fit(problem(rows[5:6]), Settings(DIVERGENCES["reverse"], Quadrature(), Adam()))
    assert together.mu[5].item() == alone.mu[0].item()
    assert together.sigma2[5].item() == alone.sigma2[0].item()
    assert together.steps[5].item() == alone.steps[0].item()


@pytest.mark.parametrize("name", ["forward", "reverse"])
def test_a_stream_fits_each_block_as_a_fit_of_its_own(name):
    """Blocks of a stream join while others are still at work, and still give every row the steps it
    takes alone (they join only when the handover check falls): the same bits, block by block.
    The stepwise path (``fused=False``): the fused kernel fits each block whole, with no stream."""
    gen = torch.Generator().manual_seed(7)
    n = 240
    rows = list(
        zip(
            (torch.rand(n, generator=gen) * 7).tolist(),
            (0.5 + 0.45 * torch.rand(n, generator=gen)).tolist(),
            [1.0] * n,
            (torch.rand(n, generator=gen) * 8 - 4).tolist(),
            (0.2 + 3 * torch.rand(n, generator=gen)).tolist(),
        )
    )
    settings = Settings(DIVERGENCES[name], Quadrature(), Adam(), fused=False)
    cuts = [0, 37, 120, 121, 200, n]
    blocks = [problem(rows[a:b]) for a, b in zip(cuts, cuts[1:])]
    alone = [fit(b, settings) for b in blocks]
    streamed, asked = [], []

    def source():
        for block in blocks:
            asked.append(len(streamed))  # results out when this block was asked for
            yield block

    for result in fit_stream(source(), settings, capacity=60):
        streamed.append(result)
    assert len(streamed) == len(blocks)
    for got, want in zip(streamed, alone):
        for field in ("mu", "sigma2", "loss", "grad_norm", "steps", "status"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
    # The stream overlapped blocks: blocks were taken on before the one ahead of them had finished.
    assert sum(a < k for k, a in enumerate(asked)) >= 3


def test_per_row_learning_rates_are_used():
    prob = problem([(3.0, 0.6, 1.0, 2.0, 1.0)] * 2, max_steps=20)
    prob = Problem(
        prob.mixture, prob.init_mu, prob.init_sigma2, torch.tensor([0.01, 0.1]), prob.max_steps, prob.tol
    )
    res = fit(prob, Settings(DIVERGENCES["reverse"], Quadrature(), Adam(), polish=False))
    assert res.mu[0].item() != res.mu[1].item()
    assert (res.status == Status.MAX_STEPS).all() and (res.steps == 20).all()


def test_without_polish_adam_runs_to_its_budget_and_keeps_finite_values():
    res = fit(
        problem([(3.0, 0.75, 1.0, 1.0, 1.0)], max_steps=300),
        Settings(DIVERGENCES["reverse"], Quadrature(), Adam(), polish=False),
    )
    assert res.status.item() == Status.MAX_STEPS
    assert res.steps.item() == 300
    assert 1e-8 < res.grad_norm.item() < 1e-1 and torch.isfinite(res.loss).all()


def test_sgd_with_momentum_converges():
    res = fit(
        problem([(2.0, 0.5, 1.0, 1.0, 1.0), (5.0, 0.8, 1.0, -2.0, 1.0)], lr=0.02),
        Settings(DIVERGENCES["reverse"], Quadrature(), SGD(0.9)),
    )
    assert (res.status == Status.CONVERGED).all()


def test_exploding_sgd_is_marked_diverged_with_its_last_finite_values():
    res = fit(
        problem([(3.0, 0.5, 1.0, 1.0, 1.0)], lr=10.0, max_steps=500),
        Settings(DIVERGENCES["forward"], Quadrature(), SGD(0.9), polish=False),
    )
    assert res.status.item() == Status.DIVERGED
    assert (
        torch.isfinite(res.mu).all() and torch.isfinite(res.sigma2).all() and torch.isfinite(res.loss).all()
    )


def test_monte_carlo_fit_is_reproducible_and_close_to_the_exact_optimum():
    rows = [(2.0, 0.7, 1.0, 0.5, 1.0)]
    settings = Settings(DIVERGENCES["forward"], MonteCarlo(num_samples=50000, seed=1), Adam())
    a, b = fit(problem(rows), settings), fit(problem(rows), settings)
    assert a.mu.item() == b.mu.item() and a.sigma2.item() == b.sigma2.item()
    exact = fit(problem(rows), Settings(DIVERGENCES["forward"], Quadrature(), Adam()))
    # The sample-average optimum is the sample's moments: within a few standard errors of P's.
    se_mu = (exact.sigma2.sqrt() / 50000**0.5).item()
    assert abs(a.mu.item() - exact.mu.item()) < 4 * se_mu
    assert a.status.item() == Status.CONVERGED
